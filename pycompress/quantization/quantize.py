"""``pycompress.quantize``: swap linear layers and convolutions for int8 layers in place.

What is converted
    Every selected ``nn.Linear`` (exact class; subclasses with their own ``forward`` are left
    alone and listed), every GPT-2-style ``Conv1D`` of transformers (weight stored ``[in, out]``;
    converted with the transposed weight, see :mod:`pycompress.nn.conv1d`) and every
    ``MaskedLinear`` (pruned layers: the masked weight is quantized, so pruned weights stay
    exactly zero) become ``Int8Linear``. Every ``nn.MultiheadAttention`` (which reads its
    projection weights directly instead of calling them) becomes ``Int8MultiheadAttention`` as a
    whole: int8 projections, float attention (not with ``add_bias_kv`` / ``add_zero_attn``: left
    alone and listed). With ``mode="w8a8"`` every ``nn.Conv2d`` (any stride,
    padding, dilation and groups; zero padding only) and ``MaskedConv2d`` becomes ``Int8Conv2d``.
    Every other layer computing a linear map is left alone and listed with the reason:
    a projection of a float ``nn.MultiheadAttention``, ``SparseLinear`` (quantize before ``deploy_pruned``), ``nn.Conv1d/3d``
    and the transposed convolutions, convs with another ``padding_mode``, ``nn.Bilinear``, a ``Conv1D`` subclass or one of unknown layout, the root
    module, and any layer the int8 constructors refuse. Embeddings and normalization layers are
    not linear layers and are never touched (a BatchNorm folded into a conv is replaced by
    ``nn.Identity``, see below).

Convolutional networks
    The model is traced with ``torch.fx`` to find, without changing its module structure (see
    :mod:`pycompress.quantization.fuse`): zero-padding modules whose output only a conv reads
    (computed by the conv, replaced by ``nn.Identity``), eval-mode ``BatchNorm2d`` layers after a conv (folded
    into its weight and bias, the BatchNorm replaced by ``nn.Identity``), the ReLU / ReLU6 / SiLU /
    Hardswish module after it (computed in the conv's epilogue), and the convs whose output only
    ever feeds other converted convs (their output stays uint8: no float round trip). With
    ``calibration_data`` the activations get static per-tensor uint8 quantization from
    observers (:mod:`pycompress.quantization.observers`) and the biases are corrected by the
    mean output error of each conv; without it, each image is quantized on the fly. A model that
    cannot be traced is converted layer by layer (no folding, fusion or chains) with a warning.

Everything is computed aside first; the model is modified only when every layer was converted
and calibrated, so an exception leaves it exactly as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pycompress import _utils
from pycompress.nn import conv1d, registry
from pycompress.nn.int8_conv import Int8Conv2d, activation_function
from pycompress.nn.int8_pool import Int8MaxPool2d
from pycompress.nn.int8_mha import Int8MultiheadAttention, mha_unsupported_reason
from pycompress.quantization import fuse, observers

__all__ = ["quantize", "QuantizationResult", "QUANT_MODES"]

QUANT_MODES = ("w8a8", "w8a16")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# layers computing a linear map that no int8 layer replaces: listed, never silently ignored
_OTHER_LINEAR_MAPS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Bilinear)


@dataclass
class QuantizationResult:
    """What :func:`quantize` did.

    Attributes:
        mode: the quantization mode.
        converted: names of the converted layers (linear layers, attention modules and convs), in
            model order.
        skipped: layers left in floating point, with the reason.
        convs: the converted convs (a subset of ``converted``).
        folded: conv -> the BatchNorm folded into it.
        padded: conv -> the zero-padding module before it that it computes (its padding added to
            the conv's own).
        fused: conv -> ``{"module": name, "activation": kind, "replaced": bool}``: the activation
            computed in the conv's epilogue (``replaced``: the module became ``nn.Identity``;
            otherwise it is called elsewhere too and stays, a no-op on its own output).
        identities: modules replaced by ``nn.Identity`` (folded BatchNorms, fused activations,
            padding modules computed by a conv).
        uint8_edges: ``(producer, consumer)`` pairs of convs between which the activations stay
            uint8 (the consumer reads them as its input, or as its residual).
        uint8_residual_edges: the pairs of ``uint8_edges`` where the consumer reads them as its
            residual.
        residual: conv -> ``{"block": name, "activation": kind, "residual": "uint8" | "float"}``:
            the residual addition after the conv (and the activation after the addition) that it
            computes itself (``Int8Conv2d(residual=True)``).
        residual_blocks: block -> the convs in it (relative names) that compute its residual
            additions; the block is now a ``torch.fx.GraphModule`` calling them as ``conv(x, r)``
            (same submodules, same ``state_dict`` keys).
        pools: the ``nn.MaxPool2d`` modules on those uint8 edges, now
            :class:`~pycompress.nn.Int8MaxPool2d` (they pool the uint8 maps).
        feeds: conv -> the converted convs its output reaches (directly or through other
            operations); a conv whose output stays channels-last relies on them.
        static: convs with static (calibrated) input quantization; the others quantize each image
            on the fly.
        bias_corrected: convs whose bias was corrected on the calibration data.
        observer: the observer that set the static ranges (None without calibration data).
        traced: whether ``torch.fx`` traced the model (False: convs converted one by one).
        conv_macs: multiply-adds per image of every conv call (summed per module), measured on the
            first calibration batch or ``example_inputs``; empty without inputs.
        int8_mac_fraction: the fraction of ``conv_macs`` computed by int8 layers (None without
            inputs).
        notes: other remarks (e.g. why the model could not be traced).
    """

    mode: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    convs: list[str] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)
    padded: dict[str, str] = field(default_factory=dict)
    fused: dict[str, dict] = field(default_factory=dict)
    identities: list[str] = field(default_factory=list)
    uint8_edges: list[tuple[str, str]] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    feeds: dict[str, list[str]] = field(default_factory=dict)
    static: list[str] = field(default_factory=list)
    bias_corrected: list[str] = field(default_factory=list)
    observer: str | None = None
    traced: bool | None = None
    conv_macs: dict[str, int] = field(default_factory=dict)
    int8_mac_fraction: float | None = None
    notes: list[str] = field(default_factory=list)
    residual: dict[str, dict] = field(default_factory=dict)
    uint8_residual_edges: list[tuple[str, str]] = field(default_factory=list)
    residual_blocks: dict[str, list[str]] = field(default_factory=dict)

    def members(self, conv: str) -> list[str]:
        """The modules that ``conv``'s conversion replaced by ``nn.Identity``."""
        out = []
        if conv in self.padded:
            out.append(self.padded[conv])
        if conv in self.folded:
            out.append(self.folded[conv])
        f = self.fused.get(conv)
        if f and f["replaced"]:
            out.append(f["module"])
        return out

    def to_dict(self) -> dict:
        return {"mode": self.mode, "converted": list(self.converted), "skipped": dict(self.skipped),
                "convs": list(self.convs), "folded": dict(self.folded), "padded": dict(self.padded),
                "fused": {k: dict(v) for k, v in self.fused.items()}, "identities": list(self.identities),
                "uint8_edges": [list(e) for e in self.uint8_edges], "pools": list(self.pools),
                "feeds": {k: list(v) for k, v in self.feeds.items()}, "static": list(self.static),
                "bias_corrected": list(self.bias_corrected), "observer": self.observer, "traced": self.traced,
                "conv_macs": dict(self.conv_macs), "int8_mac_fraction": self.int8_mac_fraction,
                "notes": list(self.notes), "residual": {k: dict(v) for k, v in self.residual.items()},
                "residual_blocks": {k: list(v) for k, v in self.residual_blocks.items()},
                "uint8_residual_edges": [list(e) for e in self.uint8_residual_edges]}

    def __repr__(self) -> str:
        s = (f"QuantizationResult(mode={self.mode!r}, converted={len(self.converted)} layers, "
             f"skipped={len(self.skipped)} layers")
        if self.convs:
            s += (f", convs={len(self.convs)} (folded {len(self.folded)}, fused {len(self.fused)}, "
                  f"residual {len(self.residual)}, uint8 edges {len(self.uint8_edges)}, static {len(self.static)})")
        if self.int8_mac_fraction is not None:
            s += f", int8 conv MACs={self.int8_mac_fraction:.1%}"
        return s + ")"


def _int8_linear_class():
    from pycompress import nn as pnn

    cls = getattr(pnn, "Int8Linear", None)
    if cls is None:
        raise RuntimeError(
            "pycompress.nn.Int8Linear is not available in this build of pycompress; "
            "quantize() needs it"
        )
    return cls


def _is_conv2d(module: nn.Module) -> bool:
    from pycompress import nn as pnn

    masked = getattr(pnn, "MaskedConv2d", None)
    return isinstance(module, nn.Conv2d) or (masked is not None and isinstance(module, masked))


def _conv_skip_reason(module: nn.Module, mode: str) -> str | None:
    """None when the conv can become an Int8Conv2d, else why not."""
    if mode != "w8a8":
        return (f"{type(module).__name__}: mode {mode!r} is a weight-only mode of linear layers; convolutions "
                "are converted with mode='w8a8'")
    if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
        return f"{type(module).__name__} is a subclass of nn.Conv2d with its own behaviour"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: Int8Conv2d pads with zeros only"
    if module.weight.dtype not in _FLOAT_DTYPES:
        return f"weight dtype {module.weight.dtype} is not a floating type supported by Int8Conv2d"
    return None


def _skip_reason(model: nn.Module, name: str, module: nn.Module, layer_cls: type) -> str | None:
    """None when the linear module can be converted, else why not. Non-linear modules return ''."""
    from pycompress import nn as pnn

    masked = getattr(pnn, "MaskedLinear", None)
    sparse = getattr(pnn, "SparseLinear", None)
    if isinstance(module, (layer_cls, Int8Conv2d, Int8MultiheadAttention)):
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
        return (f"{type(module).__name__}: no int8 layer replaces it (Int8Linear: matrix products, "
                "Int8Conv2d: 2-D convolutions); it stays in floating point")
    if not isinstance(module, nn.Linear):
        return ""  # not a linear layer
    if isinstance(_utils.parent_of(model, name), nn.MultiheadAttention):
        return "projection inside nn.MultiheadAttention (its weight is read directly, not called)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is a subclass of nn.Linear with its own behaviour"
    if module.weight.dtype not in _FLOAT_DTYPES:
        return f"weight dtype {module.weight.dtype} is not a floating type supported by Int8Linear"
    return None


def _mha_skip_reason(name: str, module: nn.MultiheadAttention, selected: set[str]) -> str | None:
    """None when the attention module can become an Int8MultiheadAttention, else why not."""
    reason = mha_unsupported_reason(module)
    if reason is not None:
        return f"nn.MultiheadAttention left in floating point: {reason}"
    excluded = [c for c, _ in module.named_modules(prefix=name) if c != name and c not in selected]
    if excluded:
        return (f"its projection {excluded[0]!r} is excluded; an attention module is converted as a whole "
                "(exclude the attention module itself to keep it in floating point)")
    return None


def _check_finite_mha(name: str, module: nn.MultiheadAttention) -> None:
    for pname, t in module.named_parameters():
        if t.dtype.is_floating_point and not torch.isfinite(t.detach()).all():
            raise ValueError(f"quantize: layer {name!r} ({type(module).__name__}) has NaN or inf values in its "
                             f"{pname}; nothing was converted")


def _check_finite(name: str, module: nn.Module) -> None:
    for pname in ("weight", "bias"):
        t = getattr(module, pname, None)
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not torch.isfinite(t.detach()).all():
            raise ValueError(f"quantize: layer {name!r} ({type(module).__name__}) has NaN or inf values in its "
                             f"{pname}; nothing was converted")


def _reiterable(data: Any) -> Any:
    """Calibration data that can be iterated over several times (iterators are materialized)."""
    batches = _utils.iter_batches(data, "calibration_data")
    if isinstance(batches, Iterator):
        batches = list(batches)
    return batches


def _first_batch(batches: Any) -> Any:
    for b in batches:
        return b
    raise ValueError("calibration_data holds no batch")


def _conv_macs(model: nn.Module, batch: Any) -> dict[str, int]:
    """Multiply-adds per image of every 2-D convolution of ``model`` on ``batch`` (summed over
    calls of the same module)."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name, module):
        def fn(mod, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] > 0:
                kh, kw = mod.kernel_size
                per = (out.shape[1] * out.shape[2] * out.shape[3]) * (mod.in_channels // mod.groups) * kh * kw
                macs[name] = macs.get(name, 0) + int(per)
        return fn

    for name, m in model.named_modules():
        if name and (_is_conv2d(m) or isinstance(m, Int8Conv2d)):
            handles.append(m.register_forward_hook(hook(name, m)))
    _utils.run_calibration(model, [batch], handles)
    return macs


# --------------------------------------------------------------------------- calibration
class _Calibration:
    """Observers and bias-correction statistics of the convs to convert, gathered by forward
    hooks on the float model (never modified)."""

    def __init__(self, model: nn.Module, groups: dict[str, fuse.ConvGroup], chains: dict[str, fuse.Chain],
                 observer: Any):
        self.model = model
        self.groups = groups
        self.modules = dict(model.named_modules())
        self.inputs = {n: observers.make_observer(observer, f"conv {n!r} input") for n in groups}
        # a conv that computes a residual addition has no float module whose output is its own:
        # its output quantization is the input quantization of the convs it feeds
        self.outputs = {n: observers.make_observer(observer, f"conv {n!r} output") for n in chains
                        if groups[n].block is None}
        # a conv that computes a residual addition: the range of its own part of the sum (conv and
        # BatchNorm, before the addition), which the ONNX export needs (Int8Conv2d.sum_scale)
        self.sums = {n: observers.make_observer(observer, f"conv {n!r} sum before the residual")
                     for n, g in groups.items() if g.block is not None}

    def _observer_hooks(self, method: str) -> list:
        handles = []
        for name, obs in self.inputs.items():
            def pre(mod, args, obs=obs):
                getattr(obs, method)(args[0])
            handles.append(self.modules[name].register_forward_pre_hook(pre))
        for name, obs in self.outputs.items():
            g = self.groups[name]
            act = activation_function(g.activation)

            def post(mod, args, out, obs=obs, act=act):
                getattr(obs, method)(act(out))
            handles.append(self.modules[g.last_float_module].register_forward_hook(post))
        for name, obs in self.sums.items():
            def post_sum(mod, args, out, obs=obs):
                getattr(obs, method)(out)
            handles.append(self.modules[self.groups[name].last_float_module].register_forward_hook(post_sum))
        return handles

    def observe(self, batches: Any) -> None:
        _utils.run_calibration(self.model, batches, self._observer_hooks("observe"))
        if any(o.needs_histogram for o in (*self.inputs.values(), *self.outputs.values(), *self.sums.values())):
            _utils.run_calibration(self.model, batches, self._observer_hooks("observe_histogram"))

    def bias_corrections(self, batches: Any, layers: dict[str, tuple[nn.Conv2d, Int8Conv2d]]) -> dict[str, torch.Tensor]:
        """Per conv: the mean over the calibration data (per output channel) of the float output
        (BatchNorm applied, before the activation: the output of the conv or of its BatchNorm
        in the float model) minus the output of its quantized arithmetic (int8 weights, static
        input quantization, the folded bias) on the same input."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []
        for name, (folded, q) in layers.items():
            dev = folded.weight.device
            w_deq = q.dequantized_weight().to(dev)
            bias = folded.bias.detach().float() if folded.bias is not None else None
            scale = q.input_scale.float().to(dev)
            inv = 1.0 / scale
            zp = q.input_zero_point.float().to(dev)
            cfg = dict(stride=folded.stride, padding=folded.padding, dilation=folded.dilation,
                       groups=folded.groups)
            pending: list[torch.Tensor] = []

            def pre(mod, args, w_deq=w_deq, bias=bias, inv=inv, zp=zp, scale=scale, cfg=cfg, pending=pending):
                x = args[0].detach().float()
                xq = (torch.clamp(torch.round(x * inv) + zp, 0, 255) - zp) * scale
                pending.append(F.conv2d(xq, w_deq, bias, **cfg))

            def post(mod, args, out, name=name, pending=pending):
                yq = pending.pop()
                d = (out.detach().float() - yq).sum(dim=(0, 2, 3), dtype=torch.float64)
                sums[name] = d if name not in sums else sums[name] + d
                counts[name] = counts.get(name, 0) + yq.shape[0] * yq.shape[2] * yq.shape[3]
            g = self.groups[name]
            handles.append(self.modules[name].register_forward_pre_hook(pre))
            handles.append(self.modules[g.last_float_module].register_forward_hook(post))
        _utils.run_calibration(self.model, batches, handles)
        return {n: (sums[n] / counts[n]).float() for n in sums if counts.get(n)}


# --------------------------------------------------------------------------- convs
def _convert_convs(model: nn.Module, sources: dict[str, nn.Conv2d], calibration_data: Any, observer: Any,
                   bias_correction: bool | None, result: QuantizationResult,
                   fuse_residual: bool = True) -> dict[str, nn.Module]:
    """Builds (aside) the Int8Conv2d of every conv of ``sources`` and the ``nn.Identity`` of
    the modules folded / fused into them: name -> new module."""
    modules = dict(model.named_modules())
    device = _utils.model_device(model)
    plan = fuse.analyse(model, sources, device, residual=fuse_residual)
    result.traced = plan.traced
    if not plan.traced:
        result.notes.append(f"torch.fx could not trace the model ({plan.reason}); convs converted one by one "
                            "without BatchNorm folding, activation fusion or uint8 chains")
    for n in [n for n in sources if n in plan.weight_read]:
        # the forward reads this conv's parameters directly: replacing the module would break it
        result.skipped[n] = "its weight is read directly by the model's forward (not only called)"
        sources = {k: v for k, v in sources.items() if k != n}
    groups = {n: plan.groups.get(n, fuse.ConvGroup(conv=n)) for n in sources}
    chains = dict(plan.chains)
    calibrated = calibration_data is not None
    calib = None
    if calibrated:
        batches = calibration_data
        calib = _Calibration(model, groups, chains, observer)
        calib.observe(batches)
        result.observer = observer if isinstance(observer, str) else str(observer[0])

    in_q: dict[str, tuple[float, int]] = {}
    out_q: dict[str, tuple[float, int]] = {}
    if calib is not None:
        for n, obs in calib.inputs.items():
            if obs.seen:
                in_q[n] = obs.qparams()
            else:
                result.notes.append(f"conv {n!r} did not run on the calibration data: dynamic input quantization")
        for n, chain in list(chains.items()):
            if any(c not in in_q for c in chain.consumers) or any(c not in sources for c in chain.residual_consumers):
                del chains[n]
                continue
            if groups[n].block is not None:
                if not chain.consumers:
                    del chains[n]
                    continue
                qp = in_q[chain.consumers[0]]
            else:
                obs = calib.outputs[n]
                if not obs.seen:
                    del chains[n]
                    continue
                qp = obs.qparams()
            if chain.needs_zero_zp and qp[1] != 0:
                del chains[n]
                continue
            out_q[n] = qp
        for n, chain in chains.items():
            for c in chain.consumers:
                in_q[c] = out_q[n]
    else:
        chains = {}

    layers: dict[str, tuple[nn.Conv2d, Int8Conv2d]] = {}
    for n, src in sources.items():
        g = groups[n]
        bn = modules[g.bn] if g.bn else None
        folded = fuse.fold_batchnorm(src, bn)
        try:
            q = Int8Conv2d.from_float(folded, activation=g.activation, input_quantization=in_q.get(n),
                                      output_quantization=out_q.get(n), pad=modules[g.pad] if g.pad else None,
                                      residual=g.block is not None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantize: conv {n!r} cannot be converted: {e}; nothing was converted") from e
        q.layer_name = n
        if calib is not None and n in calib.sums and calib.sums[n].seen and q.static_input:
            q.set_sum_quantization(*calib.sums[n].qparams())
        q.channels_last_output = n in plan.layout_free
        q.fused_modules = tuple(m for m in (g.pad, g.bn, g.act) if m)
        if src.weight.dtype in (torch.float16, torch.bfloat16):  # uint8-fed layers answer in the model's dtype
            q.float_dtype = src.weight.dtype
        layers[n] = (folded, q)

    if bias_correction is None:
        bias_correction = calibrated
    if bias_correction:
        if not calibrated:
            raise ValueError("bias_correction=True needs calibration_data")
        static_layers = {n: v for n, v in layers.items() if v[1].static_input}
        corrections = calib.bias_corrections(batches, static_layers)
        for n, c in corrections.items():
            folded, q = layers[n]
            if not torch.isfinite(c).all():
                raise ValueError(f"quantize: the bias correction of conv {n!r} is not finite; nothing was converted")
            with torch.no_grad():
                if q.bias is None:
                    q.bias = torch.zeros(q.out_channels, dtype=torch.float32, device=q.weight.device)
                q.bias.add_(c.to(q.bias.device))
            result.bias_corrected.append(n)

    replacements: dict[str, nn.Module] = {}
    for n, (folded, q) in layers.items():
        q.train(modules[n].training)
        replacements[n] = q
        g = groups[n]
        if g.pad:
            result.padded[n] = g.pad
        if g.bn:
            result.folded[n] = g.bn
        if g.act:
            result.fused[n] = {"module": g.act, "activation": g.activation, "replaced": g.act_replaced}
        for r in g.replaced:
            ident = nn.Identity()
            ident.train(modules[r].training)
            replacements[r] = ident
            result.identities.append(r)
        if q.static_input:
            result.static.append(n)
    for n, chain in chains.items():
        for c in chain.residual_consumers:
            replacements[c].set_residual_quantization(*out_q[n])
            result.uint8_edges.append((n, c))
            result.uint8_residual_edges.append((n, c))
        for c in chain.consumers:
            result.uint8_edges.append((n, c))
        for p in chain.pools:
            if p not in replacements:
                pool = Int8MaxPool2d.from_float(modules[p])
                pool.train(modules[p].training)
                replacements[p] = pool
                result.pools.append(p)
    result.feeds = {n: sorted(plan.feeds.get(n, ())) for n in sources if plan.feeds.get(n)}

    # blocks whose residual additions the convs compute: rebuilt as fx graphs (built aside)
    blocks: dict[str, dict[str, str]] = {}
    for n in sources:
        g = groups[n]
        if g.block is not None:
            blocks.setdefault(g.block, {})[n[len(g.block) + 1:]] = g.activation
            result.residual[n] = {"block": g.block, "activation": g.activation,
                                  "residual": "uint8" if replacements[n].residual_scale is not None else "float"}
    for b, fused in blocks.items():
        def layer_of(rel, b=b):
            full = f"{b}.{rel}"
            return replacements.get(full, modules.get(full))
        try:
            replacements[b] = fuse.rewrite_residual_block(modules[b], fused, layer_of)
        except ValueError as e:
            raise ValueError(f"quantize: block {b!r} cannot compute its residual additions in its convs: {e}; "
                             "nothing was converted") from e
        result.residual_blocks[b] = sorted(fused)
    return replacements


# --------------------------------------------------------------------------- quantize
def quantize(
    model: nn.Module,
    mode: str = "w8a8",
    calibration_data: Any = None,
    include: Any = None,
    exclude: Any = None,
    act_bits: int = 8,
    weight_bits: int = 8,
    *,
    observer: Any = "percentile",
    bias_correction: bool | None = None,
    fuse_residual: bool = True,
    example_inputs: Any = None,
    return_result: bool = False,
    warn: bool = True,
):
    """Replaces the selected linear layers of ``model`` (``nn.Linear``, transformers' ``Conv1D``,
    ``MaskedLinear``) by ``pycompress.nn.Int8Linear``, its ``nn.MultiheadAttention`` modules by
    ``pycompress.nn.Int8MultiheadAttention`` and, with ``mode="w8a8"``, its 2-D
    convolutions (``nn.Conv2d``, ``MaskedConv2d``) by ``pycompress.nn.Int8Conv2d``.

    Weights are quantized symmetrically per output channel to int8. ``mode="w8a8"`` also
    quantizes activations (linear layers: per token at run time; convs: per tensor, uint8,
    static with ``calibration_data``, else per image at run time); ``mode="w8a16"`` keeps
    activations in floating point (weight-only int8, linear layers only). For convs, eval-mode
    BatchNorms are folded in, the following activation is fused and int8 outputs flow between
    consecutive convs (see the module documentation). The model is modified in place and
    returned. Layers that cannot be converted are left alone and listed (``warnings.warn``, and
    in the :class:`QuantizationResult` when ``return_result=True``).

    Args:
        model: the model to convert (modified in place).
        mode: ``"w8a8"`` or ``"w8a16"``.
        calibration_data: a batch or an iterable of batches (see :mod:`pycompress._utils`) run
            through the model (eval mode, no gradients) to set static activation ranges of the
            convs and correct their biases. ``None``: dynamic per-image quantization.
        include: module-name glob(s) (or ``"re:<regex>"``) to convert; ``None`` = every layer.
            A pattern selects the module it names and everything inside it.
        exclude: module-name glob(s) to leave in floating point (e.g. ``"classifier"``).
        act_bits: ``8`` (default) or ``7``: bits of the per-token activation quantization of
            ``w8a8`` linear layers (see ``Int8Linear``; 7 bits is faster on CPUs without VNNI).
        weight_bits: ``8`` (default) or ``7``: per-channel weight range ``[-63, 63]`` of ``w8a8``
            linear layers; with ``act_bits=7`` AVX2 CPUs run a faster exact kernel.
        observer: how calibration sets an activation range: ``"percentile"`` (default: the
            99.99th percentile, ``("percentile", p)`` for another), ``"minmax"`` or ``"mse"``.
        bias_correction: correct each conv's bias by its mean output error on the calibration
            data; ``None`` = on when ``calibration_data`` is given.
        fuse_residual: let convs compute the residual addition after them (and the activation
            after it): the blocks holding those additions become ``torch.fx.GraphModule`` s with
            the same submodules, and a block's output can stay uint8 for the next block (the
            shortcut then carries the quantized value, as in other int8 runtimes). ``False``
            keeps the additions in float.
        example_inputs: a batch to measure the conv multiply-adds on when no calibration data is
            given (``QuantizationResult.int8_mac_fraction``).
        return_result: also return a :class:`QuantizationResult`.
        warn: emit a warning listing the selected layers that could not be converted.

    Returns:
        ``model``, or ``(model, QuantizationResult)`` when ``return_result=True``.

    Raises:
        ValueError: unknown ``mode`` or observer; a pattern that matches no module; an invalid
            regex; NaN/inf weights (naming the layer); empty calibration data; calibration data
            the model fails on or that produces NaN/inf activations (naming the layer). The model
            is unchanged when anything is raised.

    Example:
        >>> import torch, copy, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> q = pycompress.quantize(copy.deepcopy(model), mode="w8a8", exclude="2")
        >>> type(q[0]).__name__, type(q[2]).__name__
        ('Int8Linear', 'Linear')
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> q = pycompress.quantize(cnn, calibration_data=[torch.randn(4, 3, 16, 16)])
        >>> [type(m).__name__ for m in q]
        ['Int8Conv2d', 'Identity', 'Identity']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in QUANT_MODES:
        raise ValueError(f"mode must be one of {QUANT_MODES}, got {mode!r}")
    _utils.check_int8_bits("act_bits", act_bits, mode)
    _utils.check_int8_bits("weight_bits", weight_bits, mode)
    observers.make_observer(observer)  # validates the name before anything runs
    if not isinstance(fuse_residual, bool):
        raise TypeError(f"fuse_residual must be True or False, got {type(fuse_residual).__name__}")
    if bias_correction is not None and not isinstance(bias_correction, bool):
        raise TypeError(f"bias_correction must be None, True or False, got {type(bias_correction).__name__}")
    if bias_correction and calibration_data is None:
        raise ValueError("bias_correction=True needs calibration_data")
    layer_cls = _int8_linear_class()
    if calibration_data is not None:
        calibration_data = _reiterable(calibration_data)
        _first_batch(calibration_data)  # empty calibration data is an error, not "no calibration"
    extra = {"act_bits": act_bits} if act_bits != 8 else {}
    if weight_bits != 8:
        extra["weight_bits"] = weight_bits
    selected = _utils.select_modules(model, include, exclude)
    result = QuantizationResult(mode=mode)
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            aliases.setdefault(id(m), []).append(n)

    linear_new: dict[str, nn.Module] = {}
    conv_sources: dict[str, nn.Conv2d] = {}
    order: dict[str, int] = {}
    selected_names = {n for n, _ in selected}
    attention: list[str] = []  # MultiheadAttention modules handled as a whole (converted or listed)
    for i, (name, module) in enumerate(selected):
        order[name] = i
        if any(name.startswith(a + ".") for a in attention):
            continue  # a projection of an attention module handled above
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
            reason = _mha_skip_reason(name, module, selected_names)
            if reason is not None:
                result.skipped[name] = reason
                continue
            _check_finite_mha(name, module)
            try:
                new = Int8MultiheadAttention.from_float(module, mode=mode, **extra)
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
                result.skipped[name] = f"Int8MultiheadAttention refused it: {e}"
                continue
            new.train(module.training)
            linear_new[name] = new
            continue
        if _is_conv2d(module):
            reason = _conv_skip_reason(module, mode)
            if reason is not None:
                result.skipped[name] = reason
                continue
            _check_finite(name, module)
            conv_sources[name] = module if type(module) is nn.Conv2d else registry.dense_equivalent(module)
            continue
        reason = _skip_reason(model, name, module, layer_cls)
        if reason == "":
            continue
        if reason is not None:
            result.skipped[name] = reason
            continue
        _check_finite(name, module)
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
        linear_new[name] = new

    conv_new: dict[str, nn.Module] = {}
    if conv_sources:
        conv_new = _convert_convs(model, conv_sources, calibration_data, observer, bias_correction, result,
                                  fuse_residual)
    if any(_is_conv2d(m) or isinstance(m, Int8Conv2d) for m in model.modules()):
        batch = None
        if calibration_data is not None:
            batch = _first_batch(calibration_data)
        elif example_inputs is not None:
            batch = example_inputs
        if batch is not None:
            result.conv_macs = _conv_macs(model, batch)
            total = sum(result.conv_macs.values())
            int8 = sum(v for k, v in result.conv_macs.items()
                       if k in conv_new and isinstance(conv_new[k], Int8Conv2d)
                       or isinstance(model.get_submodule(k), Int8Conv2d))
            result.int8_mac_fraction = int8 / total if total else None

    # every replacement is ready: swap them in (all names a module is registered under)
    replacements = {**linear_new, **conv_new}
    for name in sorted(replacements, key=lambda n: n.count(".")):
        module = model.get_submodule(name)
        for alias in aliases.get(id(module), [name]):
            _utils.set_module(model, alias, replacements[name])
    if replacements:  # torch's fused transformer paths read float weights the int8 layers lack
        registry.disable_transformer_fast_paths(model)
    result.converted = sorted((n for n, m in replacements.items()
                               if not isinstance(m, nn.Identity) and n not in result.residual_blocks),
                              key=lambda n: order.get(n, math.inf))
    result.convs = [n for n in result.converted if isinstance(replacements[n], Int8Conv2d)]
    if (isinstance(model, (nn.Linear, nn.MultiheadAttention)) or conv1d.is_conv1d(model) or _is_conv2d(model)) \
            and include is None:
        result.skipped[""] = "the root module itself cannot be replaced in place; wrap it in a container"
    if warn and result.skipped:
        lines = "; ".join(f"{n or '<root>'}: {r}" for n, r in result.skipped.items())
        warnings.warn(f"quantize: {len(result.skipped)} layer(s) left in floating point: {lines}", stacklevel=2)
    if warn and result.traced is False:
        warnings.warn(f"quantize: {result.notes[0]}", stacklevel=2)
    return (model, result) if return_result else model
