"""Benchmark: 2:4 semi-structured sparse linear (pycompress SemiSparseLinear).

CPU: dense fp32 nn.Linear against SemiSparseLinear with fp32 and fp16 values (fp32 activations).
CUDA: dense bf16 nn.Linear (cuBLAS) against SemiSparseLinear with bf16 values (sparse tensor
cores) and, where available, torch's ``to_sparse_semi_structured`` (bf16). Weights carry a
random 2:4 mask (exactly 2 of every 4 kept).
"""

from __future__ import annotations

import warnings

import torch

from common import time_fn
from pycompress.nn import SemiSparseLinear

KERNEL = "semi24"

SHAPES = [(4096, 4096), (768, 3072)]  # (K, N)


def _mask24(N, K, gen):
    order = torch.rand(N, K // 4, 4, generator=gen).argsort(-1).argsort(-1)
    return (order < 2).reshape(N, K)


def _case(K, N, M):
    return f"K={K} N={N} M={M}"


def _torch_semi_structured(lin):
    """torch's own 2:4 path (CUTLASS/cuSPARSELt), or None where unavailable."""
    try:
        from torch.sparse import to_sparse_semi_structured

        sl = torch.nn.Linear(lin.in_features, lin.out_features, bias=False, device=lin.weight.device,
                             dtype=lin.weight.dtype)
        with torch.no_grad():
            sl.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        return sl
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def run(device: str, quick: bool = False) -> list[dict]:
    cuda = str(device).startswith("cuda")
    if cuda:
        ms = [16, 4096] if quick else [1, 16, 256, 4096, 16384]
    else:
        ms = [1, 8, 32] if quick else [1, 8, 32, 128]
    repeats = 5 if quick else 15
    rows = []
    gen = torch.Generator().manual_seed(0)
    for K, N in SHAPES:
        w = torch.randn(N, K, generator=gen) * _mask24(N, K, gen)
        lin = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        if cuda:
            dense = lin.to(device=device, dtype=torch.bfloat16)
            ours = {"pycompress SemiSparseLinear bf16": SemiSparseLinear.from_dense(dense)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = _torch_semi_structured(dense)
            impls_base = [("dense bf16 nn.Linear", dense)] + list(ours.items())
            if ref is not None:
                impls_base.append(("torch to_sparse_semi_structured bf16", ref))
            xdtype = torch.bfloat16
        else:
            dense = lin
            impls_base = [("dense fp32 nn.Linear", dense),
                          ("pycompress SemiSparseLinear fp32", SemiSparseLinear.from_dense(lin)),
                          ("pycompress SemiSparseLinear fp16", SemiSparseLinear.from_dense(lin, dtype=torch.float16))]
            xdtype = torch.float32
        for M in ms:
            x = torch.randn(M, K, generator=gen).to(device=device, dtype=xdtype)
            with torch.no_grad():
                for impl, mod in impls_base:
                    try:
                        t = time_fn(lambda: mod(x), device, warmup=2, repeats=repeats)
                    except RuntimeError as e:  # e.g. torch's semi-structured path refusing a shape
                        if impl.startswith("torch"):
                            continue
                        raise e
                    rows.append({"kernel": KERNEL, "case": _case(K, N, M), "impl": impl, "K": K, "N": N, "M": M,
                                 **t, "GFLOP/s dense-equiv": 2 * M * K * N / (t["ms"] * 1e-3) / 1e9})
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Speed-up of SemiSparseLinear over the dense layer of the same device (CUDA target: >= 1.3x
    dense bf16 at large M)."""
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    lines = []
    for case, d in by.items():
        base = d.get("dense fp32 nn.Linear") or d.get("dense bf16 nn.Linear")
        if base is None:
            continue
        parts = []
        for impl, r in d.items():
            if impl.startswith("pycompress") or impl.startswith("torch"):
                parts.append(f"{impl.replace('pycompress ', '')} {r['ms']:.3f} ms = {base['ms'] / r['ms']:.2f}x dense")
        line = f"{case}: " + "; ".join(parts)
        if "dense bf16 nn.Linear" in d and base["M"] >= 4096 and "pycompress SemiSparseLinear bf16" in d:
            ok = base["ms"] / d["pycompress SemiSparseLinear bf16"]["ms"] >= 1.3
            line += f"  [target >=1.3x dense bf16: {'met' if ok else 'MISSED'}]"
        lines.append(line)
    return lines
