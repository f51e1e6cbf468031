"""int8 GEMM ops: bit-exact against int64 references on every device and CPU code path."""

from __future__ import annotations

import pytest
import torch

import pycompress.ops as ops
from reference import linear_ref, quantize_per_token_ref

GEMM_SHAPES = [  # (M, K, N)
    (1, 1, 1), (1, 67, 129), (0, 5, 7), (5, 1, 3), (6, 4, 16), (7, 3, 17), (17, 67, 129),
    (13, 100, 33), (64, 300, 100), (1, 4096, 40), (130, 257, 48),
    (70, 4500, 40),  # K split into blocks of 2048 (partial sums through the workspace)
]


def gemm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().long() @ b.cpu().long().t()).to(torch.int32)


def rand_i8(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8).to(device)


@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_gemm_exact(shape, device, cpu_isa):
    M, K, N = shape
    a, b = rand_i8(M, K, device=device), rand_i8(N, K, device=device)
    c = ops.int8_gemm(a, b)
    assert c.dtype == torch.int32 and c.shape == (M, N) and c.device == a.device
    torch.testing.assert_close(c.cpu(), gemm_ref(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("K", [1, 67, 1000, 4099])
def test_gemm_extremes_no_saturation(K, device, cpu_isa):
    a = torch.full((7 if K < 4000 else 70, K), -128, dtype=torch.int8, device=device)
    b = torch.full((19, K), -128, dtype=torch.int8, device=device)
    b[1] = 127
    b[2, ::2] = 127  # mixed signs inside a k group
    c = ops.int8_gemm(a, b).cpu()
    torch.testing.assert_close(c, gemm_ref(a, b), rtol=0, atol=0)
    assert c[0, 0].item() == 16384 * K


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 67, 129), (2, 100, 33), (1, 4096, 40), (2, 40001, 20)])
def test_gemm_small_m_weights_without_min(shape, device, cpu_isa):
    # weights in [-127, 127] (what Int8Linear stores), activations with -128
    M, K, N = shape
    a = rand_i8(M, K, device=device)
    a[0, 0] = -128
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8).to(device)
    torch.testing.assert_close(ops.int8_gemm(a, b).cpu(), gemm_ref(a, b), rtol=0, atol=0)
    a.fill_(-128)
    b.fill_(-127)
    torch.testing.assert_close(ops.int8_gemm(a, b).cpu(), gemm_ref(a, b), rtol=0, atol=0)


def test_gemm_noncontiguous(device, cpu_isa):
    a = rand_i8(40, 70, device=device)[:, 3:68]  # row stride 70 > K = 65
    b = rand_i8(65, 33, device=device).t()  # column-major [33, 65]
    c = ops.int8_gemm(a, b)
    torch.testing.assert_close(c.cpu(), gemm_ref(a, b), rtol=0, atol=0)
    a2 = a[::2]  # every other row
    torch.testing.assert_close(ops.int8_gemm(a2, b).cpu(), gemm_ref(a2, b), rtol=0, atol=0)


@pytest.mark.cuda
def test_gemm_cpu_cuda_same_integers():
    from conftest import CUDA_OK, CUDA_WHY

    if not CUDA_OK:
        pytest.skip(CUDA_WHY)
    for M, K, N in [(1, 4096, 4096), (16, 4096, 1000), (33, 67, 129), (256, 512, 384), (2048, 1024, 256)]:
        a, b = rand_i8(M, K), rand_i8(N, K)
        torch.testing.assert_close(ops.int8_gemm(a.cuda(), b.cuda()).cpu(), ops.int8_gemm(a, b), rtol=0, atol=0)


LINEAR_SHAPES = [(1, 1, 1), (1, 64, 48), (3, 67, 129), (16, 256, 100), (70, 130, 33), (100, 1800, 20)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(shape, dtype, with_bias, device, cpu_isa):
    M, K, N = shape
    x = (torch.randn(M, K) * 2).to(dtype).to(device)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8).to(device)
    w_scale = (torch.rand(N) * 0.02 + 1e-3).to(device)
    bias = torch.randn(N).to(dtype).to(device) if with_bias else None
    y = ops.int8_linear(x, w, w_scale, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y.cpu(), linear_ref(x, w, w_scale, bias), rtol=0, atol=0)


def test_linear_packed_and_leading_dims(cpu_isa):
    x = torch.randn(2, 3, 5, 200)
    w = torch.randint(-127, 128, (72, 200), dtype=torch.int8)
    ws, bias = torch.rand(72), torch.randn(72)
    packed = ops.int8_pack_weight(w)
    assert packed.numel() == ops.int8_packed_bytes(72, 200)
    y = ops.int8_linear(x, w, ws, bias, w_packed=packed)
    assert y.shape == (2, 3, 5, 72)
    torch.testing.assert_close(y, ops.int8_linear(x, w, ws, bias), rtol=0, atol=0)
    torch.testing.assert_close(y.reshape(-1, 72), linear_ref(x.reshape(-1, 200), w, ws, bias), rtol=0, atol=0)
    y1 = ops.int8_linear(x[0, 0, 0], w, ws, bias)  # 1-D input
    assert y1.shape == (72,)
    torch.testing.assert_close(y1, y[0, 0, 0], rtol=0, atol=0)


def test_linear_special_rows(device, cpu_isa):
    x = torch.randn(4, 40)
    x[1] = 0
    x[2, 3] = float("nan")
    w = torch.randint(-127, 128, (20, 40), dtype=torch.int8)
    ws, bias = torch.rand(20), torch.randn(20)
    y = ops.int8_linear(x.to(device), w.to(device), ws.to(device), bias.to(device)).cpu()
    torch.testing.assert_close(y[1], bias, rtol=0, atol=0)  # zero row -> bias
    assert torch.isnan(y[2]).all()  # non-finite row stays visible
    torch.testing.assert_close(y, linear_ref(x, w, ws, bias), rtol=0, atol=0, equal_nan=True)


# The VNNI path's register tiles (up to 12 rows x 2 panels, the rows of a block shared evenly):
# every tile row count, pairs of panels and a last single or partial one (odd panel pieces over
# two threads), K tails, one k-group, K blocks with two row blocks
VNNI_TILE_SHAPES = [
    (1, 4, 32), (2, 67, 17), (3, 260, 48), (4, 5, 80), (5, 67, 47), (6, 130, 33), (7, 64, 32),
    (8, 260, 48), (9, 67, 80), (10, 4, 17), (11, 300, 48), (12, 67, 32), (13, 130, 80),
    (16, 260, 47), (25, 67, 48), (37, 100, 80), (200, 1500, 40), (193, 2049, 33),
]


@pytest.mark.parametrize("shape", VNNI_TILE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_tile_shapes_exact(shape, dtype, cpu_isa):
    M, K, N = shape
    x = (torch.randn(M, K) * 2).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_scale, bias = torch.rand(N) * 0.02 + 1e-3, torch.randn(N).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = ops.int8_linear(x, w, w_scale, bias)
        c = ops.int8_gemm(x.float().clamp(-128, 127).to(torch.int8), w)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y, linear_ref(x, w, w_scale, bias), rtol=0, atol=0)
    torch.testing.assert_close(c, gemm_ref(x.float().clamp(-128, 127).to(torch.int8), w), rtol=0, atol=0)


# 7-bit activations: every M remainder of the 6-row AVX2 tile, K tails, N tails, K blocks
ACT7_SHAPES = LINEAR_SHAPES + [(2, 5, 16), (5, 300, 17), (6, 64, 32), (7, 130, 48), (13, 1000, 40),
                               (200, 2100, 20), (64, 4099, 16)]


@pytest.mark.parametrize("shape", ACT7_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_act7_matches_reference(shape, dtype, with_bias, device, cpu_isa):
    M, K, N = shape
    x = (torch.randn(M, K) * 2).to(dtype).to(device)
    w = rand_i8(N, K, device=device)  # full int8 range, -128 included: still exact
    w_scale = (torch.rand(N) * 0.02 + 1e-3).to(device)
    bias = torch.randn(N).to(dtype).to(device) if with_bias else None
    y = ops.int8_linear(x, w, w_scale, bias, act_bits=7)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y.cpu(), linear_ref(x, w, w_scale, bias, act_bits=7), rtol=0, atol=0)
    # the 7-bit integer product itself, against int64
    q, s = quantize_per_token_ref(x.cpu(), qmax=63)
    assert q.abs().max().item() <= 63
    acc = ops.int8_linear(x, w, torch.ones(N, device=device), act_bits=7).cpu().double() / s.double()[:, None]
    ref = (q.long() @ w.cpu().long().t()).double()
    if dtype == torch.float32:  # fp32 output holds acc * s exactly enough to round back
        torch.testing.assert_close(acc.round(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("K", [1, 67, 1000, 4099])
def test_linear_act7_extremes(K, device, cpu_isa):
    # activations at +-63 everywhere, weights at -128 / 127: the largest vpmaddubsw pair sums
    x = torch.ones(9, K)
    x[1::2] = -1
    x[4, ::2] = -1
    w = torch.full((19, K), -128, dtype=torch.int8)
    w[1] = 127
    w[2, ::2] = 127
    ones = torch.ones(19)
    y = ops.int8_linear(x.to(device), w.to(device), ones.to(device), act_bits=7).cpu()
    torch.testing.assert_close(y, linear_ref(x, w, ones, None, act_bits=7), rtol=0, atol=0)
    assert y[0, 0].item() == pytest.approx(-128 * K, rel=1e-6)  # 63 * -128 * K * (1 / 63)


# 7-bit weights ([-64, 64]) with 7-bit activations: on AVX2 such panels add the int16 pair sums
# of two k-groups before widening. Every row count of the 5-row tile up to 2 tiles, an odd
# number of k-groups (K = 4, 12, 300), K blocks with an odd last block (2100), and weights
# mixing narrow panels with panels holding one value outside [-64, 64].
NARROW_SHAPES = [(m, 12, 16) for m in range(1, 12)] + [
    (1, 4, 16), (3, 300, 33), (16, 4096, 64), (5, 67, 129), (40, 2100, 48), (200, 2100, 20),
    (64, 4099, 16)]


@pytest.mark.parametrize("shape", NARROW_SHAPES)
@pytest.mark.parametrize("mixed", [False, True])
def test_linear_act7_narrow_weights_exact(shape, mixed, device, cpu_isa):
    M, K, N = shape
    x = torch.randn(M, K) * 2
    w = torch.randint(-64, 65, (N, K), dtype=torch.int8)
    if mixed:  # the second panel of 16 columns (when there is one) is not narrow
        w[min(16, N - 1), K // 2] = -128
        w[N - 1, 0] = 65
    q, s = quantize_per_token_ref(x, qmax=63)
    acc = ops.int8_linear(x.to(device), w.to(device), torch.ones(N, device=device),
                          act_bits=7).cpu().double() / s.double()[:, None]
    torch.testing.assert_close(acc.round(), (q.long() @ w.long().t()).double(), rtol=0, atol=0)
    ws, bias = torch.rand(N) * 0.02 + 1e-3, torch.randn(N)
    torch.testing.assert_close(ops.int8_linear(x.to(device), w.to(device), ws.to(device), bias.to(device),
                                               act_bits=7).cpu(),
                               linear_ref(x, w, ws, bias, act_bits=7), rtol=0, atol=0)


@pytest.mark.parametrize("K", [4, 12, 1000, 4099])
@pytest.mark.parametrize("wmax", [64, 65])
def test_linear_act7_narrow_extremes(K, wmax, device, cpu_isa):
    # q = +63 (stored as 127) against weights +-64: four products sum to 32512, the most an
    # int16 pair-sum may hold; a panel reaching 65 (33020) must take the widening kernel
    x = torch.ones(7, K)
    x[1::2] = -1
    x[4, ::2] = -1
    w = torch.full((33, K), wmax, dtype=torch.int8)
    w[1] = -64
    w[2, ::2] = -64
    w[17:] = -64  # second and third panels narrow whatever wmax is
    w[20, 1::3] = 64
    ones = torch.ones(33)
    y = ops.int8_linear(x.to(device), w.to(device), ones.to(device), act_bits=7).cpu()
    torch.testing.assert_close(y, linear_ref(x, w, ones, None, act_bits=7), rtol=0, atol=0)
    assert y[0, 0].item() == pytest.approx(wmax * K, rel=1e-6)


@pytest.mark.parametrize("shape", NARROW_SHAPES)
@pytest.mark.parametrize("mixed", [False, True])
def test_gemm_and_linear_8bit_narrow_weights_exact(shape, mixed, device, cpu_isa):
    # weights in [-64, 64] with 8-bit activations: on AVX2 A + 128 goes through vpmaddubsw,
    # whose pair sums reach 2 * 255 * 64 = 32640 at the extremes below. With one row at 65
    # (2 * 255 * 65 saturates int16) the whole product must take the widening kernel.
    M, K, N = shape
    a = rand_i8(M, K)
    a[0] = 127
    a[-1, ::2] = -128
    b = torch.randint(-64, 65, (N, K), dtype=torch.int8)
    b[0] = 64
    b[N // 2] = -64
    if mixed:
        b[N - 1] = 65
    torch.testing.assert_close(ops.int8_gemm(a.to(device), b.to(device)).cpu(), gemm_ref(a, b),
                               rtol=0, atol=0)
    x = torch.randn(M, K) * 3
    x[0] = x[0].abs()  # one row quantized near +127 everywhere
    ws, bias = torch.rand(N) * 0.02 + 1e-3, torch.randn(N)
    packed = ops.int8_pack_weight(b) if device == "cpu" else None
    y = ops.int8_linear(x.to(device), b.to(device), ws.to(device), bias.to(device), w_packed=packed)
    torch.testing.assert_close(y.cpu(), linear_ref(x, b, ws, bias), rtol=0, atol=0)


def test_pack_weight_panel_max():
    # the packed form ends with each 16-column panel's largest |w|, which picks the kernel
    w = torch.randint(-64, 65, (40, 20), dtype=torch.int8)
    w[3, 5] = -128
    w[20, 7] = 70
    w[32:] = torch.randint(-9, 10, (8, 20), dtype=torch.int8)
    packed = ops.int8_pack_weight(w)
    tail = packed[-(48 // 4):].view(torch.int32)
    expect = [w[p * 16:(p + 1) * 16].to(torch.int32).abs().max().item() for p in range(3)]
    assert tail.tolist() == expect == [128, 70, w[32:].abs().max().item()]


def test_linear_act_bits_default_and_special_rows(device, cpu_isa):
    x = torch.randn(5, 40)
    x[1] = 0
    x[2, 3] = float("inf")
    w = torch.randint(-127, 128, (20, 40), dtype=torch.int8)
    ws, bias = torch.rand(20), torch.randn(20)
    args = (x.to(device), w.to(device), ws.to(device), bias.to(device))
    torch.testing.assert_close(ops.int8_linear(*args), ops.int8_linear(*args, act_bits=8), rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(ops.int8_linear(*args).cpu(), linear_ref(x, w, ws, bias), rtol=0, atol=0,
                               equal_nan=True)
    y7 = ops.int8_linear(*args, act_bits=7).cpu()
    torch.testing.assert_close(y7[1], bias, rtol=0, atol=0)
    assert torch.isnan(y7[2]).all()
    torch.testing.assert_close(y7, linear_ref(x, w, ws, bias, act_bits=7), rtol=0, atol=0, equal_nan=True)
    # packed weight and leading dims
    x3 = torch.randn(2, 3, 40)
    packed = ops.int8_pack_weight(w)
    torch.testing.assert_close(ops.int8_linear(x3, w, ws, bias, w_packed=packed, act_bits=7),
                               ops.int8_linear(x3, w, ws, bias, act_bits=7), rtol=0, atol=0)


def test_linear_bad_act_bits():
    x, w, ws = torch.randn(3, 8), rand_i8(5, 8), torch.rand(5)
    for bad in (6, 9, 0, True, "7"):
        with pytest.raises(ValueError, match="act_bits must be 8 or 7"):
            ops.int8_linear(x, w, ws, act_bits=bad)
    with pytest.raises(RuntimeError, match="act_bits must be 8 or 7"):
        torch.ops.pycompress.int8_linear(x, w, ws, None, None, 6)


@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 67, 129), (16, 256, 100), (33, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a16_matches_reference(shape, dtype, device, cpu_isa):
    M, K, N = shape
    x = torch.randn(M, K).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    ws, bias = torch.rand(N) * 0.01, torch.randn(N)
    y = ops.int8_linear_w8a16(x.to(device), w.to(device), ws.to(device), bias.to(dtype).to(device))
    ref = x.double() @ (w.double() * ws.double()[:, None]).t() + bias.to(dtype).double()
    assert y.dtype == dtype and y.shape == (M, N)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_bad_inputs():
    a, b = rand_i8(4, 8), rand_i8(5, 8)
    with pytest.raises(TypeError, match="a must have dtype int8"):
        ops.int8_gemm(a.float(), b)
    with pytest.raises(TypeError, match="b must have dtype int8"):
        ops.int8_gemm(a, b.to(torch.uint8))
    with pytest.raises(ValueError, match="same K"):
        ops.int8_gemm(a, rand_i8(5, 9))
    with pytest.raises(ValueError, match="2-D"):
        ops.int8_gemm(rand_i8(8), b)
    with pytest.raises(ValueError, match="K >= 1"):
        ops.int8_gemm(rand_i8(4, 0), rand_i8(5, 0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.int8_gemm([[1]], b)
    x, w, ws = torch.randn(3, 8), rand_i8(5, 8), torch.rand(5)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.int8_linear(x.double(), w, ws)
    with pytest.raises(TypeError, match="w must have dtype int8"):
        ops.int8_linear(x, w.float(), ws)
    with pytest.raises(TypeError, match="w_scale must have dtype float32"):
        ops.int8_linear(x, w, ws.half())
    with pytest.raises(ValueError, match="last dimension"):
        ops.int8_linear(torch.randn(3, 9), w, ws)
    with pytest.raises(ValueError, match="w_scale must have N = 5"):
        ops.int8_linear(x, w, torch.rand(4))
    with pytest.raises(ValueError, match="bias must have N = 5"):
        ops.int8_linear(x, w, ws, torch.randn(6))
    with pytest.raises(ValueError, match="w_packed"):
        ops.int8_linear(x, w, ws, w_packed=torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="bias must have N = 5"):
        ops.int8_linear_w8a16(x, w, ws, torch.randn(6))
    with pytest.raises(ValueError, match="w must be 2-D"):
        ops.int8_linear_w8a16(x, rand_i8(40), ws)
    # the raw ops keep their own checks (RuntimeError, never a crash)
    with pytest.raises(RuntimeError, match="same K"):
        torch.ops.pycompress.int8_gemm(a, rand_i8(5, 9))
    with pytest.raises((RuntimeError, TypeError), match="must be int8"):
        torch.ops.pycompress.int8_gemm(a.float(), b)
    with pytest.raises(RuntimeError, match="w_scale"):
        torch.ops.pycompress.int8_linear(x, w, torch.rand(4), None, None)
    with pytest.raises(RuntimeError, match="w_packed"):
        torch.ops.pycompress.int8_linear(x, w, ws, None, torch.zeros(3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.pycompress.int8_linear_w8a16(x, w, ws, torch.randn(2))


def test_opcheck(device):
    a, b = rand_i8(5, 67, device=device), rand_i8(33, 67, device=device)
    torch.library.opcheck(torch.ops.pycompress.int8_gemm.default, (a, b))
    x = torch.randn(5, 67, device=device)
    ws = torch.rand(33, device=device)
    bias = torch.randn(33, device=device)
    for xx in [x, x.half(), x.bfloat16()]:
        torch.library.opcheck(torch.ops.pycompress.int8_linear.default, (xx, b, ws, bias, None))
        torch.library.opcheck(torch.ops.pycompress.int8_linear.default, (xx, b, ws, bias, None, 7))
        torch.library.opcheck(torch.ops.pycompress.int8_linear_w8a16.default, (xx, b, ws, None))
    if device == "cpu":
        packed = ops.int8_pack_weight(b)
        torch.library.opcheck(torch.ops.pycompress.int8_pack_weight.default, (b,))
        torch.library.opcheck(torch.ops.pycompress.int8_linear.default, (x, b, ws, bias, packed))


def test_direct_entry_points_match_torch_ops(conv_op_args):
    """pycompress._C.direct: typed calls of the same ops, with the same results and errors."""
    from pycompress import _C

    x, w, ws, bias = torch.randn(5, 67), rand_i8(33, 67), torch.rand(33), torch.randn(33)
    residual = torch.randn(2, 10, 4, 3)
    xc = conv_op_args[0]
    dense = torch.randn(33, 67)
    mask = torch.rand(33, 67) < 0.3
    rp, ci, v = ops.dense_to_csr(dense * mask, mask)
    mask24 = torch.zeros(33, 67, dtype=torch.bool)
    mask24[:, 0::4] = mask24[:, 1::4] = True  # two of every four
    values, meta = ops.semi24_compress(dense * mask24, mask24)
    calls = {  # name: (arguments, first argument of a bad call)
        "int8_linear": ((x, w, ws, bias, ops.int8_pack_weight(w), 8), x[:, :-1]),
        "int8_linear_w8a16": ((x, w, ws, bias), x[:, :-1]),
        "int8_conv2d": (tuple(conv_op_args) + (residual, 1.0, 0), xc[:, :-1]),  # a channel missing
        "sparse_linear": ((x, rp, ci, v, bias, 67, None), x[:, :-1]),
        "semi24_linear": ((x, values, meta, bias, 67), x[:, :-1]),
    }
    assert {n for n in dir(_C.direct) if not n.startswith("_")} == set(calls)
    for name, (args, bad_x) in calls.items():
        op = getattr(torch.ops.pycompress, name).default
        assert len(op._schema.arguments) == len(args)
        direct = getattr(_C.direct, name)
        assert torch.equal(direct(*args), op(*args)), name
        errors = []
        for f in (op, direct):
            with pytest.raises((RuntimeError, ValueError)) as e:
                f(bad_x, *args[1:])
            errors.append((type(e.value), str(e.value).splitlines()[0]))
        assert errors[0] == errors[1], errors
        with pytest.raises(TypeError):
            direct(*args[:-1])


def test_torch_compile_ops():
    w = rand_i8(48, 64)
    ws = torch.rand(48)

    def f(x):
        return (ops.int8_linear(x, w, ws) + ops.int8_linear_w8a16(x, w, ws) + ops.int8_gemm(w, w).float().sum()
                + ops.int8_linear(x, w, ws, act_bits=7))

    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ---- AMX path: the same integers and the same output bits as the AVX-512 VNNI path ----

from contextlib import contextmanager  # noqa: E402

import pycompress  # noqa: E402
from pycompress import _ext  # noqa: E402

needs_amx = pytest.mark.skipif("amx" not in _ext.cpu_isas(), reason="this CPU or OS does not allow AMX-INT8")

# whole 16-row tiles and M % 16 tail rows; K not a multiple of 64 (nor of 4); N not a multiple of 16
AMX_MS = [1, 2, 15, 16, 17, 33, 128]
AMX_KN = [(67, 129), (130, 33), (1000, 40), (4100, 17)]


@contextmanager
def _isa_and_threads(isa: str, threads: int):
    previous, previous_threads = pycompress.active_cpu_isa(), torch.get_num_threads()
    pycompress.set_cpu_isa(isa)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        pycompress.set_cpu_isa(previous)
        torch.set_num_threads(previous_threads)


@needs_amx
@pytest.mark.parametrize("M", AMX_MS)
@pytest.mark.parametrize("KN", AMX_KN)
def test_amx_gemm_exact(M, KN):
    K, N = KN
    a, b = rand_i8(M, K), rand_i8(N, K)
    with _isa_and_threads("amx", 2):
        c = ops.int8_gemm(a, b)
    torch.testing.assert_close(c, gemm_ref(a, b), rtol=0, atol=0)


@needs_amx
@pytest.mark.parametrize("M", [16, 17, 33])
def test_amx_gemm_extremes(M):
    # -128 * -128 summed over K = 4100: 67 174 400, no saturation anywhere
    a = torch.full((M, 4100), -128, dtype=torch.int8)
    b = torch.full((33, 4100), -128, dtype=torch.int8)
    b[1] = 127
    b[2, ::3] = 127
    with _isa_and_threads("amx", 2):
        c = ops.int8_gemm(a, b)
    torch.testing.assert_close(c, gemm_ref(a, b), rtol=0, atol=0)
    assert c[0, 0].item() == 16384 * 4100


@needs_amx
@pytest.mark.parametrize("M", AMX_MS)
@pytest.mark.parametrize("KN", AMX_KN)
@pytest.mark.parametrize("bits", [(8, 8), (7, 8), (8, 7), (7, 7)], ids=["a8w8", "a7w8", "a8w7", "a7w7"])
def test_amx_linear_same_bits_as_avx512(M, KN, bits):
    K, N = KN
    act_bits, weight_bits = bits
    wmax = 127 if weight_bits == 8 else 63
    x = torch.randn(M, K) * 3
    w = torch.randint(-wmax, wmax + 1, (N, K), dtype=torch.int8)
    ws, bias = torch.rand(N) * 0.02 + 1e-3, torch.randn(N)
    packed = ops.int8_pack_weight(w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        for b in (None, bias):
            outs = {}
            for isa in ("avx512", "amx"):
                with _isa_and_threads(isa, 2):
                    outs[isa] = ops.int8_linear(xd, w, ws, b, w_packed=packed, act_bits=act_bits)
            assert torch.equal(outs["amx"], outs["avx512"]), (dtype, b is not None)
            torch.testing.assert_close(outs["amx"], linear_ref(xd, w, ws, b, act_bits), rtol=0, atol=0)


@needs_amx
def test_amx_packed_weight_runs_on_every_path():
    # the packed layout does not depend on the CPU: a weight packed while AMX is in use gives the
    # same bytes as one packed on the scalar path, and runs unchanged on every other path
    from pycompress.nn import Int8Linear

    lin = torch.nn.Linear(300, 70)
    x = torch.randn(37, 300)
    with _isa_and_threads("amx", 2):
        q = Int8Linear.from_float(lin, mode="w8a8")
        y_amx = q(x)
        packed_amx = ops.int8_pack_weight(q.weight)
    with _isa_and_threads("scalar", 1):
        assert torch.equal(ops.int8_pack_weight(q.weight), packed_amx)
    for isa in ("scalar", "avx2", "avx512"):
        with _isa_and_threads(isa, 2):
            assert torch.equal(q(x), y_amx), isa
            assert torch.equal(ops.int8_linear(x, q.weight, q.weight_scale, q.bias, w_packed=packed_amx), y_amx)
    torch.testing.assert_close(y_amx, linear_ref(x, q.weight, q.weight_scale, q.bias), rtol=0, atol=0)
