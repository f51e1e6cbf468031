"""Writes the measured-result tables of the README and docs/ from bench/results/*.json.

    python bench/tables.py            rewrite every table in place
    python bench/tables.py --check    exit 1 if any table differs from what the JSON gives

A table lives between two marker comments in a markdown file:

    <!-- table:KIND@STEM begin -->
    (generated: replaced on every run)
    <!-- table:KIND@STEM end -->

``KIND`` names a table layout (``python bench/tables.py --list``) and ``STEM`` the results file
``bench/results/STEM.json``; ``summary`` and ``runs`` take several, joined by ``+``
(``summary@amd-epyc-zen4+amd-epyc``). Every table starts with a caption naming the device, the
CPU path, the thread count, torch, the date of the run and the file it came from.

Figures are computed from the rows as ``bench/run.py`` stored them: ``ms`` is the median of a
row (the median run's median with ``--runs N``), ratios are ratios of those medians, and the
bracketed ranges are the ratios of each run's medians (``ms_runs``). Only the standard library is
used, so the check runs without torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import posixpath
import re
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
PER_CORE = "[1 thread, CPU time]"

MARKER = re.compile(r"<!--\s*table:(?P<name>[^\s>]+)\s+(?P<which>begin|end)\s*-->")


class TableError(Exception):
    """A marker, table name or results file that the generator cannot use."""


# --------------------------------------------------------------------------------------------
# results files


class Results:
    """One ``bench/results/STEM.json``."""

    def __init__(self, stem: str, data: dict, path: str):
        self.stem, self.data, self.path = stem, data, path
        if not isinstance(data, dict) or "meta" not in data or "kernels" not in data:
            raise TableError(f"{path}: not a bench/run.py results file (needs 'meta' and 'kernels')")
        self.meta = data["meta"]
        self.kernels = data["kernels"]

    def rows(self, kernel: str) -> list[dict]:
        if kernel not in self.kernels:
            raise TableError(f"{self.stem}.json has no '{kernel}' results "
                             f"(it has: {', '.join(self.kernels) or 'none'})")
        return self.kernels[kernel]

    def has(self, kernel: str) -> bool:
        return kernel in self.kernels

    def row(self, kernel: str, case: str, impl: str) -> dict:
        for r in self.rows(kernel):
            if r.get("case") == case and r.get("impl") == impl:
                return r
        raise TableError(f"{self.stem}.json: no '{kernel}' row with case '{case}' and impl '{impl}'")

    def find(self, kernel: str, case: str, impl: str) -> dict | None:
        for r in self.kernels.get(kernel, []):
            if r.get("case") == case and r.get("impl") == impl:
                return r
        return None

    def runs(self, kernel: str) -> int:
        """How many fresh-process runs the rows of ``kernel`` are the median of."""
        return max((len(r["ms_runs"]) for r in self.rows(kernel) if r.get("ms_runs")), default=1)

    def date(self, kernel: str) -> str:
        """When ``kernel`` finished (ISO 8601), else when the run started."""
        return self.data.get("kernel_dates", {}).get(kernel) or self.meta.get("date", "")

    def load(self, kernel: str) -> list | None:
        """The 1-minute load average when ``kernel`` started and finished, where recorded."""
        return self.data.get("kernel_load", {}).get(kernel)

    def env(self, kernel: str) -> dict:
        return self.data.get("kernel_env", {}).get(kernel, self.meta.get("threading_env", {})) or {}

    def device(self) -> str:
        m = self.meta
        name = m.get("device", "unknown device")
        cpu = m.get("cpu_id")
        if cpu and cpu != name:
            name += f" ({cpu})"
        parts = [name]
        if m.get("device_type", "cpu") == "cpu":
            if m.get("cpu_isa"):
                parts.append(f"CPU path `{m['cpu_isa']}`")
            if m.get("threads"):
                parts.append(f"{m['threads']} threads")
        if m.get("torch"):
            parts.append(f"torch {m['torch']}")
        return ", ".join(parts)


def load_results(stem: str, results_dir: str) -> Results:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", stem):
        raise TableError(f"bad results file name '{stem}'")
    path = os.path.join(results_dir, stem + ".json")
    if not os.path.isfile(path):
        have = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(results_dir, "*.json")))
        raise TableError(f"no results file {os.path.relpath(path, ROOT) if path.startswith(ROOT) else path} "
                         f"(there are: {', '.join(have) or 'none'})")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TableError(f"{path}: not valid JSON ({e})") from None
    return Results(stem, data, path)


# --------------------------------------------------------------------------------------------
# number formats


def _sig3(v: float) -> str:
    """Three significant digits, trailing zeros kept (0.110, 3.39, 26.8)."""
    if v == 0:
        return "0"
    s = f"{v:#.3g}"
    if "e" in s:
        return f"{v:.0f}"
    return s.rstrip(".")


def ms(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:.0f}"
    if v >= 100:
        return f"{v:.1f}"
    return _sig3(v)


def ratio(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def x(v: float) -> str:
    return ratio(v) + "×"


def run_range(base: dict, row: dict) -> str:
    """`` (lo–hi)``: the ratio base/row of each run, when both rows carry per-run medians."""
    a, b = base.get("ms_runs"), row.get("ms_runs")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return ""
    r = [p / q for p, q in zip(a, b)]
    return f" ({ratio(min(r))}–{ratio(max(r))})"


def speedup(base: dict, row: dict, ranged: bool = True) -> str:
    return x(base["ms"] / row["ms"]) + (run_range(base, row) if ranged else "")


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def cos(v: float | None) -> str:
    return "–" if v is None else f"{v:.5f}"


def _when(iso: str) -> str:
    try:
        t = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or "unknown date"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _span(isos: list[str]) -> str:
    whens = sorted(_when(i) for i in isos if i)
    if not whens:
        return "unknown date"
    lo, hi = whens[0], whens[-1]
    if lo == hi:
        return lo
    if lo[:10] == hi[:10]:
        return f"{lo[:16]}–{hi[11:]}"
    return f"{lo} – {hi}"


def _env_note(env: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in env.items()) or "default OpenMP settings"


def caption(res: Results, kernel: str, command: str) -> str:
    n = res.runs(kernel)
    how = f"median of {n} fresh-process runs, each run's ratio range in brackets" if n > 1 else "one run"
    load = res.load(kernel)
    load_note = f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else ""
    return (f"*{res.device()}, {_env_note(res.env(kernel))}; `{command}`, {how}; "
            f"finished {_when(res.date(kernel))}{load_note}; `bench/results/{res.stem}.json`.*")


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _one(kind: str, results: list[Results]) -> Results:
    if len(results) != 1:
        raise TableError(f"table kind '{kind}' takes one results file, got {len(results)}")
    return results[0]


# --------------------------------------------------------------------------------------------
# table kinds

INT8_IMPLS = [
    ("pycompress w8a8", "w8a8"),
    ("pycompress w8a8 (7-bit act)", "`act_bits=7`"),
    ("pycompress w8a8 (7-bit w)", "`weight_bits=7`"),
    ("pycompress w8a8 (7-bit act+w)", "`act_bits=7, weight_bits=7`"),
    ("pycompress w8a16", "w8a16"),
]
INT8_FP32, INT8_AO = "fp32 nn.Linear", "torch.ao dynamic int8"


def _int8_shape_cases(res: Results, shape: str) -> list[str]:
    cases = []
    for r in res.rows("int8"):
        if r["case"].endswith(" " + shape) and r["case"] not in cases:
            cases.append(r["case"])
    if not cases:
        raise TableError(f"{res.stem}.json: no int8 rows of shape {shape}")
    return cases


def t_int8(results: list[Results], link_base: str = "") -> str:
    """Int8Linear wall clock at K = N = 4096: every M, every pycompress form against fp32 and torch.ao."""
    res = _one("int8", results)
    rows = []
    for case in _int8_shape_cases(res, "K=4096 N=4096"):
        fp32 = res.row("int8", case, INT8_FP32)
        ao = res.find("int8", case, INT8_AO)
        m = case.split()[0][2:]
        rows.append([m, "fp32 `nn.Linear`", ms(fp32["ms"]), "1", "–", pct(fp32.get("rel err"))])
        if ao:
            rows.append([m, "torch.ao dynamic int8", ms(ao["ms"]), speedup(fp32, ao), "1", pct(ao.get("rel err"))])
        for impl, label in INT8_IMPLS:
            r = res.find("int8", case, impl)
            if r is None:
                continue
            rows.append([m, label, ms(r["ms"]), speedup(fp32, r), speedup(ao, r) if ao else "–",
                         pct(r.get("rel err"))])
    return (caption(res, "int8", "python bench/run.py --kernels int8") + " K = N = 4096, ms per call; "
            "speed-ups are ratios of medians; rel. error = ‖y − y_fp32‖ / ‖y_fp32‖ on the timed input.\n\n"
            + table(["M", "implementation", "ms", "vs fp32", "vs torch.ao", "rel. error"], rows,
                    ["r", "l", "r", "l", "l", "r"]))


def t_int8_per_core(results: list[Results], link_base: str = "") -> str:
    """Int8Linear per core: best CPU time of one thread per call (``[1 thread, CPU time]`` rows)."""
    res = _one("int8-per-core", results)
    impls = [(INT8_FP32, "fp32 `nn.Linear`"), (INT8_AO, "torch.ao")] + INT8_IMPLS[:4]
    rows = []
    for case in _int8_shape_cases(res, "K=4096 N=4096"):
        got = {impl: res.find("int8", case, f"{impl} {PER_CORE}") for impl, _ in impls}
        if got[INT8_FP32] is None:
            continue
        fp32, ao = got[INT8_FP32], got[INT8_AO]
        cells = [case.split()[0][2:]]
        for impl, _ in impls:
            r = got[impl]
            if r is None:
                cells.append("–")
            elif impl in (INT8_FP32, INT8_AO):
                cells.append(ms(r["ms"]))
            else:
                cells.append(f"{ms(r['ms'])} ({x(fp32['ms'] / r['ms'])}"
                             + (f", {x(ao['ms'] / r['ms'])} ao)" if ao else ")"))
        rows.append(cells)
    if not rows:
        raise TableError(f"{res.stem}.json: no int8 '{PER_CORE}' rows")
    return (caption(res, "int8", "python bench/run.py --kernels int8")
            + " K = N = 4096; best CPU time per call of one thread, ms (speed-up vs fp32, vs torch.ao).\n\n"
            + table(["M"] + [label for _, label in impls], rows, ["r"] + ["l"] * len(impls)))


SPARSE = ["dense fp32 nn.Linear", "torch CSR sparse.mm", "pycompress SparseLinear"]


def _sparse_cases(res: Results, kernel: str, sparsity: float | None = None) -> list[dict]:
    seen, out = set(), []
    for r in res.rows(kernel):
        if r["impl"] != SPARSE[2] and kernel == "sparse":
            continue
        if sparsity is not None and abs(r.get("sparsity", -1) - sparsity) > 1e-9:
            continue
        if r["case"] not in seen:
            seen.add(r["case"])
            out.append(r)
    return out


def t_sparse(results: list[Results], link_base: str = "") -> str:
    """SparseLinear at 90% unstructured sparsity against dense fp32 and torch CSR, with per-core ratios."""
    res = _one("sparse", results)
    rows = []
    for ours in _sparse_cases(res, "sparse", 0.9):
        case = ours["case"]
        dense, csr = res.row("sparse", case, SPARSE[0]), res.row("sparse", case, SPARSE[1])
        pc = [res.find("sparse", case, f"{i} {PER_CORE}") for i in SPARSE]
        core = (f"{x(pc[0]['ms'] / pc[2]['ms'])} / {x(pc[1]['ms'] / pc[2]['ms'])}"
                if all(pc) else "")
        rows.append([f"{ours['K']}×{ours['N']}", str(ours["M"]), ms(dense["ms"]), ms(csr["ms"]), ms(ours["ms"]),
                     speedup(dense, ours), speedup(csr, ours), core])
    if not rows:
        raise TableError(f"{res.stem}.json: no sparse rows at 90% sparsity")
    return (caption(res, "sparse", "python bench/run.py --kernels sparse")
            + " 90% unstructured sparsity, median ms; per core = best CPU time of one thread, "
            "SparseLinear's speed-up over dense fp32 / torch CSR.\n\n"
            + table(["K×N", "M", "dense fp32", "torch CSR", "SparseLinear", "vs dense", "vs CSR", "per core"],
                    rows, ["l", "r", "r", "r", "r", "l", "l", "l"]))


def t_sparse_grid(results: list[Results], link_base: str = "") -> str:
    """SparseLinear's speed-up over dense fp32 / torch CSR at every sparsity and M."""
    res = _one("sparse-grid", results)
    grid, ms_cols = {}, []
    for ours in _sparse_cases(res, "sparse"):
        dense = res.row("sparse", ours["case"], SPARSE[0])
        csr = res.row("sparse", ours["case"], SPARSE[1])
        key = (f"{ours['K']}×{ours['N']}", f"{round(100 * ours['sparsity'])}%")
        if ours["M"] not in ms_cols:
            ms_cols.append(ours["M"])
        grid.setdefault(key, {})[ours["M"]] = f"{x(dense['ms'] / ours['ms'])} / {x(csr['ms'] / ours['ms'])}"
    rows = [[k[0], k[1]] + [v.get(m, "–") for m in ms_cols] for k, v in grid.items()]
    return (caption(res, "sparse", "python bench/run.py --kernels sparse")
            + " SparseLinear's speed-up over dense fp32 / over torch CSR (ratios of medians).\n\n"
            + table(["K×N", "sparsity"] + [f"M = {m}" for m in ms_cols], rows, ["l", "r"] + ["l"] * len(ms_cols)))


SEMI24 = ["dense fp32 nn.Linear", "pycompress SemiSparseLinear fp32", "pycompress SemiSparseLinear fp16"]


def t_semi24(results: list[Results], link_base: str = "") -> str:
    """SemiSparseLinear (2:4) with fp32 and fp16 values against dense fp32."""
    res = _one("semi24", results)
    rows, seen = [], set()
    for r in res.rows("semi24"):
        if r["case"] in seen:
            continue
        seen.add(r["case"])
        dense = res.row("semi24", r["case"], SEMI24[0])
        cells = [f"{r['K']} × {r['N']}", str(r["M"]), ms(dense["ms"])]
        for impl in SEMI24[1:]:
            o = res.find("semi24", r["case"], impl)
            cells.append("–" if o is None else f"{ms(o['ms'])} ({speedup(dense, o, ranged=False)})")
        rows.append(cells)
    return (caption(res, "semi24", "python bench/run.py --kernels semi24")
            + " Random 2:4 weights, fp32 activations; median ms (speed-up vs dense fp32).\n\n"
            + table(["K × N", "M", "dense fp32 `nn.Linear`", "SemiSparseLinear, fp32 values",
                     "SemiSparseLinear, fp16 values"], rows, ["l", "r", "r", "r", "r"]))


def t_kd(results: list[Results], link_base: str = "") -> str:
    """Fused KD loss, forward + backward, against eager PyTorch and torch.compile."""
    res = _one("kd", results)
    rows, seen = [], set()
    for r in res.rows("kd"):
        case = r["case"]
        if case in seen:
            continue
        seen.add(case)
        eager, comp = res.row("kd", case, "torch eager"), res.row("kd", case, "torch.compile")
        ours, fused = res.row("kd", case, "pycompress"), res.find("kd", case, "pycompress fused")

        def cpu(a, b):
            return x(a["cpu_ms"] / b["cpu_ms"]) if a.get("cpu_ms") and b.get("cpu_ms") else "–"

        mem = ours.get("extra/grad")
        emem = eager.get("extra/grad")
        rows.append([f"{r['N']} × {r['V']} {r['dtype']}", ms(eager["ms"]), ms(comp["ms"]), ms(ours["ms"]),
                     ms(fused["ms"]) if fused else "–",
                     f"{x(eager['ms'] / ours['ms'])} / {x(comp['ms'] / ours['ms'])}",
                     f"{cpu(eager, ours)} / {cpu(comp, ours)}",
                     "–" if mem is None else f"{mem:.2f}" + ("" if emem is None else f" (eager {emem:.1f})")])
    return (caption(res, "kd", "python bench/run.py --kernels kd")
            + " Forward + backward, T = 2, batchmean; median ms; CPU = process CPU time per step; "
            "extra peak memory = peak RSS during a step minus RSS before it, over the gradient's size.\n\n"
            + table(["N × V", "eager", "torch.compile", "pycompress", "`fused=True`",
                     "speed-up vs eager / compile (wall)", "(CPU time)", "extra peak memory / gradient"],
                    rows, ["l", "r", "r", "r", "r", "l", "l", "l"]))


def t_compact(results: list[Results], link_base: str = "") -> str:
    """A BERT-base encoder after structured pruning and ``compact``."""
    res = _one("compact", results)
    rows = res.rows("compact")
    dense = next((r for r in rows if r["impl"] == "dense"), None)
    if dense is None:
        raise TableError(f"{res.stem}.json: no 'compact' row with impl 'dense'")
    out = [[r["impl"], ms(r["ms"]), f"{r['GFLOP']:.1f}", f"{r['FLOP ratio']:.3f}",
            x(dense["ms"] / r["ms"]), f"{r['params (M)']:.1f}"] for r in rows]
    return (caption(res, "compact", "python bench/run.py --kernels compact")
            + f" `{dense['case']}`: one forward pass, median ms.\n\n"
            + table(["variant", "ms", "GFLOP", "FLOP ratio", "speed-up", "params (M)"], out,
                    ["l", "r", "r", "r", "r", "r"]))


def _by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    return by


def _sci(v: float | None) -> str:
    return "–" if v is None else f"{v:.1e}"


# the targets of channel pruning + compact at 50% (docs/pruning.md)
PRUNE_TARGETS = (("exact", "rel. error ≤ 1e-5"), ("params", "params ≤ 0.6×"), ("speed", "≥ 1.6× dense"),
                 ("peer", "≥ 1× Torch-Pruning"))


def _prune_targets(dense: dict, ours: dict, tp: dict | None) -> str:
    met = {"exact": ours.get("rel err") is not None and ours["rel err"] <= 1e-5,
           "params": ours["param ratio"] <= 0.6,
           "speed": dense["ms"] / ours["ms"] >= 1.6,
           "peer": None if tp is None else tp["ms"] / ours["ms"] >= 1.0}
    missed = [label for key, label in PRUNE_TARGETS if met[key] is False]
    held = sum(1 for v in met.values() if v)
    return f"{held}/{sum(1 for v in met.values() if v is not None)}" + (f" (missed: {', '.join(missed)})"
                                                                         if missed else "")


def t_cnn_prune(results: list[Results], link_base: str = "") -> str:
    """CNN channel pruning + ``compact`` at 50% against dense and Torch-Pruning, same run."""
    res = _one("cnn-prune", results)
    out, first_case = [], None
    for case, d in _by_case(res.rows("cnn_prune")).items():
        dense = d.get("dense")
        if dense is None:
            raise TableError(f"{res.stem}.json: no 'cnn_prune' row with case '{case}' and impl 'dense'")
        first_case = first_case or case
        tp_impl = next((i for i in d if i.startswith("Torch-Pruning") and not i.endswith(PER_CORE)), None)
        tp = d.get(tp_impl) if tp_impl else None
        core = {i: d.get(f"{i} {PER_CORE}") for i in d}
        model = case.split(" B=")[0]
        for impl, r in d.items():
            if impl.endswith(PER_CORE):
                continue
            ours = impl.startswith("pycompress")
            c, cd = core[impl], core["dense"]
            ctp = core.get(tp_impl) if tp_impl else None
            one = "–" if c is None else ms(c["ms"]) + ("" if r is dense or cd is None else f" ({x(cd['ms'] / c['ms'])}"
                                                       + (f", {x(ctp['ms'] / c['ms'])} TP)" if ours and ctp else ")"))
            targets = ""
            if ours:
                targets = "wall: " + _prune_targets(dense, r, tp)
                if c is not None and cd is not None:
                    targets += "; 1 thread: " + _prune_targets(cd, {**c, "rel err": r.get("rel err")}, ctp)
                same = r.get("same shapes as Torch-Pruning")
                if same is not None:
                    targets += "; " + ("layer shapes = Torch-Pruning's" if same else "layer shapes ≠ Torch-Pruning's")
            out.append([model if r is dense else "", impl, ms(r["ms"]),
                        "1" if r is dense else speedup(dense, r),
                        speedup(tp, r) if ours and tp else "–", one,
                        f"{r['params (M)']:.2f} ({r['param ratio']:.3f})", f"{r['GFLOP']:.2f} ({r['FLOP ratio']:.3f})",
                        _sci(r.get("rel err")) if ours else "–", targets])
    shape = first_case.split(" ", 1)[1] if first_case and " " in first_case else ""
    return (caption(res, "cnn_prune", "python bench/run.py --kernels cnn_prune")
            + f" `{shape}`, one forward pass: median wall ms with the process's threads, speed-up = dense ms / "
            "variant ms (vs Torch-Pruning: its ms / pycompress's), each run's ratio in brackets; 1 thread = best "
            "CPU time of one thread, ms (speed-up vs dense, vs Torch-Pruning); params in millions and GFLOP with "
            "the ratio to dense in brackets; rel. error = max |compacted − masked| / max |masked| of the logits; "
            "targets: " + ", ".join(label for _, label in PRUNE_TARGETS) + ".\n\n"
            + table(["model", "variant", "ms", "vs dense", "vs Torch-Pruning", "1 thread", "params (M)", "GFLOP",
                     "rel. error", "targets held"], out, ["l", "l", "r", "l", "l", "l", "r", "r", "r", "l"]))


def _failure(row: dict) -> str:
    """A failed model's status and error as one table cell: the last line of the error (a crashed
    process's stderr tail ends with its exception)."""
    last = next((ln.strip() for ln in reversed(row.get("error", "").splitlines()) if ln.strip()), "")
    return f"**{row.get('status', 'failed')}**: `{last[:300]}`".replace("|", "\\|")


def t_zoo_prune(results: list[Results], link_base: str = "") -> str:
    """The prunability table: torchvision / timm CNNs through channel pruning (50%) and ``compact``."""
    res = _one("zoo-prune", results)
    out = []
    for case, d in _by_case(res.rows("zoo_prune")).items():
        dense = d.get("dense")
        ours = next((r for i, r in d.items() if i != "dense"), None)
        if ours is None:
            raise TableError(f"{res.stem}.json: no pruned 'zoo_prune' row for '{case}'")
        model = f"{case} (`{ours.get('model', '')}`)"
        if ours.get("status") != "ok":
            out.append([model, _failure(ours)] + ["–"] * 6)
            continue
        kept = list(ours.get("kept_reasons", [])) + [f"compact: {r}" for r in ours.get("compact_reasons", [])]
        out.append([model,
                    f"{ours['groups_pruned']} / {ours['groups']} groups, {ours['channels_pruned']} / "
                    f"{ours['channels']} channels",
                    _sci(ours.get("rel err")), f"{ours['param ratio']:.3f}", f"{ours['MAC ratio']:.3f}",
                    f"{ms(dense['ms'])} → {ms(ours['ms'])}" if dense else ms(ours["ms"]),
                    speedup(dense, ours) if dense else "–",
                    "; ".join(kept).replace("|", "\\|") or "–"])
    m = res.meta
    libs = ", ".join(f"{k} {m[k]}" for k in ("torchvision", "timm") if m.get(k))
    batch = next((r.get("batch") for r in res.rows("zoo_prune") if r.get("batch")), None)
    return (caption(res, "zoo_prune", "python bench/zoo_prune.py") + f" {libs}; random weights, "
            f"`prune_channels(model, 0.5, scope=\"layer\", method=\"magnitude_l2\")` + `compact`; "
            f"latency of one forward pass at batch {batch} × 3×224×224, median ms, dense → compacted; rel. "
            "error = max |compacted − masked| / max |masked| of the logits; params and MACs as ratios to dense; "
            "last column: why channels were kept (× number of dependency groups or layers).\n\n"
            + table(["architecture", "pruned", "rel. error", "params", "MACs", "ms", "speed-up",
                     "channels kept because"], out, ["l", "l", "r", "r", "r", "r", "l", "l"]))


def t_zoo_quant(results: list[Results], link_base: str = "") -> str:
    """The conversion table: torchvision / timm CNNs and vision transformers through ``quantize``."""
    res = _one("zoo-quant", results)
    rows = res.rows("zoo_quant")
    out = []
    for r in rows:
        model = f"{r['case']} (`{r.get('model', '')}`)"
        if r.get("status") != "ok":
            out.append([model, _failure(r)] + ["–"] * 7)
            continue
        conv = ", ".join(f"{n} {c}" for c, n in r["converted"].items())
        skipped = r.get("skipped") or {}
        out.append([model, conv + (f"; {len(skipped)} left in float" if skipped else ""),
                    pct(r.get("int8_conv_macs")) if r.get("int8_conv_macs") is not None else "–",
                    str(r["uint8_edges"]), str(r["residual_blocks"]),
                    f"{r['logit_cosine_mean']:.5f} ({r['logit_cosine_min']:.5f})",
                    f"{r['worst_layer_cosine']:.4f}", "yes" if r["validate_passed"] else "**no**",
                    "yes" if r["save_load_exact"] else "**no**"])
    m = res.meta
    libs = ", ".join(f"{k} {m[k]}" for k in ("torchvision", "timm") if m.get(k))
    return (caption(res, "zoo_quant", "python bench/zoo_quant.py --ext build/cuda/lib") + f" {libs}; "
            f"`quantize(model, \"{m.get('mode', 'w8a8')}\")`, random weights with a random head; CNNs calibrated on "
            f"2 × 2 random images, transformers dynamic; compared with fp32 on {m.get('batch')} other random "
            "224 × 224 images. uint8 edges: conv outputs passed on as uint8; residual blocks: additions "
            "computed by the convs; worst layer: `validate`'s lowest per-layer cosine; save / load: "
            "`save` then `load` into a fresh model gives the same output bits.\n\n"
            + table(["architecture", "converted", "conv MACs int8", "uint8 edges", "residual blocks",
                     "logit cosine mean (min)", "worst layer cosine", "`validate`", "save / load exact"],
                    out, ["l", "l", "r", "r", "r", "r", "r", "l", "l"]))


DEC_FP32, DEC_AO = "fp32", "torch.ao dynamic int8"


def t_decoder(results: list[Results], link_base: str = "") -> str:
    """A GPT-2-small-sized decoder: pycompress w8a8 / w8a16 against fp32 and torch.ao dynamic int8."""
    res = _one("decoder", results)
    out = []
    for case, d in _by_case(res.rows("decoder")).items():
        base = d.get(DEC_FP32)
        if base is None:
            continue  # the KD rows: table kind decoder-kd
        ao = d.get(DEC_AO)
        label = case.split(": ", 1)[-1]
        def cpu(a, b):
            return x(a["cpu_ms_1t"] / b["cpu_ms_1t"]) if a and a.get("cpu_ms_1t") and b.get("cpu_ms_1t") else "–"

        for impl, r in d.items():
            out.append([label if r is base else "", impl, ms(r["ms"]), f"{r['tokens/s']:.0f}",
                        "1" if r is base else speedup(base, r),
                        speedup(ao, r) if ao and r is not ao and r is not base else "–",
                        f"{ms(r['cpu_ms_1t'])}: {cpu(base, r)}" + (f" / {cpu(ao, r)}" if ao and r is not ao
                                                                   and r is not base else "")
                        if r.get("cpu_ms_1t") else "–",
                        "–" if r is base else f"{r['ppl change %']:+.3f} %",
                        "–" if r is base else f"{r['KL/token']:.1e}"])
    if not out:
        raise TableError(f"{res.stem}.json: no decoder model rows (impl '{DEC_FP32}')")
    model = next(r["case"].split(": ")[0] for r in res.rows("decoder") if r["impl"] == DEC_FP32)
    return (caption(res, "decoder", "python bench/run.py --kernels decoder")
            + f" `{model}` (transformers `GPT2LMHeadModel` from a config, random weights); median wall ms per "
            "forward pass, speed-ups are ratios of medians (each run's in brackets); 1 thread = best single-thread "
            "CPU time per call, ms: speed-up vs fp32 / vs torch.ao; ppl change and KL(fp32 ‖ variant) per token of "
            "the next-token distributions on held-out random tokens.\n\n"
            + table(["case", "variant", "ms", "tokens/s", "vs fp32", "vs torch.ao", "1 thread",
                     "ppl change", "KL / token"], out, ["l", "l", "r", "r", "l", "l", "l", "r", "r"]))


def t_decoder_kd(results: list[Results], link_base: str = "") -> str:
    """The KD loss at GPT-2's vocabulary, forward + backward, against eager and torch.compile."""
    res = _one("decoder-kd", results)
    out = []
    for case, d in _by_case(res.rows("decoder")).items():
        if "torch eager" not in d:
            continue
        e, c, o = d["torch eager"], d.get("torch.compile"), d.get("pycompress")
        if o is None:
            raise TableError(f"{res.stem}.json: no 'decoder' row with case '{case}' and impl 'pycompress'")
        out.append([case.replace("KD loss fwd+bwd ", ""), ms(e["ms"]), ms(c["ms"]) if c else "–", ms(o["ms"]),
                    speedup(e, o), speedup(c, o) if c else "–"])
    if not out:
        raise TableError(f"{res.stem}.json: no decoder KD rows (impl 'torch eager')")
    return (caption(res, "decoder", "python bench/run.py --kernels decoder")
            + " `KDLoss`-style loss (T = 2, batchmean), forward + backward, fp32 logits; median ms.\n\n"
            + table(["tokens × V", "eager", "torch.compile", "pycompress", "vs eager", "vs torch.compile"], out,
                    ["l", "r", "r", "r", "l", "l"]))


INT8_TOOLS = (("torch fp32", "torch fp32"), ("ONNX Runtime int8", "ONNX Runtime int8 (static QDQ)"),
              ("OpenVINO int8", "OpenVINO int8 (NNCF)"), ("pycompress", "pycompress `quantize`"),
              ("pycompress int8 -> ONNX Runtime", "pycompress → ONNX Runtime (`export_onnx`)"),
              ("pycompress int8 -> ONNX Runtime [exact]", "pycompress → ONNX Runtime (`int8_format=\"exact\"`)"))


def _cnn_int8_cases(res: Results) -> dict[str, dict[str, dict]]:
    cases = _by_case(res.rows("cnn_int8"))
    if not cases:
        raise TableError(f"{res.stem}.json: no 'cnn_int8' rows")
    return cases


def t_cnn_int8(results: list[Results], link_base: str = "") -> str:
    """Int8 CNN latency: torch fp32, ONNX Runtime int8, OpenVINO int8 and pycompress, batch 1 and 8."""
    res = _one("cnn-int8", results)
    out = []
    for case, d in _cnn_int8_cases(res).items():
        base = d.get("torch fp32")
        ov = d.get("OpenVINO int8")
        model, _, rest = case.partition(" B=")
        cells = [model, rest.split()[0]]
        for impl, _ in INT8_TOOLS:
            r = d.get(impl)
            if r is None:
                cells.append("–")
            elif r is base:
                cells.append(ms(r["ms"]))
            else:
                cells.append(f"{ms(r['ms'])} ({speedup(base, r, ranged=False)})" if base else ms(r["ms"]))
        ours = d.get("pycompress")
        cells.append(speedup(ov, ours) if ov and ours else "–")
        core = {impl: d.get(f"{impl} {PER_CORE}") for impl, _ in INT8_TOOLS}
        cb = core["torch fp32"]
        cells.append("–" if cb is None else ms(cb["ms"]) + " / " + " / ".join(
            "–" if core[impl] is None else x(cb["ms"] / core[impl]["ms"]) for impl, _ in INT8_TOOLS[1:]))
        cells.append(pct(ours.get("conv MACs int8")) if ours else "–")
        out.append(cells)
    return (caption(res, "cnn_int8", "python bench/run.py --kernels cnn_int8")
            + " 3×224×224; median wall ms per forward pass (speed-up over torch fp32); pycompress "
            "vs OpenVINO = OpenVINO ms / pycompress ms (each run's ratio in brackets); 1 thread = best CPU time "
            "per call of torch fp32 on one thread, ms, and the speed-up over it of ONNX Runtime / OpenVINO / "
            "pycompress / pycompress's ONNX files in ONNX Runtime (default, `exact`) on one thread; conv MACs "
            "int8 = share of the "
            "conv multiply-adds in pycompress int8 layers.\n\n"
            + table(["model", "batch"] + [label for _, label in INT8_TOOLS] + [
                "pycompress vs OpenVINO", "1 thread: fp32 ms / ORT / OpenVINO / pycompress / → ORT / → ORT exact",
                "conv MACs int8"], out, ["l", "r"] + ["r"] * len(INT8_TOOLS) + ["l", "l", "r"]))


def t_cnn_int8_accuracy(results: list[Results], link_base: str = "") -> str:
    """Int8 CNN accuracy against torch fp32: top-1 agreement and logit cosine of every tool."""
    res = _one("cnn-int8-accuracy", results)
    out, seen = [], set()
    for case, d in _cnn_int8_cases(res).items():
        model = case.split(" B=")[0]
        if model in seen:
            continue
        seen.add(model)
        for impl, label in INT8_TOOLS[1:]:
            r = d.get(impl)
            if r is None:
                continue
            name = model + (f" ({r['weights']} weights)" if r.get("weights", "random") != "random" else "")
            out.append([name if impl == INT8_TOOLS[1][0] else "", label, pct(r.get("top1 agree")),
                        pct(r.get("top1 agree (confident)")), cos(r.get("cos")),
                        f"{r['prepare_s']:.1f}" if r.get("prepare_s") is not None else "–"])
    return (caption(res, "cnn_int8", "python bench/run.py --kernels cnn_int8")
            + " Against torch fp32 on 64 structured images (smooth colour fields, gradients, rectangles; "
            "random weights unless the model says otherwise): top-1 agreement over all images and over the half with the largest fp32 top-1 "
            "margin, mean cosine of the logit vectors; conversion time (export, calibration, compilation) in "
            "seconds.\n\n"
            + table(["model", "implementation", "top-1 agreement", "(confident half)", "logit cosine",
                     "conversion s"], out, ["l", "l", "r", "r", "r", "r"]))


def t_cnn_accuracy(results: list[Results], link_base: str = "") -> str:
    """Int8 accuracy of pretrained CNNs on natural-image crops: every tool against torch fp32."""
    res = _one("cnn-accuracy", results)
    rows = res.rows("cnn_accuracy")
    if not rows:
        raise TableError(f"{res.stem}.json: no 'cnn_accuracy' rows")
    out, last, first = [], None, rows[0]
    for r in rows:
        model = r["case"] if r["case"] != last else ""
        last = r["case"]
        impl = r["impl"]
        if r.get("reverted") is not None:
            impl += f" ({len(r['reverted'])} conv{'s' if len(r['reverted']) != 1 else ''} in float)"
        out.append([model, impl, pct(r["top1 agree"]),
                    f"{pct(r['top1 agree (confident)'])} of {r['confident n']}", cos(r["cos"]),
                    cos(r.get("cos (confident)"))])
    return (caption(res, "cnn_accuracy", "python bench/run.py --kernels cnn_accuracy")
            + f" ImageNet weights; every int8 model against its fp32 model on {first['images']} random-resized "
            "crops (8–100 % of the area, aspect 3/4–4/3, random flips, fixed seed) of 8 scikit-image photos, "
            f"calibrated on {first['calibration images']} crops of 8 other photos; confident: the crops the fp32 "
            f"model classifies with top-1 probability ≥ {first['confident threshold']}; top-1 agreement (same "
            "arg-max as fp32) and mean cosine of the logit vectors, over all crops and over the confident "
            "ones.\n\n"
            + table(["model", "implementation", "top-1 agreement", "confident", "logit cosine",
                     "cosine (confident)"], out, ["l", "l", "r", "r", "r", "r"]))


ONNX_MODELS = {"encoder-6x384 b64x16": "6 × 384 (FFN 1536)", "bert-base b64x16": "BERT-base (12 × 768)"}
ONNX_LABELS = {
    "pycompress int8 -> ORT": "pycompress int8 → ORT (`auto`: u8u8)",
    "pycompress int8 -> ORT [u8s8]": "pycompress int8 → ORT, u8s8 (8-bit act.)",
    "pycompress int8 -> ORT [contrib]": "pycompress int8 → ORT, contrib (MatMulIntegerToFloat)",
    "ORT int8 per-tensor": "ORT `quantize_dynamic` int8 per-tensor",
    "ORT int8 per-channel": "ORT `quantize_dynamic` int8 per-channel",
}


def _onnx_label(impl: str) -> str:
    if impl in ONNX_LABELS:
        return ONNX_LABELS[impl]
    m = re.fullmatch(r"(.*?) \[(.*)\]", impl)
    label = impl
    if m:
        extra = m.group(2)
        label = f"{m.group(1)}, " + (f"`{extra}`" if "=" in extra else extra)
    return label.replace("->", "→").replace(" compile", " `torch.compile`")


def _verify(v) -> str:
    if v is None:
        return "–"
    return str(v).split(":")[0]


def t_onnx(results: list[Results], link_base: str = "") -> str:
    """BERT encoders: PyTorch, the exported int8 ONNX files in ONNX Runtime, and ORT's own models."""
    res = _one("onnx", results)
    rows = res.rows("onnx")
    has_verify = any("verify" in r for r in rows)
    out, last = [], None
    for r in rows:
        model = ONNX_MODELS.get(r["case"], r["case"])
        cells = [model if model != last else "", _onnx_label(r["impl"]), ms(r["ms"]), cos(r.get("cos_last")),
                 cos(r.get("cos_pooled")), "–" if r.get("file_mb") is None else f"{r['file_mb']:.1f}"]
        if has_verify:
            cells.append(_verify(r.get("verify")))
        out.append(cells)
        last = model
    header = ["model", "implementation", "ms", "cos last", "cos pooled", "file MB"] + (["verify"] if has_verify else [])
    return (caption(res, "onnx", "python bench/run.py --kernels onnx")
            + " Random-weight BERT encoders, batch 64 × 16 tokens; median ms; cosine of the last hidden "
            "state / pooled output vs torch fp32"
            + ("; verify = `export_onnx`'s own check of the file" if has_verify else "") + ".\n\n"
            + table(header, out, ["l", "l", "r", "r", "r", "r"] + (["l"] if has_verify else [])))


def t_quant(results: list[Results], link_base: str = "") -> str:
    """Per-token int8 quantization against the same expression in eager PyTorch."""
    res = _one("quant", results)
    rows, seen = [], set()
    for r in res.rows("quant"):
        if r["case"] in seen:
            continue
        seen.add(r["case"])
        eager, ours = res.row("quant", r["case"], "torch eager"), res.row("quant", r["case"], "pycompress")
        rows.append([str(r["M"]), str(r["K"]), r["dtype"], ms(eager["ms"]), ms(ours["ms"]), speedup(eager, ours)])
    return (caption(res, "quant", "python bench/run.py --kernels quant") + " Median ms.\n\n"
            + table(["M", "K", "dtype", "torch eager", "pycompress", "speed-up"], rows,
                    ["r", "r", "l", "r", "r", "l"]))


# summary: one line per headline case; a column per results file


def _s_kd(res: Results) -> str:
    case = "N=4096 V=32000 float32"
    e, c, o = (res.row("kd", case, i) for i in ("torch eager", "torch.compile", "pycompress"))
    return (f"{ms(o['ms'])} ms: {x(e['ms'] / o['ms'])} eager, {x(c['ms'] / o['ms'])} `torch.compile`; "
            f"extra memory {o['extra/grad']:.2f}× the gradient")


def _s_sparse(shape: str) -> Callable[[Results], str]:
    def f(res: Results) -> str:
        d, c = [], []
        for m in (1, 8, 32):
            case = f"{shape} s=90% M={m}"
            o = res.row("sparse", case, SPARSE[2])
            d.append(ratio(res.row("sparse", case, SPARSE[0])["ms"] / o["ms"]))
            c.append(ratio(res.row("sparse", case, SPARSE[1])["ms"] / o["ms"]))
        return f"{' / '.join(d)}× dense fp32; {' / '.join(c)}× torch CSR"
    return f


def _s_semi24(res: Results) -> str:
    v = []
    for m in (1, 8, 32, 128):
        case = f"K=4096 N=4096 M={m}"
        v.append(ratio(res.row("semi24", case, SEMI24[0])["ms"] / res.row("semi24", case, SEMI24[2])["ms"]))
    return f"{' / '.join(v)}× dense fp32"


def _s_compact(res: Results) -> str:
    rows = {r["impl"]: r for r in res.rows("compact")}
    try:
        d, f, h = rows["dense"], rows["FFN 50% compact"], rows["FFN 50% + heads 50% compact"]
    except KeyError as e:
        raise TableError(f"{res.stem}.json: no 'compact' row with impl {e}") from None
    return (f"FFN neurons: {x(d['ms'] / f['ms'])} (FLOP ratio {f['FLOP ratio']:.3f}); "
            f"FFN + heads: {x(d['ms'] / h['ms'])} (FLOP ratio {h['FLOP ratio']:.3f})")


def _s_int8(res: Results) -> str:
    f, a = [], []
    for m in (1, 16, 128):
        case = f"M={m} K=4096 N=4096"
        o = res.row("int8", case, "pycompress w8a8")
        f.append(ratio(res.row("int8", case, INT8_FP32)["ms"] / o["ms"]))
        a.append(ratio(res.row("int8", case, INT8_AO)["ms"] / o["ms"]))
    return f"{' / '.join(f)}× fp32; {' / '.join(a)}× torch.ao dynamic int8"


def _s_onnx(res: Results) -> str:
    lat, size = [], []
    for case in ONNX_MODELS:
        o = res.row("onnx", case, "pycompress int8 -> ORT")
        lat.append(ratio(o["ms"] / res.row("onnx", case, "ORT int8 per-channel")["ms"]))
        size.append(ratio(o["file_mb"] / res.row("onnx", case, "ORT fp32")["file_mb"]))
    return (f"{' / '.join(lat)}× the latency of ORT's own per-channel int8 model; "
            f"file {' / '.join(size)}× the fp32 file")


def _s_onnx_sentences(res: Results) -> str:
    cases = []
    for r in res.rows("onnx"):
        if "sentences" in r["case"] and r["case"] not in cases:
            cases.append(r["case"])
    if not cases:
        raise TableError(f"{res.stem}.json: no 'onnx' sentence-encoder rows")
    lat, size, cos = [], [], []
    for case in cases:
        o, p = res.row("onnx", case, "pycompress int8 -> ORT"), res.row("onnx", case, "ORT int8 per-channel")
        lat.append(ratio(o["ms"] / p["ms"]))
        size.append(ratio(o["file_mb"] / p["file_mb"]))
        cos.append(f"{o['cos_min']:.4f} vs {p['cos_min']:.4f}")
    return (f"{' / '.join(lat)}× the latency of ORT's own per-channel int8 model, file {' / '.join(size)}× its "
            f"size; cosine vs fp32 (min over sentences) {' / '.join(cos)}")


def _s_quant(res: Results) -> str:
    case = "M=2048 K=4096 float32"
    e, o = res.row("quant", case, "torch eager"), res.row("quant", case, "pycompress")
    return f"{ms(o['ms'])} ms, {x(e['ms'] / o['ms'])} torch eager"


SUMMARY = [
    ("kd", "KD loss fwd+bwd", "N=4096, V=32000 fp32", _s_kd, "docs/kd.md"),
    ("sparse", "SparseLinear, 90% sparse", "K=N=4096, M = 1 / 8 / 32", _s_sparse("K=4096 N=4096"), "docs/sparse.md"),
    ("sparse", "SparseLinear, 90% sparse", "K=768, N=3072, M = 1 / 8 / 32", _s_sparse("K=768 N=3072"), "docs/sparse.md"),
    ("semi24", "SemiSparseLinear 2:4, fp16 values", "K=N=4096, M = 1 / 8 / 32 / 128", _s_semi24, "docs/sparse.md"),
    ("int8", "Int8Linear w8a8", "K=N=4096, M = 1 / 16 / 128", _s_int8, "docs/int8.md"),
    ("quant", "per-token quantization", "M=2048, K=4096 fp32", _s_quant, "docs/int8.md"),
    ("compact", "`compact` after 50% structured pruning", "BERT-base, batch 8 × 128", _s_compact, "docs/pruning.md"),
    ("onnx", "ONNX export, w8a8 → ONNX Runtime", "6-layer 384 encoder / BERT-base, 64 × 16 tokens", _s_onnx,
     "docs/onnx.md"),
    ("onnx", "ONNX export, w8a8 → ONNX Runtime", "all-MiniLM-L6-v2 (pretrained) / BERT-base, 64 sentences",
     _s_onnx_sentences, "docs/onnx.md"),
]


def t_summary(results: list[Results], link_base: str = "") -> str:
    """One line per headline case, one column per results file (``summary@A+B``)."""
    if not results:
        raise TableError("table kind 'summary' needs at least one results file")
    rows = []
    for kernel, what, case, fn, link in SUMMARY:
        if not any(r.has(kernel) for r in results):
            continue
        cells = [f"[{what}]({posixpath.relpath(link, link_base or '.')})", case]
        for res in results:
            try:
                cells.append(fn(res) if res.has(kernel) else "–")
            except TableError:  # the headline case was not measured (e.g. a --quick run)
                cells.append("–")
        rows.append(cells)
    lines = []
    for res in results:
        dates = [res.date(k) for k in res.kernels]
        lines.append(f"*`{res.stem}`: {res.device()}; {_span(dates)}; `bench/results/{res.stem}.json`.*")
    return ("  \n".join(lines) + "\n\n"
            + table(["kernel", "case"] + [f"`{r.stem}`" for r in results], rows))


def t_runs(results: list[Results], link_base: str = "") -> str:
    """What each results file holds: device, CPU path, threads, torch, and per kernel date, runs, settings."""
    rows = []
    for res in results:
        m = res.meta
        first = True
        for k in res.kernels:
            rows.append([f"`{res.stem}.json`" if first else "", m.get("device", "") if first else "",
                         (m.get("cpu_id") or "–") if first else "",
                         f"`{m.get('cpu_isa', '')}`, {m.get('threads', '')} threads, torch {m.get('torch', '')}"
                         if first else "",
                         k, _when(res.date(k)), str(res.runs(k)), _env_note(res.env(k))])
            first = False
    return table(["file", "device", "CPU", "CPU path, threads, torch", "kernel", "finished", "runs",
                  "OpenMP"], rows, ["l", "l", "l", "l", "l", "l", "r", "l"])


def t_prune_accuracy(results: list[Results], link_base: str = "") -> str:
    """Channel pruning of the transferred pretrained CNN: accuracy by importance method, with and
    without compensation, before and after a short fine-tune."""
    res = _one("prune-accuracy", results)
    rows = res.rows("prune_accuracy")
    dense = next((r for r in rows if r["impl"] == "dense"), None)
    out, last = [], None
    for r in rows:
        if r["impl"] == "dense":
            continue
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        comp = r.get("compensate")
        out.append([case, r["impl"].replace(" +comp", ""), str(comp) if comp else "–",
                    f"{r['param ratio']:.3f}", f"{r['FLOP ratio']:.3f}", pct(r["accuracy"]),
                    pct(r.get("accuracy +ft"))])
    head = ""
    if dense is not None:
        head = (f" {dense['case']}; dense model {pct(dense['accuracy'])} on the test set, "
                f"{dense['params (M)']:.2f} M parameters, {dense['MFLOP']:.1f} MFLOP per image.")
    ft = next((r.get("ft epochs") for r in rows if r.get("ft epochs")), None)
    return (caption(res, "prune_accuracy", "python bench/run.py --kernels prune_accuracy") + head
            + " Channels pruned by `prune_channels` (inner: the expanded channels of every block and the "
            "head conv; all groups: every prunable group), then `compact`; accuracy without fine-tuning"
            + (f" and after {ft} epochs of fine-tuning" if ft else "") + "; params and FLOP as ratios to dense.\n\n"
            + table(["pruned", "method", "compensation", "params", "FLOP", "accuracy", "after fine-tune"], out,
                    ["l", "l", "l", "r", "r", "r", "r"]))


def t_isa_int8(results: list[Results], link_base: str = "") -> str:
    """w8a8 Int8Linear on several CPU code paths against torch.ao dynamic int8, interleaved in one process."""
    res = _one("isa-int8", results)
    rows = res.rows("isa_int8")
    isas = res.meta.get("isas") or sorted({r["isa"] for r in rows if r.get("isa")})
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    out = []
    for case, impls in by.items():
        ao = impls.get(INT8_AO)
        if ao is None:
            raise TableError(f"{res.stem}.json: case '{case}' has no '{INT8_AO}' row")
        cells = [f"{ao['K']} × {ao['N']}", str(ao["M"]),
                 f"{ms(ao['ms'])} [{ms(ao['ms_rounds_min'])}–{ms(ao['ms_rounds_max'])}]"]
        for isa in isas:
            r = impls.get(f"pycompress w8a8 [{isa}]")
            if r is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{ms(r['ms'])} [{ms(r['ms_rounds_min'])}–{ms(r['ms_rounds_max'])}]")
            cells.append(f"{x(r['vs torch.ao'])} / {x(ao['cpu_ms_1thread'] / r['cpu_ms_1thread'])}")
        out.append(cells)
    header = ["K × N", "M", "torch.ao dynamic int8 ms"]
    for isa in isas:
        header += [f"w8a8 `{isa}` ms", f"`{isa}` vs torch.ao"]
    load = res.load("isa_int8")
    load_note = f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else ""
    threads = res.meta.get("threads")
    rounds = res.meta.get("rounds")
    return (f"*{res.device()}; `python bench/compare_isa_int8.py`, CPU paths "
            + ", ".join(f"`{i}`" for i in isas)
            + f" and torch.ao interleaved in one process, median of {rounds} rounds [min–max]; finished "
            f"{_when(res.date('isa_int8'))}{load_note}; `bench/results/{res.stem}.json`.* "
            f"ms per call on {threads} threads; vs torch.ao: ratio of the medians on {threads} threads / "
            "ratio of the best CPU times per call on one thread. The code paths' outputs were checked "
            "to be bit-identical before timing.\n\n"
            + table(header, out, ["l", "r"] + ["r"] * (len(header) - 2)))


def t_int8_conv(results: list[Results], link_base: str = "") -> str:
    """int8 convolution layers against torch's fp32 conv (channels_last), wall clock and per core."""
    res = _one("int8-conv", results)
    rows = res.rows("int8_conv")
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    cols = ["pycompress int8 u8->f32", "pycompress int8 u8->u8 relu", "pycompress int8 f32->f32 (dynamic)"]
    base, one = "torch fp32 conv (channels_last)", " [1 thread, CPU time]"
    out = []
    for case, impls in by.items():
        b = impls.get(base)
        if b is None:
            continue
        cells = [case, ms(b["ms"])]
        for c in cols:
            r = impls.get(c)
            cells.append("–" if r is None else f"{ms(r['ms'])} ({x(r['x fp32'])})")
        r1 = impls.get(cols[0] + one)
        cells.append("–" if r1 is None else f"{ms(r1['ms'])} ({x(r1['x fp32'])})")
        out.append(cells)
    return (caption(res, "int8_conv", "python bench/run.py --kernels int8_conv" +
                    (f" --runs {res.runs('int8_conv')}" if res.runs("int8_conv") > 1 else ""))
            + " One conv layer, ms (speed-up over torch's fp32 conv on channels_last input in the same "
            "run); u8: uint8 input with its static scale; dynamic: float input quantized per image "
            "inside the op; last column: one thread, CPU time.\n\n"
            + table(["layer, batch", "torch fp32 ms", "int8 u8 → fp32", "int8 u8 → u8 + ReLU",
                     "int8 fp32 → fp32 (dynamic)", "u8 → fp32, 1 thread"], out,
                    ["l", "r", "r", "r", "r", "r"]))


KINDS: dict[str, Callable[[list[Results], str], str]] = {
    "summary": t_summary,
    "runs": t_runs,
    "int8": t_int8,
    "int8-per-core": t_int8_per_core,
    "quant": t_quant,
    "sparse": t_sparse,
    "sparse-grid": t_sparse_grid,
    "semi24": t_semi24,
    "kd": t_kd,
    "compact": t_compact,
    "onnx": t_onnx,
    "prune-accuracy": t_prune_accuracy,
    "int8-conv": t_int8_conv,
    "isa-int8": t_isa_int8,
    "onnx-sentences": __import__("runpy").run_path(os.path.join(ROOT, "bench", "bench_onnx.py"))["t_sentences"],
    "cnn-prune": t_cnn_prune,
    "zoo-prune": t_zoo_prune,
    "zoo-quant": t_zoo_quant,
    "decoder": t_decoder,
    "decoder-kd": t_decoder_kd,
    "cnn-int8": t_cnn_int8,
    "cnn-int8-accuracy": t_cnn_int8_accuracy,
    "cnn-accuracy": t_cnn_accuracy,
}


def render(name: str, results_dir: str = RESULTS, link_base: str = "") -> str:
    """The generated text of table ``KIND@STEM[+STEM...]``; links to other pages are written
    relative to ``link_base``, the folder (relative to the repository root) of the page."""
    kind, sep, stems = name.partition("@")
    if kind not in KINDS:
        raise TableError(f"unknown table kind '{kind}' in table name '{name}' "
                         f"(known: {', '.join(sorted(KINDS))})")
    if not sep or not stems:
        raise TableError(f"table name '{name}' names no results file: write {kind}@STEM "
                         f"for bench/results/STEM.json")
    results = [load_results(s, results_dir) for s in stems.split("+")]
    try:
        return KINDS[kind](results, link_base)
    except KeyError as e:
        raise TableError(f"table '{name}': a results row lacks the field {e}") from None


# --------------------------------------------------------------------------------------------
# markdown files


def _fenced(text: str) -> list[tuple[int, int]]:
    """Character ranges of fenced code blocks (``` or ~~~): markers inside them are examples."""
    spans, start, fence, pos = [], None, "", 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if start is None and stripped[:3] in ("```", "~~~"):
            start, fence = pos, stripped[:3]
        elif start is not None and stripped.startswith(fence) and not stripped[len(fence):].strip(fence[0]).strip():
            spans.append((start, pos + len(line)))
            start = None
        pos += len(line)
    if start is not None:
        spans.append((start, len(text)))
    return spans


def update_text(text: str, path: str = "<text>", results_dir: str = RESULTS,
                link_base: str = "") -> tuple[str, list[str]]:
    """Returns ``text`` with every marked table regenerated, and the names of the tables that changed.
    ``path`` names the text in errors; ``link_base`` is its folder relative to the repository root."""
    out, pos, changed = [], 0, []
    open_m = None
    fenced = _fenced(text)
    for m in MARKER.finditer(text):
        if any(a <= m.start() < b for a, b in fenced):
            continue
        line = text.count("\n", 0, m.start()) + 1
        if m.group("which") == "begin":
            if open_m is not None:
                raise TableError(f"{path}:{line}: table '{m.group('name')}' begins inside table "
                                 f"'{open_m.group('name')}' (no end marker before it)")
            open_m = m
            continue
        if open_m is None:
            raise TableError(f"{path}:{line}: end marker of table '{m.group('name')}' without a begin marker")
        if m.group("name") != open_m.group("name"):
            raise TableError(f"{path}:{line}: end marker of table '{m.group('name')}' closes table "
                             f"'{open_m.group('name')}'")
        name = m.group("name")
        try:
            body = "\n" + render(name, results_dir, link_base) + "\n"
        except TableError as e:
            raise TableError(f"{path}:{text.count(chr(10), 0, open_m.start()) + 1}: {e}") from None
        old = text[open_m.end():m.start()]
        if old != body:
            changed.append(name)
        out.append(text[pos:open_m.end()])
        out.append(body)
        pos = m.start()
        open_m = None
    if open_m is not None:
        line = text.count("\n", 0, open_m.start()) + 1
        raise TableError(f"{path}:{line}: table '{open_m.group('name')}' has no end marker "
                         f"(<!-- table:{open_m.group('name')} end -->)")
    out.append(text[pos:])
    return "".join(out), changed


def default_files(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from the JSON")
    ap.add_argument("--results", default=RESULTS, help="folder of the results files (default bench/results)")
    ap.add_argument("--list", action="store_true", help="list the table kinds")
    args = ap.parse_args(argv)
    if args.list:
        for k, fn in KINDS.items():
            print(f"{k:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    files = args.files or default_files()
    drift = []
    try:
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            rel = os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT) else path
            base = os.path.dirname(os.path.relpath(os.path.abspath(path), ROOT)).replace(os.sep, "/")
            new, changed = update_text(text, rel, args.results, base)
            drift += [f"{rel}: table '{n}'" for n in changed]
            if changed and not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    except (TableError, OSError) as e:
        print(f"tables.py: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if drift:
            print("tables differ from bench/results (run python bench/tables.py):\n  " + "\n  ".join(drift),
                  file=sys.stderr)
            return 1
        return 0
    for d in drift:
        print(f"updated {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
