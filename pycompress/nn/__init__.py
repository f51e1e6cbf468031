"""``pycompress.nn``: drop-in modules backed by the pycompress kernels."""

from pycompress.nn.kd_loss import KDLoss

__all__: list[str] = ["KDLoss"]
