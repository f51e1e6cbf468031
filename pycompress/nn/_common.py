"""Pieces shared by the layers: the mask handling of the masked layers, and the plain ``nn.Linear``
a layer converts back to."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` (device and dtype of ``weight``) holding ``weight`` and ``bias``."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


class MaskedWeight:
    """Mask handling shared by MaskedLinear and MaskedConv2d: a bool ``mask`` buffer of the weight's
    shape whose ``False`` entries hold exactly zero weights."""

    weight: torch.Tensor
    mask: torch.Tensor

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replaces the mask (bool, weight's shape) and zeroes the pruned weights."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        self.mask.copy_(mask.to(self.mask.device))
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Sets the pruned weights to exactly zero (in place)."""
        self.weight.masked_fill_(~self.mask, 0)

    @property
    def sparsity(self) -> float:
        n = self.mask.numel()
        return 1.0 - float(self.mask.sum()) / n if n else 0.0
