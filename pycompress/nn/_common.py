"""Pieces shared by the sparse layers: building the
plain ``nn.Linear`` a layer converts back to."""

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
