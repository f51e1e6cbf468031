"""Benchmark: fused KD softmax-KL loss, forward + backward (pycompress vs eager vs torch.compile).

Every implementation computes ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
reduction="batchmean") * T**2`` and its gradient with respect to the student logits ``s``.

Memory: on CPU each (case, implementation) runs in a fresh subprocess. After one warm-up step
(which also compiles, for torch.compile), the process's peak-RSS counter is reset
(``echo 5 > /proc/self/clear_refs``) and ``extra_MB`` = VmHWM during one more forward+backward
minus VmRSS just before it, i.e. every byte the step touched beyond the inputs — including the
gradient tensor itself (``grad_MB``), which any implementation must produce. Where clear_refs
is not writable the child reports peak RSS since start (noted in the ``mem_method`` column).
``cpu_ms`` is the process CPU time (user + system, all threads) per step, reported next to the
wall time because this machine's cores are shared. On CUDA ``extra_MB`` is ``torch.cuda.max_memory_allocated`` growth over the inputs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import time_fn

KERNEL = "kd"
T = 2.0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def torch_kd(s, t):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * (T * T)


def make_impl(name):
    if name == "torch eager":
        return torch_kd
    if name == "torch.compile":
        return torch.compile(torch_kd, dynamic=False)
    import pycompress.ops as ops

    if name == "pycompress":
        return lambda s, t: ops.kd_kl_div(s, t, T, "batchmean")
    if name == "pycompress fused":
        return lambda s, t: ops.kd_kl_div(s, t, T, "batchmean", fused=True)
    if name == "liger":
        from liger_kernel.transformers import LigerKLDIVLoss

        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: loss(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * (T * T)
    raise ValueError(name)


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _measure(impl, N, V, dtype_name, device, quick):
    """Runs in the child (CPU) or in-process (CUDA): warm-up, one measured step, timing."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    s = (torch.randn(N, V, device=device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, device=device) * 2).to(dtype)
    fn = make_impl(impl)

    def step():
        fn(s, t).backward()
        s.grad = None

    step()  # warm-up / compile
    res = {}
    if device == "cpu":
        base = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            res["mem_method"] = "VmHWM reset"
        except OSError:
            res["mem_method"] = "peak since start"
        step()
        res["extra_MB"] = (_status_kb("VmHWM") - base) / 1024
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        res["extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res["mem_method"] = "cuda allocator peak"
    slow = impl.startswith("torch") and N * V >= 2**27
    cpu = {"s": 0.0, "n": 0}

    def timed_step():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        step()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu["s"] += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        cpu["n"] += 1

    t_ = time_fn(timed_step if device == "cpu" else step, device, warmup=0,
                 repeats=2 if (quick or slow) else 5)
    res.update(t_)
    if device == "cpu":
        # process CPU time (user + system, all threads) per step: less sensitive than wall time
        # to other load on a shared machine
        res["cpu_ms"] = 1e3 * cpu["s"] / max(cpu["n"], 1)
    return res


def _run_child(impl, N, V, dtype_name, quick):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(N), str(V), dtype_name,
           "1" if quick else "0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(device: str, quick: bool = False) -> list[dict]:
    cases = [(4096, 32000, "float32")] if quick else [
        (n, v, d) for d in ("float32", "bfloat16")
        for n, v in ((4096, 32000), (1024, 128256), (8192, 50257))]
    impls = ["torch eager", "torch.compile", "pycompress", "pycompress fused"]
    if device.startswith("cuda"):
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger")
        except ImportError:
            pass
    rows = []
    for N, V, dname in cases:
        esize = torch.empty((), dtype=getattr(torch, dname)).element_size()
        grad_mb = N * V * esize / 2**20
        moved = 3 * N * V * esize  # read s, t; write the gradient
        for impl in impls:
            if device.startswith("cuda"):
                r = _measure(impl, N, V, dname, device, quick)
            else:
                r = _run_child(impl, N, V, dname, quick)
            row = {"kernel": KERNEL, "case": f"N={N} V={V} {dname}", "impl": impl, "N": N, "V": V,
                   "dtype": dname, "grad_MB": grad_mb}
            if "error" in r:
                row.update(ms=float("nan"), error=r["error"])
            else:
                row.update(r)
                row["extra/grad"] = r["extra_MB"] / grad_mb
                row["GB/s"] = moved / (r["ms"] * 1e-3) / 1e9
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    lines = []
    by = {(r["case"], r["impl"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = by.get((case, "pycompress"))
        eager = by.get((case, "torch eager"))
        comp = by.get((case, "torch.compile"))
        fz = by.get((case, "pycompress fused"))
        if not ours or not ours.get("ms") or ours["ms"] != ours["ms"]:
            continue
        target = case == "N=4096 V=32000 float32"
        parts = []
        if eager:
            sp = eager["ms"] / ours["ms"]
            parts.append(f"{sp:.1f}x vs eager" + (f" (target >= 8x: {'met' if sp >= 8 else 'MISSED'})" if target else ""))
        if comp:
            sp = comp["ms"] / ours["ms"]
            parts.append(f"{sp:.2f}x vs torch.compile" + (f" (target >= 2x: {'met' if sp >= 2 else 'MISSED'})" if target else ""))
        ratio = ours.get("extra/grad")
        if ratio is not None:
            parts.append(f"extra peak memory {ratio:.2f}x the gradient" + (f" (target <= 1.25x: {'met' if ratio <= 1.25 else 'MISSED'})" if target else ""))
        if eager and ours.get("cpu_ms") and eager.get("cpu_ms") and comp and comp.get("cpu_ms"):
            parts.append(f"by CPU time {eager['cpu_ms'] / ours['cpu_ms']:.1f}x vs eager, "
                         f"{comp['cpu_ms'] / ours['cpu_ms']:.2f}x vs torch.compile")
        if fz and fz.get("ms") == fz.get("ms"):
            parts.append(f"fused=True {ours['ms'] / fz['ms']:.2f}x the speed of the default two-pass")
        lines.append(f"kd {case}: pycompress {ours['ms']:.1f} ms; " + "; ".join(parts))
    return lines


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    impl, N, V, dname, quick = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
    print(json.dumps(_measure(impl, N, V, dname, "cpu", quick)))
