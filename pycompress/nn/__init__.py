"""``pycompress.nn``: drop-in modules backed by the pycompress kernels."""

from pycompress.nn.int8_linear import Int8Linear

__all__: list[str] = ["Int8Linear"]
