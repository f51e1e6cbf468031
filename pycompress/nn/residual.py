"""Residual additions computed by int8 convs: the ``torch.fx`` rewrite of a block whose
addition (and the activation after it) an ``Int8Conv2d(residual=True)`` computes.

``pycompress.quantize`` plans which additions to fuse (``pycompress.quantization.fuse``) and
rebuilds their blocks with :func:`rewrite_residual_block`; ``pycompress.load`` rebuilds the same
blocks in a fresh model from the saved list. The graph helpers here are shared by both.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from pycompress.nn import conv1d, registry

__all__ = ["FUSABLE_ACTIVATIONS", "IDEMPOTENT", "Tracer", "rewrite_residual_block", "residual_tail", "activation_of",
           "is_add", "single_input_call", "is_batchnorm_act", "batchnorm_act_activation"]

# activation module type -> Int8Conv2d activation name
FUSABLE_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu",
                                        nn.Hardswish: "hardswish"}
IDEMPOTENT = ("relu", "relu6")
# activation functions fusable after a residual addition (kwargs: only ``inplace``)
_ACT_FUNCTIONS: dict = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.relu6: "relu6",
                        torch.nn.functional.silu: "silu", torch.nn.functional.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = (operator.add, torch.add)


def is_batchnorm_act(m: nn.Module | None) -> bool:
    """Whether ``m`` has the structure of timm's ``BatchNormAct2d`` (recognised without importing
    timm): a class of that name deriving directly from ``nn.BatchNorm2d``, holding ``drop`` and
    ``act`` modules; its forward is ``act(drop(batch_norm(x)))``."""
    cls = type(m)
    return (cls.__name__ == "BatchNormAct2d" and len(cls.__mro__) > 1 and cls.__mro__[1] is nn.BatchNorm2d
            and isinstance(getattr(m, "drop", None), nn.Module) and isinstance(getattr(m, "act", None), nn.Module))


def batchnorm_act_activation(m: nn.Module | None) -> str | None:
    """For a :func:`is_batchnorm_act` module whose ``drop`` changes nothing (``nn.Identity``, or
    ``nn.Dropout`` in eval mode) and whose ``act`` is ``nn.Identity`` or a fusable activation
    (exact types): the Int8Conv2d activation name (``"none"`` for ``nn.Identity``); else None.
    The BatchNorm itself (eval mode, running statistics) is checked where it is folded."""
    if not is_batchnorm_act(m):
        return None
    drop = m.drop
    if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and not drop.training)):
        return None
    if type(m.act) is nn.Identity:
        return "none"
    return FUSABLE_ACTIVATIONS.get(type(m.act))


class Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if registry.is_pycompress_layer(m) or conv1d.is_conv1d(m) or is_batchnorm_act(m):
            return True
        return super().is_leaf_module(m, qualname)


def single_input_call(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    return node.op == "call_module" and len(node.args) == 1 and node.args[0] is src and not node.kwargs


def is_add(node: torch.fx.Node) -> bool:
    """A two-tensor addition without ``alpha`` (the forms a block's ``out += identity`` takes)."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def activation_of(node: torch.fx.Node, src: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The fusable activation ``node`` applies to ``src`` alone (None if it is not one)."""
    if node.op == "call_module":
        return FUSABLE_ACTIVATIONS.get(type(modules.get(node.target))) if single_input_call(node, src) else None
    if len(node.args) != 1 or node.args[0] is not src or set(node.kwargs) - {"inplace"}:
        return None
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method" and not node.kwargs:
        return _ACT_METHODS.get(node.target)
    return None


def residual_tail(start: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """From a conv node: the BatchNorm / ``nn.Identity`` calls (a BatchNorm with an activation,
    timm's ``BatchNormAct2d``, only when its activation is ``nn.Identity``) read only in a line up
    to a fusable addition, and that addition (None when there is none)."""
    between, cur = [], start
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_add(u) and u.args.count(cur) == 1:
            return between, u
        if not single_input_call(u, cur):
            return None
        m = modules.get(u.target)
        if type(m) not in (nn.BatchNorm2d, nn.Identity) and batchnorm_act_activation(m) != "none":
            return None
        between.append(u)
        cur = u


def rewrite_residual_block(block: nn.Module, fused: dict[str, str], layer_of) -> torch.fx.GraphModule:
    """The ``torch.fx.GraphModule`` replacing ``block`` once the residual additions after the
    convs named in ``fused`` (names relative to ``block`` -> the activation after the addition,
    or ``"none"``) are computed by those convs (see the module documentation).

    ``layer_of(name)`` returns the module that will stand at ``name`` (relative to ``block``)
    after the conversion; calls of ``nn.ReLU`` / ``nn.ReLU6`` modules whose input is a conv whose
    new layer already applies that activation (``relu`` or ``relu6``; ReLU after ReLU6 too) and
    calls of ``nn.Identity`` modules are dropped. The result holds ``block``'s own submodules
    under the same names (the caller swaps the converted layers in afterwards) and does not
    modify ``block``.

    Raises:
        ValueError: the block does not trace, or one of the additions is not found in its graph.
    """
    try:
        graph = Tracer().trace(block)
    except Exception as e:
        raise ValueError(f"the block does not trace on its own ({type(e).__name__}: {e})") from None
    modules = dict(block.named_modules())
    conv_nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in fused}
    for conv, act in fused.items():
        node = conv_nodes.get(conv)
        tail = residual_tail(node, modules) if node is not None else None
        if tail is None:
            raise ValueError(f"the residual addition after {conv!r} is not in the block's graph")
        between, add = tail
        last = between[-1] if between else node
        other = add.args[1] if add.args[0] is last else add.args[0]
        end = add
        users = list(add.users)
        if act != "none":
            if len(users) != 1 or activation_of(users[0], add, modules) != act:
                raise ValueError(f"the {act} after the residual addition of {conv!r} is not in the block's graph")
            end = users[0]
        with graph.inserting_before(add):
            new = graph.call_module(conv, (node.args[0], other))
        end.replace_all_uses_with(new)
        for dead in [end, add, *reversed(between), node] if end is not add else [add, *reversed(between), node]:
            graph.erase_node(dead)
    # shared idempotent activations after convs that compute them, and identities
    for n in list(graph.nodes):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], torch.fx.Node):
            continue
        m = modules.get(n.target)
        src = n.args[0]
        drop = type(layer_of(n.target)) is nn.Identity
        if type(m) in (nn.ReLU, nn.ReLU6) and src.op == "call_module":
            done = getattr(layer_of(src.target), "activation", None)
            drop = done == "relu6" or (done == "relu" and type(m) is nn.ReLU)
        if drop:
            n.replace_all_uses_with(src)
            graph.erase_node(n)
    graph.lint()
    gm = torch.fx.GraphModule(block, graph, class_name=type(block).__name__)
    for name, child in block.named_children():  # the whole subtree, under the same names
        setattr(gm, name, child)
    gm.train(block.training)
    return gm
