"""GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]``.

``transformers.pytorch_utils.Conv1D`` (GPT-2, DistilGPT2, GPT, ImageGPT, Decision Transformer
and code copied from them) computes ``y = x @ weight + bias`` with ``weight [nx, nf]`` =
``[in_features, out_features]``: the transpose of ``nn.Linear``'s layout. transformers is an
optional dependency, so the class is recognised without importing it: by its name, the module it
comes from and its weight layout (when transformers is loaded, by the class itself as well).

Every workflow that converts ``nn.Linear`` layers converts a ``Conv1D`` through
:func:`to_linear`: an ``nn.Linear`` holding the transposed weight, which computes the same map.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["is_conv1d", "is_conv1d_family", "conv1d_problem", "to_linear", "linear_weight"]

_CLASS_NAME = "Conv1D"


def _loaded_class() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, _CLASS_NAME, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _named_like(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == _CLASS_NAME and cls.__module__.split(".")[0] in ("transformers", "transformers_modules")


def conv1d_problem(m: nn.Module) -> str | None:
    """Why a module of the Conv1D family (:func:`is_conv1d_family`) cannot be treated as a linear
    layer; None when it can, and for modules outside the family."""
    loaded = _loaded_class()
    if loaded is not None and isinstance(m, loaded) and type(m) is not loaded:
        return f"{type(m).__name__} is a subclass of transformers' Conv1D with its own behaviour"
    if not (_named_like(m) or (loaded is not None and type(m) is loaded)):
        return None
    nf, nx = getattr(m, "nf", None), getattr(m, "nx", None)
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if not (isinstance(nf, int) and isinstance(nx, int)):
        return "Conv1D without integer nf / nx attributes (unknown layout)"
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (nx, nf):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else None
        return f"Conv1D weight of shape {shape} is not [nx, nf] = [{nx}, {nf}] (unknown layout)"
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (nf,)):
        return f"Conv1D bias is not a tensor of shape [nf] = [{nf}]"
    return None


def is_conv1d_family(m: nn.Module) -> bool:
    """True for a Conv1D (or a subclass / look-alike of one), usable or not."""
    loaded = _loaded_class()
    return _named_like(m) or (loaded is not None and isinstance(m, loaded))


def is_conv1d(m: nn.Module) -> bool:
    """True for a GPT-2-style ``Conv1D`` with the expected layout (weight ``[in, out]``)."""
    return is_conv1d_family(m) and conv1d_problem(m) is None


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout ``[out, in]`` (a transposed view for a Conv1D)."""
    return m.weight.t() if is_conv1d(m) else m.weight


@torch.no_grad()
def to_linear(m: nn.Module, share_bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` computing what the Conv1D ``m`` computes: a contiguous copy of the
    transposed weight (a new ``Parameter``, same device, dtype and ``requires_grad``) and the same
    bias ``Parameter`` object (``share_bias=False``: a copy). The layer's training flag is kept."""
    problem = conv1d_problem(m)
    if not is_conv1d_family(m) or problem is not None:
        raise TypeError(problem or f"expected a transformers Conv1D, got {type(m).__name__}")
    w = m.weight
    lin = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if m.bias is not None:
        lin.bias = m.bias if share_bias and isinstance(m.bias, nn.Parameter) else nn.Parameter(
            m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    lin.train(m.training)
    return lin
