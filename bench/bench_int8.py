"""Benchmark: int8 linear layers — pycompress Int8Linear (w8a8, w8a16) against its peers.

``pycompress w8a8 (7-bit act)`` is ``Int8Linear.from_float(..., act_bits=7)`` (per-token 7-bit
activations; on AVX2 CPUs without VNNI it runs the vpmaddubsw kernel), and
``pycompress w8a8 (7-bit act+w)`` is ``from_float(..., act_bits=7, weight_bits=7)`` (weights in
[-63, 63] as well: the int16 pair-sum kernel on AVX2); ``pycompress w8a8 (7-bit w)`` is
``from_float(..., weight_bits=7)`` with 8-bit activations (on AVX2 without VNNI: ``vpmaddubsw``
with A + 128, exact because every weight is in [-64, 64]).

Every row has ``rel err``: ``||y - y_fp32|| / ||y_fp32||`` of that implementation's output on the
timed input (weights N(0, 0.02), inputs N(0, 1)), so speed and accuracy are read side by side.

Peers measured in the same run: fp32 (and bf16 on CUDA) ``nn.Linear``, torch.ao
``quantize_dynamic`` int8 (CPU, FBGEMM/oneDNN), ``torch._int_mm`` + separate dequantization
(activations quantized per token first), and the raw ``int8_gemm`` against ``torch._int_mm``.

On the CPU ``torch._int_mm`` only runs for M * K * N <= 3e8 (it is far slower than every
other implementation there). CPU runs cap the batch size to keep the full set within minutes on small machines: M <= 512
(M <= 128 for K = N = 8192); the table says which shapes ran.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import pycompress.ops as ops
from common import PER_CORE, per_core_ms, run_ratio_range, time_fn
from pycompress.nn import Int8Linear

KERNEL = "int8"
W8A8_7 = "pycompress w8a8 (7-bit act)"
W8A8_77 = "pycompress w8a8 (7-bit act+w)"
W8A8_W7 = "pycompress w8a8 (7-bit w)"
OURS_W8A8 = ("pycompress w8a8", W8A8_7, W8A8_77, W8A8_W7)  # the rows with target lines

MS_FULL = [1, 16, 128, 512, 2048, 4096]
KN_FULL = [(768, 3072), (4096, 4096), (4096, 11008), (8192, 8192)]
CPU_MAX_M = {(8192, 8192): 128}
CPU_MAX_M_DEFAULT = 512


def _torch_ao_dynamic(lin: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def _int_mm_dequant(x, wq_t, w_scale, bias):
    """torch._int_mm peer: per-token quantization, int8 x int8 -> int32, separate dequant."""
    q, s = ops.quantize_per_token(x)
    acc = torch._int_mm(q, wq_t)
    return (acc.float() * s[:, None] * w_scale[None, :] + bias).to(x.dtype)


def _repeats(flops: float, device: str, quick: bool) -> int:
    if device != "cpu":
        return 20
    if flops > 4e10:
        return 3
    if flops > 5e9:
        return 5
    return 10 if quick else 20


def run(device: str, quick: bool = False) -> list[dict]:
    cuda = device.startswith("cuda")
    if quick:
        ms, kns = [1, 16, 128], [(4096, 4096)]
    else:
        ms, kns = MS_FULL, KN_FULL
    rows = []
    torch.manual_seed(0)
    for K, N in kns:
        lin = nn.Linear(K, N).to(device)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        q8 = Int8Linear.from_float(lin, mode="w8a8")
        q7 = Int8Linear.from_float(lin, mode="w8a8", act_bits=7)
        q77 = Int8Linear.from_float(lin, mode="w8a8", act_bits=7, weight_bits=7)
        qw7 = Int8Linear.from_float(lin, mode="w8a8", weight_bits=7)
        q16 = Int8Linear.from_float(lin, mode="w8a16")
        ao = _torch_ao_dynamic(lin) if not cuda else None  # quantizes a copy of lin
        wq_t = q8.weight.t()
        lin_bf16 = nn.Linear(K, N).to(device).bfloat16() if cuda else None
        for M in ms:
            if not cuda and M > CPU_MAX_M.get((K, N), CPU_MAX_M_DEFAULT):
                continue
            x = torch.randn(M, K, device=device)
            flops = 2.0 * M * K * N
            rep = _repeats(flops, device, quick)
            impls = [("fp32 nn.Linear", lambda: lin(x))]
            if cuda:
                xb = x.bfloat16()
                impls.append(("bf16 nn.Linear", lambda: lin_bf16(xb)))
            else:
                impls.append(("torch.ao dynamic int8", lambda: ao(x)))
            # torch._int_mm: CUDA refuses M <= 16 and K, N not multiples of 8; its CPU
            # kernel is a slow reference loop here, so only small CPU problems run it
            if (cuda and M > 16 and K % 8 == 0 and N % 8 == 0) or (not cuda and M * K * N <= 3e8):
                impls.append(("torch._int_mm+dequant", lambda: _int_mm_dequant(x, wq_t, q8.weight_scale, lin.bias)))
            impls.append(("pycompress w8a8", lambda: q8(x)))
            impls.append((W8A8_7, lambda: q7(x)))
            impls.append((W8A8_77, lambda: q77(x)))
            impls.append((W8A8_W7, lambda: qw7(x)))
            if cuda:
                impls.append(("pycompress w8a8 bf16", lambda: q8(xb)))
            if M <= 16 or not cuda:
                impls.append(("pycompress w8a16", lambda: q16(x)))
                if cuda:
                    impls.append(("pycompress w8a16 bf16", lambda: q16(xb)))
            if not cuda and (K, N) == (4096, 4096) and M in (1, 16, 128):
                rows += _per_core_rows(M, K, N, impls, rep)
            base = None
            with torch.no_grad():
                ref = lin(x).float()
                for impl, fn in impls:
                    try:
                        err = ((fn().float() - ref).norm() / ref.norm()).item()
                        t = time_fn(fn, device, warmup=1 if rep <= 5 else 2, repeats=rep)
                    except RuntimeError as e:  # a peer refusing the shape
                        rows.append({"kernel": KERNEL, "case": f"M={M} K={K} N={N}", "impl": impl,
                                     "M": M, "K": K, "N": N, "ms": float("nan"),
                                     "note": str(e).splitlines()[0][:60]})
                        continue
                    if impl == "fp32 nn.Linear":
                        base = t["ms"]
                    rows.append({
                        "kernel": KERNEL, "case": f"M={M} K={K} N={N}", "impl": impl,
                        "M": M, "K": K, "N": N, **t,
                        "TOPS": flops / (t["ms"] * 1e-3) / 1e12,
                        "x fp32": (base / t["ms"]) if base else float("nan"),
                        "rel err": err,
                    })
    if cuda:
        rows += _gemm_vs_int_mm(device, quick)
    return rows


def _per_core_rows(M, K, N, impls, rep) -> list[dict]:
    """fp32, torch.ao and our w8a8 rows on one thread (see common.per_core_ms)."""
    timed = per_core_ms([(impl, fn) for impl, fn in impls
                         if impl in ("fp32 nn.Linear", "torch.ao dynamic int8", *OURS_W8A8)], rep)
    return [{"kernel": KERNEL, "case": f"M={M} K={K} N={N}", "impl": f"{impl} {PER_CORE}",
             "M": M, "K": K, "N": N, "ms": ms, "TOPS": 2.0 * M * K * N / (ms * 1e-3) / 1e12}
            for impl, ms in timed.items()]


def _gemm_vs_int_mm(device: str, quick: bool) -> list[dict]:
    rows = []
    shapes = [(2048, 4096, 4096)] if quick else [(M, K, N) for M in (512, 2048, 4096)
                                                 for K, N in KN_FULL]
    for M, K, N in shapes:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=device)
        bt = b.t()
        flops = 2.0 * M * K * N
        for impl, fn in [("torch._int_mm", lambda: torch._int_mm(a, bt)),
                         ("pycompress int8_gemm", lambda: ops.int8_gemm(a, b))]:
            t = time_fn(fn, device, warmup=3, repeats=20)
            rows.append({"kernel": KERNEL, "case": f"gemm M={M} K={K} N={N}", "impl": impl,
                         "M": M, "K": K, "N": N, **t, "TOPS": flops / (t["ms"] * 1e-3) / 1e12})
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Speedup lines for the CPU targets (M in {1, 16, 128}, K = N = 4096), for the default
    8-bit activations, for ``act_bits=7``, for ``act_bits=7, weight_bits=7`` and for
    ``weight_bits=7``.

    Ratios of medians, and in brackets of the fastest runs (less sensitive to other load on
    a shared machine); then the per-core CPU-time ratios (one thread, best run).
    """
    out = []
    med = {(r["case"], r["impl"]): r["ms"] for r in rows}
    row_of = {(r["case"], r["impl"]): r for r in rows}
    best = {(r["case"], r["impl"]): r.get("ms_min", r["ms"]) for r in rows}
    for M in (1, 16, 128):
        case = f"M={M} K=4096 N=4096"
        if (case, "fp32 nn.Linear") not in med:
            continue
        for impl in OURS_W8A8:
            key = (case, impl)
            if key not in med:
                continue

            def ratio(peer, impl=impl):
                return med[(case, peer)] / med[(case, impl)], best[(case, peer)] / best[(case, impl)]

            f_med, f_min = ratio("fp32 nn.Linear")
            line = (f"{case}: {impl} {med[key]:.3f} ms = {f_med:.2f}x fp32 [{f_min:.2f}x]"
                    f"{run_ratio_range(row_of[(case, 'fp32 nn.Linear')], row_of[key], 2)} "
                    f"(target >= 3x: {'met' if f_med >= 3 else 'NOT met'})")
            if (case, "torch.ao dynamic int8") in med:
                a_med, a_min = ratio("torch.ao dynamic int8")
                line += (f", {a_med:.2f}x torch.ao dynamic int8 [{a_min:.2f}x]"
                         f"{run_ratio_range(row_of[(case, 'torch.ao dynamic int8')], row_of[key], 2)} "
                         f"(target >= 1.2x: {'met' if a_med >= 1.2 else 'NOT met'})")
            if impl == "pycompress w8a8" and (case, "pycompress w8a16") in med:
                w_med, w_min = ratio("fp32 nn.Linear", "pycompress w8a16")
                line += f"; w8a16 {med[(case, 'pycompress w8a16')]:.3f} ms = {w_med:.2f}x fp32 [{w_min:.2f}x]"
            out.append(line)
            pc = {name: med.get((case, f"{name} {PER_CORE}")) for name in
                  (impl, "fp32 nn.Linear", "torch.ao dynamic int8")}
            if all(v is not None for v in pc.values()):
                ours = pc[impl]
                f_pc, a_pc = pc["fp32 nn.Linear"] / ours, pc["torch.ao dynamic int8"] / ours
                out.append(f"    per core {PER_CORE}: {impl} {ours:.3f} ms = {f_pc:.2f}x fp32 "
                           f"(target >= 3x: {'met' if f_pc >= 3 else 'NOT met'}), {a_pc:.2f}x torch.ao "
                           f"dynamic int8 (target >= 1.2x: {'met' if a_pc >= 1.2 else 'NOT met'})")
    return out
