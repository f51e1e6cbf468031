"""One-shot pruning: ``prune`` (gradual schedules are in :mod:`pycompress.pruning.gradual`,
deployment in :mod:`pycompress.pruning.deploy`).

Patterns:

* ``"unstructured"``: individual weights with the smallest ``|w|``.
* ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive weights along the input
  dimension exactly ``N`` are kept. When ``in_features`` is not a multiple of ``M`` the last,
  shorter group of ``r`` weights keeps ``ceil(r * N / M)``. The sparsity is set by the pattern;
  ``sparsity`` may be ``None`` or must match ``1 - N/M`` (±1%).
* ``"channel"``: whole output rows (neurons).
* ``"head"``: whole attention heads of BERT-style self-attention modules (the head's rows of
  ``query``, ``key`` and ``value``) and of GPT-2-style ones (the head's query, key and value rows
  of the fused ``c_attn``), so that :func:`pycompress.compact` can remove them.

Methods (importance scores; the lowest are pruned):

* ``"magnitude"``: unstructured / N:M ``|W_ij|``; channel: the L1 norm of the row
  ``sum_j |W_ij|``, divided by ``in_features`` (the row's mean ``|w|``) when ranking across layers;
  head: the mean ``|w|`` of the head's query, key and value rows.
* ``"activation"``: channel: a statistic of the neuron's activation ``a_i`` as it is used:
  ``a_i`` is input feature ``i`` of the linear layers ``c`` that read the neuron through
  element-wise ops only (its *consumers*, found as :func:`pycompress.compact` finds them: the
  torch.fx graph, or the BERT feed-forward layout ``intermediate.dense -> act -> output.dense``),
  i.e. after the activation function (a neuron whose pre-activation is always negative before a
  ReLU scores zero). ``activation_score`` picks the statistic:

  - ``"mean_abs"`` (default): ``mean |a_i|`` over every calibration token (pooled over all
    consumers when there are several): the mean absolute activation.
  - ``"std_weighted"``: how much the neuron's signal varies where it is used,
    ``sum_c std(a_i) * ||W_c[:, i]||_2``, with ``std`` the standard deviation over every
    calibration token and ``W_c[:, i]`` the consumer's (masked / dequantized) input column. A
    neuron whose output is nearly the same for every input carries no information, however large
    that output. On the digits MLP of ``pycompress demo`` it keeps markedly more accuracy
    without fine-tuning than ``"mean_abs"`` (see docs/pruning.md).

  With either statistic, when no consumer is known (the model output, a residual add or a
  normalization reads the layer, or the model cannot be traced) the score falls back to the mean
  ``|y_i|`` of the layer's own output.
  Head: the mean ``|y|`` of the head's slice of the attention output (for GPT-2-style attention:
  of the input of ``c_proj``). Unstructured / N:M:
  the Wanda score ``|W_ij| * ||x_j||_2`` (``||x_j||_2`` = L2 norm of input feature ``j`` over all
  calibration tokens). Across layers (``scope="global"``) each layer's scores are divided by
  their mean, so that layers of different activation scale are ranked on one scale.
* ``"mixed"``: ``mix * A / mean(A) + (1 - mix) * M / mean(M)`` with ``A`` the activation score
  (for channels the one ``activation_score`` selects), ``M`` the magnitude score (per channel,
  head or weight; means taken over the layer).

``activation_score`` only concerns the channel pattern with ``method="activation"`` or
``"mixed"``: heads and unstructured / N:M keep the scores above, and ``method="magnitude"`` uses
no activation. Its value is checked for every pattern and method (an unknown one raises
``ValueError``) and otherwise ignored there.

Activation statistics come from one pass over ``calibration_data`` with forward hooks (and
forward pre-hooks on the consumers) under ``torch.no_grad()`` (model in eval mode, restored
afterwards).

A weight shared by several selected layers (tied weights, ``b.weight = a.weight``) is scored once
and gets one mask: its activation statistics are combined over its uses (unstructured / N:M:
``||x_j||_2`` over the tokens of every use; channel: the activation scores summed over the uses),
and it counts once towards the sparsity.

Every ranking sorts with a stable sort on (score, position), so identical weights give identical
masks on every data-parallel rank.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from pycompress import _utils
from pycompress.nn import conv1d
from pycompress.nn.masked_conv import MaskedConv2d
from pycompress.nn.masked_linear import MaskedLinear
from pycompress.pruning import gpt2_heads
from pycompress.pruning.channels import has_convs, prune_channels
from pycompress.pruning.graph import consumers_of, effective_weight, is_attention, is_gpt2_attention

__all__ = ["prune"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ----------------------------------------------------------------------------- helpers
def _is_prunable(m):
    return (type(m) is nn.Linear or isinstance(m, MaskedLinear) or type(m) is nn.Conv2d
            or isinstance(m, MaskedConv2d) or conv1d.is_conv1d(m))


def _selected(model, include, exclude):
    """(name, layer) of the selected ``nn.Linear`` / MaskedLinear / ``nn.Conv2d`` / MaskedConv2d
    layers and transformers ``Conv1D`` layers (include/exclude as in
    :func:`pycompress._utils.select_modules`: globs or ``re:`` patterns, ancestors match too)."""
    if _is_prunable(model):
        raise ValueError(f"the model itself is a {type(model).__name__} layer; wrap it in a container module "
                         "to prune it")
    return _utils.select_modules(model, include, exclude, predicate=lambda n, m: _is_prunable(m))


def _set_module(model, name, new):
    if name == "":
        raise ValueError("the model itself is a Linear layer; wrap it in a container module to swap it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _parse_pattern(pattern):
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    if pattern in ("unstructured", "channel"):
        return pattern, None
    m = _NM.match(pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not (0 < n <= mm):
            raise ValueError(f"pattern {pattern!r}: need 0 < N <= M")
        return "nm", (n, mm)
    raise ValueError(f"unknown pattern {pattern!r}; use 'unstructured', 'channel', 'head' (prune only) or 'N:M' "
                     "such as '2:4'")


def _check_sparsity(sparsity, name="sparsity"):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _check_scope(scope):
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def _keep_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) that is False for the k lowest scores (ties: lower flat index first)."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep.reshape(scores.shape)


def _nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` highest scores of every group of ``m`` along the last dim (for a conv
    weight ``[out, in, kh, kw]``: along the input channels, at every kernel position)."""
    if scores.dim() == 4:
        o, i, kh, kw = scores.shape
        flat = scores.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
        return _nm_mask(flat, n, m).reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    N, K = scores.shape
    a = scores.detach().float()
    mask = torch.zeros(N, K, dtype=torch.bool, device=scores.device)
    full = K // m * m
    if full:
        g = a[:, :full].reshape(N, full // m, m)
        # stable descending order: sort -score ascending (ties keep the lower index)
        order = torch.sort(-g, dim=-1, stable=True).indices[..., :n]
        gm = torch.zeros_like(g, dtype=torch.bool)
        gm.scatter_(-1, order, True)
        mask[:, :full] = gm.reshape(N, full)
    r = K - full
    if r:
        keep = math.ceil(r * n / m)
        order = torch.sort(-a[:, full:], dim=-1, stable=True).indices[:, :keep]
        tail = torch.zeros(N, r, dtype=torch.bool, device=scores.device)
        tail.scatter_(-1, order, True)
        mask[:, full:] = tail
    return mask


def _normalized(score: torch.Tensor) -> torch.Tensor:
    """``score / mean(score)`` (a layer's scores on a common scale; all-zero stays zero)."""
    mean = score.float().mean()
    return score.float() / mean if float(mean) > 0 else score.float()


def _weight_scores(layers, kind, method, mix, stats, scope):
    """Per-element importance of every weight (unstructured and N:M patterns)."""
    out = []
    for name, m in layers:
        w = m.weight.detach().abs().float()
        if method == "magnitude":
            out.append(w)
            continue
        wanda = w * _input_norm_per_weight(m, stats[name]["in_norm"].to(w.device))
        if method == "activation":
            # across layers the Wanda scores are put on a common scale (each layer's mean = 1)
            out.append(_normalized(wanda) if scope == "global" and kind == "unstructured" else wanda)
        else:
            out.append(mix * _normalized(wanda) + (1.0 - mix) * _normalized(w))
    return out


def _input_norm_per_weight(m, in_norm):
    """The input feature norms broadcast to the weight: ``[1, in]`` for a linear layer; for a conv
    ``[out, in/groups, 1, 1]``, output channel ``o`` of group ``g`` reading input channels
    ``g * in/groups ...``."""
    if m.weight.dim() == 2:
        return in_norm[None, :]
    out_c, per_group = m.weight.shape[:2]
    groups = in_norm.numel() // per_group
    return in_norm.reshape(groups, per_group).repeat_interleave(out_c // groups, 0)[:, :, None, None]


def _channel_scores(layers, method, mix, stats, scope):
    """Per-output-channel importance, already on the scale used for ranking in ``scope``."""
    out = []
    for name, m in layers:
        w = m.weight.detach().float()
        mag = w.abs().sum(1)  # L1 norm of the row
        if method == "magnitude":
            out.append(mag / max(w.shape[1], 1) if scope == "global" else mag)
            continue
        act = stats[name]["channel_act"].to(w.device)
        if method == "activation":
            out.append(_normalized(act) if scope == "global" else act)
        else:
            out.append(mix * _normalized(act) + (1.0 - mix) * _normalized(mag))
    return out


def _drop_rows_global(scores, sizes_per_layer, sparsity):
    """Ranks all rows of all layers together; drops the lowest-scoring prefix whose weight count
    is closest to ``sparsity`` of all weights. Returns one bool keep-vector per layer."""
    dev = scores[0].device
    flat = torch.cat([s.to(dev) for s in scores])
    sizes = torch.cat([torch.full((s.numel(),), k, dtype=torch.int64, device=dev)
                       for s, k in zip(scores, sizes_per_layer)])
    target = sparsity * int(sizes.sum())
    order = torch.sort(flat, stable=True).indices
    cum = torch.cumsum(sizes[order], 0)
    # number of rows to drop: the prefix whose weight count is closest to the target
    j = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64, device=dev).to(cum.dtype)))
    cands = [c for c in (j - 1, j, j + 1) if 0 <= c <= len(order)]

    def err(c):
        return abs((int(cum[c - 1]) if c > 0 else 0) - target)

    cnt = min(cands, key=err)
    keep = torch.ones(len(order), dtype=torch.bool, device=dev)
    keep[order[:cnt]] = False
    rows, off = [], 0
    for s in scores:
        rows.append(keep[off:off + s.numel()].to(s.device))
        off += s.numel()
    return rows


def _compute_masks(layers, sparsity, kind, nm, scope, method="magnitude", mix=0.5, stats=None):
    """Returns a list of bool masks, one per (name, module) in ``layers``."""
    weights = [m.weight.detach() for _, m in layers]
    if kind == "nm":
        return [_nm_mask(s, *nm) for s in _weight_scores(layers, kind, method, mix, stats, scope)]
    if kind == "unstructured":
        scores = _weight_scores(layers, kind, method, mix, stats, scope)
        if scope == "layer":
            return [_keep_lowest(s, round(sparsity * s.numel())) for s in scores]
        flat = torch.cat([s.reshape(-1).to(weights[0].device) for s in scores])
        keep = _keep_lowest(flat, round(sparsity * flat.numel()))
        out, off = [], 0
        for w in weights:
            out.append(keep[off:off + w.numel()].reshape(w.shape).to(w.device))
            off += w.numel()
        return out
    # channel
    scores = _channel_scores(layers, method, mix, stats, scope)
    if scope == "layer":
        rows = [_keep_lowest(s, round(sparsity * s.numel())) for s in scores]
    else:
        rows = _drop_rows_global(scores, [w.shape[1] for w in weights], sparsity)
    return [r[:, None].expand_as(w).clone() for r, w in zip(rows, weights)]


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def _collect_stats(model, named, calibration_data, need_out=False, need_in=False, consumers=None):
    """One pass over ``calibration_data`` with forward hooks on the modules of ``named``.

    Per module: ``out_mean_abs`` (mean |output| per output feature over all tokens) and
    ``in_norm`` (L2 norm of each input feature over all tokens). ``consumers`` optionally maps a
    name of ``named`` to the names of the linear layers reading its output (element-wise ops in
    between); their inputs are recorded in the same pass with forward pre-hooks, as
    ``consumer_in_std`` = {consumer: standard deviation of each input feature over all tokens}
    and ``consumer_in_abs`` = {consumer: (sum of |x| of each input feature, token count)}.
    """
    stats = {name: {"tokens": 0, "out": None, "in": None} for name, _ in named}
    cstats = {c: {"tokens": 0, "sum": 0.0, "sq": 0.0, "abs": 0.0}
              for cs in (consumers or {}).values() for c in cs}
    handles = []

    def pre_hook_for(cname):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"layer {cname!r} was called without a tensor input")
            x = x.detach().double().reshape(-1, x.shape[-1])  # float64 sums: var = E[x^2] - E[x]^2
            st = cstats[cname]
            st["sum"] = st["sum"] + x.sum(0)
            st["sq"] = st["sq"] + x.pow(2).sum(0)
            st["abs"] = st["abs"] + x.abs().sum(0)
            st["tokens"] += x.shape[0]
        return hook

    def hook_for(name):
        def hook(module, args, output):
            st = stats[name]
            if need_in:
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor):
                    raise ValueError(f"layer {name!r} was called without a tensor input")
                if x.dim() == 4 and isinstance(module, (nn.Conv2d, MaskedConv2d)):
                    x = x.movedim(1, -1)  # conv input channels last
                x = x.detach().float().reshape(-1, x.shape[-1])
                sq = x.pow(2).sum(0)
                st["in"] = sq if st["in"] is None else st["in"] + sq
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"layer {name!r} returned no tensor")
            y = y.detach().float().reshape(-1, y.shape[-1])
            if need_out:
                a = y.abs().sum(0)
                st["out"] = a if st["out"] is None else st["out"] + a
            st["tokens"] += y.shape[0]
        return hook

    for name, m in named:
        handles.append(m.register_forward_hook(hook_for(name)))
    for cname in cstats:
        handles.append(model.get_submodule(cname).register_forward_pre_hook(pre_hook_for(cname)))
    _utils.run_calibration(model, calibration_data, handles)
    out = {}
    for name, st in stats.items():
        if st["tokens"] == 0:
            raise ValueError(f"layer {name!r} never ran on calibration_data, so it has no activation "
                             "statistics; exclude it or use method='magnitude'")
        out[name] = {}
        if need_out:
            out[name]["out_mean_abs"] = st["out"] / st["tokens"]
        if need_in:
            out[name]["in_norm"] = st["in"].sqrt()
        cs = (consumers or {}).get(name)
        if cs:
            seen, absum = {}, {}
            for c in cs:
                n = cstats[c]["tokens"]
                if n:
                    mean = cstats[c]["sum"] / n
                    seen[c] = (cstats[c]["sq"] / n - mean.pow(2)).clamp_min(0).sqrt().float()
                    absum[c] = (cstats[c]["abs"], n)
            if len(seen) == len(cs):
                out[name]["consumer_in_std"] = seen
                out[name]["consumer_in_abs"] = absum
    return out


@torch.no_grad()
def _channel_activations(model, layers, stats, activation_score="mean_abs"):
    """Sets ``stats[name]["channel_act"]``, the activation importance of each output neuron ``i``
    (``a`` = the consumer's input, i.e. after the element-wise ops in between):
    ``"mean_abs"``: ``mean |a_i|`` over all tokens of all consumers; ``"std_weighted"``:
    ``sum_c std(a_i) * ||W_c[:, i]||_2`` over the consumers ``c``. Either falls back to
    ``mean|y_i|`` of the layer's own output when no consumer is known (``channel_act_source``
    says which)."""
    for name, m in layers:
        st = stats[name]
        seen = st.get("consumer_in_std")
        if not seen or any(v.numel() != m.weight.shape[0] for v in seen.values()):
            st["channel_act"], st["channel_act_source"] = st["out_mean_abs"], "output"
            continue
        dev = m.weight.device
        if activation_score == "mean_abs":
            pairs = st["consumer_in_abs"].values()
            total = sum(s.to(dev) for s, _ in pairs)
            st["channel_act"] = (total / sum(n for _, n in pairs)).float()
        else:
            st["channel_act"] = sum(v.to(dev) * effective_weight(model.get_submodule(c)).norm(dim=0).to(dev)
                                    for c, v in seen.items())
        st["channel_act_source"] = "consumers"


def _check_not_meta(modules) -> None:
    """Refuses layers whose weights are on the meta device (shapes only, no values to rank)."""
    for name, m in modules:
        for pname, p in m.named_parameters():
            if p.device.type == "meta":
                raise ValueError(f"layer {name or '<model>'!r}: parameter {pname!r} is on the meta device (shapes "
                                 "without values, nothing to rank); materialize the model first, e.g. "
                                 "model.to_empty(device='cpu') then load_state_dict(...)")


def _tied_groups(layers) -> list[list[int]]:
    """Indices of ``layers`` grouped by weight: layers sharing one ``Parameter`` (tied weights)
    form one group, scored and masked once."""
    groups: dict[int, list[int]] = {}
    for i, (_, m) in enumerate(layers):
        groups.setdefault(id(m.weight), []).append(i)
    return list(groups.values())


def _merge_tied_stats(layers, groups, stats, kind) -> None:
    """Combines the activation statistics of a shared weight's uses into its first layer's:
    Wanda's input norms over the tokens of every use (``sqrt(sum ||x_j||^2)``), channel
    activation scores summed over the uses."""
    for g in groups:
        if len(g) < 2:
            continue
        names = [layers[i][0] for i in g]
        first = stats[names[0]]
        dev = layers[g[0]][1].weight.device
        if kind == "channel":
            first["channel_act"] = sum(stats[n]["channel_act"].float().to(dev) for n in names)
        else:
            first["in_norm"] = sum(stats[n]["in_norm"].float().to(dev).pow(2) for n in names).sqrt()


# ----------------------------------------------------------------------------- attention heads
def _head_scores(attn, method, mix, stats, scope):
    out = []
    for name, a in attn:
        if is_gpt2_attention(a):
            mag = gpt2_heads.magnitude(a)
            if method == "magnitude":
                out.append(mag)
                continue
            act = gpt2_heads.activation(name, a, stats).to(mag.device)
            if method == "activation":
                out.append(_normalized(act) if scope == "global" else act)
            else:
                out.append(mix * _normalized(act) + (1.0 - mix) * _normalized(mag))
            continue
        h, d = a.num_attention_heads, a.attention_head_size
        mag = sum(getattr(a, p).weight.detach().float().abs().sum(1) for p in ("query", "key", "value"))
        mag = mag.reshape(h, d).sum(1) / (3 * d * a.query.in_features)
        if method == "magnitude":
            out.append(mag)
            continue
        act = stats[name]["out_mean_abs"].float()
        if act.numel() != h * d:
            raise ValueError(f"attention {name!r}: output width {act.numel()} is not "
                             f"num_attention_heads * attention_head_size = {h * d}")
        act = act.to(mag.device).reshape(h, d).mean(1)
        if method == "activation":
            out.append(_normalized(act) if scope == "global" else act)
        else:
            out.append(mix * _normalized(act) + (1.0 - mix) * _normalized(mag))
    return out


def _prune_heads(model, sparsity, scope, method, mix, calibration_data, include, exclude):
    attn = _utils.select_modules(model, include, exclude,
                                 predicate=lambda n, m: is_attention(m) or is_gpt2_attention(m))
    if not attn:
        raise ValueError("pattern='head' found no attention module (a module with query/key/value "
                         "linear layers and num_attention_heads / attention_head_size attributes, or "
                         "a GPT-2-style attention with c_attn / c_proj, num_heads and head_dim)")
    _check_not_meta(attn)
    stats = None
    if method != "magnitude":
        # GPT-2 attention modules return their output after c_proj: heads are read at its input
        cons = {n: [gpt2_heads.consumer(n)] for n, a in attn if is_gpt2_attention(a)}
        stats = _collect_stats(model, attn, calibration_data, need_out=True, consumers=cons)
    scores = _head_scores(attn, method, mix, stats, scope)
    drops = []
    if scope == "layer":
        for s in scores:
            k = min(round(sparsity * s.numel()), s.numel() - 1)
            drops.append(~_keep_lowest(s, k))
    else:
        dev = scores[0].device
        flat = torch.cat([s.to(dev) for s in scores])
        order = torch.sort(flat, stable=True).indices.tolist()
        owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)]).tolist()
        left = [s.numel() for s in scores]
        target = round(sparsity * flat.numel())
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        cnt = 0
        for idx in order:  # lowest first; every layer keeps at least one head
            if cnt >= target:
                break
            if left[owner[idx]] > 1:
                drop[idx] = True
                left[owner[idx]] -= 1
                cnt += 1
        off = 0
        for s in scores:
            drops.append(drop[off:off + s.numel()].to(s.device))
            off += s.numel()
    for (name, a), dh in zip(attn, drops):
        if is_gpt2_attention(a):
            gpt2_heads.mask_heads(a, dh)
            continue
        rows = dh.repeat_interleave(a.attention_head_size)
        for p in ("query", "key", "value"):
            lin = getattr(a, p)
            keep = ~rows.to(lin.weight.device)[:, None].expand_as(lin.weight)
            if isinstance(lin, MaskedLinear):
                lin.set_mask(lin.mask & keep)
            else:
                setattr(a, p, MaskedLinear.from_dense(lin, keep.clone(), share_parameters=True))
    return model


# ----------------------------------------------------------------------------- public API
_METHODS = ("magnitude", "activation", "mixed")
ACTIVATION_SCORES = ("mean_abs", "std_weighted")


def _check_activation_score(activation_score):
    if not isinstance(activation_score, str) or activation_score not in ACTIVATION_SCORES:
        raise ValueError(f"unknown activation_score {activation_score!r}; supported: "
                         f"{', '.join(map(repr, ACTIVATION_SCORES))}")
    return activation_score


def _check_method(method, mix):
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; supported: {', '.join(map(repr, _METHODS))}")
    if isinstance(mix, bool) or not isinstance(mix, (int, float)):
        raise TypeError(f"mix must be a float in [0, 1], got {mix!r}")
    if not (0.0 <= float(mix) <= 1.0) or math.isnan(float(mix)):
        raise ValueError(f"mix must be in [0, 1] (weight of the activation score), got {mix}")
    return float(mix)


def prune(model: nn.Module, sparsity: float | None, pattern: str = "unstructured", scope: str = "global",
          method: str = "magnitude", include=None, exclude=None, calibration_data=None,
          mix: float = 0.5, activation_score: str = "mean_abs", example_inputs=None,
          compensate: bool | str | None = True) -> nn.Module:
    """Prunes the selected ``nn.Linear`` layers of ``model`` in place, replacing them by
    :class:`~pycompress.nn.MaskedLinear` (already masked layers are re-pruned), and returns it.
    The new layers keep the original ``Parameter`` objects, so existing optimizers stay valid;
    except transformers' ``Conv1D`` layers (GPT-2; weight stored ``[in, out]``), which become
    MaskedLinear layers holding a new weight ``Parameter`` (the transpose; the bias is kept):
    build the optimizer after pruning them (:class:`~pycompress.GradualPruning` given an
    optimizer updates it).

    Args:
        model: the model (modified in place).
        sparsity: fraction of weights to remove, in [0, 1) (of attention heads for
            ``pattern="head"``). For ``"N:M"`` patterns ``None`` or ``1 - N/M``.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``), ``"channel"`` (whole output
            neurons) or ``"head"`` (whole attention heads of BERT-style or GPT-2-style
            self-attention modules: the head's query, key and value rows; every attention keeps
            at least one head).
        scope: ``"global"`` (rank across all selected layers) or ``"layer"`` (each layer
            reaches ``sparsity``). Ignored by ``"N:M"``.
        method: ``"magnitude"``, ``"activation"`` or ``"mixed"`` (see the module docstring for
            the exact scores). The data methods need ``calibration_data``.
        include, exclude: glob or list of globs on qualified module names.
        calibration_data: a batch or an iterable of batches (tensor, tuple of positional args,
            dict of keyword args), run once through the model under ``torch.no_grad()``.
        mix: weight of the activation score in ``method="mixed"`` (0 = magnitude only,
            1 = activation only).
        activation_score: the channel activation statistic of ``method="activation"`` /
            ``"mixed"``: ``"mean_abs"`` (default: mean ``|a_i|`` of the neuron's activation as
            its consumers see it) or ``"std_weighted"`` (``sum_c std(a_i) * ||W_c[:, i]||_2``).
            Both fall back to the mean ``|y_i|`` of the layer's own output without a known
            consumer. Checked always, used only by ``pattern="channel"`` (heads and
            unstructured / N:M keep their scores, see the module docstring).
        example_inputs: a batch the model runs on; needed by ``pattern="channel"`` when the
            selection holds convolutions (default: the first batch of ``calibration_data``).
        compensate: channel pruning of convolutions only: ``True`` / ``"mean"`` (default) adds
            the pruned channels' mean contribution to their readers' biases (or the BatchNorm
            after them), ``"masked"`` the contribution once their producers are masked,
            ``False`` / ``None`` drops it (see :func:`~pycompress.pruning.channels.prune_channels`).

    Convolutions (``nn.Conv2d``, becoming :class:`~pycompress.nn.MaskedConv2d`): the
    unstructured and ``N:M`` patterns prune their weights like those of linear layers (``N:M``
    groups run along the input channels at every kernel position). With ``pattern="channel"``
    and a conv among the selected layers, whole channels are pruned by dependency groups
    traced with torch.fx (residual adds, BatchNorm, depthwise convs, concatenation, flatten into
    the classifier): see :func:`pycompress.pruning.channels.prune_channels`, which also returns
    a report of the groups and why some channels were kept. ``method`` may then also be
    ``"magnitude_l2"`` or ``"bn_scale"`` (``|gamma|`` of the BatchNorms).

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> _ = pycompress.prune(model, 0.9)
        >>> type(model[0]).__name__
        'MaskedLinear'
        >>> _ = pycompress.prune(model, 0.5, pattern="channel", method="activation",
        ...                      calibration_data=torch.randn(32, 64), include="0")
        >>> int((~model[0].mask).all(1).sum())
        32
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pattern == "channel" and has_convs(model, include, exclude):
        return prune_channels(model, sparsity, scope=scope, method=method, include=include, exclude=exclude,
                              calibration_data=calibration_data, mix=mix, activation_score=activation_score,
                              example_inputs=example_inputs, compensate=compensate)
    if compensate not in (True, False, None, "mean", "masked"):
        raise ValueError(f"compensate must be True/'mean', 'masked' or False/None, got {compensate!r}")
    heads = pattern == "head"
    kind, nm = ("head", None) if heads else _parse_pattern(pattern)
    _check_scope(scope)
    mix = _check_method(method, mix)
    activation_score = _check_activation_score(activation_score)
    if method != "magnitude" and calibration_data is None:
        raise ValueError(f"method={method!r} ranks by activations and needs calibration_data "
                         "(a batch or an iterable of batches); use method='magnitude' without data")
    if kind == "nm":
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None:
            s = _check_sparsity(sparsity) if implied < 1 else float(sparsity)
            if abs(s - implied) > 0.01:
                raise ValueError(f"pattern {pattern!r} fixes sparsity at {implied:.3f}; got sparsity={sparsity}")
        sparsity = implied
    else:
        if sparsity is None:
            raise TypeError("sparsity must be a float in [0, 1) for this pattern")
        sparsity = _check_sparsity(sparsity)
    if heads:
        return _prune_heads(model, sparsity, scope, method, mix, calibration_data, include, exclude)
    in_model = _selected(model, include, exclude)
    if not in_model:
        return model
    _check_not_meta(in_model)
    # a Conv1D is scored and masked as the nn.Linear holding its transposed weight, which
    # replaces it at the end (hooks stay on the layers in the model)
    layers = [(n, conv1d.to_linear(m) if conv1d.is_conv1d(m) else m) for n, m in in_model]
    stats = None
    if method != "magnitude":
        consumers = None
        if kind == "channel":
            consumers = consumers_of(model, [n for n, _ in layers])
        stats = _collect_stats(model, in_model, calibration_data, need_out=kind == "channel",
                               need_in=kind != "channel", consumers=consumers)
    if stats is not None and kind == "channel":
        _channel_activations(model, layers, stats, activation_score)
    groups = _tied_groups(layers)
    if stats is not None:
        _merge_tied_stats(layers, groups, stats, kind)
    unique = [layers[g[0]] for g in groups]
    masks = [None] * len(layers)
    for g, mask in zip(groups, _compute_masks(unique, sparsity, kind, nm, scope, method, mix, stats)):
        for i in g:
            masks[i] = mask
    for (name, m), mask in zip(layers, masks):
        if isinstance(m, (MaskedLinear, MaskedConv2d)):
            m.set_mask(mask)
        elif isinstance(m, nn.Conv2d):
            _set_module(model, name, MaskedConv2d.from_float(m, mask, share_parameters=True))
        else:
            _set_module(model, name, MaskedLinear.from_dense(m, mask, share_parameters=True))
    return model


