"""Int8Linear (w8a8) on several CPU code paths against torch.ao dynamic int8, in one process.

    python bench/compare_isa_int8.py [--isas avx512,amx] [--ms 1,16,128,512] [--rounds 9] [--threads 2]
                                     [--json FILE]

Shapes: K = N = 4096 and K = 768, N = 3072, each at every M of ``--ms``. Per shape the
implementations are timed in interleaved rounds (one round times each implementation once: the
median of several calls after a warm-up), so that a slow phase of a shared machine slows all of
them alike; the table gives the median of the round medians and their min-max range. The outputs
of the code paths are checked to be bit-identical before timing. A second table gives the best
CPU time per call on one thread (robust to other load on the machine).

The load average is recorded before and after the run; results are only comparable between
implementations of the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pycompress  # noqa: E402
from common import cpu_id, device_name, time_fn, write_kernel_file  # noqa: E402
from pycompress.nn import Int8Linear  # noqa: E402

KN = ((4096, 4096), (768, 3072))


def _torch_ao(lin: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def _on_isa(isa: str | None, fn):
    if isa is None:
        return fn

    def run():
        pycompress.set_cpu_isa(isa)
        return fn()

    return run


def _cpu_ms(fn, repeats: int) -> float:
    """Best CPU time of one call on one thread, ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        return best * 1e3
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isas", default="avx512,amx", help="comma-separated CPU code paths to compare")
    p.add_argument("--ms", default="1,16,128,512", help="comma-separated row counts M")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None,
                   help="write the rows and the run's metadata here, as a bench/results file (kernel "
                        "'isa_int8') that bench/tables.py renders")
    args = p.parse_args(argv)
    isas = [s for s in args.isas.split(",") if s]
    try:
        ms_list = [int(m) for m in args.ms.split(",") if m]
    except ValueError:
        p.error(f"--ms takes comma-separated integers, got '{args.ms}'")
    if not ms_list or min(ms_list) < 1:
        p.error(f"--ms needs row counts >= 1, got '{args.ms}'")
    available = pycompress._ext.cpu_isas()
    missing = [s for s in isas if s not in available]
    if missing:
        print(f"this CPU does not support {missing} (available: {available})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    previous_isa = pycompress.active_cpu_isa()
    load_before = os.getloadavg()
    started = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    torch.manual_seed(0)
    try:
        for M, K, N in [(M, K, N) for K, N in KN for M in ms_list]:
            lin = nn.Linear(K, N)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02)
            q = Int8Linear.from_float(lin, mode="w8a8")
            ao = _torch_ao(lin)
            x = torch.randn(M, K)
            impls = [("fp32 nn.Linear", None, lambda: lin(x)), ("torch.ao dynamic int8", None, lambda: ao(x))]
            outs = {}
            with torch.no_grad():
                for isa in isas:
                    impls.append((f"pycompress w8a8 [{isa}]", isa, _on_isa(isa, lambda: q(x))))
                    pycompress.set_cpu_isa(isa)
                    outs[isa] = q(x)
                for isa in isas[1:]:
                    assert torch.equal(outs[isa], outs[isas[0]]), f"{isa} and {isas[0]} outputs differ"
                ref = lin(x)
                err = {name: ((fn().float() - ref).norm() / ref.norm()).item() for name, _, fn in impls}
                reps = 20 if M * K * N < 1e8 else 8
                per_round = {name: [] for name, _, _ in impls}
                for _ in range(args.rounds):
                    for name, _, fn in impls:
                        per_round[name].append(time_fn(fn, warmup=2, repeats=reps)["ms"])
                cpu = {name: _cpu_ms(fn, max(5, reps)) for name, _, fn in impls}
            ao_med = statistics.median(per_round["torch.ao dynamic int8"])
            for name, isa, _ in impls:
                ms = per_round[name]
                med = statistics.median(ms)
                rows.append({
                    "kernel": "isa_int8", "case": f"M={M} K={K} N={N}", "M": M, "K": K, "N": N,
                    "impl": name, "isa": isa,
                    "ms": med, "ms_rounds_min": min(ms), "ms_rounds_max": max(ms), "ms_rounds": ms,
                    "vs torch.ao": ao_med / med, "cpu_ms_1thread": cpu[name], "rel err": err[name],
                })
                print(f"M={M:4d} K={K:5d} N={N:5d}  {name:28s} {med:8.3f} ms "
                      f"[{min(ms):.3f}-{max(ms):.3f}]  {ao_med / med:5.2f}x torch.ao  "
                      f"1 thread: {cpu[name]:8.3f} ms  err {100 * err[name]:.2f} %", flush=True)
    finally:
        pycompress.set_cpu_isa(previous_isa)
    meta = {
        "device": device_name("cpu"), "device_type": "cpu", "cpu_id": cpu_id(), "torch": torch.__version__,
        "threads": args.threads, "rounds": args.rounds, "isas": isas,
        "date": started.isoformat(timespec="seconds"),
    }
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.json:
        write_kernel_file(args.json, "isa_int8", rows, meta, load_before[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
