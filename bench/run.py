"""Kernel microbenchmark runner: prints a table per kernel and writes JSON results.

    python bench/run.py [--kernels quant,int8,sparse,kd] [--device cpu|cuda] [--quick] [--json FILE]
                        [--runs N] [--omp-wait-policy active|passive] [--check]

Every ``bench/bench_<name>.py`` module defines ``KERNEL`` and ``run(device, quick) -> rows``;
rows are dicts with at least ``kernel``, ``case``, ``impl`` and ``ms``. The JSON file
(default ``bench/results/<device>.json``) records the device name, torch version and date.

``--runs N`` runs each kernel's benchmark N times, each in a fresh process (thread placement,
memory layout and neighbours on a shared machine differ between processes), and records per
(case, impl) the row of the median run, with every run's median in ``ms_runs``; the printed table
and the summary use those median rows.

Per kernel the file records when it finished (``kernel_dates``), its threading variables
(``kernel_env``) and the machine's 1-minute load average when it started and finished
(``kernel_load``): on a shared machine the other load is part of the result.

``--check`` imports the selected benchmark modules and checks their entry points (``KERNEL``,
``run``) without running or writing anything (the GPU check's dry run uses it on the CPU).

``--omp-wait-policy`` runs the benchmarks with ``OMP_WAIT_POLICY`` set: whether idle OpenMP
threads keep spinning (``active``) or sleep (``passive``) between parallel regions. By default
they spin for a while and then sleep; waking a sleeping thread can cost a virtual machine as much
as a sub-millisecond CPU op. The OpenMP runtime reads the
variable once, when torch loads, so the runner starts itself again with it set. The threading
variables in effect (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``,
``OMP_NUM_THREADS``) are recorded per kernel in ``kernel_env``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import cpu_id, device_name  # noqa: E402


def available_kernels() -> list[str]:
    names = []
    for f in sorted(os.listdir(HERE)):
        m = re.fullmatch(r"bench_(\w+)\.py", f)
        if m:
            names.append(m.group(1))
    return names


def format_table(rows: list[dict]) -> str:
    """Renders rows as a fixed-width table: case, impl, ms, then per-kernel extra columns."""
    if not rows:
        return "(no rows)"
    skip = {"kernel", "case", "impl", "ms", "ms_min", "ms_p90", "repeats", "M", "K", "N", "V",
            "dtype", "sparsity"}
    extra = []
    for r in rows:
        for k in r:
            if k not in skip and k not in extra:
                extra.append(k)
    cols = ["case", "impl", "ms"] + extra

    def fmt(v):
        if isinstance(v, list):
            return "/".join(fmt(x) for x in v)
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def combine_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per (case, impl): the row of the run whose median ``ms`` is the (lower) median over
    the runs, with ``ms_runs`` (every run's median, in run order) and ``ms_min`` (over all runs)."""
    order, groups = [], {}
    for rows in runs:
        for r in rows:
            key = (r["case"], r["impl"])
            if key not in groups:
                order.append(key)
                groups[key] = []
            groups[key].append(r)
    out = []
    for key in order:
        group = [r for r in groups[key] if r.get("ms") is not None]
        if not group:  # a row without a timing (a step that failed): the first run's
            out.append(groups[key][0])
            continue
        ranked = sorted(group, key=lambda r: r["ms"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["ms_runs"] = [r["ms"] for r in group]
        row["ms_min"] = min(r.get("ms_min", r["ms"]) for r in group)
        out.append(row)
    return out


THREADING_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def threading_env() -> dict[str, str]:
    """The OpenMP threading variables set in this process's environment."""
    return {k: os.environ[k] for k in THREADING_ENV if k in os.environ}


def _run_in_processes(kernel: str, args, runs: int) -> list[dict]:
    """Runs one kernel's benchmark ``runs`` times, each in a fresh process, and combines them."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--kernels", kernel, "--device", args.device,
                   "--json", out, "--runs", "1"] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark run {i + 1} of {kernel} failed:\n{proc.stdout}\n{proc.stderr}")
            with open(out) as f:
                results.append(json.load(f)["kernels"][kernel])
            print(f"  {kernel}: run {i + 1}/{runs} done", flush=True)
    return combine_runs(results)


def check_entry_points(kernels: list[str]) -> int:
    """Imports ``bench_<name>`` for each kernel and checks ``KERNEL == name`` and a callable
    ``run(device, quick)``; prints one line per kernel, returns 1 when any is broken."""
    import inspect

    bad = 0
    for k in kernels:
        try:
            mod = importlib.import_module(f"bench_{k}")
            run = getattr(mod, "run", None)
            params = list(inspect.signature(run).parameters) if callable(run) else []
            if getattr(mod, "KERNEL", None) != k:
                raise AttributeError(f"KERNEL is {getattr(mod, 'KERNEL', None)!r}, expected {k!r}")
            if params[:2] != ["device", "quick"]:
                raise AttributeError(f"run must take (device, quick), got ({', '.join(params)})")
            print(f"bench_{k}: ok (KERNEL={k!r}, run({', '.join(params)}))")
        except Exception as e:  # noqa: BLE001 - reported per kernel
            bad += 1
            print(f"bench_{k}: BROKEN: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(available_kernels()),
                    help="comma-separated list of: " + ", ".join(available_kernels()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--json", default=None, help="output file (default bench/results/<device>.json)")
    ap.add_argument("--runs", type=int, default=1,
                    help="run each kernel's benchmark N times in fresh processes and keep the median run per row")
    ap.add_argument("--omp-wait-policy", choices=["active", "passive"], default=None,
                    help="set OMP_WAIT_POLICY for the benchmarks (idle OpenMP threads spin or sleep)")
    ap.add_argument("--check", action="store_true",
                    help="import the selected benchmarks and check their entry points; run nothing")
    args = ap.parse_args(argv)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY", "").lower() != args.omp_wait_policy:
        # read by the OpenMP runtime when torch loads: start again with it set
        env = dict(os.environ, OMP_WAIT_POLICY=args.omp_wait_policy.upper())
        cmd = [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv)
        return subprocess.call(cmd, env=env)
    if args.runs < 1:
        print(f"error: --runs must be >= 1, got {args.runs}", file=sys.stderr)
        return 2

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in available_kernels()]
    if unknown:
        print(f"error: unknown kernel(s) {', '.join(unknown)}; available: "
              f"{', '.join(available_kernels())}", file=sys.stderr)
        return 2
    if args.check:
        return check_entry_points(kernels)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA GPU is available", file=sys.stderr)
        return 2

    import pycompress

    dev = device_name(args.device)
    meta = {
        "device": dev,
        "device_type": args.device,
        "torch": torch.__version__,
        "pycompress": pycompress.__version__,
        "cpu_isa": pycompress.active_cpu_isa(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "quick": args.quick,
        "runs": args.runs,
        "threading_env": threading_env(),
        "cpu_id": cpu_id() if args.device == "cpu" else dev,
    }
    env_note = ", ".join(f"{k}={v}" for k, v in meta["threading_env"].items()) or "default OpenMP settings"
    print(f"# pycompress benchmarks on {dev} ({args.device}), torch {torch.__version__}, "
          f"{meta['threads']} threads, CPU path {meta['cpu_isa']}, {env_note}")
    results = {"meta": meta, "kernels": {}}
    failed = {}
    for k in kernels:
        mod = importlib.import_module(f"bench_{k}")
        load_before = os.getloadavg()[0]
        try:
            rows = mod.run(args.device, args.quick) if args.runs == 1 else _run_in_processes(k, args, args.runs)
        except Exception as e:  # one failing benchmark must not discard the others' results
            failed[k] = f"{type(e).__name__}: {e}"
            print(f"\n## {k}\nFAILED: {failed[k]}", file=sys.stderr, flush=True)
            continue
        results["kernels"][k] = rows
        results.setdefault("kernel_dates", {})[k] = _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds")
        results.setdefault("kernel_env", {})[k] = meta["threading_env"]
        # other load on the machine (1-minute load average) when the kernel started and finished
        results.setdefault("kernel_load", {})[k] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(f"\n## {k}\n" + format_table(rows))
        if hasattr(mod, "summarize"):
            summary = mod.summarize(rows)
            results.setdefault("summary", {})[k] = summary
            for line in summary:
                print("  " + line)

    if not results["kernels"]:
        print(f"error: every benchmark failed ({', '.join(failed)}); nothing written", file=sys.stderr)
        return 1
    out = args.json
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower() or args.device
        out = os.path.join(HERE, "results", f"{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    prev = {}
    if os.path.exists(out):
        try:
            with open(out) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = {}
    # keep other kernels' earlier results when only some were run on the same machine (CPUs
    # that report the same name, e.g. "AMD EPYC" in a VM, are told apart by cpu_id)
    pm = prev.get("meta", {})
    same_device = pm.get("device") == dev and pm.get("cpu_id", meta["cpu_id"]) == meta["cpu_id"]
    if prev and not same_device:
        print(f"note: {out} held results of another machine ({pm.get('device')}, "
              f"{pm.get('cpu_id', 'no cpu_id')}); they are replaced", file=sys.stderr)
    merged = prev.get("kernels", {}) if same_device else {}
    merged.update(results["kernels"])
    results["kernels"] = merged
    # when each kernel's rows were measured (meta["date"] is this run's start) and with which
    # threading variables
    for key in ("kernel_dates", "kernel_env", "kernel_load"):
        per_kernel = dict(prev.get(key, {})) if same_device else {}
        per_kernel.update(results.get(key, {}))
        results[key] = per_kernel
    if "summary" in prev and same_device:
        s = prev["summary"]
        s.update(results.get("summary", {}))
        results["summary"] = s
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    if failed:
        print(f"error: benchmark(s) failed: {'; '.join(f'{k}: {m[:500]}' for k, m in failed.items())}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
