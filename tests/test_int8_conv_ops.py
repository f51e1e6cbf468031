"""int8_conv2d / int8_conv2d_pack_weight: exactness against the integer reference on every CPU code
path, the op contract's corner cases, bad input, and tracing (fake kernels, opcheck, compile)."""

from __future__ import annotations

import pytest
import torch

import pycompress
import pycompress.ops as ops
from pycompress import _ext
from reference import conv2d_quantize_ref, conv2d_ref

# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups): odd sizes, C not a multiple of 4 / 16,
# Cout not a multiple of 16, grouped and depthwise convs, strides, dilations, asymmetric kernels.
CASES = [
    (2, 5, 9, 11, 7, (3, 3), 1, 1, 1, 1),
    (1, 19, 8, 7, 33, (3, 3), 2, 1, 1, 1),
    (3, 16, 6, 9, 16, (1, 1), 1, 0, 1, 1),     # 1x1 stride 1: plain GEMM on the rows
    (1, 67, 5, 5, 20, (1, 1), 2, 0, 1, 1),     # 1x1 stride 2
    (2, 8, 10, 9, 12, (3, 3), 1, 2, 2, 2),     # groups 2, dilation 2
    (1, 12, 7, 8, 20, (3, 2), (2, 1), (1, 0), 1, 4),  # groups 4, asymmetric everything
    (2, 24, 9, 10, 24, (3, 3), 1, 1, 1, 24),   # depthwise 3x3
    (1, 37, 11, 9, 37, (3, 3), 2, 1, 1, 37),   # depthwise 3x3 stride 2, C not a multiple of 16
    (2, 18, 12, 11, 18, (5, 5), 1, 2, 1, 18),  # depthwise 5x5
    (1, 9, 13, 12, 9, (5, 5), 2, 4, 2, 9),     # depthwise 5x5 stride 2 dilation 2
    (1, 4, 6, 6, 8, (3, 3), 1, 1, 1, 4),       # Cin/groups == 1, Cout = 2 * Cin (not depthwise)
    (1, 3, 5, 5, 6, (5, 5), 1, 0, 1, 1),       # output size 1
    # stride 1 and a multiple of 64 input channels per group: on AMX the taps read their rows in
    # place from a padded copy of x
    (3, 64, 6, 7, 40, (3, 3), 1, 1, 1, 1),     # several images per block
    (1, 128, 9, 12, 36, (3, 3), 1, 2, 2, 2),   # dilation 2, 2 groups of 64 channels
    (2, 64, 7, 9, 24, (1, 3), 1, (0, 1), 1, 1),  # one row of taps
]


def _case_args(case):
    n, cin, h, w, cout, k, s, p, d, g = case
    return dict(n=n, cin=cin, h=h, w=w, cout=cout, k=k, stride=s, padding=p, dilation=d, groups=g)


def make_weight(cout, cin_g, k, wmin=-128, wmax=127):
    w = torch.randint(wmin, wmax + 1, (cout, cin_g, *k), dtype=torch.int8)
    ws = torch.rand(cout) * 0.02 + 0.001
    return w, ws


def make_input(kind, n, cin, h, w, channels_last=True):
    if kind == "uint8":
        x = torch.randint(0, 256, (n, cin, h, w), dtype=torch.uint8)
        scale = torch.rand(n) * 0.05 + 0.01
        zp = torch.randint(0, 256, (n,), dtype=torch.int32)
    elif kind == "int8":
        x = torch.randint(-128, 128, (n, cin, h, w), dtype=torch.int8)
        scale = torch.rand(1) * 0.05 + 0.01
        zp = torch.randint(-128, 128, (1,), dtype=torch.int32)
    elif kind == "float_static":
        x = torch.randn(n, cin, h, w) * 3
        scale = torch.tensor([0.03])
        zp = torch.tensor([100], dtype=torch.int32)
    else:  # float dynamic
        x = torch.randn(n, cin, h, w) * 2 + 0.5
        scale = zp = None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, scale, zp


def run_both(x, w, ws, bias, scale, zp, c, **kw):
    args = dict(x_scale=scale, x_zero_point=zp, stride=c["stride"], padding=c["padding"],
                dilation=c["dilation"], groups=c["groups"], **kw)
    y = ops.int8_conv2d(x, w, ws, bias, **args)
    ref = conv2d_ref(x, w, ws, bias, **args)
    return y, ref


def assert_same(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    if y.dtype.is_floating_point:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    else:
        assert torch.equal(y, ref), (y.int() - ref.int()).abs().max()


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("kind", ["uint8", "int8", "float_dynamic", "float_static"])
def test_conv_exact(case, kind, cpu_isa):
    c = _case_args(case)
    x, scale, zp = make_input(kind, c["n"], c["cin"], c["h"], c["w"])
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    bias = torch.randn(c["cout"])
    for act in ["none", "relu", "relu6"]:
        y, ref = run_both(x, w, ws, bias if act != "relu" else None, scale, zp, c, activation=act)
        assert_same(y, ref)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[7], CASES[9]], ids=["conv", "grouped", "dw3", "dw5"])
@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int8])
def test_conv_requantized_exact(case, out_dtype, cpu_isa):
    c = _case_args(case)
    x, scale, zp = make_input("uint8", c["n"], c["cin"], c["h"], c["w"])
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    bias = torch.randn(c["cout"])
    zp_out = 3 if out_dtype == torch.uint8 else -5
    # a scale at which part of the outputs clamps at each end of the range
    out_scale = float(run_both(x, w, ws, bias, scale, zp, c)[1].abs().max()) / 400
    for act in ["none", "relu", "relu6"]:
        y, ref = run_both(x, w, ws, bias, scale, zp, c, activation=act, out_dtype=out_dtype,
                          out_scale=out_scale, out_zero_point=zp_out)
        assert_same(y, ref)
        # the range is used (clamping happens at both ends for "none")
        if act == "none":
            info = torch.iinfo(out_dtype)
            assert int(y.min()) == info.min and int(y.max()) == info.max


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[8]], ids=["conv", "dw3", "dw5"])
@pytest.mark.parametrize("act", ["silu", "hardswish"])
def test_conv_smooth_activations(case, act, cpu_isa):
    c = _case_args(case)
    x, scale, zp = make_input("float_dynamic", c["n"], c["cin"], c["h"], c["w"])
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    bias = torch.randn(c["cout"])
    y, ref = run_both(x, w, ws, bias, scale, zp, c, activation=act)
    if act == "hardswish":
        assert_same(y, ref)
    else:  # exp may differ by 1 ulp between libraries
        torch.testing.assert_close(y, ref, rtol=4e-7, atol=1e-30)
    yq, refq = run_both(x, w, ws, bias, scale, zp, c, activation=act, out_dtype=torch.uint8, out_scale=0.05,
                        out_zero_point=10)
    assert (yq.int() - refq.int()).abs().max() <= (0 if act == "hardswish" else 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_half_inputs_and_outputs(dtype, cpu_isa):
    c = _case_args(CASES[1])
    x = (torch.randn(c["n"], c["cin"], c["h"], c["w"]) * 2).to(dtype)
    w, ws = make_weight(c["cout"], c["cin"], c["k"])
    bias = torch.randn(c["cout"])
    y, ref = run_both(x, w, ws, bias, None, None, c)
    assert y.dtype == dtype
    assert_same(y, ref)
    xq, scale, zp = make_input("uint8", c["n"], c["cin"], c["h"], c["w"])
    for od in [torch.float16, torch.bfloat16, torch.float32]:
        y, ref = run_both(xq, w, ws, bias, scale, zp, c, out_dtype=od)
        assert_same(y, ref)
    dwc = _case_args(CASES[7])
    xq, scale, zp = make_input("int8", dwc["n"], dwc["cin"], dwc["h"], dwc["w"])
    w, ws = make_weight(dwc["cout"], 1, dwc["k"])
    y, ref = run_both(xq, w, ws, None, scale, zp, dwc, out_dtype=dtype)
    assert_same(y, ref)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8]], ids=["conv", "grouped", "dw"])
def test_conv_packed_weight_and_layouts(case, cpu_isa):
    c = _case_args(case)
    x, scale, zp = make_input("uint8", c["n"], c["cin"], c["h"], c["w"], channels_last=False)
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    packed = ops.int8_conv2d_pack_weight(w, c["groups"])
    assert packed.numel() == ops.int8_conv2d_packed_bytes(c["cout"], c["cin"] // c["groups"], *c["k"], c["groups"])
    kw = dict(x_scale=scale, x_zero_point=zp, stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
              groups=c["groups"])
    ref = conv2d_ref(x, w, ws, None, **kw)
    assert_same(ops.int8_conv2d(x, w, ws, **kw), ref)  # NCHW input
    assert_same(ops.int8_conv2d(x, w, ws, w_packed=packed, **kw), ref)
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)  # other strides
    assert_same(ops.int8_conv2d(xs, w, ws, w_packed=packed, **kw), ref)
    # the weight may be non-contiguous too
    wt = w.transpose(2, 3).contiguous().transpose(2, 3)
    assert_same(ops.int8_conv2d(x, wt, ws, **kw), ref)


def test_conv_extremes_no_saturation(cpu_isa):
    # |acc| up to 9 * 512 * 255 * 128 (1.5e8): exact on every path
    w = torch.full((24, 512, 3, 3), -128, dtype=torch.int8)
    ws = torch.full((24,), 1e-3)
    for xv, zp in [(255, 0), (0, 255)]:
        x = torch.full((1, 512, 4, 5), xv, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        sc, z = torch.tensor([1.0]), torch.tensor([zp], dtype=torch.int32)
        y = ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=z, padding=1)
        assert_same(y, conv2d_ref(x, w, ws, x_scale=sc, x_zero_point=z, padding=1))
    x = torch.full((1, 512, 4, 5), -128, dtype=torch.int8)
    sc, z = torch.tensor([1.0]), torch.tensor([127], dtype=torch.int32)
    y = ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=z, padding=1)
    assert_same(y, conv2d_ref(x, w, ws, x_scale=sc, x_zero_point=z, padding=1))


def test_conv_narrow_weights_exact(cpu_isa):
    # every |w| <= 64: the AVX2 level takes the vpmaddubsw path
    w = torch.randint(-64, 65, (17, 40, 3, 3), dtype=torch.int8)
    ws = torch.rand(17)
    x = torch.randint(0, 256, (2, 40, 6, 7), dtype=torch.uint8)
    sc, z = torch.tensor([0.02, 0.03]), torch.tensor([7, 250], dtype=torch.int32)
    kw = dict(x_scale=sc, x_zero_point=z, stride=2, padding=1)
    assert_same(ops.int8_conv2d(x, w, ws, **kw), conv2d_ref(x, w, ws, **kw))


def test_conv_larger_layers(cpu_isa):
    # several pixel blocks and panel ranges per thread, images spanning blocks; 1x1 convs whose
    # uint8 rows the GEMM reads in place (one group and two)
    for n, cin, hw, cout, k, s, g in [(3, 64, 15, 96, 3, 1, 1), (2, 32, 17, 64, 3, 2, 2), (1, 144, 19, 144, 3, 1, 144),
                                      (2, 256, 9, 64, 1, 1, 1), (3, 128, 7, 96, 1, 1, 2), (1, 20, 11, 24, 1, 1, 1),
                                      (2, 64, 37, 32, 3, 1, 1), (5, 128, 7, 160, 3, 1, 1)]:
        x, scale, zp = make_input("uint8", n, cin, hw, hw)
        w, ws = make_weight(cout, cin // g, (k, k))
        bias = torch.randn(cout)
        kw = dict(x_scale=scale, x_zero_point=zp, stride=s, padding=k // 2, groups=g, activation="relu")
        assert_same(ops.int8_conv2d(x, w, ws, bias, **kw), conv2d_ref(x, w, ws, bias, **kw))
        kw["out_dtype"] = torch.uint8
        kw["out_scale"] = 0.1
        assert_same(ops.int8_conv2d(x, w, ws, bias, **kw), conv2d_ref(x, w, ws, bias, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_nchw_float_input_quantized_straight_to_channels_last(dtype, static, cpu_isa):
    """A float NCHW batch is quantized into channels-last bytes in one pass (per block of pixels
    and channels): the same output bits as the channels-last copy of the same batch."""
    for n, cin, h, w, k, s in [(2, 3, 37, 41, 7, 2), (1, 5, 9, 11, 3, 1), (1, 64, 6, 5, 3, 1), (2, 4, 33, 17, 1, 1)]:
        wq, ws = make_weight(8, cin, (k, k))
        x = (torch.randn(n, cin, h, w) * 2).to(dtype)
        assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        kw = dict(stride=s, padding=k // 2)
        if static:
            kw.update(x_scale=torch.tensor([0.03]), x_zero_point=torch.tensor([100], dtype=torch.int32))
        y = ops.int8_conv2d(x, wq, ws, **kw)
        assert torch.equal(y, ops.int8_conv2d(x.contiguous(memory_format=torch.channels_last), wq, ws, **kw))
        assert_same(y, conv2d_ref(x, wq, ws, **kw))


def test_conv_threads_agree():
    prev = torch.get_num_threads()
    try:
        for cin in (48, 64):  # 64: the padded form on AMX
            x, scale, zp = make_input("float_dynamic", 2, cin, 14, 14)
            w, ws = make_weight(80, cin, (3, 3))
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(ops.int8_conv2d(x, w, ws, padding=1))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    finally:
        torch.set_num_threads(prev)


def test_conv_empty_batch_and_size_one():
    w, ws = make_weight(8, 3, (3, 3))
    x = torch.randn(0, 3, 5, 5)
    y = ops.int8_conv2d(x, w, ws, padding=1)
    assert y.shape == (0, 8, 5, 5) and y.dtype == torch.float32
    xq = torch.zeros(0, 3, 5, 5, dtype=torch.uint8)
    y = ops.int8_conv2d(xq, w, ws, x_scale=torch.ones(1), x_zero_point=torch.zeros(1, dtype=torch.int32),
                        out_dtype=torch.int8)
    assert y.shape == (0, 8, 3, 3) and y.dtype == torch.int8
    # output 1x1 and 1x1 input with padding
    x = torch.randn(2, 3, 1, 1)
    assert_same(ops.int8_conv2d(x, w, ws, padding=1), conv2d_ref(x, w, ws, padding=1))
    x = torch.randn(1, 3, 3, 3)
    assert_same(ops.int8_conv2d(x, w, ws), conv2d_ref(x, w, ws))


def test_dynamic_quantization_matches_reference():
    # per image parameters: an all-positive image, an all-negative one, a constant one
    x = torch.stack([torch.rand(4, 6, 6) + 1, -torch.rand(4, 6, 6) - 2, torch.zeros(4, 6, 6)])
    w, ws = make_weight(5, 4, (3, 3))
    assert_same(ops.int8_conv2d(x, w, ws), conv2d_ref(x, w, ws))
    q, s, z = conv2d_quantize_ref(x)
    assert s[2].item() == 1.0 and z[0].item() == 0 and z[1].item() == 255


def test_nonfinite_dynamic_input():
    w, ws = make_weight(5, 4, (3, 3))
    for bad in [float("nan"), float("inf")]:
        x = torch.randn(2, 4, 6, 6)
        x[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            ops.int8_conv2d(x, w, ws)
        with pytest.raises(ValueError, match="NaN or infinite"):
            torch.ops.pycompress.int8_conv2d(x, None, None, w, ws, None, None, [1, 1], [0, 0], [1, 1], 1, "none",
                                             None, 1.0, 0)


def _bad_calls():
    x = torch.randint(0, 256, (2, 8, 6, 6), dtype=torch.uint8)
    xf = torch.randn(2, 8, 6, 6)
    w = torch.randint(-128, 128, (4, 8, 3, 3), dtype=torch.int8)
    ws = torch.rand(4)
    sc, zp = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    q = dict(x_scale=sc, x_zero_point=zp)
    return [
        (TypeError, "x must have dtype", lambda: ops.int8_conv2d(x.int(), w, ws, **q)),
        (ValueError, "x must be 4-D", lambda: ops.int8_conv2d(x[0], w, ws, **q)),
        (TypeError, "w must have dtype", lambda: ops.int8_conv2d(x, w.float(), ws, **q)),
        (ValueError, "w must be 4-D", lambda: ops.int8_conv2d(x, w[0], ws, **q)),
        (ValueError, "channels", lambda: ops.int8_conv2d(x, w[:, :5], ws, **q)),
        (ValueError, "groups=3 must divide", lambda: ops.int8_conv2d(x, w[:, :4], ws, groups=3, **q)),
        (ValueError, "groups must be >= 1", lambda: ops.int8_conv2d(x, w, ws, groups=0, **q)),
        (ValueError, "output would be empty", lambda: ops.int8_conv2d(x, w, ws, dilation=3, **q)),
        (ValueError, "output would be empty",
         lambda: ops.int8_conv2d(x[:, :, :2], w, ws, **q)),
        (ValueError, "stride values must be >= 1", lambda: ops.int8_conv2d(x, w, ws, stride=0, **q)),
        (ValueError, "padding values must be >= 0", lambda: ops.int8_conv2d(x, w, ws, padding=(1, -1), **q)),
        (TypeError, "dilation must be", lambda: ops.int8_conv2d(x, w, ws, dilation=(1, 2, 3), **q)),
        (ValueError, "w_scale must have Cout", lambda: ops.int8_conv2d(x, w, torch.rand(5), **q)),
        (TypeError, "w_scale must have dtype", lambda: ops.int8_conv2d(x, w, ws.double(), **q)),
        (ValueError, "w_scale must be finite", lambda: ops.int8_conv2d(x, w, ws * float("inf"), **q)),
        (ValueError, "bias must have Cout", lambda: ops.int8_conv2d(x, w, ws, torch.rand(3), **q)),
        (ValueError, "activation must be one of", lambda: ops.int8_conv2d(x, w, ws, activation="gelu", **q)),
        (TypeError, "out_dtype must be", lambda: ops.int8_conv2d(x, w, ws, out_dtype=torch.int32, **q)),
        (ValueError, "out_scale must be finite and > 0",
         lambda: ops.int8_conv2d(x, w, ws, out_dtype=torch.uint8, out_scale=0.0, **q)),
        (ValueError, "out_scale must be finite and > 0",
         lambda: ops.int8_conv2d(x, w, ws, out_dtype=torch.int8, out_scale=float("nan"), **q)),
        (ValueError, "out_zero_point must lie in",
         lambda: ops.int8_conv2d(x, w, ws, out_dtype=torch.int8, out_zero_point=128, **q)),
        (ValueError, "needs x_scale and x_zero_point", lambda: ops.int8_conv2d(x, w, ws)),
        (ValueError, "both x_scale and x_zero_point", lambda: ops.int8_conv2d(xf, w, ws, x_scale=sc)),
        (ValueError, r"x_scale must have shape \[1\] or \[N\]",
         lambda: ops.int8_conv2d(x, w, ws, x_scale=torch.ones(3), x_zero_point=zp)),
        (TypeError, "x_zero_point must have dtype",
         lambda: ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=zp.long())),
        (ValueError, "x_scale must be finite",
         lambda: ops.int8_conv2d(x, w, ws, x_scale=sc * float("nan"), x_zero_point=zp)),
        (ValueError, "x_scale must be > 0",
         lambda: ops.int8_conv2d(xf, w, ws, x_scale=sc * 0, x_zero_point=zp)),
        (ValueError, "x_zero_point must lie in",
         lambda: ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=zp - 1)),
        (ValueError, "x_zero_point must lie in",
         lambda: ops.int8_conv2d(x.view(torch.int8), w, ws, x_scale=sc, x_zero_point=zp + 128)),
        (ValueError, "w_packed must be",
         lambda: ops.int8_conv2d(x, w, ws, w_packed=torch.zeros(7, dtype=torch.int8), **q)),
        (TypeError, "must be a torch.Tensor", lambda: ops.int8_conv2d(x.tolist(), w, ws, **q)),
        (ValueError, "w must be non-empty", lambda: ops.int8_conv2d_pack_weight(w[:0])),
        (ValueError, "groups=3 must divide", lambda: ops.int8_conv2d_pack_weight(w, 3)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_wrapper(i):
    exc, match, call = _bad_calls()[i]
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_binding():
    """The op itself (called without the wrapper) rejects bad input with a clear error."""
    x = torch.randint(0, 256, (2, 8, 6, 6), dtype=torch.uint8)
    w = torch.randint(-128, 128, (4, 8, 3, 3), dtype=torch.int8)
    ws = torch.rand(4)
    sc, zp = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    op = torch.ops.pycompress.int8_conv2d

    def call(**over):
        a = dict(x=x, x_scale=sc, x_zero_point=zp, w=w, w_scale=ws, bias=None, w_packed=None, stride=[1, 1],
                 padding=[0, 0], dilation=[1, 1], groups=1, activation="none", out_dtype=None, out_scale=1.0,
                 out_zero_point=0)
        a.update(over)
        return op(*a.values())

    call()
    for over, match in [
        (dict(x=x[0]), "x must be 4-D"),
        (dict(x=x.int()), "x must be uint8, int8"),
        (dict(w=w.float()), "w must be int8"),
        (dict(w=w[:, :3]), "channels"),
        (dict(groups=3, w=w[:3, :4]), "must divide"),
        (dict(dilation=[3, 3]), "output would be empty"),
        (dict(stride=[0, 1]), "stride values must be >= 1"),
        (dict(padding=[-1, 0]), "padding values must be >= 0"),
        (dict(w_scale=torch.rand(3)), "w_scale must have shape"),
        (dict(w_scale=ws * float("nan")), "w_scale must be finite"),
        (dict(bias=torch.rand(5)), "bias must have shape"),
        (dict(activation="tanh"), "unknown activation"),
        (dict(out_dtype=torch.int32), "out_dtype must be"),
        (dict(out_dtype=torch.uint8, out_scale=-1.0), "out_scale must be finite"),
        (dict(out_dtype=torch.uint8, out_zero_point=300), "out_zero_point must lie"),
        (dict(x_scale=None), "needs x_scale and x_zero_point"),
        (dict(x_scale=torch.ones(2, 1)), "x_scale must have shape"),
        (dict(x_zero_point=zp.float()), "x_zero_point must be Int"),
        (dict(x_zero_point=zp + 256), "x_zero_point must lie"),
        (dict(x_scale=sc * float("inf")), "x_scale must be finite"),
        (dict(w_packed=torch.zeros(3, dtype=torch.int8)), "w_packed must be"),
        (dict(x=x.float(), x_scale=sc * 0), "x_scale must be > 0"),
    ]:
        with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
            call(**over)
    with pytest.raises(RuntimeError, match="w must be 4-D"):
        torch.ops.pycompress.int8_conv2d_pack_weight(w[0], 1)
    with pytest.raises(RuntimeError, match="must divide"):
        torch.ops.pycompress.int8_conv2d_pack_weight(w, 3)


def test_fake_kernel_and_opcheck(conv_op_args):
    args = conv_op_args
    w = args[3]
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default, args)
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default,
                          args[:12] + (torch.uint8, 0.25, 3))
    xf = torch.randn(2, 6, 7, 5)
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default,
                          (xf, None, None) + args[3:12] + (torch.bfloat16, 1.0, 0))
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d_pack_weight.default, (w, 2))
    dw = torch.randint(-128, 128, (6, 1, 3, 3), dtype=torch.int8)
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d_pack_weight.default, (dw, 6))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(3, 6, 9, 9, dtype=torch.int8)
        fw = torch.empty(12, 6, 3, 3, dtype=torch.int8)
        y = torch.ops.pycompress.int8_conv2d(fx, torch.ones(1), torch.zeros(1, dtype=torch.int32), fw,
                                             torch.ones(12), None, None, [2, 2], [1, 1], [1, 1], 1, "none",
                                             torch.int8, 0.5, 0)
        assert y.shape == (3, 12, 5, 5) and y.dtype == torch.int8
        assert y.is_contiguous(memory_format=torch.channels_last)
        p = torch.ops.pycompress.int8_conv2d_pack_weight(fw, 1)
        assert p.shape == (ops.int8_conv2d_packed_bytes(12, 6, 3, 3, 1),)


def test_torch_compile():
    w, ws = make_weight(16, 8, (3, 3))
    dw, dws = make_weight(16, 1, (3, 3))
    packed = ops.int8_conv2d_pack_weight(w)

    def f(x):
        y = ops.int8_conv2d(x, w, ws, w_packed=packed, padding=1, activation="relu", out_dtype=torch.uint8,
                            out_scale=0.05, out_zero_point=0)
        return ops.int8_conv2d(y, dw, dws, x_scale=torch.tensor([0.05]), x_zero_point=torch.tensor([0], dtype=torch.int32),
                               padding=1, groups=16)

    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


def test_pack_weight_of_other_groups_rejected():
    w, ws = make_weight(8, 4, (3, 3))
    x = torch.randn(1, 8, 5, 5)
    packed1 = ops.int8_conv2d_pack_weight(w, 1)
    with pytest.raises(ValueError, match="w_packed must be"):
        ops.int8_conv2d(x, w[:, :2].contiguous(), ws, w_packed=packed1, groups=4)


@pytest.mark.skipif("amx" not in _ext.cpu_isas(), reason="this CPU or OS does not allow AMX-INT8")
def test_amx_same_bits_as_avx512():
    x, scale, zp = make_input("uint8", 2, 64, 13, 13)
    w, ws = make_weight(72, 64, (3, 3))
    prev = pycompress.active_cpu_isa()
    try:
        outs = []
        for isa in ("avx512", "amx"):
            pycompress.set_cpu_isa(isa)
            outs.append(ops.int8_conv2d(x, w, ws, x_scale=scale, x_zero_point=zp, padding=1))
        assert torch.equal(outs[0], outs[1])
    finally:
        pycompress.set_cpu_isa(prev)


def test_dynamic_quantization_halfway_values(cpu_isa):
    # values at and next to the halfway points between quantization steps: where x * (1 / s) and
    # x / s round differently, the kernel must give the rounding of x / s
    lo, hi = -1.7, 3.1
    s = (torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)) / 255
    j = torch.arange(-88, 162, dtype=torch.float32)  # every value inside [lo, hi]
    mid = (j + 0.5) * s
    vals = torch.cat([mid, torch.nextafter(mid, torch.tensor(float("inf"))), torch.nextafter(mid, torch.tensor(-float("inf"))),
                      j * s, torch.tensor([lo, hi])])
    n = vals.numel() // 8 * 8
    x = vals[:n].reshape(1, 8, n // 8, 1).repeat(1, 1, 1, 3)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = lo, hi
    q, sc, zp = conv2d_quantize_ref(x)
    assert torch.equal(sc, s.reshape(1))
    w = torch.zeros(8, 1, 1, 1, dtype=torch.int8)
    w[:, 0, 0, 0] = 1
    y = ops.int8_conv2d(x, w, torch.ones(8), groups=8)  # depthwise 1x1: y = (q - zp) * s
    assert_same(y, conv2d_ref(x, w, torch.ones(8), groups=8))
    wd = torch.eye(8, dtype=torch.int8).reshape(8, 8, 1, 1)
    assert_same(ops.int8_conv2d(x, wd, torch.ones(8)), conv2d_ref(x, wd, torch.ones(8)))


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int8])
def test_requantized_nan_and_huge_values_saturate(out_dtype, cpu_isa):
    # a NaN bias gives the low end of the range on every path; huge values saturate
    x = torch.randint(0, 256, (1, 4, 5, 5), dtype=torch.uint8)
    w = torch.randint(-128, 128, (20, 4, 3, 3), dtype=torch.int8)
    bias = torch.zeros(20)
    bias[3], bias[5], bias[7] = float("nan"), 3e38, -3e38
    y = ops.int8_conv2d(x, w, torch.full((20,), 1e-3), bias, x_scale=torch.ones(1),
                        x_zero_point=torch.zeros(1, dtype=torch.int32), padding=1, out_dtype=out_dtype,
                        out_scale=1e-3, out_zero_point=1)
    info = torch.iinfo(out_dtype)
    assert (y[:, 3] == info.min).all() and (y[:, 5] == info.max).all() and (y[:, 7] == info.min).all()


# Depthwise shapes that reach each part of the direct kernels: two output rows per task (an odd
# number of rows leaves a single last one), rows cut into several segments, blocks of 64 channels
# with a tail, the 3x3 / 5x5 kernels and the general one, strides and dilations apart in x and y,
# blocks of 4 pixels with a remainder, border and interior columns.
DW_CASES = [
    # (n, c, h, w, k, stride, padding, dilation)
    (2, 80, 7, 53, (3, 3), 1, 1, 1),              # two segments, odd rows, 64 + 16 channels
    (1, 200, 9, 100, (3, 3), 1, 1, 1),            # three segments, C % 16 == 8
    (3, 16, 5, 6, (5, 5), 1, 2, 1),               # 5x5, batch 3, rows in one segment
    (1, 24, 13, 123, (5, 5), 2, 2, 1),            # 5x5 stride 2, two segments
    (2, 96, 17, 17, (3, 3), 2, 1, 1),             # 3x3 stride 2
    (1, 33, 10, 11, (7, 7), 1, 3, 1),             # general kernel, two quads
    (1, 20, 9, 9, (4, 4), 1, 1, 1),               # kh a multiple of 4: one row per task
    (2, 40, 12, 12, (3, 5), (1, 2), (1, 2), 1),   # asymmetric kernel, stride and padding
    (1, 48, 11, 13, (3, 3), (2, 1), 1, (1, 2)),   # stride in y only, dilation in x only
    (1, 32, 9, 9, (3, 3), 1, 2, 2),               # dilation 2
    (1, 17, 6, 7, (1, 1), 1, 0, 1),               # 1x1
    (1, 64, 3, 3, (3, 3), 1, 0, 1),               # one output pixel
    (1, 16, 4, 30, (3, 3), 1, 5, 1),              # rows and columns entirely in the padding
]


@pytest.mark.parametrize("case", DW_CASES, ids=[f"dw{i}" for i in range(len(DW_CASES))])
@pytest.mark.parametrize("kind", ["uint8", "int8"])
def test_depthwise_kernels_exact(case, kind, cpu_isa):
    n, c, h, w_, k, s, p, d = case
    x, scale, zp = make_input(kind, n, c, h, w_)
    w, ws = make_weight(c, 1, k)
    bias = torch.randn(c)
    kw = dict(x_scale=scale, x_zero_point=zp, stride=s, padding=p, dilation=d, groups=c)
    assert_same(ops.int8_conv2d(x, w, ws, bias, **kw), conv2d_ref(x, w, ws, bias, **kw))
    kw.update(activation="relu6", out_dtype=torch.uint8, out_scale=0.05, out_zero_point=3)
    assert_same(ops.int8_conv2d(x, w, ws, bias, **kw), conv2d_ref(x, w, ws, bias, **kw))


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("kind", ["uint8", "int8"])
def test_depthwise_extreme_sums_exact(k, kind, cpu_isa):
    # every tap at the end of the input range times -128: the largest sums the kernels form
    # (int16 pairs, vpdpbusd quads) must not saturate
    c = 40
    fill = 255 if kind == "uint8" else -128
    x = torch.full((2, c, 9, 9), fill, dtype=torch.uint8 if kind == "uint8" else torch.int8)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.full((c, 1, k, k), -128, dtype=torch.int8)
    w[1::2] = 127
    ws = torch.full((c,), 1e-3)
    zp = torch.tensor([0 if kind == "uint8" else 127], dtype=torch.int32)
    kw = dict(x_scale=torch.tensor([1.0]), x_zero_point=zp, padding=k // 2, groups=c)
    assert_same(ops.int8_conv2d(x, w, ws, **kw), conv2d_ref(x, w, ws, **kw))


def test_depthwise_threads_agree():
    # few rows per thread: the tasks also split the channels
    prev = torch.get_num_threads()
    try:
        for n, c, hw in [(1, 200, 7), (3, 96, 7), (1, 40, 14)]:
            x, scale, zp = make_input("uint8", n, c, hw, hw)
            w, ws = make_weight(c, 1, (3, 3))
            kw = dict(x_scale=scale, x_zero_point=zp, padding=1, groups=c)
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(ops.int8_conv2d(x, w, ws, **kw))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
            assert_same(outs[0], conv2d_ref(x, w, ws, **kw))
    finally:
        torch.set_num_threads(prev)
