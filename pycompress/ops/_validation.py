"""Argument checks shared by the op wrappers: raise clear Python exceptions at the edge."""

from __future__ import annotations

import torch

from pycompress import _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, *, dtypes=None, ndim=None, min_ndim=None) -> torch.Tensor:
    """Checks that ``value`` is a tensor of an allowed dtype and rank; returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None allowed) must live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    uniq = set(devices.values())
    if len(uniq) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")
    return next(iter(uniq)) if uniq else torch.device("cpu")


def check_device_supported(device: torch.device, op: str) -> None:
    """Raises when ``device`` has no pycompress kernel (e.g. CUDA tensors with a CPU-only build)."""
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        if not _ext.has_cuda_kernels():
            raise RuntimeError(
                f"pycompress.ops.{op}: got CUDA tensors but this pycompress build has no CUDA "
                "kernels; rebuild with a CUDA build of torch and nvcc available (PYCOMPRESS_CUDA=1)"
            )
        return
    raise RuntimeError(f"pycompress.ops.{op}: device type '{device.type}' is not supported (cpu, cuda)")


def same_device_fake(op: str, *tensors) -> None:
    """In a fake (meta) kernel: the tensors (None allowed) are on one device, as the real kernels
    require (a meta tensor among CPU ones would otherwise give a result of the wrong device)."""
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) <= 1, lambda: f"{op}: all tensors must be on the same device, got "
                 + ", ".join(sorted(str(d) for d in devices)))
