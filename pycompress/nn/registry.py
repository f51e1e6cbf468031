"""The layer classes pycompress knows by name: every ``pycompress.nn`` layer plus those added with
:func:`register_layer`. Save/load rebuild layers from this registry only (never by importing a path
from a file), and reports use it to tell compressed layers from plain ones."""

from __future__ import annotations

from torch import nn

from pycompress.nn.int8_conv import Int8Conv2d
from pycompress.nn.int8_linear import Int8Linear
from pycompress.nn.int8_pool import Int8MaxPool2d
from pycompress.nn.int8_mha import Int8MultiheadAttention
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.nn.semi_sparse_linear import SemiSparseLinear
from pycompress.nn.sparse_linear import SparseLinear

__all__ = ["register_layer", "pycompress_layer_classes", "is_pycompress_layer", "dense_equivalent", "COMPACTED_ATTR",
           "disable_transformer_fast_paths"]

# Set on a model by ``compact``: its layers are narrower than the architecture's, so ``load`` rebuilds them.
COMPACTED_ATTR = "_pycompress_compacted"


# The built-in layers with config() / from_config(), in the order reports list them.
_BUILTIN_LAYERS: tuple[type, ...] = (Int8Linear, Int8Conv2d, Int8MaxPool2d, Int8MultiheadAttention, MaskedLinear, MaskedConv2d, SparseLinear, SemiSparseLinear)


def pycompress_layer_classes() -> dict[str, type]:
    """The pycompress layer classes known now: name → class (those with config/from_config)."""
    out: dict[str, type] = {cls.__name__: cls for cls in _BUILTIN_LAYERS}
    out.update(_EXTRA_LAYERS)
    return out


_EXTRA_LAYERS: dict[str, type] = {}


def register_layer(cls: type) -> type:
    """Registers a layer class (with ``config()`` / ``from_config()``) for save/load and reports.

    Usable as a decorator. Classes of ``pycompress.nn`` are known without registration.

    Example:
        >>> import torch
        >>> from pycompress.nn import register_layer
        >>> @register_layer
        ... class ScaledLinear(torch.nn.Linear):
        ...     def config(self):
        ...         return {"in_features": self.in_features, "out_features": self.out_features}
        ...     @classmethod
        ...     def from_config(cls, cfg):
        ...         return cls(cfg["in_features"], cfg["out_features"])
        >>> ScaledLinear.__name__
        'ScaledLinear'
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError("register_layer expects an nn.Module subclass")
    for attr in ("config", "from_config"):
        if not callable(getattr(cls, attr, None)):
            raise TypeError(f"{cls.__name__} has no {attr}() and cannot be registered")
    known = pycompress_layer_classes()
    if cls.__name__ in known and known[cls.__name__] is not cls:
        raise ValueError(f"another layer class is already registered as {cls.__name__!r}")
    _EXTRA_LAYERS[cls.__name__] = cls
    return cls


def is_pycompress_layer(module: nn.Module) -> bool:
    cls = type(module)
    return pycompress_layer_classes().get(cls.__name__) is cls


def dense_equivalent(module: nn.Module) -> nn.Module:
    """A plain float module equivalent to a pycompress layer (``to_float`` / ``to_dense``)."""
    for attr in ("to_float", "to_dense"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn()
    return module


def disable_transformer_fast_paths(model: nn.Module) -> list[str]:
    """Makes the ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` modules of ``model``
    that hold pycompress layers run module by module. Their eval-mode fast paths read the float
    weights of the attention, ``linear1`` / ``linear2`` and the norms directly (fused kernels, and
    nested tensors for padded batches), which int8 or sparse layers do not have. Returns the
    names of the modules changed."""
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            continue
        if not any(is_pycompress_layer(c) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False  # read by TransformerEncoder.forward only
            changed.append(name)
        elif isinstance(m, nn.TransformerEncoderLayer) and getattr(m, "activation_relu_or_gelu", 0):
            m.activation_relu_or_gelu = 0  # read by the fast-path checks only
            changed.append(name)
    return changed
