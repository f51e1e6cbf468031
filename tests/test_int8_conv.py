"""pycompress.nn.Int8Conv2d: exactness against the reference of its quantized arithmetic, accuracy,
state_dict / config round trips, dtype and device moves, bad inputs, torch.compile / torch.export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from pycompress.nn import Int8Conv2d
from reference import conv2d_ref

pytestmark = [pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                 reason="this build has no int8_conv2d op"),
              pytest.mark.usefixtures("one_thread")]


# (in, out, kernel, stride, padding, dilation, groups, bias)
CONFIGS = [
    (3, 8, 3, 1, 1, 1, 1, True),
    (8, 16, 3, 2, 1, 1, 1, False),
    (12, 12, 3, 1, 1, 1, 12, True),  # depthwise
    (16, 16, 5, 2, 2, 1, 16, True),  # depthwise 5x5 strided
    (16, 24, 1, 1, 0, 1, 1, True),  # 1x1: a plain GEMM
    (16, 8, 1, 2, 0, 1, 1, True),  # strided 1x1 (ResNet downsample)
    (8, 12, 3, 1, 2, 2, 4, True),  # dilated, grouped
    (5, 7, (3, 1), (1, 2), (1, 0), 1, 1, True),  # rectangular kernel, odd channels
]


def _conv(cfg, seed=0):
    cin, cout, k, s, p, d, g, bias = cfg
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
    if bias:
        with torch.no_grad():
            conv.bias.normal_(0, 0.1)
    return conv


def _ref(q: Int8Conv2d, x, **over):
    kw = dict(x_scale=q.input_scale, x_zero_point=q.input_zero_point, stride=q.stride, padding=q.padding,
              dilation=q.dilation, groups=q.groups, activation=q.activation, out_dtype=q.output_dtype,
              out_scale=q._out_scale, out_zero_point=q._out_zero_point)
    kw.update(over)
    return conv2d_ref(x, q.weight, q.weight_scale, q.bias, **kw)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_from_float_dynamic_matches_reference_and_float(cfg):
    conv = _conv(cfg)
    q = Int8Conv2d.from_float(conv)
    x = torch.randn(3, cfg[0], 11, 10)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == conv(x).shape
    assert torch.equal(y, _ref(q, x))  # every output exact: same fp32 epilogue as the reference
    assert _rel(y, conv(x).detach()) < 0.03


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_weight_quantization_is_per_channel_absmax(cfg):
    conv = _conv(cfg)
    q = Int8Conv2d.from_float(conv)
    w = conv.weight.detach()
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    assert torch.equal(q.weight_scale, scale)
    assert torch.equal(q.weight, torch.round(w / scale[:, None, None, None]).to(torch.int8))
    assert q.weight.abs().max() <= 127
    if conv.bias is not None:
        assert torch.equal(q.bias, conv.bias.detach())


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "silu", "hardswish"])
def test_static_input_fused_activation_uint8_output(activation):
    conv = _conv(CONFIGS[0])
    q = Int8Conv2d.from_float(conv, activation=activation, input_quantization=(0.035, 128),
                              output_quantization=(0.03, 10))
    assert q.static_input and q.output_dtype == torch.uint8
    x = torch.randn(2, 3, 9, 9)
    y = q(x)
    assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
    want = _ref(q, x)
    if activation in ("none", "relu", "relu6"):
        assert torch.equal(y, want)
    else:  # within one quantization step (exp in the epilogue)
        assert (y.int() - want.int()).abs().max() <= 1
    # a uint8 input quantized with the layer's own input quantization gives the same result
    xq = torch.clamp(torch.round(x * (1 / q.input_scale)) + 128, 0, 255).to(torch.uint8)
    assert torch.equal(q(xq), y)
    qf = Int8Conv2d.from_float(conv, activation=activation, input_quantization=(0.035, 128))
    yf = qf(x)
    act = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}[activation]
    assert _rel(yf, act(conv(x)).detach()) < 0.03


def test_chain_of_two_layers_equals_float_round_trip():
    """A uint8 output read by a layer whose input quantization equals it: the same result as
    dequantizing and requantizing in float (the second layer's own entry quantization)."""
    torch.manual_seed(1)
    a = Int8Conv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), activation="relu", input_quantization=(0.03, 120),
                              output_quantization=(0.02, 0))
    b = Int8Conv2d.from_float(nn.Conv2d(8, 6, 3, padding=1), input_quantization=(0.02, 0))
    x = torch.randn(2, 4, 8, 8)
    u = a(x)
    assert u.dtype == torch.uint8
    y_chain = b(u)
    y_float = b(u.float() * 0.02)  # real values of u, quantized again at b's entry: exactly u
    assert torch.equal(y_chain, y_float)


def test_uint8_input_with_per_image_shapes_and_float_dtypes():
    q = Int8Conv2d.from_float(_conv(CONFIGS[4]))
    x = torch.randn(2, 16, 6, 6)
    for dtype in (torch.float16, torch.bfloat16):
        y = q(x.to(dtype))
        assert y.dtype == dtype
        assert torch.equal(y, _ref(q, x.to(dtype)))


def test_float_dtype_of_uint8_fed_layers():
    q = Int8Conv2d.from_float(_conv(CONFIGS[0]), input_quantization=(0.03, 128))
    x = torch.randint(0, 256, (1, 3, 6, 6), dtype=torch.uint8)
    assert q(x).dtype == torch.float32
    q.float_dtype = torch.bfloat16
    assert q(x).dtype == torch.bfloat16 and torch.equal(q(x), _ref(q, x, out_dtype=torch.bfloat16))
    assert q(x.float() * 0.03).dtype == torch.float32  # float inputs answer in their own dtype
    assert Int8Conv2d.from_config(q.config()).float_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float_dtype must be"):
        Int8Conv2d(3, 4, 3, float_dtype=torch.int8)
    # casting the layer (with its model) sets it; moving it does not
    assert copy.deepcopy(q).half().float_dtype == torch.float16
    assert copy.deepcopy(q).float().float_dtype is None
    assert copy.deepcopy(q).to("cpu").float_dtype == torch.bfloat16


def test_float_output_layout():
    q = Int8Conv2d.from_float(_conv(CONFIGS[0]))
    x = torch.randn(2, 3, 8, 8)
    y = q(x)
    assert y.is_contiguous()  # code written for nn.Conv2d may .view() the output
    y.view(2, -1)
    q.channels_last_output = True
    y2 = q(x)
    assert y2.is_contiguous(memory_format=torch.channels_last) and torch.equal(y2, y)
    assert q.config()["channels_last_output"] is True


def test_config_round_trip_and_state_dict():
    conv = _conv(CONFIGS[6])
    q = Int8Conv2d.from_float(conv, activation="relu6", input_quantization=(0.05, 3), output_quantization=(0.1, 0))
    q.channels_last_output = True
    q.fused_modules = ("features.1", "features.2")
    import json

    cfg = json.loads(json.dumps(q.config()))
    fresh = Int8Conv2d.from_config(cfg)
    assert set(fresh.state_dict()) == set(q.state_dict())
    assert "weight_packed" not in q.state_dict()
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(fresh(x), q(x))
    y = q(x)
    assert torch.equal(q.dequantize_output(y), (y.float() - 0) * 0.1)
    assert fresh._out_scale == q._out_scale and fresh._out_zero_point == 0
    assert fresh.fused_modules == ("features.1", "features.2") and fresh.channels_last_output
    assert torch.equal(fresh.weight_packed, q.weight_packed)
    # a dynamic layer has no quantization buffers; loading a static state dict into it is refused
    dyn = Int8Conv2d.from_float(conv)
    assert set(dyn.state_dict()) == {"weight", "weight_scale", "bias"}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dyn.load_state_dict(q.state_dict())


def test_to_float():
    conv = _conv(CONFIGS[2])
    q = Int8Conv2d.from_float(conv, activation="relu")
    f = q.to_float()
    assert type(f) is nn.Conv2d and f.groups == conv.groups and f.padding == conv.padding
    assert torch.equal(f.weight, q.weight.float() * q.weight_scale[:, None, None, None])
    assert _rel(f.weight, conv.weight.detach()) < 0.01
    seq = q.to_float(with_activation=True)
    assert isinstance(seq, nn.Sequential) and isinstance(seq[1], nn.ReLU)
    x = torch.randn(1, 12, 6, 6)
    assert _rel(q(x), seq(x).detach()) < 0.03


def test_dtype_casts_keep_fp32_scales_and_packing():
    q = Int8Conv2d.from_float(_conv(CONFIGS[0]), input_quantization=(0.035, 128))
    x = torch.randn(2, 3, 8, 8)
    want = q(x)
    h = copy.deepcopy(q).half()
    assert h.weight_scale.dtype == torch.float32 and h.bias.dtype == torch.float32
    assert h.input_scale.dtype == torch.float32 and h.input_zero_point.dtype == torch.int32
    assert h.weight.dtype == torch.int8
    assert torch.equal(h(x), want)
    moved = copy.deepcopy(q).to("cpu")
    assert moved.weight_packed.numel() > 0 and torch.equal(moved(x), want)


def test_repack_after_editing_in_place():
    q = Int8Conv2d.from_float(_conv(CONFIGS[1]))
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        q.weight.mul_(-1)
    q.repack()
    assert torch.equal(q(x), _ref(q, x))


def test_bad_inputs_name_the_layer():
    q = Int8Conv2d.from_float(_conv(CONFIGS[0]))
    q.layer_name = "features.0"
    with pytest.raises(ValueError, match=r"'features.0'.*4-D"):
        q(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"'features.0'.*3 input channels"):
        q(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"'features.0'.*uint8.*no static input quantization"):
        q(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"'features.0'.*int32"):
        q(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    q2 = Int8Conv2d.from_float(nn.Conv2d(3, 4, 5))
    q2.layer_name = "features.0"
    with pytest.raises(ValueError, match=r"'features.0'.*too small"):
        q2(torch.randn(1, 3, 2, 2))
    # devices are checked by the op; the layer names itself in the message
    with pytest.raises(ValueError, match=r"'features.0': input on meta but the layer is on cpu"):
        q(torch.randn(1, 3, 8, 8, device="meta"))
    unnamed = Int8Conv2d.from_float(_conv(CONFIGS[0]))
    with pytest.raises(ValueError, match=r"Int8Conv2d\(3, 8, kernel_size=\(3, 3\)"):
        unnamed(torch.randn(8, 8))


@pytest.mark.parametrize("residual", [False, True])
def test_calls_stay_visible(residual):
    """The layer calls its op through a typed entry point for plain tensors in eager mode: modes,
    subclasses, the profiler and the tracer still see the op and get the same bits."""
    from direct_calls import check_calls_visible

    torch.manual_seed(0)
    q = Int8Conv2d.from_float(_conv(CONFIGS[0]), activation="relu", input_quantization=(0.035, 128),
                              output_quantization=(0.03, 0), residual=residual)
    x = torch.randn(2, 3, 9, 9)
    args = (x,)
    if residual:
        q.set_residual_quantization(0.05, 3)
        args = (x, torch.randint(0, 256, (2, 8, 9, 9), dtype=torch.uint8))
    check_calls_visible(q.eval(), args, "pycompress::int8_conv2d")


def test_from_float_refusals():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        Int8Conv2d.from_float(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        Int8Conv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    bad = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        Int8Conv2d.from_float(bad)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        Int8Conv2d.from_float(nn.Conv2d(3, 4, 3), input_quantization=(0.0, 0))
    with pytest.raises(ValueError, match=r"zero point must be in \[0, 255\]"):
        Int8Conv2d.from_float(nn.Conv2d(3, 4, 3), output_quantization=(0.1, 300))
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Conv2d(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="groups=2 must divide"):
        Int8Conv2d(3, 4, 3, groups=2)


def test_same_padding_is_resolved():
    conv = nn.Conv2d(4, 6, 3, padding="same", dilation=2)
    q = Int8Conv2d.from_float(conv)
    assert q.padding == (2, 2)
    x = torch.randn(1, 4, 9, 9)
    assert q(x).shape == conv(x).shape


@pytest.mark.parametrize("static", [False, True])
def test_torch_compile_fullgraph(static):
    torch.manual_seed(0)
    kw = {"input_quantization": (0.03, 110)} if static else {}
    model = nn.Sequential(
        Int8Conv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), activation="relu", output_quantization=(0.02, 0), **kw)
        if static else Int8Conv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), activation="relu"),
        Int8Conv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, groups=8), input_quantization=(0.02, 0))
        if static else Int8Conv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, groups=8)),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    want = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), want)


def test_torch_export():
    torch.manual_seed(0)
    model = nn.Sequential(
        Int8Conv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), activation="relu", input_quantization=(0.03, 110),
                              output_quantization=(0.02, 0)),
        Int8Conv2d.from_float(nn.Conv2d(8, 4, 1), input_quantization=(0.02, 0)),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    ep = torch.export.export(model, (x,))
    assert torch.equal(ep.module()(x), model(x))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("int8_conv2d" in t for t in targets), targets


def test_docstring_examples_run():
    import doctest

    import pycompress.nn.int8_conv as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
