"""``Int8MaxPool2d``: an ``nn.MaxPool2d`` that pools the uint8 / int8 maps passed between int8 convs
with the pycompress kernel (torch's ``max_pool2d`` refuses channels-last uint8 maps of realistic
sizes) and every other input as ``nn.MaxPool2d`` does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.ops import int8_pool as _pool_ops

__all__ = ["Int8MaxPool2d"]

_QUANT_DTYPES = (torch.uint8, torch.int8)


class Int8MaxPool2d(nn.MaxPool2d):
    """Max pooling for quantized and float inputs alike (a drop-in ``nn.MaxPool2d``).

    A uint8 or int8 input goes to ``torch.ops.pycompress.int8_max_pool2d`` (the output keeps the
    dtype, channels-last: the quantized maxima with the input's scale and zero point, exact); a float
    input runs ``F.max_pool2d`` unchanged. :func:`pycompress.quantize` puts it where an int8 conv's
    uint8 output is pooled before the next int8 conv. No parameters or buffers.

    Example:
        >>> import torch
        >>> from pycompress.nn import Int8MaxPool2d
        >>> pool = Int8MaxPool2d.from_float(torch.nn.MaxPool2d(3, 2, 1))
        >>> x = torch.randint(0, 256, (2, 64, 56, 56), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        >>> bool(torch.equal(pool(x).float(), torch.nn.functional.max_pool2d(x.float(), 3, 2, 1)))
        True
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices=False, ceil_mode=ceil_mode)
        # checked once here, so that forward only dispatches
        self._args = _pool_ops.pool_arguments(self.kernel_size, self.stride, self.padding, self.dilation)

    @classmethod
    def from_float(cls, pool: nn.MaxPool2d) -> "Int8MaxPool2d":
        """The layer computing what ``pool`` computes (``return_indices`` pools are refused)."""
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"Int8MaxPool2d.from_float expects an nn.MaxPool2d, got {type(pool).__name__}")
        if pool.return_indices:
            raise ValueError("Int8MaxPool2d cannot return indices (the pool has return_indices=True)")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _QUANT_DTYPES and x.dim() == 4:
            k, s, p, d = self._args
            return torch.ops.pycompress.int8_max_pool2d.default(x, k, s, p, d, self.ceil_mode)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode)

    def config(self) -> dict:
        """JSON-serializable description from which :meth:`from_config` rebuilds the layer."""
        k, s, p, d = self._args
        return {"kernel_size": k, "stride": s, "padding": p, "dilation": d, "ceil_mode": bool(self.ceil_mode)}

    @classmethod
    def from_config(cls, cfg: dict) -> "Int8MaxPool2d":
        return cls(tuple(cfg["kernel_size"]), tuple(cfg.get("stride", cfg["kernel_size"])),
                   tuple(cfg.get("padding", (0, 0))), tuple(cfg.get("dilation", (1, 1))), bool(cfg.get("ceil_mode", False)))

    def to_float(self) -> nn.MaxPool2d:
        """The equivalent ``nn.MaxPool2d``."""
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)
