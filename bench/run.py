"""Kernel microbenchmark runner: prints a table per kernel and writes JSON results.

    python bench/run.py [--kernels quant,int8,sparse,kd] [--device cpu|cuda] [--quick] [--json FILE]

Every ``bench/bench_<name>.py`` module defines ``KERNEL`` and ``run(device, quick) -> rows``;
rows are dicts with at least ``kernel``, ``case``, ``impl`` and ``ms``. The JSON file
(default ``bench/results/<device>.json``) records the device name, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import device_name  # noqa: E402


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
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(available_kernels()),
                    help="comma-separated list of: " + ", ".join(available_kernels()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--json", default=None, help="output file (default bench/results/<device>.json)")
    args = ap.parse_args(argv)

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in available_kernels()]
    if unknown:
        print(f"error: unknown kernel(s) {', '.join(unknown)}; available: "
              f"{', '.join(available_kernels())}", file=sys.stderr)
        return 2
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
    }
    print(f"# pycompress benchmarks on {dev} ({args.device}), torch {torch.__version__}, "
          f"{meta['threads']} threads, CPU path {meta['cpu_isa']}")
    results = {"meta": meta, "kernels": {}}
    for k in kernels:
        mod = importlib.import_module(f"bench_{k}")
        rows = mod.run(args.device, args.quick)
        results["kernels"][k] = rows
        results.setdefault("kernel_dates", {})[k] = _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds")
        print(f"\n## {k}\n" + format_table(rows))
        if hasattr(mod, "summarize"):
            summary = mod.summarize(rows)
            results.setdefault("summary", {})[k] = summary
            for line in summary:
                print("  " + line)

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
    # keep other kernels' earlier results when only some were run
    merged = prev.get("kernels", {}) if prev.get("meta", {}).get("device") == dev else {}
    merged.update(results["kernels"])
    results["kernels"] = merged
    # when each kernel's rows were measured (meta["date"] is this run's start)
    same_device = prev.get("meta", {}).get("device") == dev
    dates = dict(prev.get("kernel_dates", {})) if same_device else {}
    dates.update(results.get("kernel_dates", {}))
    results["kernel_dates"] = dates
    if "summary" in prev and same_device:
        s = prev["summary"]
        s.update(results.get("summary", {}))
        results["summary"] = s
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
