"""Attention heads of the GPT-2 family (``GPT2Attention`` and copies of it): one fused projection
``c_attn`` (rows ``[query | key | value]`` in ``nn.Linear`` layout, each ``num_heads * head_dim``
wide, head ``h`` at rows ``h * head_dim ... (h + 1) * head_dim`` of each third) split by
``split_size``, and the output projection ``c_proj`` reading the heads side by side.

A head is pruned by masking its rows in all three thirds of ``c_attn``; ``compact`` removes it by
dropping those rows and the head's input columns of ``c_proj``, and sets ``num_heads`` and
``split_size`` (as transformers' own ``prune_heads`` of these modules does).
"""

from __future__ import annotations

import torch
from torch import nn

from pycompress.nn import conv1d
from pycompress.nn.masked_linear import MaskedLinear

__all__ = ["magnitude", "activation", "consumer", "head_rows", "mask_heads", "split_rows"]


def consumer(name: str) -> str:
    """The output projection (whose input holds the heads side by side) of attention ``name``."""
    return f"{name}.c_proj"


@torch.no_grad()
def magnitude(a: nn.Module) -> torch.Tensor:
    """Mean ``|w|`` of each head's query, key and value rows of ``c_attn``."""
    h, d = a.num_heads, a.head_dim
    w = conv1d.linear_weight(a.c_attn).detach().float().abs()  # [3 * h * d, in]
    return w.sum(1).reshape(3, h, d).sum((0, 2)) / (3 * d * w.shape[1])


def activation(name: str, a: nn.Module, stats: dict) -> torch.Tensor:
    """Mean ``|y|`` of each head's slice of the attention output (the input of ``c_proj``), from
    the consumer statistics collected by prune's calibration pass."""
    seen = stats[name].get("consumer_in_abs", {}).get(consumer(name))
    h, d = a.num_heads, a.head_dim
    if seen is None:
        raise ValueError(f"attention {name!r}: its output projection {consumer(name)!r} never ran on "
                         "calibration_data")
    total, n = seen
    act = (total / n).float()
    if act.numel() != h * d:
        raise ValueError(f"attention {name!r}: c_proj input width {act.numel()} is not num_heads * "
                         f"head_dim = {h * d}")
    return act.reshape(h, d).mean(1)


def head_rows(drop: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Bool rows of ``c_attn`` ([query | key | value]) belonging to the heads in ``drop``."""
    return drop.repeat_interleave(head_dim).repeat(3)


def split_rows(rows: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``c_attn`` rows as ``[3, heads, head_dim]`` (query, key, value)."""
    return rows.reshape(3, heads, head_dim)


@torch.no_grad()
def mask_heads(a: nn.Module, drop: torch.Tensor) -> None:
    """Masks the ``c_attn`` rows of the heads in ``drop`` (a Conv1D becomes a MaskedLinear)."""
    lin = a.c_attn
    if conv1d.is_conv1d(lin):
        lin = conv1d.to_linear(lin)
    rows = head_rows(drop.to(lin.weight.device), a.head_dim)
    keep = ~rows[:, None].expand_as(lin.weight)
    if isinstance(lin, MaskedLinear):
        lin.set_mask(lin.mask & keep)
    else:
        a.c_attn = MaskedLinear.from_dense(lin, keep.clone(), share_parameters=True)
