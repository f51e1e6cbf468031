"""``deploy_pruned``: turns masked layers into inference layers (SparseLinear, SemiSparseLinear or
dense ``nn.Linear``), choosing by measured speed in ``mode="auto"``."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from pycompress import _ext, _utils
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.nn.semi_sparse_linear import SemiSparseLinear
from pycompress.nn.sparse_linear import SparseLinear
from pycompress.pruning.prune import _set_module

__all__ = ["deploy_pruned", "measure"]


def _median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


@torch.no_grad()
def measure(layer: nn.Module, x: torch.Tensor, reps: int = 5) -> float:
    """The default timer of :func:`deploy_pruned`: median seconds of ``layer(x)`` over ``reps``
    calls, after two warm-up calls."""
    for _ in range(2):
        layer(x)
    return _median_ms(lambda: layer(x), reps) / 1e3


def _timed(timer, layer: nn.Module, x: torch.Tensor, name: str) -> float:
    t = timer(layer, x)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"deploy_pruned: timer returned {t!r} for the {type(layer).__name__} of layer {name!r} "
                         f"at {x.shape[0]} row(s); it must return the seconds per call (a number >= 0)")
    return float(t)


@torch.no_grad()
def _sparse_is_faster(dense: nn.Module, sparse: nn.Module, batch_sizes, timer, name: str) -> bool:
    dev = next(dense.parameters()).device
    dtype = next(dense.parameters()).dtype
    for bs in batch_sizes:
        x = torch.randn(bs, dense.in_features, device=dev, dtype=dtype)
        td = _timed(timer, dense, x, name)
        ts = _timed(timer, sparse, x, name)
        if ts >= td:
            return False
    return True


def deploy_pruned(model: nn.Module, mode: str = "auto", include=None, exclude=None,
                  batch_sizes=(1, 32), timer=None) -> nn.Module:
    """Turns the MaskedLinear layers of ``model`` into inference layers, in place.

    ``mode="sparse"`` gives :class:`~pycompress.nn.SparseLinear`, ``"dense"`` a plain ``nn.Linear``
    (``weight * mask``), and ``"auto"`` times both on the layer's device at ``batch_sizes`` rows and
    keeps SparseLinear only where it is faster at every one of them (never slower than dense).
    ``mode="semi24"`` gives :class:`~pycompress.nn.SemiSparseLinear` (masks must be 2:4, e.g. from
    ``prune(..., pattern="2:4")``); in ``"auto"`` a 2:4-masked layer becomes SemiSparseLinear where
    that is faster than the other choice at every batch size.

    ``timer(layer, x) -> float`` measures ``"auto"``'s candidates: the seconds one call of the
    candidate ``layer`` (``nn.Linear``, ``SparseLinear`` or ``SemiSparseLinear``) takes on the
    random batch ``x`` (``batch_sizes`` rows). Default :func:`pycompress.pruning.deploy.measure`
    (median of 5 calls after 2 warm-up calls); pass another to time differently or to make the
    choice reproducible.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("auto", "sparse", "dense", "semi24"):
        raise ValueError(f"mode must be 'auto', 'sparse', 'dense' or 'semi24', got {mode!r}")
    if (not isinstance(batch_sizes, (list, tuple)) or not batch_sizes
            or not all(isinstance(b, int) and b > 0 for b in batch_sizes)):
        raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    if timer is None:
        timer = measure
    elif not callable(timer):
        raise TypeError(f"timer must be a callable (layer, x) -> seconds, got {type(timer).__name__}")
    # every layer's replacement is decided (and timed) first, then all are swapped: a failure
    # leaves the model as it was
    plan = []
    for name, m in _utils.select_modules(model, include, exclude,
                                         predicate=lambda n, mod: isinstance(mod, MaskedLinear)):
        dense = m.to_dense()
        new = dense
        if mode not in ("dense", "semi24"):
            dev = m.weight.device
            usable = dev.type == "cpu" or (dev.type == "cuda" and _cuda_sparse_available())
            if usable:
                sparse = SparseLinear.from_dense(m)
                if mode == "sparse" or _sparse_is_faster(dense, sparse, batch_sizes, timer, name):
                    new = sparse
            elif mode == "sparse":
                raise RuntimeError(f"no sparse kernel for device {dev} (layer {name!r})")
        if mode in ("semi24", "auto"):
            new = _semi24_choice(m, new, name, mode, batch_sizes, timer)
        if name == "":
            raise ValueError("the model itself is a MaskedLinear; wrap it in a container module")
        plan.append((name, new))
    for name, new in plan:
        _set_module(model, name, new)
    return model


def _semi24_choice(m: MaskedLinear, current: nn.Module, name: str, mode: str, batch_sizes,
                   timer=measure) -> nn.Module:
    """SemiSparseLinear for mode="semi24"; for "auto" it replaces ``current`` only when the mask
    is 2:4 and it is faster at every batch size."""
    dev = m.weight.device
    usable = dev.type == "cpu" or (dev.type == "cuda" and _ext.has_cuda_kernels()
                                   and _ext.op_has_cuda_kernel("pycompress::semi24_linear"))
    if mode == "semi24":
        if not usable:
            raise RuntimeError(f"no 2:4 sparse kernel for device {dev} (layer {name!r})")
        try:
            return SemiSparseLinear.from_dense(m)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    k4 = (m.in_features + 3) // 4 * 4
    keep = torch.nn.functional.pad(m.mask.to(torch.int8), (0, k4 - m.in_features))
    if not usable or not bool((keep.view(m.out_features, -1, 4).sum(-1) <= 2).all()):
        return current
    semi = SemiSparseLinear.from_dense(m)
    with torch.no_grad():
        for bs in batch_sizes:
            x = torch.randn(bs, m.in_features, device=dev, dtype=m.weight.dtype)
            if _timed(timer, semi, x, name) >= _timed(timer, current, x, name):
                return current
    return semi


def _cuda_sparse_available() -> bool:
    return _ext.has_cuda_kernels() and _ext.op_has_cuda_kernel("pycompress::sparse_linear")
