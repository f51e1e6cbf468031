"""Graph analysis for the int8 conversion of CNNs: BatchNorm folding, activation fusion and the
int8 chains between convolutions, found with ``torch.fx``.

The traced graph is only *read*: the model keeps its own module structure (``quantize`` replaces
modules in place), so every rewrite must be expressible as a module swap:

* a zero-padding module (``nn.ZeroPad2d``, or ``nn.ConstantPad2d`` with value 0, adding rows
  and columns only) called once, whose output only the conv reads, is computed by the conv
  (its zero-point padding, asymmetric where the module's is: TensorFlow's "SAME" padding of
  stride-2 convs) and replaced by ``nn.Identity``;
* an eval-mode ``nn.BatchNorm2d`` whose only input is a conv's output, and which is that output's
  only user, is folded into the conv and replaced by ``nn.Identity``;
* a BatchNorm with its activation in one module (timm's ``BatchNormAct2d``: an ``nn.BatchNorm2d``
  subclass computing ``act(drop(batch_norm(x)))``, recognised by its structure, see
  :func:`pycompress.nn.residual.batchnorm_act_activation`), in eval mode, whose ``drop`` changes
  nothing and whose ``act`` is ``nn.Identity`` or a fusable activation, is folded the same way
  with its activation computed in the conv's epilogue, and replaced by ``nn.Identity``;
* a ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.SiLU`` / ``nn.Hardswish`` module that is the only user of the
  conv (or folded BatchNorm) output is computed in the conv's epilogue. When that module is called
  nowhere else it becomes ``nn.Identity``; a ReLU or ReLU6 module that is also called at other
  places (torchvision's blocks reuse one ``self.relu``) stays, since applying it again to its own
  output changes nothing (both are idempotent, bit for bit);
* a conv's float output may stay channels-last (the op's layout) unless a path from it reaches
  a ``.view`` or the model's output before another converted conv or a flattening op
  (``flatten``, ``reshape``, a linear layer): there it is made contiguous, as ``nn.Conv2d``
  would return it;
* a conv's output can stay uint8 when every path from it ends at the input of another converted
  conv, through modules that are exact on uint8 tensors only: ``nn.Identity``, ``nn.MaxPool2d``
  (a maximum commutes with the monotonic quantization; such a pool becomes
  :class:`pycompress.nn.Int8MaxPool2d`, which pools uint8 maps with the pycompress kernel, where
  that kernel runs on the model's device), and, when the zero point is 0, ``nn.ReLU`` (every uint8
  value stands for a real value >= 0) and the zero-padding modules ``nn.ZeroPad2d`` and
  ``nn.ConstantPad2d`` with value 0 (a padded 0 byte stands for the real value 0); a padding
  module that the consumer computes needs neither (the op pads with the zero point). Residual
  additions, concatenations, pooling by averages, flattening and model outputs all need float
  values.

Residual additions are the one rewrite that is not a module swap: an addition
``a + b`` (``operator.add`` / ``torch.add`` / ``Tensor.add``, including ``out += identity``)
where ``a`` is the output of a conv group without an activation (conv, folded BatchNorm,
``nn.Identity`` modules) read only by the addition, optionally followed by a fusable activation
(a module — shared ones too — or ``torch.relu`` / ``F.relu`` / ``F.relu6`` / ``F.silu`` /
``F.hardswish``) read only by it, is computed by the conv (``Int8Conv2d(residual=True)``:
``activation(conv(x) + b)``). The module whose ``forward`` holds the addition (a ResNet
``Bottleneck``, an inverted-residual block; never the root) is replaced by a
``torch.fx.GraphModule`` of its own graph with the addition and activation removed and the conv
called as ``conv(x, b)``; it keeps every submodule under the same name (``state_dict`` keys do
not change), and also drops the calls of shared idempotent activations on convs that compute
them, and of ``nn.Identity`` modules. ``b`` may then stay uint8 as well: a chain's consumer is
either a conv's input or a fused conv's residual.

A conv called at more than one place is converted but never folded, fused or chained (its
neighbours differ per call).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from pycompress.nn import registry
from pycompress.nn.int8_conv import pad_module_padding
from pycompress.nn.residual import (FUSABLE_ACTIVATIONS, IDEMPOTENT as _IDEMPOTENT, Tracer as _Tracer,
                                    activation_of as _activation_of, batchnorm_act_activation as _bn_act,
                                    is_add as _is_add, is_batchnorm_act as _is_bn_act,
                                    residual_tail as _residual_tail, rewrite_residual_block,
                                    single_input_call as _single_input_call)

__all__ = ["ConvGroup", "GraphPlan", "analyse", "fold_batchnorm", "FUSABLE_ACTIVATIONS", "maxpool_takes_uint8",
           "is_zero_pad", "rewrite_residual_block"]


@dataclass
class ConvGroup:
    """A conv, the zero-padding module before it and the modules computed in its epilogue after
    conversion."""

    conv: str
    pad: str | None = None  # a zero-padding module whose output only the conv reads
    bn: str | None = None
    act: str | None = None
    activation: str = "none"
    act_replaced: bool = False  # the activation module becomes nn.Identity (else it stays: idempotent)
    # residual fusion: the module whose forward holds the addition (its qualified name), and the
    # addition's node name in the model's graph; ``activation`` is then the one after the addition
    block: str | None = None
    add_node: str | None = None
    bn_act: bool = False  # ``bn`` is a BatchNorm with its activation in one module (BatchNormAct2d)

    @property
    def replaced(self) -> list[str]:
        """Modules replaced by ``nn.Identity`` when the conv is converted."""
        return [n for n in (self.pad, self.bn, self.act if self.act_replaced else None) if n]

    @property
    def last_float_module(self) -> str:
        """The module whose output, after ``activation``, is the group's output (the ``drop``
        inside a BatchNormAct2d: its output is the BatchNorm's, before the activation)."""
        if self.bn and self.bn_act:
            return self.bn + ".drop"
        return self.bn or self.conv


@dataclass
class Chain:
    """A uint8 edge candidate: ``producer``'s output reaches each of ``consumers`` (as their only
    input) through pass-through modules; ``needs_zero_zp``: a ReLU or a zero-padding module is
    on the way."""

    producer: str
    consumers: list[str]
    needs_zero_zp: bool = False
    pools: list[str] = field(default_factory=list)  # nn.MaxPool2d modules on the way (uint8 pooling)
    residual_consumers: list[str] = field(default_factory=list)  # fused convs taking it as their residual


@dataclass
class GraphPlan:
    traced: bool
    reason: str | None = None
    groups: dict[str, ConvGroup] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    weight_read: set[str] = field(default_factory=set)  # convs whose parameters the forward reads directly
    # convs whose float output may stay channels-last: no path from it reaches a ``.view`` or the
    # model's output before another converted conv (which lays out its own output)
    layout_free: set[str] = field(default_factory=set)
    # conv -> the converted convs its output reaches (through any other operations)
    feeds: dict[str, set[str]] = field(default_factory=dict)


def maxpool_takes_uint8(pool: nn.MaxPool2d, device: torch.device) -> bool:
    """Whether ``pool`` can pool uint8 channels-last maps on ``device`` as
    :class:`pycompress.nn.Int8MaxPool2d` (its kernel runs there and gives what max pooling of the
    float values gives; ``return_indices`` pools cannot)."""
    from pycompress.nn.int8_pool import Int8MaxPool2d

    if pool.return_indices:
        return False
    try:
        q = Int8MaxPool2d.from_float(pool).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (2, 64, 40, 40), generator=g, dtype=torch.uint8).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        got = q(x)
        want = torch.nn.functional.max_pool2d(x.float(), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                              pool.ceil_mode)
        return got.dtype == torch.uint8 and torch.equal(got.float(), want)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def is_zero_pad(m: nn.Module | None) -> bool:
    """Whether ``m`` is a 2-D padding module that pads with the value 0 (``nn.ZeroPad2d``, or
    ``nn.ConstantPad2d`` with value 0; negative padding crops)."""
    return type(m) is nn.ZeroPad2d or (type(m) is nn.ConstantPad2d and float(m.value) == 0.0)


def _module_at(modules: dict[str, nn.Module], node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return modules.get(node.target)


def _owner(node: torch.fx.Node) -> str | None:
    """Qualified name of the innermost module whose forward created ``node`` (None: the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.items())[-1]
    path = last[1][0] if isinstance(last[1], tuple) else last[0]
    return path or None


def analyse(model: nn.Module, convertible: dict[str, nn.Conv2d], device: torch.device | None = None,
            residual: bool = True) -> GraphPlan:
    """Traces ``model`` with ``torch.fx`` (symbolically: no input needed) and plans the folding,
    fusion and uint8 chains of the convs named in ``convertible`` (name -> the float conv it
    stands for); ``residual=False`` leaves residual additions alone. A model that cannot be traced gets ``GraphPlan(traced=False, reason=...)``."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # any failure of symbolic tracing: data-dependent control flow, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return GraphPlan(traced=False, reason=f"{type(e).__name__}: {msg[:200]}")
    modules = dict(model.named_modules())
    plan = GraphPlan(traced=True)
    ids = Counter()
    name_of_id: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        name_of_id.setdefault(id(m), []).append(n)
    for node in graph.nodes:
        if node.op == "call_module":
            ids[id(modules[node.target])] += 1
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            plan.weight_read.add(owner)
    plan.calls = {n: ids.get(id(m), 0) for n, m in modules.items()}
    # a conv whose parameters the forward reads stays a float nn.Conv2d: not a convertible one
    convertible = {n: c for n, c in convertible.items() if n not in plan.weight_read}

    def calls(name: str) -> int:
        return plan.calls.get(name, 0)

    def read_directly(name: str) -> bool:
        return name in plan.weight_read

    def flattens(node: torch.fx.Node) -> bool:
        """Whether ``node`` turns a feature map into rows (its output's layout is its own)."""
        if node.op == "call_module":
            m = modules.get(node.target)
            return isinstance(m, (nn.Linear, nn.Flatten)) or (
                registry.is_pycompress_layer(m) and hasattr(m, "in_features"))
        if node.op == "call_function":
            return node.target in (torch.flatten, torch.reshape, torch.nn.functional.linear)
        return node.op == "call_method" and node.target in ("flatten", "reshape")

    def reach(start: torch.fx.Node, feeds: set[str]) -> bool:
        """Collects the converted convs reached from ``start`` into ``feeds``; True when a path
        reaches a ``.view`` or the model's output before a conv or a flattening op."""
        stack, seen, layout = [start], set(), False
        while stack:
            node = stack.pop()
            for u in node.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "output" or (u.op == "call_method" and u.target == "view") or (
                        u.op == "call_function" and u.target is torch.Tensor.view):
                    layout = True
                    continue
                if u.op == "call_module" and u.target in convertible:
                    feeds.add(u.target)
                    continue
                if flattens(u):
                    continue
                stack.append(u)
        return layout

    conv_nodes: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in convertible:
            conv_nodes.setdefault(node.target, []).append(node)
    for name, nodes in conv_nodes.items():
        feeds: set[str] = set()
        layout = [reach(n, feeds) for n in nodes]
        plan.feeds[name] = feeds
        if not any(layout):
            plan.layout_free.add(name)

    ends: dict[str, torch.fx.Node] = {}
    pad_of: dict[str, str] = {}  # padding module -> the conv that computes it
    fused_adds: dict[torch.fx.Node, tuple[str, torch.fx.Node]] = {}  # addition -> (conv, residual operand)
    block_graphs: dict[str, torch.fx.Graph | None] = {}

    def _block_has(block: str, conv: str) -> bool:
        """Whether ``block`` traces on its own with the addition after ``conv`` in its graph."""
        if block not in block_graphs:
            try:
                block_graphs[block] = _Tracer().trace(modules[block])
            except Exception:
                block_graphs[block] = None
        g = block_graphs[block]
        if g is None:
            return False
        bmods = dict(modules[block].named_modules())
        nodes = [n for n in g.nodes if n.op == "call_module" and n.target == conv]
        return len(nodes) == 1 and _residual_tail(nodes[0], bmods) is not None

    def _plan_residual(group: ConvGroup, conv_node: torch.fx.Node, cur: torch.fx.Node) -> torch.fx.Node | None:
        """Plans the fusion of a residual addition after the group (returns its new end)."""
        tail = _residual_tail(cur, modules)
        if tail is None:
            return None
        between, add = tail
        if add in fused_adds:  # both operands come from convs: the first one computes the addition
            return None
        if any(calls(n.target) != 1 or read_directly(n.target) for n in between):
            return None
        if any(type(modules[n.target]) is nn.BatchNorm2d or _is_bn_act(modules[n.target]) for n in between):
            return None  # a BatchNorm the conv does not fold (not eval mode, or a second one)
        block = _owner(add)
        conv = group.conv
        # (the block runs once: its conv, called once, is inside it)
        if block is None or not conv.startswith(block + ".") or read_directly(block) \
                or registry.is_pycompress_layer(modules.get(block)) or not _block_has(block, conv[len(block) + 1:]):
            return None
        last = between[-1] if between else cur
        other = add.args[1] if add.args[0] is last else add.args[0]
        if other is last:
            return None
        end = add
        users = list(add.users)
        if len(users) == 1:
            kind = _activation_of(users[0], add, modules)
            if kind is not None and (users[0].op != "call_module" or users[0].target.startswith(block + ".")):
                group.activation = kind
                end = users[0]
        group.block, group.add_node = block, add.name
        fused_adds[add] = (conv, other)
        return end

    for node in graph.nodes:
        if node.op != "call_module" or node.target not in convertible:
            continue
        name = node.target
        conv = convertible[name]
        group = ConvGroup(conv=name)
        plan.groups[name] = group
        if calls(name) != 1 or len(node.args) != 1 or node.kwargs or read_directly(name):
            continue
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and len(src.users) == 1 and src.op == "call_module" \
                and len(src.args) == 1 and isinstance(src.args[0], torch.fx.Node) and not src.kwargs \
                and pad_module_padding(_module_at(modules, src)) is not None and calls(src.target) == 1 \
                and not read_directly(src.target):
            group.pad = src.target
            pad_of[src.target] = name
        cur = node
        users = list(cur.users)
        if len(users) == 1 and _single_input_call(users[0], cur):
            bn = _module_at(modules, users[0])
            # a BatchNormAct2d: its activation ("none": nn.Identity) is computed by the conv; its
            # ``drop`` (called once, by it alone) is where calibration reads the BatchNorm's output
            bn_act = _bn_act(bn)
            if bn_act is not None and len(name_of_id.get(id(bn.drop), ())) != 1:
                bn_act = None
            if ((type(bn) is nn.BatchNorm2d or bn_act is not None) and not bn.training and bn.track_running_stats
                    and bn.running_mean is not None and bn.running_var is not None
                    and bn.num_features == conv.out_channels and calls(users[0].target) == 1
                    and not read_directly(users[0].target)):
                group.bn = users[0].target
                cur = users[0]
                if bn_act is not None:
                    group.bn_act, group.activation = True, bn_act
        users = list(cur.users)
        if group.activation == "none" and len(users) == 1 and _single_input_call(users[0], cur):
            act = _module_at(modules, users[0])
            kind = FUSABLE_ACTIVATIONS.get(type(act))
            if kind is not None:
                if calls(users[0].target) == 1:
                    group.act, group.activation, group.act_replaced = users[0].target, kind, True
                    cur = users[0]
                elif kind in _IDEMPOTENT:
                    group.act, group.activation, group.act_replaced = users[0].target, kind, False
        if group.activation == "none" and residual:
            cur = _plan_residual(group, node, cur) or cur
        ends[name] = cur

    pools_ok: dict[str, bool] = {}
    dev = device if device is not None else torch.device("cpu")
    for name, end in ends.items():
        consumers: list[str] = []
        residual_consumers: list[str] = []
        pools: list[str] = []
        needs_zero_zp = False
        ok = True
        stack, seen = [end], set()
        while stack and ok:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            users = list(node.users)
            if not users:
                ok = False
            for u in users:
                if u in fused_adds and fused_adds[u][1] is node and u.args.count(node) == 1:
                    residual_consumers.append(fused_adds[u][0])
                    continue
                m = _module_at(modules, u)
                if m is None or not _single_input_call(u, node):
                    ok = False
                    break
                if u.target in convertible and u.target in plan.groups and calls(u.target) == 1 \
                        and not read_directly(u.target):
                    consumers.append(u.target)
                elif u.target in pad_of:  # computed by its conv, with the zero point
                    consumers.append(pad_of[u.target])
                elif type(m) is nn.Identity:
                    stack.append(u)
                elif type(m) is nn.MaxPool2d and not m.return_indices:
                    if u.target not in pools_ok:
                        pools_ok[u.target] = maxpool_takes_uint8(m, dev)
                    if not pools_ok[u.target]:
                        ok = False
                        break
                    pools.append(u.target)
                    stack.append(u)
                elif type(m) is nn.ReLU or is_zero_pad(m):
                    needs_zero_zp = True
                    stack.append(u)
                else:
                    ok = False
                    break
        if ok and (consumers or residual_consumers):
            plan.chains[name] = Chain(producer=name, consumers=sorted(set(consumers)), needs_zero_zp=needs_zero_zp,
                                      pools=sorted(set(pools)), residual_consumers=sorted(set(residual_consumers)))
    return plan


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A new float32 ``nn.Conv2d`` computing ``bn(conv(x))`` (eval-mode BatchNorm statistics),
    computed in float64; without ``bn``, an fp32 copy of ``conv``."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                                device=w.device)
    if bn is not None:
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
        inv = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        w = w * inv[:, None, None, None]
        b = (b - bn.running_mean.detach().double()) * inv + beta
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None or bn is not None,
                    padding_mode=conv.padding_mode, device=w.device, dtype=torch.float32)
    out.weight.copy_(w.float())
    if out.bias is not None:
        out.bias.copy_(b.float())
    return out

