"""The dataflow facts pruning relies on: which layers read a layer's output, through which
element-wise ops, found in the ``torch.fx`` graph or in known layouts (the BERT feed-forward block,
BERT-style self-attention). :func:`~pycompress.compact` and the activation scores of
:func:`~pycompress.prune` both use it, so a channel is scored where it is used and removed only
where every use is understood.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pycompress import nn as pnn
from pycompress.nn import conv1d, registry
from pycompress.nn.masked_linear import MaskedLinear


# --------------------------------------------------------------------------- layer access
def int8_linear_cls() -> type | None:
    return getattr(pnn, "Int8Linear", None)


def sparse_linear_cls() -> type | None:
    return getattr(pnn, "SparseLinear", None)


def is_linear_like(m: nn.Module) -> bool:
    i8 = int8_linear_cls()
    return (type(m) is nn.Linear or isinstance(m, MaskedLinear) or (i8 is not None and isinstance(m, i8))
            or conv1d.is_conv1d(m))


@torch.no_grad()
def effective_weight(m: nn.Module) -> torch.Tensor:
    """The float weight the layer multiplies by (masked / dequantized)."""
    if isinstance(m, MaskedLinear):
        return (m.weight * m.mask).float()
    i8 = int8_linear_cls()
    if i8 is not None and isinstance(m, i8):
        return m.weight.float() * m.weight_scale.float()[:, None]
    return conv1d.linear_weight(m).float()  # [out, in], also for a Conv1D


# --------------------------------------------------------------------------- element-wise ops
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                        nn.CELU, nn.SELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
                        nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign)
_DROPOUT = (nn.Dropout, nn.AlphaDropout)
# Hugging Face activation modules (transformers.activations), parameter-free and element-wise
_HF_ACTIVATIONS = {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                   "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "MishActivation", "LinearActivation",
                   "AccurateGELUActivation", "ReLUSquaredActivation", "LaplaceActivation",
                   "ClippedGELUActivation"}
ELEMENTWISE_FUNCS = {torch.relu, F.relu, F.gelu, F.silu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid,
                      F.leaky_relu, F.elu, F.hardswish, F.hardtanh, F.mish, F.softplus, F.relu6,
                      torch.nn.functional.selu, torch.abs, torch.neg, torch.exp}
_DROPOUT_FUNCS = {F.dropout, torch.dropout}
_SCALAR_OPS = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div,
               torch.add, torch.sub}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "abs", "neg", "exp", "clone", "detach"}


def is_elementwise_module(m: nn.Module) -> bool:
    if isinstance(m, _ELEMENTWISE_MODULES):
        return True
    return (type(m).__name__ in _HF_ACTIVATIONS and type(m).__module__.startswith("transformers")
            and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()))


class Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if registry.is_pycompress_layer(m) or is_elementwise_module(m) or conv1d.is_conv1d(m):
            return True
        return super().is_leaf_module(m, qualname)


def is_number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def elementwise_step(node: torch.fx.Node, src: torch.fx.Node, modules: dict[str, nn.Module]):
    """If ``node`` applies an element-wise op to ``src`` only, returns ``f(value) -> value`` that
    replays it on the constant channels; otherwise None."""
    others = [a for a in list(node.args) + list(node.kwargs.values()) if a is not src]
    if any(isinstance(a, torch.fx.Node) for a in others) or list(node.args).count(src) != 1:
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or not is_elementwise_module(m) or node.args[0] is not src or node.kwargs:
            return None
        if isinstance(m, _DROPOUT):
            return lambda v: v
        return lambda v, m=m: m(v)
    if node.op == "call_function":
        fn = node.target
        if fn in _DROPOUT_FUNCS:
            return lambda v: v
        if fn in ELEMENTWISE_FUNCS and node.args[0] is src:
            return lambda v, fn=fn, a=node.args[1:], k=dict(node.kwargs): fn(v, *a, **k)
        if fn in _SCALAR_OPS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if a is src and is_number(b):
                return lambda v, fn=fn, b=b: fn(v, b)
            if b is src and is_number(a) and fn in (operator.mul, operator.add, torch.mul, torch.add,
                                                    operator.sub, torch.sub):
                return lambda v, fn=fn, a=a: fn(a, v)
        return None
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS and node.args[0] is src:
        if len(node.args) > 1 or node.kwargs:
            return None
        return lambda v, name=node.target: getattr(v, name)()
    return None


def describe_node(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model output"
    t = node.target
    return f"{node.op} {getattr(t, '__name__', t)!s}"


def follow_uses(start: torch.fx.Node, calls: dict, modules: dict, shared=frozenset()):
    """Follows the value of ``start`` through element-wise ops to the linear layers reading it.
    Returns ``(consumers, why)``: ``consumers`` = [(name, chain of element-wise replays)], ``why``
    = the reason it cannot be followed (None when every use was understood)."""
    consumers: list[tuple[str, list]] = []
    stack = [(start, [])]
    while stack:
        cur, chain = stack.pop()
        for user in cur.users:
            if user.op == "call_module" and is_linear_like(modules.get(user.target)) \
                    and user.args and user.args[0] is cur and len(user.args) == 1 and not user.kwargs:
                if len(calls.get(user.target, [])) != 1:
                    return consumers, f"its consumer {user.target!r} is called more than once"
                if user.target in shared:
                    return consumers, f"its consumer {user.target!r} shares its weight with another layer"
                consumers.append((user.target, chain))
                continue
            step = elementwise_step(user, cur, modules)
            if step is None:
                return consumers, (f"its output flows into {describe_node(user)}, which compact cannot follow "
                                   "(only element-wise ops between linear layers are understood: a residual "
                                   "add, a normalization, a reshape or the model output keep the full width)")
            stack.append((user, chain + [step]))
    return consumers, None


# --------------------------------------------------------------------------- known layouts
def ffn_blocks(modules: dict):
    """Yields ``(producer, consumer, activation)`` of every BERT-family feed-forward block
    (``intermediate.dense -> intermediate_act_fn -> output.dense``) and every GPT-2-family MLP
    (``c_fc -> act -> c_proj``) in ``modules``."""
    yield from gpt2_mlp_blocks(modules)
    for pname, parent in modules.items():
        inter, out = getattr(parent, "intermediate", None), getattr(parent, "output", None)
        if not (isinstance(inter, nn.Module) and isinstance(out, nn.Module)
                and callable(getattr(parent, "feed_forward_chunk", None))
                and type(inter).__name__.endswith("Intermediate") and type(out).__name__.endswith("Output")):
            continue
        prefix = f"{pname}." if pname else ""
        yield f"{prefix}intermediate.dense", f"{prefix}output.dense", getattr(inter, "intermediate_act_fn", None)


def gpt2_mlp_blocks(modules: dict):
    """``(c_fc, c_proj, act)`` of every transformers MLP block of the GPT-2 family (``GPT2MLP``,
    ``ImageGPTMLP``, ...: ``forward`` is ``dropout(c_proj(act(c_fc(x))))``)."""
    for pname, parent in modules.items():
        cls = type(parent)
        if not (cls.__name__.endswith("MLP") and cls.__module__.startswith("transformers.models.")
                and all(isinstance(getattr(parent, a, None), nn.Module) for a in ("c_fc", "c_proj"))
                and hasattr(parent, "act")):
            continue
        prefix = f"{pname}." if pname else ""
        yield f"{prefix}c_fc", f"{prefix}c_proj", getattr(parent, "act")


def is_elementwise_act(act) -> bool:
    return (isinstance(act, nn.Module) and is_elementwise_module(act)) or act in ELEMENTWISE_FUNCS


def consumers_of(model: nn.Module, names) -> dict[str, list[str]]:
    """The linear layers that read the output of each layer in ``names`` through element-wise ops
    only, found the way :func:`compact` finds them (BERT feed-forward layout, else the torch.fx
    graph). Layers whose uses cannot all be followed are absent from the result."""
    modules = dict(model.named_modules())
    wanted = set(names)
    found: dict[str, list[str]] = {}
    for name, cname, act in ffn_blocks(modules):
        if name in wanted and is_elementwise_act(act) and is_linear_like(modules.get(cname)):
            found[name] = [cname]
    rest = [n for n in names if n not in found]
    if not rest:
        return found
    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable: no consumer is known
        return found
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name in rest:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            continue
        consumers, why = follow_uses(nodes[0], calls, modules)
        if why is None and consumers:
            found[name] = list(dict.fromkeys(c for c, _ in consumers))
    return found



def is_attention(m: nn.Module) -> bool:
    """A Hugging Face BERT-style self-attention: ``query``/``key``/``value`` linear layers and
    ``num_attention_heads`` / ``attention_head_size`` attributes."""
    lin = (nn.Linear, MaskedLinear)
    return (all(isinstance(getattr(m, a, None), lin) for a in ("query", "key", "value"))
            and isinstance(getattr(m, "num_attention_heads", None), int)
            and isinstance(getattr(m, "attention_head_size", None), int))


def is_gpt2_attention(m: nn.Module) -> bool:
    """A transformers self-attention of the GPT-2 family: a fused ``c_attn`` projection
    (``[query | key | value]``, each ``num_heads * head_dim`` wide; a Conv1D or a linear layer)
    split by ``split_size``, and the output projection ``c_proj``."""
    if not type(m).__module__.startswith("transformers.models."):
        return False
    h, d, split = (getattr(m, a, None) for a in ("num_heads", "head_dim", "split_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, d, split)) or split != h * d:
        return False
    if getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
        return False
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    if not (isinstance(c_attn, nn.Module) and isinstance(c_proj, nn.Module)
            and (conv1d.is_conv1d(c_attn) or isinstance(c_attn, (nn.Linear, MaskedLinear)))):
        return False
    return conv1d.linear_weight(c_attn).shape[0] == 3 * split
