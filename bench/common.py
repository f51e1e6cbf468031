"""Timing helpers shared by the kernel benchmarks."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 3, repeats: int = 10,
            min_time_s: float = 0.0, warmup_s: float = 0.025) -> dict:
    """Times ``fn`` and returns ``{"ms": median, "ms_min": ..., "ms_p90": ..., "repeats": n}``.

    Warm-up runs ``warmup`` calls and continues until ``warmup_s`` has elapsed (sub-millisecond
    calls otherwise get timed while the thread pool's threads are still being placed on cores).
    CUDA timings use events around each call after a synchronize; CPU timings use
    ``time.perf_counter``. Repeats continue until ``min_time_s`` has elapsed as well.
    """
    start_warm = time.perf_counter()
    n = 0
    while n < warmup or (time.perf_counter() - start_warm) < warmup_s:
        fn()
        n += 1
        if n >= 100 * max(1, warmup):
            break
    sync(device)
    gc.collect()
    times = []
    start_all = time.perf_counter()
    cuda = str(device).startswith("cuda")
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        if cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    times.sort()
    return {
        "ms": statistics.median(times),
        "ms_min": times[0],
        "ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "repeats": len(times),
    }


PER_CORE = "[1 thread, CPU time]"  # impl suffix of the rows timed by per_core_ms


def per_core_ms(impls, repeats: int) -> dict[str, float]:
    """Best CPU time per call of each ``(name, fn)`` in ``impls`` on one thread, in ms: robust to
    other load on a shared machine, where wall-clock medians of multi-threaded runs swing by 2x or
    more. With one thread the work runs on the calling thread, and only that thread's CPU time is
    counted (idle OpenMP workers that keep spinning, e.g. with ``OMP_WAIT_POLICY=active``, would
    add to the process's). The thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        with torch.no_grad():
            for name, fn in impls:
                fn()
                best = float("inf")
                for _ in range(max(3, repeats)):
                    t0 = time.thread_time()
                    fn()
                    best = min(best, time.thread_time() - t0)
                out[name] = best * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def _cpuinfo() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str:
    """Vendor, family, model and stepping of the CPU (Linux), else the processor string."""
    import platform

    fields = _cpuinfo()
    keys = ("vendor_id", "cpu family", "model", "stepping")
    if all(k in fields for k in keys):
        return "{} family {} model {} stepping {}".format(*(fields[k] for k in keys))
    return platform.processor() or platform.machine()


def write_kernel_file(path: str, kernel: str, rows: list[dict], meta: dict, load_before: float) -> None:
    """Writes (atomically) a results file of one kernel in ``bench/run.py``'s format, which
    ``bench/tables.py`` reads: the rows, the run's ``meta``, when the kernel finished (now), its
    threading variables and the 1-minute load average at its start and now."""
    import datetime as _dt
    import json
    import os

    results = {"meta": meta, "kernels": {kernel: rows},
               "kernel_dates": {kernel: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
               "kernel_env": {kernel: meta.get("threading_env", {})},
               "kernel_load": {kernel: [round(load_before, 2), round(os.getloadavg()[0], 2)]}}
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def run_ratio_range(base: dict, row: dict, digits: int = 1) -> str:
    """``" (runs: lo-hi x)"``: the speed-up of ``row`` over ``base`` in each run, when both rows
    carry per-run medians (``bench/run.py --runs N``), else ``""``."""
    a, b = base.get("ms_runs"), row.get("ms_runs")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return ""
    r = [x / y for x, y in zip(a, b)]
    return f" (runs: {min(r):.{digits}f}-{max(r):.{digits}f}x)"


def rows_by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """``{case: {impl: row}}`` of a benchmark's rows, for summaries that compare within a case."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    return by
