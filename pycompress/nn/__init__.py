"""``pycompress.nn``: drop-in modules backed by the pycompress kernels."""

__all__: list[str] = []

from pycompress.nn.masked_linear import MaskedLinear  # noqa: E402
from pycompress.nn.sparse_linear import SparseLinear  # noqa: E402

__all__ += ["MaskedLinear", "SparseLinear"]
