"""Benchmark: sparse x dense linear (pycompress SparseLinear) vs dense fp32 nn.Linear and torch CSR.

Weights are pruned unstructured by magnitude-free random masks at the given sparsity; every
implementation computes ``x @ W.T`` for ``x [M, K]`` in the same run.
"""

from __future__ import annotations

import warnings

import torch

from common import PER_CORE, per_core_ms, run_ratio_range, time_fn
from pycompress.nn import SparseLinear

KERNEL = "sparse"
IMPLS = ("dense fp32 nn.Linear", "torch CSR sparse.mm", "pycompress SparseLinear")

SHAPES = [(4096, 4096), (768, 3072)]  # (K, N)


def _case(K, N, s, M):
    return f"K={K} N={N} s={int(round(s * 100))}% M={M}"


def run(device: str, quick: bool = False) -> list[dict]:
    sparsities = [0.9] if quick else [0.5, 0.75, 0.9, 0.95]
    ms = [1, 8, 32] if quick else [1, 8, 32, 128]
    repeats = 5 if quick else 15
    rows = []
    gen = torch.Generator().manual_seed(0)
    for K, N in SHAPES:
        for s in sparsities:
            w = torch.randn(N, K, generator=gen)
            w = (w * (torch.rand(N, K, generator=gen) >= s)).to(device)
            lin = torch.nn.Linear(K, N, bias=False, device=device)
            with torch.no_grad():
                lin.weight.copy_(w)
            ours = SparseLinear.from_dense(lin)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wcsr = w.to_sparse_csr()
            for M in ms:
                x = torch.randn(M, K, generator=gen).to(device)
                impls = [
                    ("dense fp32 nn.Linear", lambda: lin(x)),
                    ("torch CSR sparse.mm", lambda: torch.sparse.mm(wcsr, x.t()).t()),
                    ("pycompress SparseLinear", lambda: ours(x)),
                ]
                with torch.no_grad():
                    for impl, fn in impls:
                        # sub-millisecond cases get more repeats (up to 10x) for a stable median
                        t = time_fn(fn, device, warmup=3, repeats=repeats, min_time_s=0.05 if quick else 0.2)
                        rows.append({"kernel": KERNEL, "case": _case(K, N, s, M), "impl": impl, "K": K, "N": N,
                                     "sparsity": s, "M": M, **t,
                                     "GFLOP/s dense-equiv": 2 * M * K * N / (t["ms"] * 1e-3) / 1e9})
                    if device == "cpu" and _is_target(s, M):
                        rows += _per_core_rows(K, N, s, M, impls, repeats)
    return rows


def _is_target(sparsity: float, M: int) -> bool:
    return abs(sparsity - 0.9) < 1e-6 and M in (1, 8, 32)


def _per_core_rows(K, N, s, M, impls, repeats) -> list[dict]:
    """The target cases on one thread (see common.per_core_ms)."""
    return [{"kernel": KERNEL, "case": _case(K, N, s, M), "impl": f"{impl} {PER_CORE}", "K": K, "N": N,
             "sparsity": s, "M": M, "ms": ms, "GFLOP/s dense-equiv": 2 * M * K * N / (ms * 1e-3) / 1e9}
            for impl, ms in per_core_ms(impls, 3 * repeats).items()]


def summarize(rows: list[dict]) -> list[str]:
    """Speed-ups of SparseLinear over dense and torch CSR; target lines at 90% sparsity, M <= 32."""
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    lines = []
    for case, d in by.items():
        if not set(IMPLS) <= d.keys():
            continue
        ours = d["pycompress SparseLinear"]
        vd = d["dense fp32 nn.Linear"]["ms"] / ours["ms"]
        vc = d["torch CSR sparse.mm"]["ms"] / ours["ms"]
        line = (f"{case}: SparseLinear {ours['ms']:.3f} ms = {vd:.1f}x dense fp32"
                f"{run_ratio_range(d['dense fp32 nn.Linear'], ours)}, {vc:.1f}x torch CSR"
                f"{run_ratio_range(d['torch CSR sparse.mm'], ours)}")
        if _is_target(ours["sparsity"], ours["M"]):
            ok = vd >= 5 and vc >= 2
            line += f"  [target >=5x dense and >=2x CSR: {'met' if ok else 'MISSED'}]"
        lines.append(line)
        if all(f"{impl} {PER_CORE}" in d for impl in IMPLS):
            pc = [d[f"{impl} {PER_CORE}"]["ms"] for impl in IMPLS]
            lines.append(f"    per core {PER_CORE}: SparseLinear {pc[2]:.3f} ms = {pc[0] / pc[2]:.1f}x dense fp32, "
                         f"{pc[1] / pc[2]:.1f}x torch CSR")
    return lines
