"""int8_conv2d's fused residual: ``y = y + r`` after the bias and before the activation, exact on
every CPU code path against a reference that follows the op's fp32 formula one rounded step at a
time; bad residuals raise; the fake kernel and opcheck cover the new arguments."""

from __future__ import annotations

import pytest
import torch

import pycompress
import pycompress.ops as ops
from pycompress import _ext
from reference import conv2d_ref

# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups); Cout mostly not a multiple of 16 or 8
CASES = {
    "1x1_rows": (2, 16, 6, 9, 37, (1, 1), 1, 0, 1, 1),  # 1x1 stride 1 unpadded: the direct-rows path
    "3x3_s2": (2, 19, 9, 8, 37, (3, 3), 2, 1, 1, 1),
    "grouped": (2, 12, 7, 8, 20, (3, 3), 1, 1, 1, 4),
    "dw3": (2, 37, 9, 10, 37, (3, 3), 1, 1, 1, 37),
    "dw3_s2": (1, 24, 11, 9, 24, (3, 3), 2, 1, 1, 24),
    "dw5": (2, 18, 12, 11, 18, (5, 5), 1, 2, 1, 18),
    "wide": (2, 64, 10, 10, 80, (3, 3), 1, 1, 1, 1),  # full GEMM / AMX tiles
}
RES_KINDS = ["uint8", "int8", "float32", "bfloat16", "float16"]
QUANT = (torch.uint8, torch.int8)


def make_problem(case, x_kind="uint8"):
    n, cin, h, w, cout, k, s, p, d, g = case
    if x_kind == "uint8":
        x = torch.randint(0, 256, (n, cin, h, w), dtype=torch.uint8)
        xs = torch.rand(n) * 0.05 + 0.01  # one scale and zero point per image
        xzp = torch.randint(0, 256, (n,), dtype=torch.int32)
    else:
        x = torch.randn(n, cin, h, w) * 2 + 0.5
        xs = xzp = None
    x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randint(-128, 128, (cout, cin // g, *k), dtype=torch.int8)
    ws = torch.rand(cout) * 0.02 + 0.001
    bias = torch.randn(cout)
    conv = dict(x_scale=xs, x_zero_point=xzp, stride=s, padding=p, dilation=d, groups=g)
    return x, wt, ws, bias, conv


def make_residual(kind, shape, magnitude, layout):
    """A residual of `shape` whose real values span about +-magnitude, with its scale and zp."""
    if kind == "uint8":
        zp = int(torch.randint(0, 256, ()).item())
        r = torch.randint(0, 256, shape, dtype=torch.uint8)
        scale = magnitude / 128
    elif kind == "int8":
        zp = int(torch.randint(-128, 128, ()).item())
        r = torch.randint(-128, 128, shape, dtype=torch.int8)
        scale = magnitude / 128
    else:
        r = (torch.randn(shape) * magnitude / 2).to(getattr(torch, kind))
        scale, zp = 1.0, 0
    if layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view with gaps: every other channel of a wider tensor
        wide = torch.cat([r, r], dim=1)
        r = wide[:, ::2]
        assert not r.is_contiguous() and not r.is_contiguous(memory_format=torch.channels_last)
    return r, scale, zp


def residual_ref(x, wt, ws, bias, conv, res, res_scale, res_zp, activation, out_dtype, out_scale, out_zp):
    """The op's formula in fp32, one rounded step at a time."""
    return conv2d_ref(x, wt, ws, bias, activation=activation, out_dtype=out_dtype, out_scale=out_scale,
                      out_zero_point=out_zp, residual=res, residual_scale=res_scale, residual_zero_point=res_zp,
                      **conv)


def check(y, ref, activation):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    if activation == "silu":  # exp may differ by 1 ulp between libraries
        if y.dtype.is_floating_point:
            torch.testing.assert_close(y, ref, rtol=4e-7, atol=1e-30)
        else:
            assert (y.int() - ref.int()).abs().max() <= 1
    elif y.dtype.is_floating_point:
        assert torch.equal(y, ref), (y - ref).abs().max()
    else:
        assert torch.equal(y, ref), (y.int() - ref.int()).abs().max()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("res_kind", RES_KINDS)
def test_residual_exact(case, res_kind, cpu_isa):
    x, wt, ws, bias, conv = make_problem(CASES[case])
    base = conv2d_ref(x, wt, ws, bias, out_dtype=torch.float32, **conv)
    mag = float(base.abs().max())
    layouts = ["channels_last", "contiguous", "strided"]
    for i, activation in enumerate(["none", "relu", "relu6", "silu"]):
        res, rs, rzp = make_residual(res_kind, tuple(base.shape), mag, layouts[i % 3])
        # a requantization scale at which part of the outputs clamps
        outs = [(torch.float32, 1.0, 0), (torch.uint8, mag / 200, 7)]
        if activation == "none":
            outs.append((torch.int8, mag / 100, -3))
        for out_dtype, out_scale, out_zp in outs:
            y = ops.int8_conv2d(x, wt, ws, bias, activation=activation, out_dtype=out_dtype, out_scale=out_scale,
                                out_zero_point=out_zp, residual=res, residual_scale=rs, residual_zero_point=rzp,
                                **conv)
            ref = residual_ref(x, wt, ws, bias, conv, res, rs, rzp, activation, out_dtype, out_scale, out_zp)
            check(y, ref, activation)
            if out_dtype == torch.uint8 and activation == "none":
                # the output uses the range (neither all clamped nor a handful of values)
                assert len(torch.unique(y)) > 30


@pytest.mark.parametrize("case", ["3x3_s2", "dw3"])
def test_residual_without_bias_float_input_and_half_output(case, cpu_isa):
    x, wt, ws, _, conv = make_problem(CASES[case], x_kind="float")
    base = conv2d_ref(x, wt, ws, None, out_dtype=torch.float32, **conv)
    for res_kind in ["uint8", "float32"]:
        res, rs, rzp = make_residual(res_kind, tuple(base.shape), float(base.abs().max()), "channels_last")
        for out_dtype in [torch.float32, torch.bfloat16, torch.float16]:
            for activation in ["none", "relu", "hardswish"]:
                y = ops.int8_conv2d(x.to(out_dtype), wt, ws, None, activation=activation, residual=res,
                                    residual_scale=rs, residual_zero_point=rzp, **conv)
                ref = residual_ref(x.to(out_dtype), wt, ws, None, conv, res, rs, rzp, activation, out_dtype,
                                   1.0, 0)
                check(y, ref, activation)


def test_residual_code_paths_agree():
    """Every CPU code path gives the same bits (also for silu, whose exp comes from one library)."""
    isas = _ext.cpu_isas()
    previous = pycompress.active_cpu_isa()
    for case in ["1x1_rows", "grouped", "dw5", "wide"]:
        x, wt, ws, bias, conv = make_problem(CASES[case])
        base = conv2d_ref(x, wt, ws, bias, out_dtype=torch.float32, **conv)
        for res_kind in ["uint8", "int8", "float32"]:
            res, rs, rzp = make_residual(res_kind, tuple(base.shape), float(base.abs().max()), "channels_last")
            outs = []
            try:
                for isa in isas:
                    pycompress.set_cpu_isa(isa)
                    outs.append(ops.int8_conv2d(x, wt, ws, bias, activation="silu", residual=res, residual_scale=rs,
                                                residual_zero_point=rzp, **conv))
            finally:
                pycompress.set_cpu_isa(previous)
            for o in outs[1:]:
                assert torch.equal(o, outs[0])


def test_residual_no_fma_contraction(cpu_isa):
    """Values where fma(d, s, y) and fp32(fp32(d * s) + y) differ: the op rounds the product."""
    x = torch.full((1, 1, 1, 1), 1, dtype=torch.uint8)
    wt = torch.ones(16, 1, 1, 1, dtype=torch.int8)
    y_val = torch.tensor(1.0 + 2.0 ** -23)  # y = 1 * 1 * w_scale
    ws = y_val.repeat(16)
    res = torch.full((1, 16, 1, 1), 3, dtype=torch.uint8)
    rs = 1.0 / 3.0 + 2.0 ** -30  # 3 * rs is not a float32
    rs32 = torch.tensor(rs, dtype=torch.float32)
    rounded = y_val + (torch.tensor(3.0) * rs32)
    fused = torch.tensor(float(y_val) + 3.0 * float(rs32), dtype=torch.float32)
    args = dict(x_scale=torch.ones(1), x_zero_point=torch.zeros(1, dtype=torch.int32), residual=res, residual_scale=rs)
    y = ops.int8_conv2d(x, wt, ws, **args)
    assert torch.equal(y.flatten(), rounded.repeat(16))
    if not torch.equal(rounded, fused):  # the case discriminates
        assert not torch.equal(y.flatten()[0], fused)


def _bad_residual_calls():
    x = torch.randint(0, 256, (2, 6, 5, 5), dtype=torch.uint8)
    wt = torch.randint(-128, 128, (8, 6, 3, 3), dtype=torch.int8)
    base = dict(x=x, w=wt, w_scale=torch.rand(8), x_scale=torch.rand(2) + 0.1,
                x_zero_point=torch.zeros(2, dtype=torch.int32), padding=1)
    good = torch.zeros(2, 8, 5, 5, dtype=torch.uint8)
    return base, [
        (dict(residual=torch.zeros(2, 8, 4, 5, dtype=torch.uint8)), ValueError, "residual must have the output's shape"),
        (dict(residual=torch.zeros(8, 5, 5, dtype=torch.uint8)), ValueError, "residual must have the output's shape"),
        (dict(residual=torch.zeros(2, 8, 5, 5, dtype=torch.int32)), TypeError, "residual"),
        (dict(residual=torch.zeros(2, 8, 5, 5, dtype=torch.float64)), TypeError, "residual"),
        (dict(residual=good, residual_scale=0.0), ValueError, "residual_scale"),
        (dict(residual=good, residual_scale=-1.0), ValueError, "residual_scale"),
        (dict(residual=good, residual_scale=float("inf")), ValueError, "residual_scale"),
        (dict(residual=good, residual_scale=float("nan")), ValueError, "residual_scale"),
        (dict(residual=good, residual_scale=1e-50), ValueError, "residual_scale"),  # 0 in float32
        (dict(residual=good, residual_zero_point=256), ValueError, "residual_zero_point"),
        (dict(residual=good, residual_zero_point=-1), ValueError, "residual_zero_point"),
        (dict(residual=good.to(torch.int8), residual_zero_point=128), ValueError, "residual_zero_point"),
        (dict(residual=good.to(torch.int8), residual_zero_point=-129), ValueError, "residual_zero_point"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_bad_residual_wrapper(i):
    base, calls = _bad_residual_calls()
    over, exc, match = calls[i]
    with pytest.raises(exc, match=match):
        ops.int8_conv2d(**base, **over)


def test_bad_residual_wrapper_types_and_device():
    base, _ = _bad_residual_calls()
    good = torch.zeros(2, 8, 5, 5, dtype=torch.uint8)
    with pytest.raises(TypeError, match="residual_scale"):
        ops.int8_conv2d(**base, residual=good, residual_scale="1")
    with pytest.raises(TypeError, match="residual_zero_point"):
        ops.int8_conv2d(**base, residual=good, residual_zero_point=1.5)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ops.int8_conv2d(**base, residual=[[0]])
    with pytest.raises(ValueError, match="residual on meta"):
        ops.int8_conv2d(**base, residual=good.to("meta"))


@pytest.mark.parametrize("i", range(13))
def test_bad_residual_binding(i):
    """The kernel checks the same things itself (for callers of torch.ops.pycompress directly)."""
    base, calls = _bad_residual_calls()
    over, exc, match = calls[i]
    b = base
    with pytest.raises(exc, match=match):
        torch.ops.pycompress.int8_conv2d(
            b["x"], b["x_scale"], b["x_zero_point"], b["w"], b["w_scale"], None, None, [1, 1], [1, 1], [1, 1], 1,
            "none", None, 1.0, 0, over["residual"], over.get("residual_scale", 1.0),
            over.get("residual_zero_point", 0))


def test_float_residual_ignores_scale_and_zero_point():
    x, wt, ws, bias, conv = make_problem(CASES["grouped"])
    base = conv2d_ref(x, wt, ws, bias, out_dtype=torch.float32, **conv)
    res = torch.randn(base.shape)
    a = ops.int8_conv2d(x, wt, ws, bias, residual=res, **conv)
    b = ops.int8_conv2d(x, wt, ws, bias, residual=res, residual_scale=-3.0, residual_zero_point=999, **conv)
    assert torch.equal(a, b)
    assert torch.equal(a, base + res)


def test_residual_opcheck_and_fake(conv_op_args):
    args = conv_op_args
    y = torch.ops.pycompress.int8_conv2d(*args)
    res_u8 = torch.randint(0, 256, y.shape, dtype=torch.uint8)
    res_f = torch.randn(y.shape, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default, args + (res_u8, 0.05, 12))
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default,
                          args[:12] + (torch.uint8, 0.25, 3, res_f, 1.0, 0))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(3, 6, 9, 9, dtype=torch.int8)
        fw = torch.empty(12, 6, 3, 3, dtype=torch.int8)
        common = (torch.ones(1), torch.zeros(1, dtype=torch.int32), fw, torch.ones(12), None, None, [2, 2], [1, 1],
                  [1, 1], 1, "relu", torch.uint8, 0.5, 0)
        out = torch.ops.pycompress.int8_conv2d(fx, *common, torch.empty(3, 12, 5, 5, dtype=torch.uint8), 0.1, 3)
        assert out.shape == (3, 12, 5, 5) and out.dtype == torch.uint8
        assert out.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(Exception, match="residual"):
            torch.ops.pycompress.int8_conv2d(fx, *common, torch.empty(3, 12, 5, 4, dtype=torch.uint8), 0.1, 3)


@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 48)], ids=["1x1", "3x3", "dw3x3"])
def test_identity_block_reads_its_own_input(k, groups, cpu_isa):
    """out = relu(conv(x) + x) with the block's uint8 input as the residual (a ResNet / MobileNetV2
    identity shortcut): the same tensor is read by the conv and by the epilogue."""
    x = torch.randint(0, 256, (2, 48, 9, 7), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    xs, xzp = torch.tensor([0.04]), torch.tensor([120], dtype=torch.int32)
    wt = torch.randint(-128, 128, (48, 48 // groups, k, k), dtype=torch.int8)
    ws, bias = torch.rand(48) * 0.002 + 0.0005, torch.randn(48)
    conv = dict(x_scale=xs, x_zero_point=xzp, padding=k // 2, groups=groups)
    y = ops.int8_conv2d(x, wt, ws, bias, activation="relu", out_dtype=torch.uint8, out_scale=0.05, out_zero_point=0,
                        residual=x, residual_scale=float(xs), residual_zero_point=int(xzp), **conv)
    ref = residual_ref(x, wt, ws, bias, conv, x, float(xs), int(xzp), "relu", torch.uint8, 0.05, 0)
    check(y, ref, "relu")
    assert len(torch.unique(y)) > 30
