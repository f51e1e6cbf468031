"""Magnitude pruning: one-shot (``prune``), gradual (``GradualPruning``) and deployment
(``deploy_pruned``).

Patterns:

* ``"unstructured"``: individual weights with the smallest ``|w|``.
* ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive weights along the input
  dimension exactly ``N`` are kept. When ``in_features`` is not a multiple of ``M`` the last,
  shorter group of ``r`` weights keeps ``ceil(r * N / M)``. The sparsity is set by the pattern;
  ``sparsity`` may be ``None`` or must match ``1 - N/M`` (±1%).
* ``"channel"``: whole output rows, ranked by the L2 norm of the row (divided by
  ``sqrt(in_features)`` when ranking across layers).

Every ranking sorts with a stable sort on (score, position), so identical weights give identical
masks on every data-parallel rank.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time

import torch
from torch import nn

from pycompress.nn.masked_linear import MaskedLinear, _clear_pruned_state
from pycompress.nn.sparse_linear import SparseLinear

__all__ = ["prune", "GradualPruning", "deploy_pruned"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ----------------------------------------------------------------------------- helpers
def _globs(value, name):
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a glob string or a list of glob strings, got {value!r}")


def _selected(model, include, exclude):
    inc, exc = _globs(include, "include"), _globs(exclude, "exclude")
    out = []
    for name, m in model.named_modules():
        if not (type(m) is nn.Linear or isinstance(m, MaskedLinear)):
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, g) for g in inc):
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            continue
        out.append((name, m))
    return out


def _set_module(model, name, new):
    if name == "":
        raise ValueError("the model itself is a Linear layer; wrap it in a container module to swap it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _parse_pattern(pattern):
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    if pattern in ("unstructured", "channel"):
        return pattern, None
    m = _NM.match(pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not (0 < n <= mm):
            raise ValueError(f"pattern {pattern!r}: need 0 < N <= M")
        return "nm", (n, mm)
    raise ValueError(f"unknown pattern {pattern!r}; use 'unstructured', 'channel' or 'N:M' such as '2:4'")


def _check_sparsity(sparsity, name="sparsity"):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _check_scope(scope):
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def _keep_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) that is False for the k lowest scores (ties: lower flat index first)."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep.reshape(scores.shape)


def _nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    N, K = w.shape
    a = w.detach().abs().float()
    mask = torch.zeros(N, K, dtype=torch.bool, device=w.device)
    full = K // m * m
    if full:
        g = a[:, :full].reshape(N, full // m, m)
        # stable descending order: sort -score ascending (ties keep the lower index)
        order = torch.sort(-g, dim=-1, stable=True).indices[..., :n]
        gm = torch.zeros_like(g, dtype=torch.bool)
        gm.scatter_(-1, order, True)
        mask[:, :full] = gm.reshape(N, full)
    r = K - full
    if r:
        keep = math.ceil(r * n / m)
        order = torch.sort(-a[:, full:], dim=-1, stable=True).indices[:, :keep]
        tail = torch.zeros(N, r, dtype=torch.bool, device=w.device)
        tail.scatter_(-1, order, True)
        mask[:, full:] = tail
    return mask


def _compute_masks(layers, sparsity, kind, nm, scope):
    """Returns a list of bool masks, one per (name, module) in ``layers``."""
    weights = [m.weight.detach() for _, m in layers]
    if kind == "nm":
        return [_nm_mask(w, *nm) for w in weights]
    if kind == "unstructured":
        if scope == "layer":
            return [_keep_lowest(w.abs().float(), round(sparsity * w.numel())) for w in weights]
        scores = torch.cat([w.abs().float().reshape(-1).to(weights[0].device) for w in weights])
        keep = _keep_lowest(scores, round(sparsity * scores.numel()))
        out, off = [], 0
        for w in weights:
            out.append(keep[off:off + w.numel()].reshape(w.shape).to(w.device))
            off += w.numel()
        return out
    # channel
    norms = [w.float().pow(2).sum(1).sqrt() for w in weights]
    if scope == "layer":
        rows = [_keep_lowest(nr, round(sparsity * nr.numel())) for nr in norms]
    else:
        dev = weights[0].device
        scores = torch.cat([(nr / math.sqrt(max(w.shape[1], 1))).to(dev) for nr, w in zip(norms, weights)])
        sizes = torch.cat([torch.full((w.shape[0],), w.shape[1], dtype=torch.int64, device=dev) for w in weights])
        total = int(sizes.sum())
        target = sparsity * total
        order = torch.sort(scores, stable=True).indices
        cum = torch.cumsum(sizes[order], 0)
        # number of rows to drop: the prefix whose weight count is closest to the target
        j = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64, device=dev).to(cum.dtype)))
        cands = [c for c in (j - 1, j, j + 1) if 0 <= c <= len(order)]
        def err(c):
            return abs((int(cum[c - 1]) if c > 0 else 0) - target)
        cnt = min(cands, key=err)
        keep = torch.ones(len(order), dtype=torch.bool, device=dev)
        keep[order[:cnt]] = False
        rows, off = [], 0
        for w in weights:
            rows.append(keep[off:off + w.shape[0]].to(w.device))
            off += w.shape[0]
    return [r[:, None].expand_as(w).clone() for r, w in zip(rows, weights)]


# ----------------------------------------------------------------------------- public API
def prune(model: nn.Module, sparsity: float | None, pattern: str = "unstructured", scope: str = "global",
          method: str = "magnitude", include=None, exclude=None) -> nn.Module:
    """Magnitude-prunes the selected ``nn.Linear`` layers of ``model`` in place, replacing them by
    :class:`~pycompress.nn.MaskedLinear` (already masked layers are re-pruned), and returns it.
    The new layers keep the original ``Parameter`` objects, so existing optimizers stay valid.

    Args:
        model: the model (modified in place).
        sparsity: fraction of weights to remove, in [0, 1). For ``"N:M"`` patterns ``None`` or
            ``1 - N/M``.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"channel"``.
        scope: ``"global"`` (rank across all selected layers) or ``"layer"`` (each layer
            reaches ``sparsity``). Ignored by ``"N:M"``.
        method: ``"magnitude"``.
        include, exclude: glob or list of globs on qualified module names.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> _ = pycompress.prune(model, 0.9)
        >>> type(model[0]).__name__
        'MaskedLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kind, nm = _parse_pattern(pattern)
    _check_scope(scope)
    if method != "magnitude":
        raise ValueError(f"unknown method {method!r}; supported: 'magnitude'")
    if kind == "nm":
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None:
            s = _check_sparsity(sparsity) if implied < 1 else float(sparsity)
            if abs(s - implied) > 0.01:
                raise ValueError(f"pattern {pattern!r} fixes sparsity at {implied:.3f}; got sparsity={sparsity}")
        sparsity = implied
    else:
        if sparsity is None:
            raise TypeError("sparsity must be a float in [0, 1) for this pattern")
        sparsity = _check_sparsity(sparsity)
    layers = _selected(model, include, exclude)
    if not layers:
        return model
    masks = _compute_masks(layers, sparsity, kind, nm, scope)
    for (name, m), mask in zip(layers, masks):
        if isinstance(m, MaskedLinear):
            m.set_mask(mask)
        elif name == "":
            raise ValueError("the model itself is a Linear layer; wrap it in a container module to prune it")
        else:
            _set_module(model, name, MaskedLinear.from_dense(m, mask, share_parameters=True))
    return model


class GradualPruning:
    """Cubic gradual pruning schedule (Zhu & Gupta 2017), usable from any training loop.

    At step ``t`` (counted by :meth:`step`) between ``start_step`` and
    ``start_step + total_steps``, every ``frequency`` steps the target is
    ``s_t = s_f + (s_i - s_f) * (1 - (t - start_step) / total_steps) ** 3`` and the selected layers
    are re-pruned by magnitude (pruned weights are exactly zero, so masks only grow, except for
    live weights that are exactly zero).

    Args:
        model: model whose ``nn.Linear`` layers are swapped to MaskedLinear at construction.
        final_sparsity, total_steps, start_step, frequency, initial_sparsity: the schedule.
        pattern: ``"unstructured"`` or ``"channel"``.
        scope, include, exclude: as in :func:`prune`.
        optimizer: optional; after each step that changes masks its state (momentum, Adam
            moments) of pruned weights is cleared, and a step hook re-applies the masks.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> sched = pycompress.GradualPruning(model, final_sparsity=0.8, total_steps=10)
        >>> for _ in range(10):
        ...     _ = sched.step()
        >>> round(sched.current_sparsity, 2)
        0.8
    """

    def __init__(self, model: nn.Module, final_sparsity: float, total_steps: int, start_step: int = 0,
                 frequency: int = 1, initial_sparsity: float = 0.0, pattern: str = "unstructured",
                 scope: str = "global", include=None, exclude=None, optimizer=None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        for name, v, lo in (("total_steps", total_steps, 1), ("start_step", start_step, 0), ("frequency", frequency, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        kind, _ = _parse_pattern(pattern)
        if kind == "nm":
            raise ValueError("N:M patterns have a fixed sparsity; use prune(model, None, pattern='N:M') once")
        _check_scope(scope)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.total_steps, self.start_step, self.frequency = model, total_steps, start_step, frequency
        self.pattern, self.scope, self.include, self.exclude = pattern, scope, include, exclude
        self.optimizer = optimizer
        self.step_count = 0
        self.current_sparsity = self.initial_sparsity
        self._hook = None
        prune(model, self.initial_sparsity, pattern=pattern, scope=scope, include=include, exclude=exclude)
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(lambda opt, a, k: _clear_pruned_state(model, opt))

    def sparsity_at(self, t: int) -> float:
        """Target sparsity of the schedule at step ``t``."""
        if t <= self.start_step:
            return self.initial_sparsity
        frac = min(1.0, (t - self.start_step) / self.total_steps)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def step(self) -> float:
        """Advances one step; re-prunes when the schedule says so. Returns the current target."""
        self.step_count += 1
        t = self.step_count
        end = self.start_step + self.total_steps
        if t < self.start_step:
            return self.current_sparsity
        due = (t - self.start_step) % self.frequency == 0 or t == end
        if t <= end and due:
            target = self.sparsity_at(t)
            prune(self.model, target, pattern=self.pattern, scope=self.scope, include=self.include,
                  exclude=self.exclude)
            self.current_sparsity = target
            if self.optimizer is not None:
                _clear_pruned_state(self.model, self.optimizer)
        return self.current_sparsity

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "current_sparsity": self.current_sparsity}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.current_sparsity = float(state["current_sparsity"])


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
def _sparse_is_faster(dense: nn.Linear, sparse: SparseLinear, batch_sizes, reps=5) -> bool:
    dev = dense.weight.device
    for bs in batch_sizes:
        x = torch.randn(bs, dense.in_features, device=dev, dtype=dense.weight.dtype)
        dense(x), sparse(x)  # warm up
        td = _median_ms(lambda: dense(x), reps)
        ts = _median_ms(lambda: sparse(x), reps)
        if ts >= td:
            return False
    return True


def deploy_pruned(model: nn.Module, mode: str = "auto", include=None, exclude=None,
                  batch_sizes=(1, 32)) -> nn.Module:
    """Turns the MaskedLinear layers of ``model`` into inference layers, in place.

    ``mode="sparse"`` gives :class:`~pycompress.nn.SparseLinear`, ``"dense"`` a plain ``nn.Linear``
    (``weight * mask``), and ``"auto"`` times both on the layer's device at ``batch_sizes`` rows and
    keeps SparseLinear only where it is faster at every one of them (never slower than dense).
    ``mode="semi24"`` gives :class:`~pycompress.nn.SemiSparseLinear` (masks must be 2:4, e.g. from
    ``prune(..., pattern="2:4")``); in ``"auto"`` a 2:4-masked layer becomes SemiSparseLinear where
    that is faster than the other choice at every batch size.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("auto", "sparse", "dense", "semi24"):
        raise ValueError(f"mode must be 'auto', 'sparse', 'dense' or 'semi24', got {mode!r}")
    if (not isinstance(batch_sizes, (list, tuple)) or not batch_sizes
            or not all(isinstance(b, int) and b > 0 for b in batch_sizes)):
        raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    inc, exc = _globs(include, "include"), _globs(exclude, "exclude")
    for name, m in list(model.named_modules()):
        if not isinstance(m, MaskedLinear):
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, g) for g in inc):
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            continue
        dense = m.to_dense()
        new = dense
        if mode not in ("dense", "semi24"):
            dev = m.weight.device
            usable = dev.type == "cpu" or (dev.type == "cuda" and _cuda_sparse_available())
            if usable:
                sparse = SparseLinear.from_dense(m)
                if mode == "sparse" or _sparse_is_faster(dense, sparse, batch_sizes):
                    new = sparse
            elif mode == "sparse":
                raise RuntimeError(f"no sparse kernel for device {dev} (layer {name!r})")
        if mode in ("semi24", "auto"):
            new = _semi24_choice(m, new, name, mode, batch_sizes)
        if name == "":
            raise ValueError("the model itself is a MaskedLinear; wrap it in a container module")
        _set_module(model, name, new)
    return model


def _semi24_choice(m: MaskedLinear, current: nn.Module, name: str, mode: str, batch_sizes) -> nn.Module:
    """SemiSparseLinear for mode="semi24"; for "auto" it replaces ``current`` only when the mask
    is 2:4 and it is faster at every batch size."""
    from pycompress import _ext
    from pycompress.nn.semi_sparse_linear import SemiSparseLinear

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
            current(x), semi(x)  # warm up
            if _median_ms(lambda: semi(x), 5) >= _median_ms(lambda: current(x), 5):
                return current
    return semi


def _cuda_sparse_available() -> bool:
    from pycompress import _ext

    return _ext.has_cuda_kernels() and _ext.op_has_cuda_kernel("pycompress::sparse_linear")
