"""Loads the compiled extension (``pycompress._C``), which registers ``torch.ops.pycompress``."""

from __future__ import annotations

import torch

_IMPORT_ERROR: Exception | None = None
try:
    from pycompress import _C  # noqa: F401  (registers the ops)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = e


def extension():
    """Returns the compiled module or raises an ImportError that says how to build it."""
    if _C is None:
        raise ImportError(
            "pycompress's compiled extension (pycompress._C) is not available: "
            f"{_IMPORT_ERROR}. Build it with `make build` or "
            "`pip install --no-build-isolation -e .` in an environment that has torch installed."
        )
    return _C


_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_tf_mode = torch._C._is_torch_function_mode_enabled


def plain_eager(x) -> bool:
    """True for a plain ``torch.Tensor`` outside ``torch.compile`` with no torch function mode
    active: the inputs for which a layer may call its op through :func:`direct_op`."""
    return x.__class__ is _Tensor and not _is_compiling() and not _tf_mode()


def direct_op(name: str):
    """The typed entry point of ``torch.ops.pycompress.<name>`` (all arguments positional), or
    None when the extension lacks it.

    It calls the same op through the dispatcher, converting the arguments with pybind11 instead
    of torch.ops' schema walk: a few microseconds less per call, which matters for layers that
    run once per forward on small inputs. It skips Python-level overrides (``__torch_function__``
    and torch function modes), so callers use it only where :func:`plain_eager` holds for every
    tensor argument, and torch.ops otherwise.
    """
    direct = getattr(_C, "direct", None)
    return getattr(direct, name, None)


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def cpu_features() -> dict:
    """CPU features detected at run time (AVX2, AVX-512, VNNI, AMX, ...)."""
    return dict(extension().cpu_features())


def max_cpu_isa() -> str:
    """The best CPU code path this machine supports: 'scalar', 'avx2', 'avx512' or 'amx'."""
    return extension().max_cpu_isa()


def active_cpu_isa() -> str:
    """The CPU code path the kernels use now."""
    return extension().active_cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Limits the CPU kernels to an ISA level ('auto', 'scalar', 'avx2', 'avx512', 'amx').

    Returns the level in effect (never higher than the CPU supports). The environment
    variable ``PYCOMPRESS_CPU_ISA`` sets the initial level.
    """
    return extension().set_cpu_isa(name)


def cpu_isas() -> list[str]:
    """All ISA levels usable on this machine, lowest first."""
    order = ["scalar", "avx2", "avx512", "amx"]
    return order[: order.index(max_cpu_isa()) + 1]


def op_has_cuda_kernel(qualname: str) -> bool:
    """True when ``pycompress::<name>`` has a CUDA kernel registered."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
