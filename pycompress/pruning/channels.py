"""Channel pruning of CNNs by dependency groups, and their compaction.

A conv's output channel cannot be removed on its own: the BatchNorm after it, the activation,
the layers that read it, every other branch written into the same residual sum, a depthwise
conv it passes through and the classifier's inputs it is flattened into all hold the same
channel. :func:`channel_groups` finds these *dependency groups* in the ``torch.fx`` graph of the
model, run once on example inputs for the tensor shapes; every group is pruned as one unit.

How channels flow (``C`` = dim 1 of a tensor)
    * ``Conv2d`` (``groups=1``) and ``Linear`` on a 2-D input *read* their input channels (input
      columns of the weight) and *produce* a new set of channels (weight rows).
    * A depthwise conv (``groups == in_channels == out_channels``), BatchNorm, element-wise
      activations and dropout, pooling, interpolation, means over the spatial dims keep the
      channels: channel ``i`` in is channel ``i`` out.
    * ``a + b`` (also ``-``, ``*``, ``/``) of two feature maps ties channel ``i`` of ``a`` to
      channel ``i`` of ``b``: all branches into a residual sum share one group.
    * ``torch.cat(..., dim=1)`` places its inputs' channels at offsets of its output.
    * ``flatten`` / ``view(N, -1)`` of ``[N, C, H, W]`` maps channel ``c`` to the ``H*W``
      consecutive features ``c*H*W ...`` of the classifier's input.

Anything else (the model input and output, a grouped conv, channel slicing / ``chunk`` /
``split``, a parameter tensor multiplied in, a layer called twice or sharing its weight, modules
pycompress does not know) *fixes* the channels involved: they are never pruned, and the group
lists the reason. A channel is pruned by masking the weight rows of every layer producing it
(and the depthwise filters it passes through) and the input columns of every layer reading it;
since no layer then reads it, :func:`compact_channels` can remove it from producers,
BatchNorms, depthwise convs and readers and the outputs stay those of the masked model.

Importance of the channels of a group (the lowest are pruned):

* ``"magnitude"`` / ``"magnitude_l2"``: the mean ``|w|`` (root-mean-square ``w``) of the
  channel's filters (weight rows), averaged over the group's producing layers.
* ``"activation"``: the channel's activation as the layers reading it see it (after BatchNorm
  and activation): ``activation_score="mean_abs"``: mean ``|a|`` over every pixel of every
  calibration image, pooled over the readers; ``"std_weighted"``: ``sum_r std(a) *
  ||W_r[:, c]||_2`` over the readers ``r``.
* ``"mixed"``: ``mix * A / mean(A) + (1 - mix) * M / mean(M)`` (means over the group).
* ``"bn_scale"``: ``|gamma|`` of the BatchNorms of the group (network slimming); channels
  without a BatchNorm are not pruned by it.

``scope="layer"`` prunes ``round(sparsity * n)`` of the ``n`` prunable channels of every group;
``scope="global"`` ranks the channels of all groups together (activation scores divided by their
group's mean, magnitude and BatchNorm scales as they are) and prunes ``round(sparsity * N)`` of
all ``N`` prunable channels, leaving at least one channel in every group.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pycompress import _utils
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.pruning.graph import Tracer, elementwise_step, is_elementwise_module

__all__ = ["channel_groups", "prune_channels", "compact_channels", "ChannelGroup", "ChannelPruningReport",
           "has_convs", "METHODS"]

METHODS = ("magnitude", "magnitude_l2", "activation", "mixed", "bn_scale")
_ACTIVATION_SCORES = ("mean_abs", "std_weighted")


# --------------------------------------------------------------------------- layer kinds
def is_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d or isinstance(m, MaskedConv2d)


def is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, MaskedLinear)


def _is_bn(m: nn.Module) -> bool:
    return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)


def _is_depthwise(m: nn.Module) -> bool:
    return is_conv(m) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def has_convs(model: nn.Module, include=None, exclude=None) -> bool:
    """Whether the selection (include/exclude as in :func:`pycompress.prune`) holds a Conv2d."""
    return any(True for _ in _utils.select_modules(model, include, exclude, predicate=lambda n, m: is_conv(m)))


_CHANNEL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
                    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
                    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Dropout2d)
_CHANNEL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
                  F.lp_pool2d, F.dropout2d, F.hardsigmoid, F.relu6, F.pad}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
           operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {"mean", "sum", "amax"}
_SHAPE_METHODS = {"size", "dim"}


# --------------------------------------------------------------------------- groups
class ChannelGraphError(ValueError):
    """The model cannot be analysed (it does not trace, or the trace does not reproduce it)."""


@dataclass
class ChannelGroup:
    """Channels that are pruned together.

    ``size``: channels in the group; ``members``: ``(module, role, offset, channels, factor)``
    with ``role`` one of ``"producer"`` (weight rows), ``"reader"`` (input columns of a conv or
    linear layer; ``factor`` inputs per channel after a flatten), ``"depthwise"`` (its filters),
    ``"batchnorm"``; ``offset`` is where the module's channels start in the group. ``fixed``:
    ``(start, stop, reason)`` ranges of channels that must not be pruned.
    """

    index: int
    size: int
    members: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    fixed: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        for m in self.members:
            if m[1] == "producer":
                return m[0]
        return self.members[0][0] if self.members else f"group{self.index}"

    def modules(self, *roles: str) -> list[str]:
        return list(dict.fromkeys(m[0] for m in self.members if not roles or m[1] in roles))

    def fixed_mask(self) -> torch.Tensor:
        f = torch.zeros(self.size, dtype=torch.bool)
        for a, b, _ in self.fixed:
            f[a:b] = True
        return f

    def reasons(self) -> list[str]:
        return list(dict.fromkeys(r for _, _, r in self.fixed))

    def __repr__(self) -> str:
        nfix = int(self.fixed_mask().sum())
        s = f"ChannelGroup({self.name!r}, {self.size} channels, {len(self.modules())} modules"
        return s + (f", {nfix} fixed: {'; '.join(self.reasons())})" if nfix else ")")


class _Spaces:
    """Union-find of channel spaces with offsets: ``find(s) = (root, off)`` means channel ``i``
    of ``s`` is channel ``off + i`` of ``root``."""

    def __init__(self):
        self.parent: list[int] = []
        self.off: list[int] = []
        self.size: list[int] = []
        self.broken: list[str | None] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.off.append(0)
        self.size.append(int(size))
        self.broken.append(None)
        return len(self.parent) - 1

    def find(self, s: int) -> tuple[int, int]:
        off = 0
        path = []
        while self.parent[s] != s:
            path.append(s)
            off += self.off[s]
            s = self.parent[s]
        root, total = s, off
        for p in path:  # path compression
            o = self.off[p]
            self.parent[p], self.off[p] = root, total
            total -= o
        return root, off

    def union(self, a: int, b: int, delta: int) -> None:
        """Channel ``i`` of ``a`` is channel ``i + delta`` of ``b``."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        if ra == rb:
            if oa != ob + delta:
                self.broken[ra] = "its channels are used at two different positions (e.g. cat([x, x]))"
            return
        d = ob + delta - oa  # channel k of ra is channel k + d of rb
        if d < 0:
            ra, rb, d = rb, ra, -d
        self.parent[ra], self.off[ra] = rb, d
        self.size[rb] = max(self.size[rb], d + self.size[ra])
        if self.broken[ra] and not self.broken[rb]:
            self.broken[rb] = self.broken[ra]


@dataclass
class _Analysis:
    groups: list[ChannelGroup]
    # module name -> [(role, group index, offset, channels, factor)]
    roles: dict[str, list[tuple[str, int, int, int, int]]]
    modules: dict[str, nn.Module]
    graph: Any = None


def _first_batch(example_inputs):
    for b in _utils.iter_batches(example_inputs, "example_inputs"):
        return b
    raise ValueError("example_inputs holds no batch")


def _positional(graph: torch.fx.Graph, batch) -> list:
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    _utils.check_batch(batch, "example_inputs")
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, (tuple, list)):
        args = list(batch)
        if len(args) > len(phs):
            raise ValueError(f"example_inputs has {len(args)} positional inputs; the model takes {len(phs)}")
        for p in phs[len(args):]:
            if not p.args:
                raise ValueError(f"example_inputs lacks the model input {p.target!r}")
            args.append(p.args[0])
        return args
    args = []
    for p in phs:
        if p.target in batch:
            args.append(batch[p.target])
        elif p.args:
            args.append(p.args[0])
        else:
            raise ValueError(f"example_inputs lacks the model input {p.target!r}")
    return args


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, tuple | None] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _trace(model: nn.Module, example_inputs):
    try:
        graph = Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any failure: the model is not traceable
        raise ChannelGraphError(
            f"channel pruning of convolutions needs a model that torch.fx can trace; {type(model).__name__} "
            f"does not ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Prune its "
            "convolutions with pattern='unstructured' or 'N:M', or make the forward traceable") from None
    gm = torch.fx.GraphModule(model, graph)
    batch = _utils.batch_to(_first_batch(example_inputs), _utils.model_device(model))
    args = _positional(graph, batch)
    rec = _ShapeRecorder(gm)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                got = rec.run(*args)
            except Exception as e:  # noqa: BLE001
                raise ChannelGraphError(f"the traced graph of {type(model).__name__} fails on example_inputs "
                                        f"({type(e).__name__}: {e})") from None
            want = _utils.call_model(model, batch, what="model")
    finally:
        model.train(was_training)
    g, _ = _utils.output_tensor(got)
    w, _ = _utils.output_tensor(want)
    if g.shape != w.shape or not torch.allclose(g.float(), w.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
        raise ChannelGraphError(f"the torch.fx trace of {type(model).__name__} does not reproduce its output on "
                                "example_inputs (data-dependent control flow?), so its channel groups cannot be "
                                "proven")
    return graph, rec.shapes


def _node_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))
    return out


def _analyze(model: nn.Module, example_inputs) -> _Analysis:
    graph, shapes = _trace(model, example_inputs)
    modules = dict(model.named_modules())
    sp = _Spaces()
    loc: dict[torch.fx.Node, tuple[int, int, int]] = {}  # node -> (space, offset, factor)
    fixes: list[tuple[int, int, int, str]] = []           # (space, offset, channels, reason)
    members: list[tuple[str, str, int, int, int, int]] = []  # (module, role, space, offset, channels, factor)

    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    owners: dict[int, set[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    seen_mod: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen_mod and seen_mod[id(m)] != name and any(True for _ in m.parameters(recurse=False)):
            shared.update((name, seen_mod[id(m)]))
        seen_mod.setdefault(id(m), name)

    def channels(n):
        s = shapes.get(n)
        return None if s is None or len(s) < 2 else s[1] // loc[n][2]

    def fix(n, why):
        if n in loc:
            s, o, _ = loc[n]
            fixes.append((s, o, channels(n), why))

    def new_space(n, why=None):
        s = shapes.get(n)
        if s is None or len(s) < 2:
            return
        sid = sp.new(s[1])
        loc[n] = (sid, 0, 1)
        if why:
            fixes.append((sid, 0, s[1], why))

    def tensors(n):
        return [a for a in _node_args(n) if shapes.get(a) is not None]

    def unknown(n, why):
        for a in tensors(n):
            fix(a, why)
        new_space(n, why)

    def same(n, src):
        if src in loc and shapes.get(n) is not None and len(shapes[n]) >= 2 \
                and shapes[n][1] == shapes[src][1]:
            loc[n] = loc[src]
            return True
        return False

    def flatten(n, src):
        i, o = shapes.get(src), shapes.get(n)
        if src in loc and i is not None and o is not None and len(o) == 2 and len(i) >= 2 and o[0] == i[0] \
                and o[1] == math.prod(i[1:]):
            s, off, f = loc[src]
            loc[n] = (s, off, f * math.prod(i[2:]))
            return True
        return False

    def binary(n, a, b):
        ta = isinstance(a, torch.fx.Node) and shapes.get(a) is not None
        tb = isinstance(b, torch.fx.Node) and shapes.get(b) is not None
        if ta and not tb or tb and not ta:
            src, other = (a, b) if ta else (b, a)
            if isinstance(other, torch.fx.Node) or isinstance(other, (int, float)) and not isinstance(other, bool):
                # a Python number or a non-tensor value of the graph (e.g. x.size(0))
                return same(n, src) or unknown(n, f"{_describe(n)} changes the channel dimension")
            return unknown(n, f"{_describe(n)} with a constant tensor")
        if not (ta and tb):
            return unknown(n, f"{_describe(n)}")
        if a not in loc or b not in loc:
            return unknown(n, f"{_describe(n)} of a tensor without channels")
        out = shapes.get(n)
        sa, sb = shapes[a], shapes[b]
        if out is None or len(out) < 2 or len(sa) != len(out) or len(sb) != len(out):
            return unknown(n, f"{_describe(n)} broadcasts over the channel dimension")
        if sa[1] == out[1] and sb[1] == out[1] and loc[a][2] == loc[b][2]:
            (s1, o1, _), (s2, o2, _) = loc[a], loc[b]
            sp.union(s1, s2, o2 - o1)
            loc[n] = loc[a]
            return None
        for x, sx in ((a, sa), (b, sb)):  # one operand broadcast across the channels (shape[1] == 1)
            y = b if x is a else a
            if sx[1] == 1 and shapes[y][1] == out[1]:
                fix(x, f"{_describe(n)} broadcasts it across channels")
                loc[n] = loc[y]
                return None
        return unknown(n, f"{_describe(n)} of tensors with different channel layouts")

    for n in graph.nodes:
        shape = shapes.get(n)
        if n.op == "placeholder":
            new_space(n, "model input")
        elif n.op == "get_attr":
            new_space(n, f"parameter or buffer {n.target!r} used as a tensor")
        elif n.op == "output":
            for a in tensors(n):
                fix(a, "reaches the model output")
        elif n.op == "call_module":
            m = modules.get(n.target)
            t = n.target
            ts = tensors(n)
            single = len(ts) == 1 and len(n.args) == 1 and not n.kwargs and n.args[0] is ts[0]
            has_params = m is not None and any(True for _ in m.parameters(recurse=False))
            if has_params and (calls.get(t, 0) > 1 or t in shared):
                unknown(n, f"module {t!r} is called more than once or shares its weight")
            elif not single:
                unknown(n, f"module {t!r} called with {len(ts)} tensors")
            elif is_conv(m):
                x = n.args[0]
                if x not in loc or loc[x][2] != 1 or len(shapes[x]) != 4:
                    unknown(n, f"conv {t!r} on a tensor whose channels are not its dim 1")
                elif m.groups == 1:
                    s, o, _ = loc[x]
                    members.append((t, "reader", s, o, m.in_channels, 1))
                    new_space(n)
                    members.append((t, "producer", loc[n][0], 0, m.out_channels, 1))
                elif _is_depthwise(m):
                    s, o, _ = loc[x]
                    loc[n] = loc[x]
                    members.append((t, "depthwise", s, o, m.out_channels, 1))
                else:
                    unknown(n, f"grouped conv {t!r} (groups={m.groups}) keeps its channels")
            elif is_linear(m):
                x = n.args[0]
                if x not in loc or len(shapes[x]) != 2:
                    unknown(n, f"linear layer {t!r} on a tensor that is not [batch, features]")
                else:
                    s, o, f = loc[x]
                    members.append((t, "reader", s, o, m.in_features // f, f))
                    new_space(n)
                    members.append((t, "producer", loc[n][0], 0, m.out_features, 1))
            elif _is_bn(m):
                x = n.args[0]
                if x in loc and same(n, x) and m.num_features == shapes[x][1]:
                    s, o, f = loc[x]
                    members.append((t, "batchnorm", s, o, m.num_features // f, f))
                else:
                    unknown(n, f"BatchNorm {t!r} on a tensor whose channels are not its dim 1")
            elif isinstance(m, nn.Flatten):
                if not (m.start_dim == 1 and m.end_dim == -1 and flatten(n, n.args[0])):
                    unknown(n, f"flatten {t!r} (only flatten(x, 1) of [N, C, ...] is understood)")
            elif is_elementwise_module(m) or isinstance(m, _CHANNEL_MODULES):
                if not same(n, n.args[0]):
                    unknown(n, f"module {t!r} changes the channel dimension")
            else:
                unknown(n, f"module {t!r} ({type(m).__name__}) is not understood")
        elif n.op == "call_function":
            fn = n.target
            ts = tensors(n)
            if shape is None:
                meta = fn is getattr and len(n.args) == 2 and n.args[1] in ("shape", "dtype", "device", "ndim")
                if ts and not meta:
                    unknown(n, f"{_describe(n)} does not return a tensor (a channel split?)")
            elif fn in _BINARY and len(n.args) == 2:
                binary(n, *n.args)
            elif fn in (torch.cat, torch.concat) and shape is not None:
                parts = n.args[0] if n.args else n.kwargs.get("tensors")
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
                if not isinstance(parts, (list, tuple)) or not all(isinstance(p, torch.fx.Node) for p in parts) \
                        or not isinstance(dim, int) or dim % len(shape) != 1 \
                        or any(p not in loc or loc[p][2] != 1 for p in parts):
                    unknown(n, "torch.cat along a dimension other than the channels")
                else:
                    new_space(n)
                    at = 0
                    for p in parts:
                        s, o, _ = loc[p]
                        sp.union(s, loc[n][0], at - o)
                        at += shapes[p][1]
            elif fn is torch.flatten:
                start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
                end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
                if not (len(ts) == 1 and start == 1 and end == -1 and flatten(n, ts[0])):
                    unknown(n, "torch.flatten (only flatten(x, 1) of [N, C, ...] is understood)")
            elif fn in _CHANNEL_FUNCS and len(ts) == 1 and n.args and n.args[0] is ts[0]:
                if not same(n, ts[0]):
                    unknown(n, f"{_describe(n)} changes the channel dimension")
            elif fn in (torch.mean, torch.sum, torch.amax) and len(ts) == 1:
                if not (_reduces_spatial(n, shapes) and same(n, ts[0])):
                    unknown(n, f"{_describe(n)} reduces the channel dimension")
            elif len(ts) == 1 and elementwise_step(n, ts[0], modules) is not None:
                if not same(n, ts[0]):
                    unknown(n, f"{_describe(n)} changes the channel dimension")
            else:
                unknown(n, f"{_describe(n)} is not understood")
        elif n.op == "call_method":
            name = n.target
            ts = tensors(n)
            src = n.args[0] if n.args else None
            if shape is None:
                if ts and name not in _SHAPE_METHODS:
                    unknown(n, f"{_describe(n)} does not return a tensor (a channel split?)")
            elif name in ("view", "reshape", "flatten") and len(ts) == 1 and src is ts[0]:
                if not (flatten(n, src) or (shape == shapes.get(src) and same(n, src))):
                    unknown(n, f"{_describe(n)} (only a flatten of [N, C, ...] into [N, C*...] is understood)")
            elif name in _BINARY_METHODS and len(n.args) == 2 and not n.kwargs:
                binary(n, *n.args)
            elif name in _REDUCE and len(ts) == 1 and src is ts[0]:
                if not (_reduces_spatial(n, shapes) and same(n, src)):
                    unknown(n, f"{_describe(n)} reduces the channel dimension")
            elif len(ts) == 1 and src is ts[0] and elementwise_step(n, src, modules) is not None:
                if not same(n, src):
                    unknown(n, f"{_describe(n)} changes the channel dimension")
            else:
                unknown(n, f"{_describe(n)} is not understood")

    # resolve spaces into groups
    index: dict[int, int] = {}
    groups: list[ChannelGroup] = []

    def group_of(space):
        root, off = sp.find(space)
        if root not in index:
            index[root] = len(groups)
            groups.append(ChannelGroup(index=len(groups), size=sp.size[root]))
            if sp.broken[root]:
                groups[-1].fixed.append((0, sp.size[root], sp.broken[root]))
        return groups[index[root]], off

    for mod, role, s, o, c, f in members:
        g, off = group_of(s)
        g.members.append((mod, role, off + o, c, f))
    for s, o, c, why in fixes:
        g, off = group_of(s)
        g.fixed.append((off + o, off + o + (c if c is not None else g.size), why))
    for g in groups:  # a channel no layer produces cannot be removed by pruning weights
        produced = torch.zeros(g.size, dtype=torch.bool)
        for _, role, o, c, _ in g.members:
            if role == "producer":
                produced[o:o + c] = True
        fixed = g.fixed_mask()
        start = None
        for i in range(g.size + 1):
            bad = i < g.size and not bool(produced[i]) and not bool(fixed[i])
            if bad and start is None:
                start = i
            elif not bad and start is not None:
                g.fixed.append((start, i, "no conv or linear layer produces these channels"))
                start = None
    groups = [g for g in groups if g.members]
    roles: dict[str, list[tuple[str, int, int, int, int]]] = {}
    for i, g in enumerate(groups):
        g.index = i
        for mod, role, o, c, f in g.members:
            roles.setdefault(mod, []).append((role, i, o, c, f))
    return _Analysis(groups=groups, roles=roles, modules=modules, graph=graph)


def _reduces_spatial(n: torch.fx.Node, shapes) -> bool:
    """A mean / sum / amax over dims that leave the batch and channel dims alone."""
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    src = shapes.get(n.args[0]) if n.args else None
    if src is None or dim is None:
        return False
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in dims):
        return False
    return all(d % len(src) >= 2 for d in dims)


def _describe(n: torch.fx.Node) -> str:
    t = n.target
    if n.op == "call_method":
        return f"method .{t}()"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".lstrip(".").replace(
        "_operator.", "operator.")


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """The dependency groups of ``model``'s channels (see the module docstring), found in its
    ``torch.fx`` graph run once on ``example_inputs`` (a batch, in eval mode, without gradients).

    Raises:
        ValueError: the model cannot be traced, or the trace does not reproduce the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _analyze(model, example_inputs).groups


# --------------------------------------------------------------------------- importance
@torch.no_grad()
def _effective(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    if isinstance(m, (MaskedConv2d, MaskedLinear)):
        w = w * m.mask
    return w.float()


def _reader_columns(m: nn.Module, c: int, f: int) -> torch.Tensor:
    """``[channels, ...]``: the weight entries of reader ``m`` that read each input channel."""
    w = _effective(m)
    if is_conv(m):
        return w.transpose(0, 1)  # [in, out, kh, kw]
    return w.t().reshape(c, f * w.shape[0])


@torch.no_grad()
def _collect_readers(model, analysis, readers, calibration_data):
    """Per reader module: (sum |x|, sum x, sum x^2, count) per input channel over the data."""
    acc = {name: None for name in readers}
    handles = []

    def hook_for(name, f):
        def hook(module, args):
            x = args[0].detach().double()
            if x.dim() == 4:
                xs = x.transpose(0, 1).reshape(x.shape[1], -1)
            else:
                xs = x.reshape(x.shape[0], -1, f).permute(1, 0, 2).reshape(x.shape[1] // f, -1)
            vals = (xs.abs().sum(1), xs.sum(1), xs.pow(2).sum(1), xs.shape[1])
            a = acc[name]
            acc[name] = vals if a is None else tuple(p + q for p, q in zip(a, vals))
        return hook

    for name, f in readers.items():
        handles.append(analysis.modules[name].register_forward_pre_hook(hook_for(name, f)))
    _utils.run_calibration(model, calibration_data, handles)
    for name, a in acc.items():
        if a is None:
            raise ValueError(f"layer {name!r} never ran on calibration_data, so its input channels have no "
                             "activation statistics; exclude it or use method='magnitude'")
    return acc


def _normalized(s: torch.Tensor) -> torch.Tensor:
    mean = s.mean() if s.numel() else s.new_zeros(())
    return s / mean if float(mean) > 0 else s


def _group_scores(g: ChannelGroup, analysis, method, mix, acts, activation_score, scope):
    """(score per channel of ``g`` (float64), bool [size] of channels the method cannot score)."""
    modules = analysis.modules
    unscored = torch.zeros(g.size, dtype=torch.bool)

    def magnitude():
        tot = torch.zeros(g.size, dtype=torch.float64)
        cnt = torch.zeros(g.size, dtype=torch.float64)
        for mod, role, o, c, _ in g.members:
            if role != "producer":
                continue
            w = _effective(modules[mod]).reshape(c, -1).double()
            v = w.abs().mean(1) if method != "magnitude_l2" else w.pow(2).mean(1).sqrt()
            tot[o:o + c] += v
            cnt[o:o + c] += 1
        return tot / cnt.clamp_min(1)

    def activation():
        tot = torch.zeros(g.size, dtype=torch.float64)
        cnt = torch.zeros(g.size, dtype=torch.float64)
        for mod, role, o, c, f in g.members:
            if role not in ("reader", "depthwise"):
                continue
            absum, s, sq, count = acts[mod]
            if activation_score == "mean_abs":
                tot[o:o + c] += absum
                cnt[o:o + c] += count
            else:
                mean = s / count
                std = (sq / count - mean.pow(2)).clamp_min(0).sqrt()
                m = modules[mod]
                cols = _effective(m).reshape(c, -1) if role == "depthwise" else _reader_columns(m, c, f)
                tot[o:o + c] += std * cols.double().reshape(c, -1).norm(dim=1)
                cnt[o:o + c] = 1
        return tot / cnt.clamp_min(1)

    if method in ("magnitude", "magnitude_l2"):
        return magnitude(), unscored
    if method == "bn_scale":
        tot = torch.zeros(g.size, dtype=torch.float64)
        cnt = torch.zeros(g.size, dtype=torch.float64)
        for mod, role, o, c, f in g.members:
            bn = modules[mod]
            if role == "batchnorm" and bn.affine:
                gamma = bn.weight.detach().double().abs().reshape(c, f).mean(1)
                tot[o:o + c] += gamma
                cnt[o:o + c] += 1
        return tot / cnt.clamp_min(1), cnt == 0
    act = activation()
    if method == "activation":
        return act, unscored
    return mix * _normalized(act) + (1.0 - mix) * _normalized(magnitude()), unscored


# --------------------------------------------------------------------------- pruning
@dataclass
class ChannelPruningReport:
    """What :func:`prune_channels` did: ``groups``: one dict per group (``name``, ``channels``,
    ``prunable``, ``pruned``, ``modules``); ``refused``: group name → why (some of) its channels
    were not pruned; ``channels_before`` / ``channels_pruned`` over all groups; ``compensated``:
    reader → where the pruned channels' mean was folded (its bias or a BatchNorm's running mean);
    ``uncompensated``: reader → why it was not compensated."""

    groups: list[dict] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    channels_before: int = 0
    channels_pruned: int = 0
    compensated: dict[str, str] = field(default_factory=dict)
    uncompensated: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"ChannelPruningReport: {self.channels_pruned} of {self.channels_before} channels pruned in "
                 f"{sum(1 for g in self.groups if g['pruned'])} of {len(self.groups)} groups"]
        for g in self.groups:
            lines.append(f"  {g['name']}: {g['pruned']}/{g['channels']} pruned ({g['prunable']} prunable); "
                         f"{', '.join(g['modules'])}")
        lines += [f"  not pruned {k}: {v}" for k, v in self.refused.items()]
        if self.compensated:
            lines.append(f"  pruned inputs folded into: {', '.join(f'{k} ({v})' for k, v in self.compensated.items())}")
        lines += [f"  not compensated {k}: {v}" for k, v in self.uncompensated.items()]
        return "\n".join(lines)


def _check_args(sparsity, scope, method, mix, activation_score):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for channel pruning of convolutions; supported: "
                         f"{', '.join(map(repr, METHODS))}")
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not (0.0 <= float(mix) <= 1.0):
        raise ValueError(f"mix must be a float in [0, 1] (weight of the activation score), got {mix!r}")
    if activation_score not in _ACTIVATION_SCORES:
        raise ValueError(f"unknown activation_score {activation_score!r}; supported: "
                         f"{', '.join(map(repr, _ACTIVATION_SCORES))}")


class _Budget:
    """Drops channels of a group while the group and every layer producing its channels keep at
    least one."""

    def __init__(self, g: ChannelGroup):
        self.left = g.size
        self.prod = [[o, c, c] for _, role, o, c, _ in g.members if role == "producer"]
        self.dropped: list[int] = []
        self.skipped = 0

    def drop(self, p: int) -> int:
        cover = [r for r in self.prod if r[0] <= p < r[0] + r[1]]
        if self.left <= 1 or any(r[2] <= 1 for r in cover):
            self.skipped += 1
            return 0
        for r in cover:
            r[2] -= 1
        self.left -= 1
        self.dropped.append(p)
        return 1


def _keep_vectors(analysis, selected, sparsity, scope, method, mix, acts, activation_score, report):
    """bool keep vector per group index (only groups with a pruned channel)."""
    cands = []  # (group, prunable mask, scores)
    for g in analysis.groups:
        prunable = ~g.fixed_mask()
        why = g.reasons()
        for mod, role, o, c, _ in g.members:
            if role == "producer" and mod not in selected:
                prunable[o:o + c] = False
                why.append(f"layer {mod!r} is not selected")
        entry = {"name": g.name, "channels": g.size, "prunable": 0, "pruned": 0, "modules": g.modules()}
        report.groups.append(entry)
        report.channels_before += g.size
        if not bool(prunable.any()):
            report.refused[g.name] = "; ".join(why) or "no prunable channel"
            continue
        scores, unscored = _group_scores(g, analysis, method, mix, acts, activation_score, scope)
        if bool((prunable & unscored).any()):
            prunable &= ~unscored
            why.append("no BatchNorm scales these channels (method='bn_scale')")
            if not bool(prunable.any()):
                report.refused[g.name] = "; ".join(why)
                continue
        if why:
            report.refused[g.name] = "some channels are kept: " + "; ".join(why)
        entry["prunable"] = int(prunable.sum())
        cands.append((g, prunable, scores, entry))
    keeps: dict[int, torch.Tensor] = {}
    budgets = [_Budget(g) for g, *_ in cands]
    if scope == "layer":
        for (g, prunable, scores, entry), budget in zip(cands, budgets):
            k = round(sparsity * int(prunable.sum()))
            if k >= g.size:
                raise ValueError(f"sparsity {sparsity} would prune every channel of the group of {g.name!r} "
                                 f"({g.size} channels: {', '.join(g.modules())}); lower the sparsity or exclude "
                                 "its layers")
            idx = torch.nonzero(prunable).flatten()
            for p in idx[torch.sort(scores[idx], stable=True).indices].tolist():
                if len(budget.dropped) >= k:
                    break
                budget.drop(p)
    elif cands:
        flat, owner, pos = [], [], []
        for j, (g, prunable, scores, _) in enumerate(cands):
            s = scores if method in ("magnitude", "magnitude_l2", "bn_scale", "mixed") else _normalized(scores)
            idx = torch.nonzero(prunable).flatten()
            flat.append(s[idx])
            owner += [j] * len(idx)
            pos.append(idx)
        allscores = torch.cat(flat)
        positions = torch.cat(pos).tolist()
        target = round(sparsity * allscores.numel())
        cnt = 0
        for i in torch.sort(allscores, stable=True).indices.tolist():
            if cnt >= target:
                break
            cnt += budgets[owner[i]].drop(positions[i])
    for (g, _, _, entry), budget in zip(cands, budgets):
        if budget.dropped:
            keep = torch.ones(g.size, dtype=torch.bool)
            keep[budget.dropped] = False
            keeps[g.index] = keep
            entry["pruned"] = len(budget.dropped)
        if budget.skipped:
            note = (f"{budget.skipped} low-scoring channels kept so that every layer keeps at least one output "
                    "channel")
            report.refused[g.name] = f"{report.refused[g.name]}; {note}" if g.name in report.refused else note
    report.channels_pruned = sum(g["pruned"] for g in report.groups)
    return keeps


def _module_keeps(analysis, keeps):
    """module -> (rows keep [out] or None, cols keep [in features] or None) from group keeps."""
    out: dict[str, list] = {}
    for mod, roles in analysis.roles.items():
        m = analysis.modules[mod]
        rows = cols = None
        for role, gi, o, c, f in roles:
            k = keeps.get(gi)
            if k is None:
                continue
            part = k[o:o + c]
            if role in ("producer", "depthwise"):
                rows = part if rows is None else rows & part
            elif role == "reader":
                part = part.repeat_interleave(f)
                cols = part if cols is None else cols & part
            elif role == "batchnorm":
                rows = part.repeat_interleave(f) if rows is None else rows & part.repeat_interleave(f)
        if rows is not None or cols is not None:
            out[mod] = [rows, cols, m]
    return out


def _weight_mask(m: nn.Module, rows, cols) -> torch.Tensor:
    w = m.weight
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if rows is not None:
        mask &= rows.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
    if cols is not None and not _is_depthwise(m):
        mask &= cols.to(w.device).reshape(1, -1, *([1] * (w.dim() - 2)))
    return mask


@torch.no_grad()
def _reader_part(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What reader ``m`` computes from ``x`` with weight ``w`` (no bias), with its own padding."""
    if isinstance(m, MaskedConv2d):
        if m._pre_pad is not None:
            x = F.pad(x, m._pre_pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        return F.conv2d(x, w, None, m.stride, m._conv_pad, m.dilation)
    if is_conv(m):
        return m._conv_forward(x, w, None)
    return x.reshape(-1, x.shape[-1]) @ w.t()


@torch.no_grad()
def _compensation(model, analysis, mods, data, mode) -> dict[str, torch.Tensor]:
    """Per reader with pruned input columns: ``delta [out]`` (float64), the mean over ``data``
    (every image and output position) of what the reader computes from its pruned inputs, in
    the model as it is (``mode="mean"``) or with the producers of the pruned channels masked
    (``"masked"``). Adding ``delta`` to the reader's bias replaces the pruned inputs by their
    mean contribution instead of by zero. ``delta`` is zero on the reader's own pruned output
    rows, so the constants its pruned outputs carry stay those measured downstream. Reads the
    model only (forward hooks)."""
    producers, readers = {}, {}
    for name, (rows, cols, m) in mods.items():
        if _is_bn(m):
            continue
        if rows is not None and not bool(rows.all()):
            producers[name] = rows
        if cols is not None and not bool(cols.all()):
            readers[name] = (torch.nonzero(~cols).flatten(), rows)
    if not readers:
        return {}
    acc: dict[str, list] = {name: [None, 0] for name in readers}

    def masked_output(rows):
        def hook(module, _args, out):
            keep = rows.to(out.device)
            b = module.bias
            if is_conv(module):
                keep = keep.reshape(1, -1, 1, 1)
                dead = b.detach().reshape(1, -1, 1, 1) if b is not None else out.new_zeros(())
            else:
                dead = b.detach() if b is not None else out.new_zeros(())
            return torch.where(keep, out, dead.to(out.dtype))
        return hook

    def reader_input(name, idx):
        def hook(module, args):
            x = args[0].detach()
            w = _effective(module)
            if is_conv(module):
                y = _reader_part(module, x[:, idx.to(x.device)].float(), w[:, idx.to(w.device)])
                s, n = y.double().sum((0, 2, 3)), y.shape[0] * y.shape[2] * y.shape[3]
            else:
                y = _reader_part(module, x.reshape(-1, x.shape[-1])[:, idx.to(x.device)].float(),
                                 w[:, idx.to(w.device)])
                s, n = y.double().sum(0), y.shape[0]
            a = acc[name]
            a[0] = s if a[0] is None else a[0] + s
            a[1] += n
        return hook

    mods_ = analysis.modules
    handles = [] if mode == "mean" else [mods_[name].register_forward_hook(masked_output(rows))
                                         for name, rows in producers.items()]
    handles += [mods_[name].register_forward_pre_hook(reader_input(name, idx)) for name, (idx, _) in readers.items()]
    _utils.run_calibration(model, data, handles)
    out = {}
    for name, (s, n) in acc.items():
        if s is None:
            raise ValueError(f"layer {name!r} never ran on the compensation data, so the pruned channels it reads "
                             "have no measured value; exclude it or pass compensate=False")
        delta = (s / n).cpu()
        rows = readers[name][1]
        if rows is not None:
            delta[~rows] = 0.0
        out[name] = delta
    return out


def _sole_batchnorm(analysis, name: str):
    """The BatchNorm module name that is the only consumer of module ``name`` in the traced
    graph (and keeps running statistics), or None."""
    if analysis.graph is None:
        return None
    nodes = [n for n in analysis.graph.nodes if n.op == "call_module" and n.target == name]
    if len(nodes) != 1:
        return None
    users = list(nodes[0].users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = analysis.modules.get(users[0].target)
    if bn is None or not _is_bn(bn) or not bn.track_running_stats or bn.running_mean is None:
        return None
    return users[0].target


def prune_channels(model: nn.Module, sparsity: float, *, scope: str = "global", method: str = "magnitude",
                   include=None, exclude=None, calibration_data=None, mix: float = 0.5,
                   activation_score: str = "mean_abs", example_inputs=None, compensate: bool = True,
                   return_report: bool = False):
    """Prunes whole channels of a CNN by dependency groups, in place (see the module docstring).

    The conv and linear layers holding a pruned channel become :class:`~pycompress.nn.MaskedConv2d`
    / :class:`~pycompress.nn.MaskedLinear` (sharing the original ``Parameter`` objects): the
    channel's filters in every producing layer and depthwise conv and its input columns in every
    reading layer are masked, so :func:`pycompress.compact` can remove it exactly. The masks of
    the layers in the groups are replaced (like ``pattern="channel"`` on linear layers).

    ``include`` / ``exclude`` select the layers whose output channels may be pruned; a channel
    is pruned only when every layer producing it is selected. ``example_inputs`` (default: the
    first batch of ``calibration_data``) is run once through the traced graph for the shapes.

    ``compensate`` (default ``True``, i.e. ``"mean"``): what the readers of a pruned channel get
    in place of it. Masking its input columns alone replaces the channel by zero, although after
    BatchNorm and activation a pruned channel is rarely zero on average. With ``"mean"`` every
    reader's contribution of the pruned channels, averaged over the data (``calibration_data``,
    else ``example_inputs``), every image and every output position, is added to the reader's
    bias: ``bias[o] += mean(sum_{c pruned, ky, kx} W[o, c, ky, kx] * x_c)``, per input feature
    for a linear layer after a flatten. This is the constant that best replaces (least squares,
    on that data) the pruned channels' contribution, so the reader's output is on average that
    of the dense model; it is exact for a channel that is constant over the data (e.g. one
    that only carries its BatchNorm's shift), except at the borders of a zero-padded conv,
    where the mean over the positions is taken. It costs one pass of the model over the data
    and changes no shape, so :func:`pycompress.compact` stays exact. ``"masked"`` measures the
    channels with their producers already masked instead (what the readers see of the pruned
    channels' constant ``act(BN(bias))`` in the masked model), exact with respect to the model
    with only the producers masked; on the small ResNet / MobileNetV2 / VGG of the tests it
    helped magnitude pruning far less than ``"mean"`` and made activation pruning worse (a
    channel of small activations can carry a larger constant once its filters are gone).
    ``False``: the channels read as zero.
    A reader without a bias is compensated through the running mean of the BatchNorm that is
    its only consumer (``running_mean -= delta``, exact in eval mode; in train mode the batch
    mean absorbs the constant); otherwise it is left as it is and listed in the report's
    ``uncompensated`` (no parameter is added, so the model keeps its architecture). The
    compensation is measured in eval mode with the reader's own pruned outputs left out, so
    the values measured further down stay those the model computes.

    Returns ``model``, or ``(model, ChannelPruningReport)`` with ``return_report=True``. On any
    error the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_args(sparsity, scope, method, mix, activation_score)
    if compensate is True:
        compensate = "mean"
    if compensate not in (False, None, "mean", "masked"):
        raise ValueError(f"compensate must be True, False, 'mean' or 'masked', got {compensate!r}")
    sparsity = float(sparsity)
    data = method in ("activation", "mixed")
    if data and calibration_data is None:
        raise ValueError(f"method={method!r} ranks channels by their activations and needs calibration_data "
                         "(a batch or an iterable of batches); use method='magnitude' without data")
    if data and hasattr(calibration_data, "__next__") and not isinstance(calibration_data, torch.Tensor):
        calibration_data = list(calibration_data)  # a one-shot iterator: read for the shapes and the statistics
    if example_inputs is None:
        if calibration_data is None:
            raise ValueError("channel pruning of convolutions needs example_inputs (a batch the model runs on) "
                             "to trace the channel dependencies")
        example_inputs = _first_batch(calibration_data)
    selected = {n for n, _ in _utils.select_modules(model, include, exclude,
                                                    predicate=lambda n, m: is_conv(m) or is_linear(m))}
    analysis = _analyze(model, example_inputs)
    report = ChannelPruningReport()
    acts = None
    if data:
        readers = {}
        for g in analysis.groups:
            if bool((~g.fixed_mask()).any()):
                for mod, role, _, _, f in g.members:
                    if role in ("reader", "depthwise"):
                        readers[mod] = f
        acts = _collect_readers(model, analysis, readers, calibration_data) if readers else {}
    keeps = _keep_vectors(analysis, selected, sparsity, scope, method, mix, acts, activation_score, report)
    mods = _module_keeps(analysis, keeps)
    folds = []  # (tensor to add to, delta)
    if compensate:
        deltas = _compensation(model, analysis, mods, calibration_data if calibration_data is not None
                               else example_inputs, compensate)
        for mod, delta in deltas.items():
            m = analysis.modules[mod]
            if not bool(delta.ne(0).any()):
                continue
            if m.bias is not None:
                folds.append((m.bias, delta))
                report.compensated[mod] = "bias"
                continue
            bn = _sole_batchnorm(analysis, mod)
            if bn is not None:
                folds.append((analysis.modules[bn].running_mean, -delta))
                report.compensated[mod] = f"running_mean of {bn}"
            else:
                report.uncompensated[mod] = ("it has no bias and its output does not go to a BatchNorm alone, so "
                                             "the pruned channels' values are dropped")
    # every check passed: masks are set below and nothing fails after this point
    with torch.no_grad():
        for t, delta in folds:
            t.add_(delta.to(device=t.device, dtype=t.dtype))
    for mod, (rows, cols, m) in mods.items():
        if _is_bn(m):
            continue
        mask = _weight_mask(m, rows, cols)
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            m.set_mask(mask)
        elif bool(mask.all()):
            continue
        elif is_conv(m):
            _utils.set_module(model, mod, MaskedConv2d.from_float(m, mask, share_parameters=True))
        else:
            _utils.set_module(model, mod, MaskedLinear.from_dense(m, mask, share_parameters=True))
    return (model, report) if return_report else model


# --------------------------------------------------------------------------- compaction
@torch.no_grad()
def _columns_pruned(m: nn.Module, c: int, f: int) -> torch.Tensor:
    """bool [c]: input channels whose every weight in reader ``m`` is masked."""
    if not isinstance(m, (MaskedConv2d, MaskedLinear)):
        return torch.zeros(c, dtype=torch.bool)
    live = m.mask
    if is_conv(m):
        return ~live.transpose(0, 1).reshape(c, -1).any(1).cpu()
    return ~live.t().reshape(c, -1).any(1).cpu()


@torch.no_grad()
def _slice_conv(m, rows, cols):
    dev = m.weight.device
    w = m.weight.detach()
    mask = m.mask if isinstance(m, MaskedConv2d) else None
    if _is_depthwise(m):
        keep = rows if rows is not None else torch.ones(m.out_channels, dtype=torch.bool)
        keep = keep.to(dev)
        n = int(keep.sum())
        w, mask = w[keep], (mask[keep] if mask is not None else None)
        cin, cout, groups = n, n, n
    else:
        r = (rows if rows is not None else torch.ones(m.out_channels, dtype=torch.bool)).to(dev)
        c = (cols if cols is not None else torch.ones(m.in_channels, dtype=torch.bool)).to(dev)
        w = w[r][:, c]
        mask = mask[r][:, c] if mask is not None else None
        cin, cout, groups, keep = int(c.sum()), int(r.sum()), m.groups, r
    conv = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups, bias=m.bias is not None,
                     padding_mode=m.padding_mode, device=dev, dtype=w.dtype)
    conv.weight.copy_(w)
    if m.bias is not None:
        conv.bias.copy_(m.bias.detach()[keep])
    conv.train(m.training)
    if mask is not None and not bool(mask.all()):
        return MaskedConv2d.from_float(conv, mask)
    return conv


@torch.no_grad()
def _slice_linear(m, rows, cols):
    dev = m.weight.device
    r = (rows if rows is not None else torch.ones(m.out_features, dtype=torch.bool)).to(dev)
    c = (cols if cols is not None else torch.ones(m.in_features, dtype=torch.bool)).to(dev)
    w = m.weight.detach()[r][:, c]
    lin = nn.Linear(int(c.sum()), int(r.sum()), bias=m.bias is not None, device=dev, dtype=w.dtype)
    lin.weight.copy_(w)
    if m.bias is not None:
        lin.bias.copy_(m.bias.detach()[r])
    lin.train(m.training)
    if isinstance(m, MaskedLinear):
        mask = m.mask[r][:, c]
        if not bool(mask.all()):
            return MaskedLinear.from_dense(lin, mask)
    return lin


@torch.no_grad()
def _slice_bn(m, keep):
    keep = keep.to(m.running_mean.device if m.running_mean is not None else m.weight.device)
    n = int(keep.sum())
    ref = m.weight if m.weight is not None else m.running_mean
    bn = type(m)(n, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats,
                 device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    if m.affine:
        bn.weight.copy_(m.weight.detach()[keep])
        bn.bias.copy_(m.bias.detach()[keep])
    if m.track_running_stats and m.running_mean is not None:
        bn.running_mean.copy_(m.running_mean[keep])
        bn.running_var.copy_(m.running_var[keep])
        bn.num_batches_tracked.copy_(m.num_batches_tracked)
    bn.train(m.training)
    return bn


def compact_channels(model: nn.Module, example_inputs, report, include=None, exclude=None) -> None:
    """Removes the pruned channels of every dependency group of ``model`` in place, adding to
    ``report`` (a :class:`~pycompress.pruning.compact.CompactionReport`).

    A channel is removed when no layer reads it (its input columns are masked to zero in every
    reader) and nothing fixes it (model input/output, unsupported ops); it then disappears from
    every producer, BatchNorm, depthwise conv and reader of its group, which leaves the outputs
    unchanged. ``include`` / ``exclude`` select the producing layers, as in ``prune``.
    """
    selected = {n for n, _ in _utils.select_modules(model, include, exclude,
                                                    predicate=lambda n, m: is_conv(m) or is_linear(m))}
    try:
        analysis = _analyze(model, example_inputs)
    except ChannelGraphError as e:
        for name, m in model.named_modules():
            if isinstance(m, MaskedConv2d) and not bool(m.mask.all()):
                report.refused[name] = str(e)
        return
    modules = analysis.modules
    keeps: dict[int, torch.Tensor] = {}
    for g in analysis.groups:
        fixed = g.fixed_mask()
        unread = torch.ones(g.size, dtype=torch.bool)     # no reader has a live weight on it
        dead = torch.zeros(g.size, dtype=torch.bool)      # every producing filter is pruned
        excluded = torch.zeros(g.size, dtype=torch.bool)  # a producer is not selected
        for mod, role, o, c, f in g.members:
            m = modules[mod]
            if role == "reader":
                unread[o:o + c] &= _columns_pruned(m, c, f)
            elif role == "producer":
                if isinstance(m, (MaskedConv2d, MaskedLinear)):
                    dead[o:o + c] |= ~m.mask.reshape(c, -1).any(1).cpu()
                if mod not in selected:
                    excluded[o:o + c] = True
        removable = unread & ~fixed & ~excluded
        stay = dead & ~removable
        if bool(stay.any()):
            why = g.reasons() if bool((stay & fixed).any()) else []
            if bool((stay & ~unread).any()):
                why.append(f"a layer still reads pruned channels (readers: {', '.join(g.modules('reader'))}); "
                           "prune(..., pattern='channel') masks the readers' input columns too")
            if bool((stay & excluded).any()):
                why.append("a layer producing them is not selected")
            report.refused[g.name] = f"{int(stay.sum())} pruned channels stay: " + "; ".join(why)
        if not bool(removable.any()):
            continue
        if bool(removable.all()):
            report.refused[g.name] = "every channel of the group is pruned; at least one must remain"
            continue
        empty = [mod for mod, role, o, c, _ in g.members if role == "producer" and bool(removable[o:o + c].all())]
        if empty:
            report.refused[g.name] = f"every output channel of {', '.join(empty)} is pruned; at least one must remain"
            continue
        keeps[g.index] = ~removable
        report.compacted.append({"layer": g.name, "kind": "channel_group", "removed": int(removable.sum()),
                                 "consumers": g.modules("reader"), "members": g.modules(),
                                 "before": [g.size], "after": [g.size - int(removable.sum())]})
    for mod, (rows, cols, m) in _module_keeps(analysis, keeps).items():
        if _is_bn(m):
            new = _slice_bn(m, rows)
        elif is_conv(m):
            new = _slice_conv(m, rows, cols)
        else:
            new = _slice_linear(m, rows, cols)
        _utils.set_module(model, mod, new)
