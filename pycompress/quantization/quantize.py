"""``pycompress.quantize``: swap ``nn.Linear`` layers for int8 ``Int8Linear`` layers in place.

What is converted
    Every selected ``nn.Linear`` (exact class; subclasses with their own ``forward`` are left
    alone and listed), every GPT-2-style ``Conv1D`` of transformers (weight stored ``[in, out]``;
    converted with the transposed weight, see :mod:`pycompress.nn.conv1d`) and every
    ``MaskedLinear`` (pruned layers: the masked weight is quantized, so pruned weights stay
    exactly zero). Every other layer computing a linear map is left alone and listed with the
    reason: ``nn.Linear`` inside ``nn.MultiheadAttention`` (it reads the weight directly instead
    of calling the layer), ``SparseLinear`` (quantize before ``deploy_pruned``), convolutions
    (``nn.Conv1d/2d/3d`` and their transposes) and ``nn.Bilinear`` (``Int8Linear`` is a matrix
    product), a ``Conv1D`` subclass or one of unknown layout, the root module, and any layer the
    ``Int8Linear`` constructor refuses. Embeddings and normalization layers are not linear
    layers and are never touched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pycompress import _utils
from pycompress.nn import conv1d, registry

__all__ = ["quantize", "QuantizationResult", "QUANT_MODES"]

QUANT_MODES = ("w8a8", "w8a16")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# layers computing a linear map that Int8Linear cannot replace: listed, never silently ignored
_OTHER_LINEAR_MAPS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                      nn.ConvTranspose3d, nn.Bilinear)


@dataclass
class QuantizationResult:
    """What :func:`quantize` did: converted layer names and skipped layers with the reason."""

    mode: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "converted": list(self.converted), "skipped": dict(self.skipped)}

    def __repr__(self) -> str:
        return (
            f"QuantizationResult(mode={self.mode!r}, converted={len(self.converted)} layers, "
            f"skipped={len(self.skipped)} layers)"
        )


def _int8_linear_class():
    from pycompress import nn as pnn

    cls = getattr(pnn, "Int8Linear", None)
    if cls is None:
        raise RuntimeError(
            "pycompress.nn.Int8Linear is not available in this build of pycompress; "
            "quantize() needs it"
        )
    return cls


def _skip_reason(model: nn.Module, name: str, module: nn.Module, layer_cls: type) -> str | None:
    """None when the module can be converted, else why not. Non-linear modules return ''."""
    from pycompress import nn as pnn

    masked = getattr(pnn, "MaskedLinear", None)
    sparse = getattr(pnn, "SparseLinear", None)
    if isinstance(module, layer_cls):
        return ""  # already int8
    if sparse is not None and isinstance(module, sparse):
        return "SparseLinear (deployed sparse layer): quantize before deploy_pruned()"
    if masked is not None and isinstance(module, masked):
        return None
    if conv1d.is_conv1d_family(module):
        problem = conv1d.conv1d_problem(module)
        if problem is not None:
            return problem
        if module.weight.dtype not in _FLOAT_DTYPES:
            return f"weight dtype {module.weight.dtype} is not a floating type supported by Int8Linear"
        return None
    if isinstance(module, _OTHER_LINEAR_MAPS):
        return (f"{type(module).__name__}: Int8Linear replaces matrix products (nn.Linear, Conv1D) "
                "only; this layer stays in floating point")
    if not isinstance(module, nn.Linear):
        return ""  # not a linear layer
    if isinstance(_utils.parent_of(model, name), nn.MultiheadAttention):
        return "projection inside nn.MultiheadAttention (its weight is read directly, not called)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is a subclass of nn.Linear with its own behaviour"
    if module.weight.dtype not in _FLOAT_DTYPES:
        return f"weight dtype {module.weight.dtype} is not a floating type supported by Int8Linear"
    return None


def quantize(
    model: nn.Module,
    mode: str = "w8a8",
    include: Any = None,
    exclude: Any = None,
    act_bits: int = 8,
    weight_bits: int = 8,
    *,
    return_result: bool = False,
    warn: bool = True,
):
    """Replaces the selected linear layers of ``model`` (``nn.Linear``, transformers' ``Conv1D``,
    ``MaskedLinear``) by ``pycompress.nn.Int8Linear``.

    Weights are quantized symmetrically per output channel to int8. ``mode="w8a8"`` also
    quantizes activations per token at run time (int8 × int8 GEMM); ``mode="w8a16"`` keeps
    activations in floating point (weight-only int8). The model is modified in place and
    returned. Layers that cannot be converted are left alone and listed (``warnings.warn``, and
    in the :class:`QuantizationResult` when ``return_result=True``).

    Args:
        model: the model to convert (modified in place).
        mode: ``"w8a8"`` or ``"w8a16"``.
        include: module-name glob(s) (or ``"re:<regex>"``) to convert; ``None`` = every layer.
            A pattern selects the module it names and everything inside it.
        exclude: module-name glob(s) to leave in floating point (e.g. ``"classifier"``).
        act_bits: ``8`` (default) or ``7``: bits of the per-token activation quantization of
            ``w8a8`` layers (see ``Int8Linear``; 7 bits is faster on CPUs without VNNI).
        weight_bits: ``8`` (default) or ``7``: per-channel weight range ``[-63, 63]`` of ``w8a8``
            layers; with ``act_bits=7`` AVX2 CPUs run a faster exact kernel (see ``Int8Linear``).
        return_result: also return a :class:`QuantizationResult` (converted and skipped layers).
        warn: emit a warning listing the selected layers that could not be converted.

    Returns:
        ``model``, or ``(model, QuantizationResult)`` when ``return_result=True``.

    Raises:
        ValueError: unknown ``mode``; a pattern that matches no module; an invalid regex.

    Example:
        >>> import torch, copy, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> q = pycompress.quantize(copy.deepcopy(model), mode="w8a8", exclude="2")
        >>> type(q[0]).__name__, type(q[2]).__name__
        ('Int8Linear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in QUANT_MODES:
        raise ValueError(f"mode must be one of {QUANT_MODES}, got {mode!r}")
    _utils.check_int8_bits("act_bits", act_bits, mode)
    _utils.check_int8_bits("weight_bits", weight_bits, mode)
    layer_cls = _int8_linear_class()
    extra = {"act_bits": act_bits} if act_bits != 8 else {}
    if weight_bits != 8:
        extra["weight_bits"] = weight_bits
    selected = _utils.select_modules(model, include, exclude)
    result = QuantizationResult(mode=mode)
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            aliases.setdefault(id(m), []).append(n)
    for name, module in selected:
        reason = _skip_reason(model, name, module, layer_cls)
        if reason == "":
            continue
        if reason is not None:
            result.skipped[name] = reason
            continue
        source = module
        if conv1d.is_conv1d(module):  # weight stored [in, out]: quantize the transpose
            source = conv1d.to_linear(module, share_bias=False)
        elif type(module) is not nn.Linear:  # MaskedLinear: quantize its masked (dense) weight
            source = registry.dense_equivalent(module)
        try:
            new = layer_cls.from_float(source, mode=mode, **extra)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
            result.skipped[name] = f"Int8Linear refused it: {e}"
            continue
        new.train(module.training)
        for alias in aliases.get(id(module), [name]):  # a module registered under several names
            _utils.set_module(model, alias, new)
        result.converted.append(name)
    if (isinstance(model, nn.Linear) or conv1d.is_conv1d(model)) and include is None:
        result.skipped[""] = "the root module itself cannot be replaced in place; wrap it in a container"
    if warn and result.skipped:
        lines = "; ".join(f"{n or '<root>'}: {r}" for n, r in result.skipped.items())
        warnings.warn(f"quantize: {len(result.skipped)} layer(s) left in floating point: {lines}", stacklevel=2)
    return (model, result) if return_result else model
