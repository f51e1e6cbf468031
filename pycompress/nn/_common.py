"""Pieces shared by the sparse layers: reading a dense layer's weight and mask, and building the
plain ``nn.Linear`` a layer converts back to."""

from __future__ import annotations

import torch
from torch import nn


def dense_weight_and_mask(linear: nn.Module, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of ``linear`` (an ``nn.Linear`` or a ``MaskedLinear``) and the mask to compress it
    with: ``mask`` if given (checked: bool, the weight's shape), else the MaskedLinear's own mask,
    else ``None``."""
    from pycompress.nn.masked_linear import MaskedLinear

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


@torch.no_grad()
def linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` (device and dtype of ``weight``) holding ``weight`` and ``bias``."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin
