"""``pycompress.compact``: turn structurally pruned layers into smaller dense layers.

After ``prune(..., pattern="channel")`` a :class:`~pycompress.nn.MaskedLinear` has output rows
that are entirely masked: those neurons output their bias, a constant. ``compact`` removes such
rows (and bias entries) from the producing layer and the matching input columns from every layer
that consumes them, in place. The constant the removed neurons fed into a consumer (after the
element-wise ops in between, e.g. ``act(bias)``) is folded into the consumer's bias, so the
outputs stay those of the masked model (up to float rounding).

Where the consumers come from
    * Models that ``torch.fx`` can trace (MLPs, custom modules): the graph is followed from the
      producer through element-wise ops (activations, dropout, multiplication / division /
      addition by a Python number, ``contiguous``) to the linear layers that read it. Any other
      use of the value (a residual add, a normalization, ``cat``, a reshape, the model output, a
      second call of the producer or of a consumer) makes the producer be refused.
    * Hugging Face BERT-family encoder layers (not traceable by ``torch.fx``), recognised by their
      layout: the feed-forward block ``intermediate.dense -> intermediate_act_fn ->
      output.dense`` (``*Intermediate`` / ``*Output`` modules of a layer with
      ``feed_forward_chunk``), the GPT-2-family MLP ``c_fc -> act -> c_proj`` (``*MLP``
      modules of transformers; their ``Conv1D`` layers become ``nn.Linear``), and attention heads of ``*SelfAttention`` / ``*CrossAttention``
      modules (``query``/``key``/``value``, ``num_attention_heads``, ``attention_head_size``)
      whose sibling ``output.dense`` is the output projection. A head is removed only when its
      query, key AND value rows are all pruned (``prune(..., pattern="head")`` prunes whole
      heads); a removed head's output is the constant ``value.bias`` of its rows (the softmax
      weights sum to one), folded into the output projection's bias. GPT-2-family attention
      (fused ``c_attn`` = ``[query | key | value]``, output projection ``c_proj``; see
      :mod:`pycompress.pruning.gpt2_heads`) loses whole heads the same way, and its
      ``num_heads`` / ``split_size`` are updated.
    * CNNs (a model with ``nn.Conv2d`` / MaskedConv2d layers, given ``example_inputs``): channels
      are removed by dependency groups (:mod:`pycompress.pruning.channels`): a channel that no
      layer reads any more (its input columns masked in every reader, as
      ``prune(..., pattern="channel")`` leaves them) is removed from every conv, linear layer,
      BatchNorm and depthwise conv of its group, residual branches and concatenations included;
      no constant needs folding. Linear producers the groups leave are then handled as above.

Layers that cannot be proven safe stay masked, and the report says why.

Equivalence holds in eval mode (dropout between a producer and its consumer is the identity
there). A w8a8 :class:`~pycompress.nn.Int8Linear` consumer quantizes each token with its own
absmax, which the removed constant columns may have set, so its outputs can change slightly;
compact before quantizing for exactness.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pycompress import _utils
from pycompress.nn import conv1d
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.nn.registry import COMPACTED_ATTR
from pycompress.pruning import gpt2_heads
from pycompress.pruning.channels import compact_channels, is_conv
from pycompress.pruning.graph import (
    Tracer, effective_weight, ffn_blocks, follow_uses, int8_linear_cls, is_attention, is_elementwise_act,
    is_gpt2_attention, is_linear_like, is_number, sparse_linear_cls,
)

__all__ = ["compact", "CompactionReport"]


@dataclass
class CompactionReport:
    """What :func:`compact` did.

    ``compacted``: one dict per shrunk producer (``layer``, ``kind`` = ``"channels"`` or
    ``"heads"``, ``removed`` = rows or heads removed, ``consumers``, ``before`` / ``after`` shapes);
    ``refused``: layer name → why its pruned rows stay masked; ``parameters_before`` /
    ``parameters_after``: ``sum(p.numel())`` over parameters and floating/int8 weight buffers;
    ``notes``: caveats (e.g. a bias created in a consumer that had none); ``max_abs_diff``: largest
    output difference on ``example_inputs`` (None without them).
    """

    compacted: list[dict] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return {"compacted": [dict(c) for c in self.compacted], "refused": dict(self.refused),
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "notes": list(self.notes), "max_abs_diff": self.max_abs_diff}

    def __repr__(self) -> str:
        return (f"CompactionReport(compacted={len(self.compacted)} layers, refused={len(self.refused)}, "
                f"parameters {self.parameters_before} -> {self.parameters_after})")

    def __str__(self) -> str:
        lines = [repr(self)]
        for c in self.compacted:
            lines.append(f"  compacted {c['layer']}: {c['removed']} {c['kind']} removed, "
                         f"{tuple(c['before'])} -> {tuple(c['after'])}; consumers: {', '.join(c['consumers'])}")
        for name, why in self.refused.items():
            lines.append(f"  refused {name}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _pruned_rows(m: nn.Module) -> torch.Tensor | None:
    """Bool [out] of rows that are entirely pruned (None for layers that cannot be producers)."""
    if isinstance(m, MaskedLinear):
        return ~m.mask.any(1)
    i8 = int8_linear_cls()
    if i8 is not None and isinstance(m, i8):
        return ~(m.weight != 0).any(1)  # an int8 row of zeros outputs its bias exactly
    return None


def _bias_values(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Constant outputs of the pruned ``rows`` (their bias, zero without bias), float32."""
    if m.bias is None:
        return torch.zeros(int(rows.sum()), device=rows.device)
    return m.bias.detach().float()[rows]


def _count(model: nn.Module) -> int:
    n = sum(p.numel() for p in model.parameters())
    i8 = int8_linear_cls()
    if i8 is not None:
        for m in model.modules():
            if isinstance(m, i8):
                n += sum(b.numel() for k, b in m.named_buffers(recurse=False)
                         if b is not None and k in ("weight", "weight_scale", "bias"))
    return n


# --------------------------------------------------------------------------- plans
@dataclass
class _Edit:
    rows: torch.Tensor | None = None       # bool [out]: rows to remove
    cols: torch.Tensor | None = None       # bool [in]: columns to remove
    bias_add: torch.Tensor | None = None   # float [out] to add to the bias (before row removal)


def _plan_fx(model, producers, modules, plan, report, shared):
    """Finds consumers of the pruned rows of ``producers`` in the torch.fx graph of ``model``."""
    try:
        graph = Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: cannot prove it
        why = (f"the model cannot be traced with torch.fx ({type(e).__name__}: {str(e).splitlines()[0][:160]}) "
               "and the layer is not part of a known layout")
        for name in producers:
            report.refused[name] = why
        return
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name, rows in producers.items():
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            report.refused[name] = ("never called in the traced graph" if not nodes else
                                    f"called {len(nodes)} times in the forward pass (shared layer)")
            continue
        consumers, why = follow_uses(nodes[0], calls, modules, shared)
        if why is None and not consumers:
            why = "no linear layer consumes its output"
        if why is None:
            sparse = sparse_linear_cls()
            for c, _ in consumers:
                if sparse is not None and isinstance(modules[c], sparse):
                    why = f"its consumer {c!r} is a deployed SparseLinear (compact before deploy_pruned)"
        if why is not None:
            report.refused[name] = why
            continue
        _add_producer(name, rows, [(c, chain) for c, chain in consumers], modules, plan, report, "channels")


def _add_producer(name, rows, consumers, modules, plan, report, kind, removed=None, shape_change=None):
    prod = modules[name]
    plan.setdefault(name, _Edit()).rows = rows
    const = _bias_values(prod, rows)
    for cname, chain in consumers:
        v = const
        with torch.no_grad():
            for step in chain:
                v = step(v)
        cons = modules[cname]
        e = plan.setdefault(cname, _Edit())
        e.cols = rows.clone() if e.cols is None else (e.cols | rows)
        w = effective_weight(cons)
        add = w[:, rows.to(w.device)] @ v.to(w.device).float()
        e.bias_add = add if e.bias_add is None else e.bias_add + add
    report.compacted.append({
        "layer": name, "kind": kind, "removed": int(rows.sum()) if removed is None else removed,
        "consumers": [c for c, _ in consumers],
        "before": list(prod.weight.shape), "after": [], **(shape_change or {})})


def _hf_ffn(model, modules, producers, plan, report, shared):
    """BERT-family feed-forward blocks: ``intermediate.dense -> act -> output.dense``."""
    for name, cname, act in ffn_blocks(modules):
        if name not in producers:
            continue
        if not is_elementwise_act(act):
            report.refused[name] = f"activation {act!r} of the feed-forward block is not a known element-wise op"
            producers.pop(name)
            continue
        if not is_linear_like(modules.get(cname)):
            report.refused[name] = f"{cname} is not a linear layer compact can shrink"
            producers.pop(name)
            continue
        if name in shared or cname in shared:
            report.refused[name] = "its weight (or its consumer's) is shared with another layer"
            producers.pop(name)
            continue
        rows = producers.pop(name)
        _add_producer(name, rows, [(cname, [lambda v, act=act: act(v)])], modules, plan, report, "channels")


def _hf_heads(model, modules, producers, plan, report, shared, head_updates):
    """Whole attention heads of BERT-family self-/cross-attention modules."""
    for aname, attn in modules.items():
        if not aname or not is_attention(attn):
            continue
        ppath = aname.rpartition(".")[0]
        parent = modules.get(ppath) if aname else None
        prefix = f"{aname}."
        qkv = [f"{prefix}{p}" for p in ("query", "key", "value")]
        pruned = [producers.get(n) for n in qkv]
        if all(p is None for p in pruned):
            continue
        for n in qkv:
            producers.pop(n, None)

        def refuse(why):
            for n, p in zip(qkv, pruned):
                if p is not None:
                    report.refused[n] = why

        out = getattr(parent, "output", None) if parent is not None else None
        oname = f"{ppath}.output.dense" if ppath else "output.dense"
        tname = type(attn).__name__
        if not (parent is not None and getattr(parent, "self", None) is attn
                and (tname.endswith("SelfAttention") or tname.endswith("CrossAttention"))
                and out is not None and type(out).__name__.endswith("SelfOutput")
                and is_linear_like(modules.get(oname))):
            refuse("attention module not in the BERT layout (parent.self = attention, "
                   "parent.output.dense = output projection)")
            continue
        if getattr(attn, "position_embedding_type", "absolute") not in ("absolute", None):
            refuse(f"position_embedding_type={attn.position_embedding_type!r} is not supported")
            continue
        if any(n in shared for n in qkv + [oname]):
            refuse("a projection shares its weight with another layer")
            continue
        if any(p is None for p in pruned):
            refuse("only whole heads can be removed: query, key and value rows of the head must all be "
                   "pruned (use prune(..., pattern='head'))")
            continue
        h, d = attn.num_attention_heads, attn.attention_head_size
        if any(p.numel() != h * d for p in pruned):
            refuse(f"projection width is not num_attention_heads * attention_head_size = {h * d}")
            continue
        per_head = [p.reshape(h, d) for p in pruned]
        whole = per_head[0].all(1) & per_head[1].all(1) & per_head[2].all(1)
        partial = [(ph.any(1) & ~whole) for ph in per_head]
        if any(bool(p.any()) for p in partial):
            why = ("rows that do not make up a whole pruned head (query, key AND value rows of every "
                   "unit of the head) stay masked")
            for n, p in zip(qkv, partial):
                if bool(p.any()):
                    report.refused[n] = why
        nrem = int(whole.sum())
        if nrem == 0:
            continue
        if nrem == h:
            refuse("every head of the attention is pruned; at least one must remain")
            continue
        rows = whole.repeat_interleave(d)
        q, k, v = (modules[n] for n in qkv)
        for n in qkv:
            plan.setdefault(n, _Edit()).rows = rows
        # removed heads output value.bias of their rows (softmax weights sum to 1)
        const = _bias_values(v, rows.to(v.weight.device))
        e = plan.setdefault(oname, _Edit())
        e.cols = rows.clone() if e.cols is None else (e.cols | rows)
        w = effective_weight(modules[oname])
        add = w[:, rows.to(w.device)] @ const.to(w.device)
        e.bias_add = add if e.bias_add is None else e.bias_add + add
        head_updates[aname] = (whole, h, d)
        report.compacted.append({"layer": aname, "kind": "heads", "removed": nrem, "consumers": [oname],
                                 "before": [h, d], "after": [h - nrem, d]})


def _gpt2_heads(model, modules, producers, plan, report, shared, head_updates):
    """Whole attention heads of GPT-2-family attention modules (fused ``c_attn``, see
    :mod:`pycompress.pruning.gpt2_heads`)."""
    for aname, attn in modules.items():
        cname = f"{aname}.c_attn"
        if not aname or cname not in producers or not is_gpt2_attention(attn):
            continue
        rows = producers.pop(cname)
        oname = gpt2_heads.consumer(aname)
        h, d = attn.num_heads, attn.head_dim
        if not is_linear_like(modules.get(oname)):
            report.refused[cname] = f"{oname} is not a linear layer compact can shrink"
            continue
        if cname in shared or oname in shared:
            report.refused[cname] = "a projection shares its weight with another layer"
            continue
        if rows.numel() != 3 * h * d:
            report.refused[cname] = f"c_attn width {rows.numel()} is not 3 * num_heads * head_dim = {3 * h * d}"
            continue
        per_head = gpt2_heads.split_rows(rows, h, d)
        whole = per_head.all(2).all(0)
        if bool((per_head.any(2) & ~whole[None, :]).any()):
            report.refused[cname] = ("rows that do not make up a whole pruned head (its query, key AND "
                                     "value rows) stay masked (use prune(..., pattern='head'))")
        nrem = int(whole.sum())
        if nrem == 0:
            continue
        if nrem == h:
            report.refused[cname] = "every head of the attention is pruned; at least one must remain"
            continue
        c_rows = gpt2_heads.head_rows(whole, d)
        plan.setdefault(cname, _Edit()).rows = c_rows
        # removed heads output value.bias of their rows (softmax weights sum to 1)
        v_rows = torch.zeros_like(c_rows)
        v_rows[2 * h * d:] = whole.repeat_interleave(d)
        const = _bias_values(modules[cname], v_rows.to(modules[cname].weight.device))
        cols = whole.repeat_interleave(d)
        e = plan.setdefault(oname, _Edit())
        e.cols = cols.clone() if e.cols is None else (e.cols | cols)
        w = effective_weight(modules[oname])
        add = w[:, cols.to(w.device)] @ const.to(w.device)
        e.bias_add = add if e.bias_add is None else e.bias_add + add
        head_updates[aname] = (whole, h, d, "gpt2")
        report.compacted.append({"layer": aname, "kind": "heads", "removed": nrem, "consumers": [oname],
                                 "before": [h, d], "after": [h - nrem, d]})


# --------------------------------------------------------------------------- rebuilding
@torch.no_grad()
def _rebuild(m: nn.Module, edit: _Edit, report: CompactionReport, name: str) -> nn.Module:
    if conv1d.is_conv1d(m):  # a consumer of GPT-2's layout: shrunk as the nn.Linear it equals
        m = conv1d.to_linear(m, share_bias=False)
    dev = m.weight.device
    rows_keep = ~edit.rows.to(dev) if edit.rows is not None else torch.ones(m.weight.shape[0], dtype=torch.bool, device=dev)
    cols_keep = ~edit.cols.to(dev) if edit.cols is not None else torch.ones(m.weight.shape[1], dtype=torch.bool, device=dev)
    bias = None if m.bias is None else m.bias.detach().clone()
    if edit.bias_add is not None and bool((edit.bias_add != 0).any()):
        add = edit.bias_add.to(dev)
        if bias is None:
            report.notes.append(f"{name}: had no bias; one was created to hold the removed inputs' constant "
                                f"contribution ({int(rows_keep.sum())} parameters added)")
            bias = add.to(m.weight.dtype if m.weight.is_floating_point() else torch.float32)
        else:
            bias = (bias.float() + add).to(bias.dtype)
    out_f, in_f = int(rows_keep.sum()), int(cols_keep.sum())
    i8 = int8_linear_cls()
    if i8 is not None and isinstance(m, i8):
        new = i8(in_f, out_f, bias=bias is not None, mode=m.mode, device=dev, act_bits=m.act_bits,
                  weight_bits=m.weight_bits)
        new.weight.copy_(m.weight[rows_keep][:, cols_keep])
        new.weight_scale.copy_(m.weight_scale[rows_keep])
        if bias is not None:
            new.bias.copy_(bias.float()[rows_keep])
        new.repack()
    else:
        w = m.weight.detach()[rows_keep][:, cols_keep]
        mask = m.mask[rows_keep][:, cols_keep] if isinstance(m, MaskedLinear) else None
        lin = nn.Linear(in_f, out_f, bias=bias is not None, device=dev, dtype=w.dtype)
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias[rows_keep])
        new = MaskedLinear.from_dense(lin, mask) if mask is not None and not bool(mask.all()) else lin
    new.train(m.training)
    return new


def _shared_weights(model: nn.Module) -> set[str]:
    """Names of linear-like modules whose weight object also belongs to another module."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    out: set[str] = set()
    for names in owners.values():
        if len(names) > 1:
            out.update(names)
    seen: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:
            out.update((name, seen[id(m)]))
        seen.setdefault(id(m), name)
    return out


def _update_hf_config(attn: nn.Module, whole: torch.Tensor) -> None:
    """Records removed heads (original indices) in ``config.pruned_heads`` ({layer: [heads]}, the
    Hugging Face bookkeeping; created when the config lacks it). The config is shared by all layers,
    so ``num_attention_heads`` there keeps the original count; the modules hold the new one."""
    cfg = getattr(attn, "config", None)
    idx = getattr(attn, "layer_idx", None)
    if cfg is None or not isinstance(idx, int):
        return
    if not isinstance(getattr(cfg, "pruned_heads", None), dict):
        try:
            cfg.pruned_heads = {}
        except (AttributeError, TypeError):
            return
    before = sorted(set(cfg.pruned_heads.get(idx, [])))
    total = len(whole) + len(before)
    alive = [i for i in range(total) if i not in before]
    cfg.pruned_heads[idx] = sorted(before + [alive[i] for i in range(len(whole)) if bool(whole[i])])


# --------------------------------------------------------------------------- public API
def _outputs(model, example_inputs):
    outs = []
    was_training = model.training
    model.eval()  # equivalence is defined in eval mode (dropout off)
    try:
        with torch.no_grad():
            for i, b in enumerate(_utils.iter_batches(example_inputs, "example_inputs")):
                out, _ = _utils.output_tensor(_utils.call_model(model, b, index=i))
                outs.append(out.detach().float().clone())
    finally:
        model.train(was_training)
    return outs


def compact(model: nn.Module, example_inputs: Any = None, include=None, exclude=None, *,
            return_report: bool = False, atol: float = 1e-5):
    """Removes pruned output channels and attention heads for real, in place, and returns ``model``.

    Every selected layer whose output rows are entirely pruned (a MaskedLinear from
    ``prune(..., pattern="channel")`` or ``pattern="head"``, or an Int8Linear row of zeros) loses
    those rows, and every consumer loses the matching input columns (see the module docstring for
    how consumers are found). Shrunk layers become ``nn.Linear`` (``MaskedLinear`` when other
    weights stay masked, ``Int8Linear`` when quantized); BERT-style attention modules get their
    ``num_attention_heads`` / ``all_head_size`` updated. Layers whose consumers cannot be proven
    are left masked and listed with the reason in the report.

    Args:
        model: the model (modified in place).
        example_inputs: optional batch or batches; when given, the outputs before and after are
            compared (max abs difference in the report) and a difference above
            ``atol * max(1, max|output|)`` raises RuntimeError (it would mean a bug, never
            expected).
        include, exclude: globs (or ``re:`` patterns) on module names selecting the producers.
        return_report: also return the :class:`CompactionReport`.

    Returns:
        ``model``, or ``(model, CompactionReport)`` with ``return_report=True``.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> _ = pycompress.prune(model, 0.5, pattern="channel", scope="layer", include="0")
        >>> model, report = pycompress.compact(model, return_report=True)
        >>> model[0].out_features, model[2].in_features
        (16, 16)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_number(atol) or atol <= 0:
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    report = CompactionReport(parameters_before=_count(model))
    reference = _outputs(model, example_inputs) if example_inputs is not None else None
    if any(is_conv(m) for m in model.modules()):
        # CNNs: channels are removed by dependency groups (pycompress.pruning.channels)
        if example_inputs is not None:
            compact_channels(model, example_inputs, report, include, exclude)
        elif any(isinstance(m, MaskedConv2d) and not bool(m.mask.all()) for m in model.modules()):
            raise ValueError("compact needs example_inputs (a batch the model runs on) to trace the channel "
                             "dependencies of a model with pruned convolutions")
    modules = dict(model.named_modules())
    selected = {n for n, _ in _utils.select_modules(model, include, exclude)}
    producers: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if name not in selected:
            continue
        rows = _pruned_rows(m)
        if rows is not None and bool(rows.any()):
            if bool(rows.all()):
                report.refused[name] = "every output channel is pruned; at least one must remain"
                continue
            producers[name] = rows
    shared = _shared_weights(model)
    for name in list(producers):
        if name in shared:
            report.refused[name] = "its weight is shared with another layer (tied weights)"
            producers.pop(name)
    plan: dict[str, _Edit] = {}
    head_updates: dict[str, tuple] = {}
    _hf_heads(model, modules, producers, plan, report, shared, head_updates)
    _gpt2_heads(model, modules, producers, plan, report, shared, head_updates)
    _hf_ffn(model, modules, producers, plan, report, shared)
    if producers:
        _plan_fx(model, producers, modules, plan, report, shared)
    for name, edit in plan.items():
        old = modules[name]
        new = _rebuild(old, edit, report, name)
        _utils.set_module(model, name, new)
        modules[name] = new
    for aname, (whole, h, d, *layout) in head_updates.items():
        attn = modules[aname]
        if layout == ["gpt2"]:
            attn.num_heads = h - int(whole.sum())
            attn.split_size = attn.num_heads * d
        else:
            attn.num_attention_heads = h - int(whole.sum())
            attn.all_head_size = attn.num_attention_heads * d
        _update_hf_config(attn, whole)
    for c in report.compacted:
        report.refused.pop(c["layer"], None)  # refused by the channel groups, compacted by the linear path
        if c["kind"] == "channels":
            c["after"] = list(modules[c["layer"]].weight.shape)
    report.parameters_after = _count(model)
    if report.compacted:
        setattr(model, COMPACTED_ATTR, True)  # lets save/load rebuild the narrower layers
    if reference is not None:
        after = _outputs(model, example_inputs)
        diff = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(reference, after))
        scale = max(max(float(r.abs().max()) if r.numel() else 0.0 for r in reference), 1.0)
        report.max_abs_diff = diff
        i8 = int8_linear_cls()
        quantized = i8 is not None and any(isinstance(modules[n], i8) for n in plan)
        if quantized:
            report.notes.append("int8 layers were shrunk: their per-token activation scales may differ, "
                                "so outputs agree only approximately")
        elif not math.isfinite(diff) or diff > atol * scale:
            raise RuntimeError(f"compact changed the outputs on example_inputs (max abs diff {diff:.3g}, "
                               f"output scale {scale:.3g}); please report this model")
    return (model, report) if return_report else model
