"""``pycompress.nn``: drop-in modules backed by the pycompress kernels."""

from pycompress.nn.int8_conv import Int8Conv2d
from pycompress.nn.int8_linear import Int8Linear
from pycompress.nn.int8_pool import Int8MaxPool2d
from pycompress.nn.int8_mha import Int8MultiheadAttention
from pycompress.nn.kd_loss import KDLoss
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.nn.semi_sparse_linear import SemiSparseLinear
from pycompress.nn.sparse_linear import SparseLinear
from pycompress.nn.registry import register_layer

__all__: list[str] = ["Int8Linear", "Int8Conv2d", "Int8MaxPool2d", "Int8MultiheadAttention", "MaskedLinear", "MaskedConv2d", "SparseLinear", "SemiSparseLinear", "KDLoss", "register_layer"]
