"""``pycompress.nn``: drop-in modules backed by the pycompress kernels."""

__all__: list[str] = []
