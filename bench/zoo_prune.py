"""Model-zoo check of channel pruning: torchvision and timm CNNs pruned 50% by channels and compacted.

    python bench/zoo_prune.py --ext build/cuda/lib [--runs 3] [--models ResNet-18,VGG-16]
                              [--batch 8] [--rounds 5] [--json FILE] [--quick]

Runs in a Python environment that has torchvision and timm (their releases pin one exact torch,
so not the development venv: ``make zoo-prune`` uses the CUDA-torch venv of ``make cuda-build``,
whose torch runs on the CPU too). ``--ext DIR`` names the folder holding a
``pycompress/_C*.so`` built for that torch: the script lays this checkout's ``pycompress``
package next to that extension in a temporary folder and imports it from there. Without
``--ext`` it imports ``pycompress`` as installed.

Every architecture, with random weights (seed 0) and random BatchNorm statistics, in eval mode:

1. ``prune_channels(model, 0.5, scope="layer", method="magnitude_l2")`` on a 1 x 3 x 224 x 224
   example: half of the prunable channels of every dependency group. Recorded: the groups found,
   how many were pruned, the channels pruned, and per group the reason some or all of its
   channels were kept (the ``ChannelPruningReport``).
2. ``compact(model, example)``: recorded are the layers left masked with the reason, and
   ``rel err``: max |compacted - masked| / max |masked| of the logits on the timed batch.
3. Parameters and multiply-adds (forward hooks on every conv and linear layer) of the result
   against the dense model, and the forward latency of both at batch ``--batch`` x 3 x 224 x 224
   (interleaved: one call of each per round, the median over ``--rounds`` rounds).

Each architecture runs in its own process, ``--runs`` times (fresh processes); per architecture
the row of the median run is kept, with every run's median in ``ms_runs``. A step that fails is
recorded with its exception and the architecture gets no timing. Output: a
``bench/run.py``-style results file (kernel ``zoo_prune``), default
``bench/results/<device>-zoo.json``; ``bench/tables.py`` renders its ``zoo-prune`` table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNEL = "zoo_prune"
SPARSITY = 0.5

# name -> (library, constructor)
ARCHS = {
    "ResNet-18": ("torchvision", "resnet18"),
    "ResNet-50": ("torchvision", "resnet50"),
    "MobileNetV2": ("torchvision", "mobilenet_v2"),
    "EfficientNet-Lite0": ("timm", "efficientnet_lite0"),
    "VGG-16": ("torchvision", "vgg16"),
    "DenseNet-121": ("torchvision", "densenet121"),
    "RegNetY-400MF": ("torchvision", "regnet_y_400mf"),
    "ConvNeXt-tiny": ("torchvision", "convnext_tiny"),
}


# --------------------------------------------------------------------------- one architecture
def _build(lib: str, ctor: str):
    import torch

    torch.manual_seed(0)
    if lib == "torchvision":
        import torchvision

        model = getattr(torchvision.models, ctor)(weights=None)
    else:
        import timm

        model = timm.create_model(ctor, pretrained=False)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cnn_models import randomize_batchnorm

    return randomize_batchnorm(model.eval(), seed=0)


def _macs(model, x) -> int:
    import torch

    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d) or hasattr(m, "groups") and hasattr(m, "kernel_size"):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, kinds) or type(m).__name__ in ("MaskedConv2d", "MaskedLinear")]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _reasons(refused: dict) -> list[str]:
    """Distinct reasons of a report's ``refused`` dict with how many groups/layers gave each."""
    counts: dict[str, int] = {}
    for why in refused.values():
        for part in re.split(r"; (?=[a-z0-9'])", re.sub(r"^some channels are kept: ", "", str(why))):
            part = re.sub(r"'[^']*'", "'…'", part.strip())  # one line per kind of reason, not per layer
            part = re.sub(r"\b\d+\b", "N", part)
            counts[part] = counts.get(part, 0) + 1
    return [f"{why} (×{n})" for why, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def one(name: str, batch: int, rounds: int, side: int) -> list[dict]:
    import torch

    import pycompress
    from pycompress.pruning.channels import prune_channels

    lib, ctor = ARCHS[name]
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", torch.get_num_threads())))
    g = torch.Generator().manual_seed(1)
    example = torch.randn(1, 3, side, side, generator=g)
    x = torch.randn(batch, 3, side, side, generator=g)
    base = {"kernel": KERNEL, "case": name, "model": f"{lib}.{ctor}", "batch": batch,
            "threads": torch.get_num_threads()}
    dense = _build(lib, ctor)
    dense_params, dense_macs = _params(dense), _macs(dense, example)
    row = {**base, "impl": f"pycompress {int(SPARSITY * 100)}% compact"}
    stage = "prune"
    try:
        t0 = time.perf_counter()
        masked, report = prune_channels(copy.deepcopy(dense), SPARSITY, scope="layer", method="magnitude_l2",
                                        example_inputs=example, return_report=True)
        row["prune_s"] = time.perf_counter() - t0
        row.update(groups=len(report.groups), groups_pruned=sum(1 for gr in report.groups if gr["pruned"]),
                   channels=report.channels_before, channels_pruned=report.channels_pruned,
                   kept_reasons=_reasons(report.refused), refused_groups=dict(report.refused))
        stage = "compact"
        with torch.no_grad():
            ref = masked(x)
        t0 = time.perf_counter()
        small, creport = pycompress.compact(masked, example, return_report=True)
        row["compact_s"] = time.perf_counter() - t0
        row.update(compacted_layers=len(creport.compacted), compact_refused=dict(creport.refused),
                   compact_reasons=_reasons(creport.refused))
        stage = "check"
        with torch.no_grad():
            out = small(x)
        row["rel err"] = float((out - ref).abs().max() / ref.abs().max())
        row.update({"params (M)": _params(small) / 1e6, "param ratio": _params(small) / dense_params,
                    "MAC ratio": _macs(small, example) / dense_macs, "status": "ok"})
    except Exception as e:  # noqa: BLE001 - the failure is the result
        row.update(status=f"{stage} failed", error=_error(e), traceback=traceback.format_exc(limit=-4))
        return [row]
    stage = "time"
    times = {"dense": [], "small": []}
    with torch.no_grad():
        for m in (dense, small):
            m(x)
        for _ in range(rounds):
            for k, m in (("dense", dense), ("small", small)):
                t0 = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    dense_row = {**base, "impl": "dense", "params (M)": dense_params / 1e6, "GMAC/image": dense_macs / 1e9,
                 "ms": statistics.median(times["dense"]), "ms_min": min(times["dense"]), "repeats": rounds}
    row.update(ms=statistics.median(times["small"]), ms_min=min(times["small"]), repeats=rounds)
    return [dense_row, row]


# --------------------------------------------------------------------------- driver
def _model_names(spec: str, known) -> list[str] | None:
    """The comma-separated model names of ``spec``; None (after an error message) when one is
    not in ``known``."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return None
    return names


def _stage_package(ext_dir: str, tmp: str) -> str:
    """``tmp/pycompress``: this checkout's Python package with the extension of ``ext_dir``."""
    sos = [f for f in os.listdir(os.path.join(ext_dir, "pycompress")) if f.startswith("_C") and f.endswith(".so")]
    if not sos:
        raise SystemExit(f"zoo_prune: no pycompress/_C*.so under {ext_dir} (build it: make cuda-build)")
    dst = os.path.join(tmp, "pycompress")
    shutil.copytree(os.path.join(ROOT, "pycompress"), dst,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(os.path.join(ext_dir, "pycompress", sos[0]), dst)
    return tmp


def _combine(runs: list[list[dict]]) -> list[dict]:
    """Per (case, impl) the row of the median run (by ``ms``) with ``ms_runs``; failures as they came."""
    groups: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            groups.setdefault((r["case"], r["impl"]), []).append(r)
    out = []
    for group in groups.values():
        timed = [r for r in group if r.get("ms") is not None]
        if not timed:
            out.append(group[0])
            continue
        ranked = sorted(timed, key=lambda r: r["ms"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["ms_runs"] = [r["ms"] for r in timed]
        row["ms_min"] = min(r["ms_min"] for r in timed)
        out.append(row)
    return out


def probe_versions(env: dict, cwd: str, label: str) -> dict | None:
    """torch, torchvision, timm and pycompress as the subprocesses will import them (``env``),
    printed; None (with the reason on stderr) when one cannot be imported."""
    probe = ("import json, platform, torch, pycompress, torchvision, timm; "
             "print(json.dumps({'torch': torch.__version__, 'torchvision': torchvision.__version__, "
             "'timm': timm.__version__, 'pycompress': pycompress.__version__, "
             "'pycompress_file': pycompress.__file__, 'cpu_isa': pycompress.active_cpu_isa(), "
             "'threads': torch.get_num_threads()}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        print(f"error: pycompress, torchvision or timm cannot be imported here:\n{proc.stderr}", file=sys.stderr)
        return None
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"# {label}: torch {versions['torch']}, torchvision {versions['torchvision']}, timm "
          f"{versions['timm']}, pycompress from {versions['pycompress_file']}, CPU path {versions['cpu_isa']}, "
          f"{versions['threads']} threads", flush=True)
    return versions


def write_results(kernel: str, rows: list[dict], versions: dict, load_before: float, out: str | None,
                  suffix: str, extra_meta: dict) -> str:
    """Writes ``rows`` as a ``bench/run.py``-style results file with one kernel (default
    ``bench/results/<device>-<suffix>.json``) and returns its path."""
    sys.path.insert(0, HERE)
    from common import cpu_id, device_name, write_kernel_file

    dev = device_name("cpu")
    meta = {"device": dev, "device_type": "cpu", "torch": versions["torch"], "torchvision": versions["torchvision"],
            "timm": versions["timm"], "pycompress": versions["pycompress"], "cpu_isa": versions["cpu_isa"],
            "threads": versions["threads"], "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), **extra_meta,
            "threading_env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ},
            "cpu_id": cpu_id()}
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()
        out = os.path.join(HERE, "results", f"{slug}-{suffix}.json")
    write_kernel_file(out, kernel, rows, meta, load_before)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ext", help="folder with pycompress/_C*.so built for this Python's torch")
    ap.add_argument("--models", default=",".join(ARCHS), help="comma-separated: " + ", ".join(ARCHS))
    ap.add_argument("--runs", type=int, default=3, help="fresh-process runs per architecture")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="64x64 inputs, batch 2, 2 rounds, one run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    side = 64 if args.quick else 224
    if args.quick:
        args.batch, args.rounds, args.runs = 2, 2, 1
    if args.one:
        rows = one(args.one, args.batch, args.rounds, side)
        with open(args.out, "w") as f:
            json.dump(rows, f)
        return 0

    names = _model_names(args.models, ARCHS)
    if names is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.ext:
            path = _stage_package(os.path.abspath(args.ext), tmp)
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
        versions = probe_versions(env, tmp, KERNEL)
        if versions is None:
            return 1
        runs: list[list[dict]] = []
        load_before = os.getloadavg()[0]
        for i in range(args.runs):
            rows: list[dict] = []
            for name in names:
                out = os.path.join(tmp, "rows.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--out", out,
                       "--batch", str(args.batch), "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                if p.returncode != 0:  # the process itself died (a crash, not an exception)
                    rows.append({"kernel": KERNEL, "case": name, "impl": f"pycompress {int(SPARSITY * 100)}% compact",
                                 "model": ".".join(ARCHS[name]), "status": "process failed",
                                 "error": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"})
                else:
                    with open(out) as f:
                        rows += json.load(f)
                last = rows[-1]
                print(f"  run {i + 1}/{args.runs} {name}: {last.get('status')}"
                      + (f", {last['ms']:.1f} ms" if last.get("ms") is not None else f" ({last.get('error', '')[:200]})"),
                      flush=True)
            runs.append(rows)

    rows = _combine(runs)
    out = write_results(KERNEL, rows, versions, load_before, args.json, "zoo",
                        {"quick": args.quick, "runs": args.runs})
    for r in rows:
        if r["impl"] == "dense":
            continue
        if r.get("status") != "ok":
            print(f"{r['case']}: {r.get('status')}: {r.get('error')}")
            continue
        d = next(x for x in rows if x["case"] == r["case"] and x["impl"] == "dense")
        print(f"{r['case']}: {r['groups_pruned']}/{r['groups']} groups pruned, {r['channels_pruned']}/"
              f"{r['channels']} channels; rel err {r['rel err']:.1e}; params x{r['param ratio']:.3f}, "
              f"MACs x{r['MAC ratio']:.3f}; {d['ms']:.1f} -> {r['ms']:.1f} ms = {d['ms'] / r['ms']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
