"""Fused knowledge-distillation loss ops (validated wrappers over ``torch.ops.pycompress.*``)."""

from __future__ import annotations

from pycompress import _ext  # noqa: F401

__all__: list[str] = []
