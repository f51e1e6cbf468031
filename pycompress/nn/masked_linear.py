"""MaskedLinear: a training-time linear layer whose pruned weights stay exactly zero."""

from __future__ import annotations

import torch
from torch import nn

from pycompress.nn._common import MaskedWeight, linear_from_weight
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.ops import sparse as sparse_ops

__all__ = ["MaskedLinear", "keep_masks"]


class MaskedLinear(MaskedWeight, nn.Module):
    """``y = x @ (weight * mask).T + bias`` computed by a fused kernel (no masked weight copy).

    Parameters ``weight [out, in]`` and ``bias [out]`` (optional), bool buffer ``mask`` of the
    weight's shape. Pruned entries of ``weight`` are held at exactly zero: they are zeroed when a
    mask is set, and their gradient is exactly zero, so SGD (momentum, weight decay) and
    Adam/AdamW leave them at zero. When masks change during training while an optimizer holds
    momentum for newly pruned weights, use :func:`keep_masks` (or ``GradualPruning(optimizer=...)``).

    Example:
        >>> import torch
        >>> from pycompress.nn import MaskedLinear
        >>> lin = torch.nn.Linear(4, 2)
        >>> ml = MaskedLinear.from_dense(lin, torch.rand(2, 4) > 0.5)
        >>> ml(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if not isinstance(in_features, int) or not isinstance(out_features, int) or in_features < 0 or out_features < 0:
            raise ValueError(f"in_features and out_features must be non-negative ints, got {in_features!r}, {out_features!r}")
        self.in_features = in_features
        self.out_features = out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        lin = nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if bias:
                self.bias.copy_(lin.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                   share_parameters: bool = False) -> "MaskedLinear":
        """Builds a MaskedLinear from ``linear`` and a bool ``mask`` of the weight's shape
        (``None`` keeps everything). Pruned weights are set to zero.

        Weights are copied, unless ``share_parameters=True``: then the new layer takes over the
        very ``Parameter`` objects of ``linear`` (zeroing its pruned entries in place), so an
        optimizer built on the original model keeps training the swapped layer.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor")
            if tuple(mask.shape) != tuple(linear.weight.shape):
                raise ValueError(f"mask must have the weight's shape {tuple(linear.weight.shape)}, "
                                 f"got {tuple(mask.shape)}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=w.device, dtype=w.dtype)
        if share_parameters:
            m.weight = linear.weight
            m.bias = linear.bias
        else:
            with torch.no_grad():
                m.weight.copy_(w)
                if linear.bias is not None:
                    m.bias.copy_(linear.bias)
        m.set_mask(torch.ones_like(w, dtype=torch.bool) if mask is None else mask)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_ops.masked_linear(x, self.weight, self.mask, self.bias)

    def config(self) -> dict:
        return {"type": "MaskedLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_config(cls, cfg: dict) -> "MaskedLinear":
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)), dtype=dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``weight * mask``."""
        return linear_from_weight(self.weight * self.mask, self.bias)

    to_float = to_dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={100 * self.sparsity:.1f}%")


@torch.no_grad()
def dense_weight_and_mask(linear: nn.Module, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of ``linear`` (an ``nn.Linear`` or a ``MaskedLinear``) and the mask to compress it
    with: ``mask`` if given (checked: bool, the weight's shape), else the MaskedLinear's own mask,
    else ``None``."""
    if not isinstance(linear, (nn.Linear, MaskedLinear)):
        raise TypeError(f"linear must be a torch.nn.Linear or MaskedLinear, got {type(linear).__name__}")
    w = linear.weight.detach()
    if mask is None and isinstance(linear, MaskedLinear):
        mask = linear.mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor")
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(w.shape)}, got {tuple(mask.shape)}")
    return w, mask


def _clear_pruned_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for m in model.modules():
        if isinstance(m, (MaskedLinear, MaskedConv2d)):
            m.apply_mask_()
            state = optimizer.state.get(m.weight)
            if state:
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.shape == m.mask.shape:
                        v.masked_fill_(~m.mask, 0)


def keep_masks(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Registers an optimizer step hook that re-applies every MaskedLinear / MaskedConv2d mask of ``model`` after
    each step and clears the optimizer state (momentum, Adam moments) of pruned weights.

    Returns the hook handle (``handle.remove()`` detaches it).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: _clear_pruned_state(model, opt))
