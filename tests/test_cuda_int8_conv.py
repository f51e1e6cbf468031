"""CUDA int8 convolution (pycompress::int8_conv2d) against the CPU op and an exact reference.

The CUDA kernels (csrc/int8/cuda/conv.cu) promise the CPU kernels' bits for the activations none,
relu and relu6, and agreement within a few fp32 ulps (one quantization step for uint8/int8
outputs) for silu and hardswish. The shapes cover both CUDA paths and their edges: the tensor-core
implicit GEMM (channels padded to 16 or read in place, Cout and pixel tails, many K tiles, tiles
spanning two images, groups) and the direct kernel (depthwise 3x3 / 5x5, strides, dilations,
channel multipliers, narrow groups, few output channels), with every input kind (uint8 and int8
with per-image or shared zero points, float inputs quantized dynamically or with given
parameters) and every output kind.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycompress.ops  # noqa: F401  (fake kernels of the pycompress ops)

pytestmark = pytest.mark.cuda
DEV = "cuda"
P = torch.ops.pycompress

ACTS = ["none", "relu", "relu6", "silu", "hardswish"]
EXACT_ACTS = ("none", "relu", "relu6")

# name: (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, groups)
SHAPES = {
    "stem3x3s2": (2, 3, 17, 19, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1),  # GEMM, Cin 3 padded to 16
    "3x3": (1, 32, 9, 11, 48, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # GEMM, x read in place
    "1x1_c24": (3, 24, 8, 7, 40, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # GEMM, Cin 24 padded to 32
    "dilated_tail": (2, 16, 10, 10, 70, (3, 3), (1, 1), (2, 2), (2, 2), 1),  # Cout tail past 64
    "deep_k": (1, 256, 6, 5, 80, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 36 K tiles
    "many_pixels": (2, 16, 23, 21, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # tiles across images
    "grouped_gemm": (1, 64, 12, 12, 64, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    "grouped_direct": (2, 8, 7, 9, 12, (3, 3), (1, 1), (1, 1), (1, 1), 4),
    "depthwise3x3": (2, 13, 11, 10, 13, (3, 3), (1, 1), (1, 1), (1, 1), 13),
    "depthwise5x5s2": (1, 20, 15, 14, 20, (5, 5), (2, 2), (2, 2), (1, 1), 20),
    "depthwise_dilated": (1, 8, 9, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2), 8),
    "depthwise_mult2": (1, 6, 6, 5, 12, (3, 3), (1, 1), (1, 1), (1, 1), 6),
    "asym_direct": (2, 5, 7, 6, 7, (2, 3), (2, 1), (0, 2), (1, 2), 1),  # Cout < 16: direct
    "asym_gemm": (1, 12, 9, 13, 20, (3, 2), (1, 2), (2, 0), (2, 1), 1),
    "mostly_padding": (1, 16, 1, 1, 16, (3, 3), (1, 1), (2, 2), (1, 1), 1),
}
KINDS = ["u8", "u8_shared", "s8", "f32", "f16", "bf16", "f32_static"]


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_problem(shape, kind, key, bias=True):
    """CPU tensors (x, x_scale, x_zero_point, w, w_scale, bias) for `shape`; x is channels_last."""
    N, C, H, W, Cout, (kh, kw), _, _, _, groups = shape
    g = gen(key, kind)
    xs = xzp = None
    if kind in ("u8", "u8_shared"):
        x = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g)
        n = 1 if kind == "u8_shared" else N
        xzp = torch.randint(0, 256, (n,), dtype=torch.int32, generator=g)
        xs = torch.rand(n, generator=g) * 0.02 + 1e-3
    elif kind == "s8":
        x = torch.randint(-128, 128, (N, C, H, W), dtype=torch.int8, generator=g)
        xzp = torch.randint(-128, 128, (N,), dtype=torch.int32, generator=g)
        xs = torch.rand(N, generator=g) * 0.02 + 1e-3
    else:
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                 "f32_static": torch.float32}[kind]
        x = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype)
        if kind == "f32_static":
            xs = torch.rand(N, generator=g) * 0.02 + 0.01
            xzp = torch.randint(0, 256, (N,), dtype=torch.int32, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (Cout, C // groups, kh, kw), dtype=torch.int8, generator=g)
    ws = torch.rand(Cout, generator=g) * 0.01 + 1e-3
    b = torch.randn(Cout, generator=g) if bias else None
    return x, xs, xzp, w, ws, b


def run(x, xs, xzp, w, ws, b, shape, device, act="none", out_dtype=None, out_scale=1.0, out_zp=0,
        w_packed=None):
    """int8_conv2d with every tensor moved to `device` (x keeps its strides)."""
    _, _, _, _, _, _, stride, padding, dilation, groups = shape
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return P.int8_conv2d(mv(x), mv(xs), mv(xzp), mv(w), mv(ws), mv(b), mv(w_packed), list(stride),
                         list(padding), list(dilation), groups, act, out_dtype, out_scale, out_zp)


def out_size(shape):
    N, _, H, W, Cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), _ = shape
    return (N, Cout, (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def check_output(y, shape, dtype):
    assert y.device.type == "cuda", f"result on {y.device}"
    assert y.dtype == dtype
    assert tuple(y.shape) == out_size(shape)
    assert y.is_contiguous(memory_format=torch.channels_last)


def exact(actual, expected):
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)


def agree(actual, expected, act):
    """Exact for none / relu / relu6; within a few fp32 ulps or one output ulp / quantization step
    for silu and hardswish (expf differs by an ulp or two between the devices)."""
    a, e = actual.cpu(), expected.cpu()
    if act in EXACT_ACTS:
        exact(a, e)
    elif e.dtype in (torch.uint8, torch.int8):
        assert (a.int() - e.int()).abs().max().item() <= 1
    else:
        rtol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[e.dtype]
        scale = max(1.0, e.float().abs().max().item())
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=rtol * 1e-3 * scale)


def conv_ref(x, xs, xzp, w, ws, b, shape):
    """Exact reference for quantized x, activation none, float32 out: the accumulator in float64
    (integers below 2^53: every sum is exact), the epilogue in the kernels' fp32 order."""
    N, _, _, _, _, _, stride, padding, dilation, groups = shape
    zp = xzp.double().expand(N).view(N, 1, 1, 1)
    # padding positions hold the zero point, i.e. x - zp = 0: F.conv2d's zero padding
    acc = F.conv2d(x.double() - zp, w.double(), None, stride, padding, dilation, groups)
    y = (acc.float() * xs.expand(N).view(N, 1, 1, 1)) * ws.view(1, -1, 1, 1)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y


# ============================================================================ against the CPU op
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_int8_conv2d_matches_cpu(name, kind):
    shape = SHAPES[name]
    args = make_problem(shape, kind, name)
    act = "relu" if list(SHAPES).index(name) % 2 else "none"
    y = run(*args, shape, DEV, act=act)
    expected_dtype = torch.float32 if kind in ("u8", "u8_shared", "s8") else args[0].dtype
    check_output(y, shape, expected_dtype)
    exact(y, run(*args, shape, "cpu", act=act))


@pytest.mark.parametrize("kind", ["u8", "u8_shared", "s8"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_int8_conv2d_matches_exact_reference(name, kind):
    shape = SHAPES[name]
    args = make_problem(shape, kind, ("ref", name), bias=kind != "u8_shared")
    y = run(*args, shape, DEV)
    check_output(y, shape, torch.float32)
    exact(y, conv_ref(*args, shape))


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16, torch.uint8, torch.int8])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", ["3x3", "depthwise3x3"])
def test_int8_conv2d_epilogues(name, act, out_dtype):
    shape = SHAPES[name]
    args = make_problem(shape, "u8", ("epilogue", name))
    if out_dtype in (torch.uint8, torch.int8):
        # an output scale that uses the whole range and clamps the largest values
        yf = run(*args, shape, "cpu", act=act)
        out_scale = max(yf.abs().max().item(), 1e-3) / 300
        out_zp = 37 if out_dtype == torch.uint8 else -5
    else:
        out_scale, out_zp = 1.0, 0
    y = run(*args, shape, DEV, act=act, out_dtype=out_dtype, out_scale=out_scale, out_zp=out_zp)
    check_output(y, shape, out_dtype or torch.float32)
    ref = run(*args, shape, "cpu", act=act, out_dtype=out_dtype, out_scale=out_scale, out_zp=out_zp)
    agree(y, ref, act)
    if out_dtype in (torch.uint8, torch.int8) and act == "none":
        lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
        yi = y.cpu().int()
        assert ((yi == lo) | (yi == hi)).any()  # the largest |y| maps to +-300 steps: clamped


@pytest.mark.parametrize("act", ["relu6", "silu", "hardswish"])
@pytest.mark.parametrize("kind", ["s8", "f16", "f32_static"])
def test_int8_conv2d_requantized_from_every_input_kind(kind, act):
    shape = SHAPES["asym_gemm"]
    args = make_problem(shape, kind, "requant")
    for out_dtype, out_zp in ((torch.int8, 3), (torch.uint8, 128)):
        y = run(*args, shape, DEV, act=act, out_dtype=out_dtype, out_scale=0.05, out_zp=out_zp)
        check_output(y, shape, out_dtype)
        agree(y, run(*args, shape, "cpu", act=act, out_dtype=out_dtype, out_scale=0.05, out_zp=out_zp), act)


# ============================================================================ layouts of x
def layouts(x):
    """The same values on the GPU in other memory layouts: NCHW, a channel slice of a wider
    channels_last tensor, a misaligned start, and a spatially strided view."""
    xd = x.to(DEV)
    N, C, H, W = x.shape
    wide = torch.zeros(N, C + 3, H, W, dtype=x.dtype, device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 1:C + 1] = xd
    buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=DEV)
    mis = buf[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    mis.copy_(xd)
    big = torch.zeros(N, C, 2 * H, 2 * W, dtype=x.dtype, device=DEV)
    big[:, :, ::2, ::2] = xd
    return {"nchw": xd.contiguous(), "channel_slice": wide[:, 1:C + 1], "misaligned": mis,
            "spatial_stride": big[:, :, ::2, ::2]}


@pytest.mark.parametrize("kind", ["u8", "s8", "f32", "bf16"])
@pytest.mark.parametrize("name", ["3x3", "grouped_gemm", "depthwise3x3", "grouped_direct"])
def test_int8_conv2d_any_layout_of_x(name, kind):
    shape = SHAPES[name]
    x, *rest = make_problem(shape, kind, ("layout", name))
    ref = run(x, *rest, shape, "cpu", act="relu6")
    for label, xd in layouts(x).items():
        torch.testing.assert_close(xd.cpu(), x, rtol=0, atol=0, msg=label)
        y = run(xd, *rest, shape, DEV, act="relu6")
        exact(y, ref)


# ============================================================================ special values
def test_int8_conv2d_accumulator_extremes_are_exact():
    # |acc| up to K * 255 * 128 with K = 3 * 3 * 512: no saturation, no loss
    shape = (1, 512, 4, 4, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    w = torch.full((32, 512, 3, 3), -128, dtype=torch.int8)
    w[16:] = 127
    ws, one = torch.ones(32), torch.ones(1)
    for x, zp in ((torch.full((1, 512, 4, 4), 255, dtype=torch.uint8), 0),
                  (torch.zeros(1, 512, 4, 4, dtype=torch.uint8), 255),
                  (torch.full((1, 512, 4, 4), -128, dtype=torch.int8), 127)):
        x = x.contiguous(memory_format=torch.channels_last)
        xzp = torch.tensor([zp], dtype=torch.int32)
        y = run(x, one, xzp, w, ws, None, shape, DEV)
        exact(y, conv_ref(x, one, xzp, w, ws, None, shape))
        exact(y, run(x, one, xzp, w, ws, None, shape, "cpu"))
        centre = (int(x.flatten()[0]) - zp) * 9 * 512
        assert y[0, 0, 1, 1].item() == centre * -128 and y[0, 31, 1, 1].item() == centre * 127


@pytest.mark.parametrize("fill", ["zeros", "positive", "negative"])
def test_int8_conv2d_dynamic_quantization_edges(fill):
    shape = SHAPES["3x3"]
    x, _, _, w, ws, b = make_problem(shape, "f32", ("dyn", fill))
    x = {"zeros": torch.zeros_like(x), "positive": x.abs() + 0.25, "negative": -x.abs() - 0.25}[fill]
    x = x.contiguous(memory_format=torch.channels_last)
    y = run(x, None, None, w, ws, b, shape, DEV)
    exact(y, run(x, None, None, w, ws, b, shape, "cpu"))
    if fill == "zeros":  # scale 1, zero point 0: every output is the bias
        exact(y, b.view(1, -1, 1, 1).expand_as(y.cpu()))


@pytest.mark.parametrize("kind", ["u8", "f32"])
def test_int8_conv2d_empty_batch(kind):
    shape = (0, 16, 5, 5, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, xs, xzp, w, ws, b = make_problem(shape, kind, "empty")
    if kind == "u8":
        xs, xzp = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    y = run(x, xs, xzp, w, ws, b, shape, DEV, act="silu")
    check_output(y, shape, torch.float32)
    assert y.numel() == 0


def test_int8_conv2d_pack_weight_on_cuda_and_w_packed_is_ignored():
    for name in ("3x3", "grouped_gemm", "depthwise5x5s2"):
        shape = SHAPES[name]
        x, xs, xzp, w, ws, b = make_problem(shape, "u8", ("pack", name))
        groups = shape[-1]
        packed = P.int8_conv2d_pack_weight(w.to(DEV), groups)
        assert packed.device.type == "cuda"
        exact(packed, P.int8_conv2d_pack_weight(w, groups))  # the CPU layout, on w's device
        y = run(x, xs, xzp, w, ws, b, shape, DEV, w_packed=packed)
        exact(y, run(x, xs, xzp, w, ws, b, shape, DEV))
        exact(y, run(x, xs, xzp, w, ws, b, shape, "cpu", w_packed=P.int8_conv2d_pack_weight(w, groups)))


def test_int8_conv2d_in_a_cuda_graph():
    # the value checks need the host and are skipped while a graph is captured; replays compute
    shape = SHAPES["grouped_gemm"]
    x, xs, xzp, w, ws, b = (t.to(DEV) for t in make_problem(shape, "u8", "graph"))
    call = lambda: run(x, xs, xzp, w, ws, b, shape, DEV, act="relu")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    x.copy_(torch.randint_like(x, 0, 256))
    graph.replay()
    torch.cuda.synchronize()
    exact(y, run(x.cpu(), xs, xzp, w, ws, b, shape, "cpu", act="relu"))


def test_int8_conv2d_opcheck():
    for name, kind in (("asym_gemm", "u8"), ("depthwise3x3", "f32"), ("grouped_direct", "s8")):
        shape = SHAPES[name]
        x, xs, xzp, w, ws, b = (None if t is None else t.to(DEV) for t in make_problem(shape, kind, "opcheck"))
        _, _, _, _, _, _, stride, padding, dilation, groups = shape
        torch.library.opcheck(P.int8_conv2d.default,
                              (x, xs, xzp, w, ws, b, None, list(stride), list(padding), list(dilation),
                               groups, "relu", None, 1.0, 0))
    torch.library.opcheck(P.int8_conv2d_pack_weight.default,
                          (torch.randint(-128, 128, (8, 3, 3, 3), dtype=torch.int8, device=DEV), 1))


# ============================================================================ Int8Conv2d
def test_int8conv2d_module_on_cuda_matches_cpu():
    from pycompress.nn import Int8Conv2d

    g = gen("module")
    convs = [
        (nn.Conv2d(3, 16, 3, stride=2, padding=1), "relu", None, None),
        (nn.Conv2d(16, 16, 3, padding=1, groups=16), "relu6", (0.05, 0), (0.04, 3)),
        (nn.Conv2d(16, 24, 1), "none", (0.04, 3), None),
        (nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=2, bias=False), "hardswish", None, None),
    ]
    x = torch.randn(2, 3, 15, 13, generator=g)
    for conv, act, inq, outq in convs:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        m = Int8Conv2d.from_float(conv, activation=act, input_quantization=inq, output_quantization=outq).eval()
        md = copy.deepcopy(m).to(DEV)
        xin = x if conv.in_channels == 3 else torch.randn(2, conv.in_channels, 9, 10, generator=g)
        with torch.no_grad():
            agree(md(xin.to(DEV)), m(xin), act)
    # a uint8 chain: the requantized output of one layer is the next layer's quantized input
    a = Int8Conv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "relu", (0.05, 0), (0.03, 0)).eval()
    b = Int8Conv2d.from_float(nn.Conv2d(16, 16, 3, padding=1, groups=16), "relu6", (0.03, 0), None).eval()
    ad, bd = copy.deepcopy(a).to(DEV), copy.deepcopy(b).to(DEV)
    xin = torch.rand(3, 8, 11, 12, generator=g)
    with torch.no_grad():
        q = ad(xin.to(DEV))
        assert q.dtype == torch.uint8 and q.device.type == "cuda"
        exact(q, a(xin))
        exact(bd(q), b(a(xin)))


# ============================================================================ bad input
# (the message fragment each error must contain, how the good arguments are changed)
def _nan_x(p):
    x = make_problem(p["shape"], "f32", "bad")[0].clone()
    x[0, 3, 2, 2] = float("nan")
    p.update(x=x, xs=None, xzp=None)


def _inf_w_scale(p):
    ws = p["ws"].clone()
    ws[5] = float("inf")
    p.update(ws=ws)


BAD_INPUTS = [
    ("4-D", lambda p: p.update(x=p["x"][0])),
    ("x must be uint8, int8, float32", lambda p: p.update(x=p["x"].int())),
    ("w must be int8", lambda p: p.update(w=p["w"].float())),
    ("channels", lambda p: p.update(w=p["w"][:, :16])),
    ("groups", lambda p: p.update(shape=p["shape"][:-1] + (5,))),
    ("output would be empty", lambda p: p.update(shape=(1, 32, 9, 11, 48, (3, 3), (1, 1), (0, 0), (5, 5), 1))),
    ("x_scale must have shape", lambda p: p.update(xs=torch.ones(2))),
    ("needs x_scale and x_zero_point", lambda p: p.update(xs=None, xzp=None)),
    ("x_scale must be > 0", lambda p: p.update(x=make_problem(p["shape"], "f32", "bad")[0], xs=torch.zeros(1),
                                               xzp=torch.zeros(1, dtype=torch.int32))),
    ("x_zero_point must be Int", lambda p: p.update(xzp=p["xzp"].long())),
    ("x_zero_point must lie in", lambda p: p.update(xzp=torch.tensor([256], dtype=torch.int32))),
    ("w_scale must be finite", _inf_w_scale),
    ("w_scale must have shape", lambda p: p.update(ws=p["ws"][:-1])),
    ("x holds NaN or infinite values", _nan_x),
    ("unknown activation", lambda p: p.update(act="gelu")),
    ("out_dtype must be", lambda p: p.update(out_dtype=torch.int32)),
    ("out_scale must be finite and > 0", lambda p: p.update(out_dtype=torch.uint8, out_scale=0.0)),
    ("out_zero_point must lie in", lambda p: p.update(out_dtype=torch.int8, out_scale=0.1, out_zp=128)),
    ("one device", lambda p: p.update(w_device="cpu")),
]


@pytest.mark.parametrize("match,change", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_int8_conv2d_bad_input(match, change):
    shape = SHAPES["3x3"]
    x, xs, xzp, w, ws, b = make_problem(shape, "u8", "bad")
    p = dict(x=x, xs=xs, xzp=xzp, w=w, ws=ws, b=b, shape=shape, act="none", out_dtype=None, out_scale=1.0,
             out_zp=0, w_device=DEV)
    change(p)
    _, _, _, _, _, _, stride, padding, dilation, groups = p["shape"]
    mv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        P.int8_conv2d(mv(p["x"]), mv(p["xs"]), mv(p["xzp"]), p["w"].to(p["w_device"]), mv(p["ws"]), mv(p["b"]),
                      None, list(stride), list(padding), list(dilation), groups, p["act"], p["out_dtype"],
                      p["out_scale"], p["out_zp"])


# ============================================================================ fused residual
@pytest.mark.parametrize("res_kind", ["u8", "s8", "f32", "bf16"])
@pytest.mark.parametrize("name", ["3x3", "dilated_tail", "grouped_gemm", "grouped_direct", "depthwise3x3",
                                  "depthwise5x5s2"])
def test_int8_conv2d_residual_matches_cpu(name, res_kind):
    """y = y + r before the activation: the CPU op's bits (none / relu / relu6), for both CUDA
    paths, quantized and float residuals, NCHW and channels_last residual layouts."""
    shape = SHAPES[name]
    args = make_problem(shape, "u8", ("residual", name, res_kind))
    g = gen("residual", name, res_kind)
    size = out_size(shape)
    mag = max(run(*args, shape, "cpu").abs().max().item(), 1e-3)
    if res_kind in ("u8", "s8"):
        lo, hi = (0, 256) if res_kind == "u8" else (-128, 128)
        dtype = torch.uint8 if res_kind == "u8" else torch.int8
        res = torch.randint(lo, hi, size, dtype=dtype, generator=g)
        rs, rzp = mag / 128, int(torch.randint(lo, hi, (), generator=g))
    else:
        res = (torch.randn(size, generator=g) * mag).to(torch.float32 if res_kind == "f32" else torch.bfloat16)
        rs, rzp = 1.0, 0
    _, _, _, _, _, _, stride, padding, dilation, groups = shape
    mv = lambda t, d: None if t is None else t.to(d)  # noqa: E731
    for i, (act, out_dtype) in enumerate([("none", None), ("relu", torch.uint8), ("relu6", torch.float16),
                                          ("silu", torch.int8)]):
        r = res if i % 2 else res.contiguous(memory_format=torch.channels_last)
        out_scale, out_zp = (mag / 100, 5) if out_dtype in (torch.uint8, torch.int8) else (1.0, 0)
        ys = [P.int8_conv2d(*(mv(t, d) for t in args[:6]), None, list(stride), list(padding), list(dilation), groups,
                            act, out_dtype, out_scale, out_zp, r.to(d), rs, rzp) for d in (DEV, "cpu")]
        check_output(ys[0], shape, out_dtype or torch.float32)
        agree(ys[0], ys[1], act)


def test_int8_conv2d_residual_bad_input():
    shape = SHAPES["3x3"]
    x, xs, xzp, w, ws, b = make_problem(shape, "u8", "bad_residual")
    _, _, _, _, _, _, stride, padding, dilation, groups = shape
    size = out_size(shape)
    u8 = torch.zeros(size, dtype=torch.uint8, device=DEV)

    def call(res, rs=1.0, rzp=0):
        return P.int8_conv2d(x.to(DEV), xs.to(DEV), xzp.to(DEV), w.to(DEV), ws.to(DEV), b.to(DEV), None,
                             list(stride), list(padding), list(dilation), groups, "relu", None, 1.0, 0, res, rs, rzp)

    with pytest.raises(ValueError, match="residual must have the output's shape"):
        call(u8[:, :, 1:])
    with pytest.raises(TypeError, match="residual must be"):
        call(u8.int())
    with pytest.raises(ValueError, match="residual_scale"):
        call(u8, rs=0.0)
    with pytest.raises(ValueError, match="residual_scale"):
        call(u8, rs=float("inf"))
    with pytest.raises(ValueError, match="residual_zero_point"):
        call(u8, rzp=256)
    with pytest.raises(ValueError, match="residual_zero_point"):
        call(u8.to(torch.int8), rzp=-129)
    with pytest.raises(ValueError, match="residual must be on x's device"):
        call(u8.cpu())


def test_quantized_resnet_with_fused_residual_blocks_on_cuda_matches_cpu():
    """A quantized ResNet whose convs compute the residual additions (uint8 shortcuts), moved to
    CUDA: the same bits as on the CPU (every activation is relu / none)."""
    import pycompress
    import cnn_models as cm

    model = cm.resnet().eval()
    calib = [cm.images(4, seed=s) for s in (2, 3)]
    q, res = pycompress.quantize(copy.deepcopy(model), calibration_data=calib, return_result=True)
    assert res.residual_blocks and res.uint8_residual_edges
    x = cm.images(3, seed=5)
    with torch.no_grad():
        want = q(x)
        got = copy.deepcopy(q).to(DEV)(x.to(DEV))
        # the convs (uint8 up to the last block) are exact; the float pooling and the int8 head
        # may round differently on the GPU
        blocks = copy.deepcopy(q).to(DEV)
        feats = {}
        blocks.layer3.register_forward_hook(lambda m, a, o: feats.__setitem__("gpu", o))
        q.layer3.register_forward_hook(lambda m, a, o: feats.__setitem__("cpu", o))
        blocks(x.to(DEV))
        q(x)
    exact(feats["gpu"], feats["cpu"])
    assert F.cosine_similarity(got.cpu().double(), want.double(), dim=1).min() > 0.9999
