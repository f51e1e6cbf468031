"""CUDA kernels against the CPU: every op with a CUDA kernel, and every module path onto them.

Each test calls the op on the GPU and compares with the CPU op (bit-exact where the kernels promise
the same bits: quantization and the int8 GEMM family) and with a float64 PyTorch reference. The
shapes are the ones most likely to break a kernel: M = 1 and both sides of every tile-size switch
in the launchers, odd K and N, K and N tails, misaligned and row-strided inputs, empty rows, and
vocabularies of up to 262144 for the KD loss. tests/test_cuda_coverage.py checks that every op
registered for CUDA in csrc/ keeps a CUDA test that names it.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import nn

import pycompress.ops as ops
from pycompress.nn import Int8Linear, Int8MultiheadAttention, KDLoss, MaskedConv2d, MaskedLinear, SemiSparseLinear, SparseLinear
from reference import linear_ref, quantize_per_token_ref

pytestmark = pytest.mark.cuda
DEV = "cuda"
P = torch.ops.pycompress

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand_i8(*shape, g=None, low=-128):
    return torch.randint(low, 128, shape, dtype=torch.int8, generator=g)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values on the same device, starting one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def row_strided(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values in rows of a wider tensor (row stride K + pad, unit column stride)."""
    wide = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype, device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def close(actual, expected, tol, *, equal_nan=False):
    """Agreement to ``tol`` relative to the size of the expected values (float64 comparison)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    finite = e[torch.isfinite(e)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, equal_nan=equal_nan)


def exact(actual, expected):
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), rtol=0, atol=0, equal_nan=True)


def on_dev(t: torch.Tensor, dev: torch.device | str = DEV):
    assert t.device.type == torch.device(dev).type, f"result on {t.device}, expected {dev}"


# ============================================================================ quantize_per_token
QUANT_SHAPES = [(1, 1), (1, 17), (2, 4096), (3, 4097), (4, 255), (33, 1000), (130, 64)]


@pytest.mark.parametrize("M,K", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token(M, K, dtype):
    x = (torch.randn(M, K, generator=gen(M, K)) * 3).to(dtype)
    if M >= 3:
        x[1] = 0  # zero row: scale 1, q 0
        x[2, K // 2] = float("inf")  # non-finite row: scale NaN, q 0
    if M >= 4:
        x[3, 0] = float("nan")
    q, s = P.quantize_per_token(x.to(DEV))
    on_dev(q)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (M, K) and s.shape == (M,)
    qc, sc = P.quantize_per_token(x)
    exact(q, qc)
    exact(s, sc)
    qr, sr = quantize_per_token_ref(x)
    exact(q, qr)
    exact(s, sr)


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token_strided_misaligned_and_3d(dtype):
    x = (torch.randn(6, 300, generator=gen(6, 300)) * 2).to(dtype)
    qc, sc = P.quantize_per_token(x)
    for xd in (row_strided(x.to(DEV)), misaligned(x.to(DEV)), x.to(DEV).t().contiguous().t()):
        q, s = ops.quantize_per_token(xd)
        exact(q, qc)
        exact(s, sc)
    q3, s3 = ops.quantize_per_token(x.reshape(2, 3, 300).to(DEV))
    assert q3.shape == (2, 3, 300) and s3.shape == (2, 3)
    exact(q3.reshape(6, 300), qc)


# ============================================================================ int8_gemm
# dispatch in csrc/int8/cuda/gemm.cu: GEMV tiles for M <= 1, 4, 8, 16, tensor-core tiles of 64 rows
# above, 128 rows once those alone fill the GPU (1100 x 2100: 153 tiles >= 132 SMs); K is padded to
# a multiple of 16 and N tails are predicated
GEMM_SHAPES = [
    (1, 1, 1), (1, 16, 7), (1, 4099, 129), (2, 17, 33), (4, 64, 128), (5, 100, 1), (8, 33, 257),
    (9, 16, 127), (16, 4096, 129), (17, 64, 128), (64, 80, 129), (65, 15, 300), (127, 2049, 33),
    (300, 1000, 257), (70, 4500, 40), (1100, 80, 2100),
]


def gemm_ref(a, b):
    return (a.cpu().long() @ b.cpu().long().t()).to(torch.int32)


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_int8_gemm(M, K, N):
    g = gen("gemm", M, K, N)
    a, b = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    c = P.int8_gemm(a.to(DEV), b.to(DEV))
    on_dev(c)
    assert c.dtype == torch.int32 and c.shape == (M, N)
    exact(c, P.int8_gemm(a, b))
    if M * K * N <= 2e7:
        exact(c, gemm_ref(a, b))


@pytest.mark.parametrize("M", [1, 3, 16, 17, 200])
def test_int8_gemm_layouts_and_extremes(M):
    K, N = 4099, 19
    g = gen("gemm-layout", M)
    a, b = rand_i8(M, K, g=g), rand_i8(N, K, g=g)
    ref = P.int8_gemm(a, b)
    ad, bd = a.to(DEV), b.to(DEV)
    for aa, bb in ((misaligned(ad), bd), (ad, misaligned(bd)), (row_strided(ad, 5), bd),
                   (ad, bd.t().contiguous().t())):
        exact(ops.int8_gemm(aa, bb), ref)
    lo = torch.full((M, K), -128, dtype=torch.int8, device=DEV)
    c = P.int8_gemm(lo, lo[:1].expand(N, K).contiguous())
    assert (c.cpu() == 16384 * K).all()  # the largest sum: no saturation
    hi = torch.full((N, K), 127, dtype=torch.int8, device=DEV)
    assert (P.int8_gemm(lo, hi).cpu() == -128 * 127 * K).all()


# ============================================================================ int8_linear (W8A8)
LINEAR_SHAPES = [(1, 1, 1), (1, 67, 129), (2, 16, 8), (5, 4099, 33), (8, 100, 17), (16, 64, 130),
                 (17, 33, 1), (64, 257, 129), (130, 1000, 300)]


@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act_bits", [8, 7])
def test_int8_linear(M, K, N, dtype, act_bits):
    g = gen("linear", M, K, N)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    w = rand_i8(N, K, g=g, low=-127)
    ws = torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = None if (M + N) % 2 else torch.randn(N, generator=g).to(dtype if M % 3 else torch.float32)
    args = (x, w, ws, bias)
    y = P.int8_linear(*(None if t is None else t.to(DEV) for t in args), None, act_bits)
    on_dev(y)
    assert y.dtype == dtype and y.shape == (M, N)
    exact(y, P.int8_linear(*args, None, act_bits))
    if M * K * N <= 2e7:
        exact(y, linear_ref(x, w, ws, bias, act_bits))


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_special_rows_and_layouts(dtype):
    g = gen("linear-special")
    x = torch.randn(5, 40, generator=g).to(dtype)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 7] = float("-inf")
    w, ws, bias = rand_i8(20, 40, g=g, low=-127), torch.rand(20, generator=g), torch.randn(20, generator=g)
    ref = P.int8_linear(x, w, ws, bias, None, 8)
    wd, wsd, bd = w.to(DEV), ws.to(DEV), bias.to(DEV)
    for xd in (x.to(DEV), misaligned(x.to(DEV)), row_strided(x.to(DEV))):
        y = ops.int8_linear(xd, wd, wsd, bd)
        exact(y, ref)
    exact(ops.int8_linear(x.to(DEV), misaligned(wd), wsd, bd), ref)
    y = ops.int8_linear(x.to(DEV), wd, wsd, bd).cpu()
    exact(y[1], bias.to(dtype))  # a zero row gives the bias
    assert torch.isnan(y[2]).all() and torch.isnan(y[3]).all()  # non-finite rows stay visible
    y3 = ops.int8_linear(x.reshape(1, 5, 40).to(DEV), wd, wsd, bd, act_bits=7)
    exact(y3.reshape(5, 20), P.int8_linear(x, w, ws, bias, None, 7))


# ============================================================================ int8_linear_w8a16
# GEMV kernels for M <= 1, 4, 8, 16; above 16 the binding dequantizes and calls the dense GEMM
W8A16_SHAPES = [(1, 16, 1), (1, 4099, 129), (2, 33, 7), (4, 64, 130), (5, 100, 17), (8, 4096, 33),
                (9, 48, 65), (16, 1000, 129), (17, 64, 33), (40, 257, 100)]


@pytest.mark.parametrize("M,K,N", W8A16_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_w8a16(M, K, N, dtype):
    g = gen("w8a16", M, K, N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = rand_i8(N, K, g=g, low=-127)
    ws = torch.rand(N, generator=g) * 0.01
    bias = torch.randn(N, generator=g).to(dtype) if N % 2 else None
    y = P.int8_linear_w8a16(x.to(DEV), w.to(DEV), ws.to(DEV), None if bias is None else bias.to(DEV))
    on_dev(y)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = x.double() @ (w.double() * ws.double()[:, None]).t()
    if bias is not None:
        ref = ref + bias.double()
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    close(y, ref, tol)
    close(y, P.int8_linear_w8a16(x, w, ws, bias), 2 * tol)


@pytest.mark.parametrize("M", [1, 7, 16])
def test_int8_linear_w8a16_misaligned_and_strided(M):
    g = gen("w8a16-layout", M)
    x = torch.randn(M, 520, generator=g).to(torch.bfloat16)
    w, ws = rand_i8(70, 520, g=g, low=-127), torch.rand(70, generator=g) * 0.01
    ref = ops.int8_linear_w8a16(x.to(DEV), w.to(DEV), ws.to(DEV))
    exact(ops.int8_linear_w8a16(misaligned(x.to(DEV)), w.to(DEV), ws.to(DEV)), ref)
    exact(ops.int8_linear_w8a16(row_strided(x.to(DEV)), misaligned(w.to(DEV)), ws.to(DEV)), ref)


# ============================================================================ int8_pack_weight
@pytest.mark.parametrize("N,K", [(1, 1), (17, 67), (130, 257)])
def test_int8_pack_weight(N, K):
    w = rand_i8(N, K, g=gen("pack", N, K), low=-127)
    packed = P.int8_pack_weight(w.to(DEV))
    on_dev(packed)
    assert packed.dtype == torch.int8 and packed.numel() == ops.int8_packed_bytes(N, K)
    exact(packed, P.int8_pack_weight(w))  # the CPU layout, on the weight's device


# ============================================================================ Int8Linear
@pytest.mark.parametrize("mode,act_bits,weight_bits", [("w8a8", 8, 8), ("w8a8", 7, 8), ("w8a8", 7, 7),
                                                       ("w8a8", 8, 7), ("w8a16", 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8linear_module(mode, act_bits, weight_bits, dtype):
    torch.manual_seed(1)
    lin = nn.Linear(67, 129)
    q_cpu = Int8Linear.from_float(lin, mode=mode, act_bits=act_bits, weight_bits=weight_bits)
    q_dev = Int8Linear.from_float(copy.deepcopy(lin).to(DEV), mode=mode, act_bits=act_bits,
                                  weight_bits=weight_bits)
    exact(q_dev.weight, q_cpu.weight)  # quantized on the GPU to the same integers and scales
    exact(q_dev.weight_scale, q_cpu.weight_scale)
    moved = copy.deepcopy(q_cpu).to(DEV)
    q_cpu, q_dev, moved = (m.to(dtype) for m in (q_cpu, q_dev, moved))
    for shape in [(1, 67), (3, 67), (2, 17, 67)]:
        x = torch.randn(shape).to(dtype)
        ref = q_cpu(x)
        for m in (q_dev, moved):
            y = m(x.to(DEV))
            on_dev(y)
            assert y.shape == ref.shape and y.dtype == dtype
            if mode == "w8a8":
                exact(y, ref)
            else:
                close(y, ref, 2e-4 if dtype == torch.float32 else 2e-2)
    back = moved.to("cpu")
    x = torch.randn(4, 67).to(dtype)
    exact(back(x), q_cpu(x))


# ============================================================================ Int8MultiheadAttention
@pytest.mark.parametrize("batch_first", [True, False])
def test_int8_multihead_attention_module(batch_first):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    q_cpu = Int8MultiheadAttention.from_float(mha)
    moved = copy.deepcopy(q_cpu).to(DEV)
    shape = (3, 9, 64) if batch_first else (9, 3, 64)
    x = torch.randn(shape)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad():
        ref, ref_w = q_cpu(x, x, x, key_padding_mask=mask)
        y, w = moved(x.to(DEV), x.to(DEV), x.to(DEV), key_padding_mask=mask.to(DEV))
    on_dev(y)
    # int8 projections give the CPU's bits; the float attention may differ in the last bits
    close(y, ref, 1e-4)
    close(w, ref_w, 1e-5)


# ============================================================================ sparse_linear (CSR)
def csr_weight(N, K, density, g, empty_rows=True):
    w = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < density)
    if empty_rows and N > 2:
        w[N // 2] = 0
    return w


# (M, K, N, density): the CSR kernel has one warp per output row and 4 tokens per warp
SPARSE_SHAPES = [(1, 1, 1, 1.0), (1, 7, 9, 0.5), (3, 100, 130, 0.1), (4, 33, 8, 0.3), (5, 1000, 17, 0.05),
                 (33, 96, 40, 0.9), (2, 40000, 3, 0.01), (7, 64, 1, 0.0), (130, 257, 65, 0.2)]


@pytest.mark.parametrize("M,K,N,density", SPARSE_SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("dtype", FLOATS)
def test_sparse_linear(M, K, N, density, index_dtype, dtype):
    if index_dtype == torch.int16 and K > 32768:
        index_dtype = torch.int32
    g = gen("csr", M, K, N)
    w = csr_weight(N, K, density, g)
    rp, ci, v = ops.dense_to_csr(w, index_dtype=index_dtype)
    bias = torch.randn(N, generator=g) if N % 2 else None
    x = torch.randn(M, K, generator=g).to(dtype)
    y = P.sparse_linear(x.to(DEV), rp.to(DEV), ci.to(DEV), v.to(DEV),
                        None if bias is None else bias.to(DEV), K)
    on_dev(y)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    tol = max(EPS[dtype], 2e-5 if K > 10000 else 1e-5)
    close(y, ref, tol)
    close(y, P.sparse_linear(x, rp, ci, v, bias, K), 2 * tol)


def test_sparse_linear_many_tokens_unsorted_rows_and_grad():
    g = gen("csr-many")
    K, N = 8, 3
    w = csr_weight(N, K, 0.6, g, empty_rows=False)
    rp, ci, v = ops.dense_to_csr(w)
    M = 65535 * 4 + 3  # more token rows than one launch covers (gridDim.y <= 65535)
    x = torch.randn(M, K, generator=g)
    y = ops.sparse_linear(x.to(DEV), rp.to(DEV), ci.to(DEV), v.to(DEV), None, K)
    close(y, x.double() @ w.double().t(), 1e-5)
    # columns in any order inside a row give the same product
    perm = torch.cat([torch.randperm(int(rp[i + 1] - rp[i]), generator=g) + int(rp[i]) for i in range(N)])
    xs = x[:37]
    y2 = ops.sparse_linear(xs.to(DEV), rp.to(DEV), ci[perm].to(DEV), v[perm].to(DEV), None, K)
    close(y2, xs.double() @ w.double().t(), 1e-5)
    # the input gradient (the weight of a SparseLinear layer gets none)
    xg = xs.to(DEV).requires_grad_()
    out = ops.sparse_linear(xg, rp.to(DEV), ci.to(DEV), v.to(DEV), None, K)
    gout = torch.randn(out.shape, generator=g)
    out.backward(gout.to(DEV))
    close(xg.grad, gout.double() @ w.double(), 1e-5)


@pytest.mark.parametrize("M", [1, 6, 33])
def test_sparselinear_module(M):
    torch.manual_seed(2)
    lin = nn.Linear(96, 41)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(41, 96) < 0.15)
    layer = SparseLinear.from_dense(copy.deepcopy(lin).to(DEV))
    on_dev(layer.values)
    cpu_layer = SparseLinear.from_dense(lin)
    for dtype in FLOATS:
        x = torch.randn(M, 96).to(dtype)
        y = layer(x.to(DEV))
        assert y.dtype == dtype
        close(y, lin(x.float()).double(), max(EPS[dtype], 1e-5))
        close(y, cpu_layer(x), 2 * max(EPS[dtype], 1e-5))
    x3 = torch.randn(2, M, 96)
    close(layer(x3.to(DEV)), cpu_layer(x3), 1e-5)
    close(copy.deepcopy(cpu_layer).to(DEV)(x3.to(DEV)), cpu_layer(x3), 1e-5)


# ============================================================================ masked_linear
# the masked GEMM uses 32 x 32 tiles: shapes on both sides of a tile edge, and all-pruned masks
MASKED_SHAPES = [(1, 1, 1, 1.0), (1, 65, 33, 0.5), (2, 32, 32, 0.0), (33, 67, 129, 0.3), (70, 300, 17, 0.9),
                 (129, 31, 64, 0.5)]


def masked_refs(x, w, mask, bias, gout):
    xd, wm = x.double(), w.double() * mask
    y = xd @ wm.t() + (0 if bias is None else bias.double())
    gd = gout.double()
    return y, gd @ wm, (gd.t() @ xd) * mask, gd.sum(0)


@pytest.mark.parametrize("M,K,N,density", MASKED_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_linear_forward_backward(M, K, N, density, dtype):
    g = gen("masked", M, K, N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    mask = torch.rand(N, K, generator=g) < density
    bias = torch.randn(N, generator=g).to(dtype)
    gout = torch.randn(M, N, generator=g).to(dtype)
    xd, wd, bd = (t.to(DEV).requires_grad_() for t in (x, w, bias))
    y = P.masked_linear(xd, wd, mask.to(DEV), bd)
    on_dev(y)
    assert y.dtype == dtype and y.shape == (M, N)
    y.backward(gout.to(DEV))
    y_ref, gx_ref, gw_ref, gb_ref = masked_refs(x, w, mask, bias, gout)
    tol = max(EPS[dtype], 2e-5)
    close(y, y_ref, tol)
    close(xd.grad, gx_ref, tol)
    close(wd.grad, gw_ref, tol)
    close(bd.grad, gb_ref, tol)
    assert (wd.grad.cpu()[~mask] == 0).all()  # pruned weights get exactly no gradient
    # the raw backward ops, called directly
    gi = P.masked_linear_grad_input(gout.to(DEV), w.to(DEV), mask.to(DEV))
    gw = P.masked_linear_grad_weight(gout.to(DEV), x.to(DEV), mask.to(DEV))
    on_dev(gi)
    close(gi, gx_ref, tol)
    close(gw, gw_ref, tol)
    close(gi, P.masked_linear_grad_input(gout, w, mask), 2 * tol)
    close(gw, P.masked_linear_grad_weight(gout, x, mask), 2 * tol)


def test_masked_linear_strided_inputs():
    g = gen("masked-strided")
    x, w = torch.randn(9, 70, generator=g), torch.randn(33, 70, generator=g)
    mask = torch.rand(33, 70, generator=g) < 0.4
    ref = x.double() @ (w.double() * mask).t()
    xd, wd, md = x.to(DEV), w.to(DEV), mask.to(DEV)
    for a, b, m in ((row_strided(xd), wd, md), (misaligned(xd), misaligned(wd), md),
                    (xd, wd.t().contiguous().t(), md.t().contiguous().t())):
        close(ops.masked_linear(a, b, m), ref, 2e-5)
    g3 = torch.randn(2, 9, 33, generator=g).to(DEV)
    close(P.masked_linear_grad_input(g3.reshape(18, 33)[::2], wd, md),
          g3.reshape(18, 33)[::2].cpu().double() @ (w.double() * mask), 2e-5)


def test_maskedlinear_module_training_step():
    torch.manual_seed(3)
    lin = nn.Linear(67, 33)
    mask = torch.rand(33, 67) < 0.5
    cpu_m = MaskedLinear.from_dense(lin, mask)
    dev_m = MaskedLinear.from_dense(copy.deepcopy(lin).to(DEV), mask.to(DEV))
    x = torch.randn(5, 4, 67)
    for m, xx in ((cpu_m, x), (dev_m, x.to(DEV))):
        m(xx).square().sum().backward()
    close(dev_m.weight.grad, cpu_m.weight.grad, 2e-5)
    close(dev_m.bias.grad, cpu_m.bias.grad, 2e-5)
    assert (dev_m.weight.grad.cpu()[~mask] == 0).all()
    opt = torch.optim.SGD(dev_m.parameters(), lr=0.1)
    opt.step()
    assert (dev_m.weight.detach().cpu()[~mask] == 0).all()  # pruned weights stay zero



@pytest.mark.parametrize("groups", [1, 4])
def test_maskedconv2d_module_training_step(groups, monkeypatch):
    # MaskedConv2d runs torch's own convolution on the masked weight: the CUDA path must give the
    # CPU's values and gradients, and keep pruned weights at zero through an optimizer step
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 math, as on the CPU
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups)
    mask = torch.rand(conv.weight.shape) < 0.5
    cpu_m = MaskedConv2d.from_float(conv, mask)
    dev_m = MaskedConv2d.from_float(copy.deepcopy(conv).to(DEV), mask.to(DEV))
    x = torch.randn(3, 8, 13, 11)
    ys = []
    for m, xx in ((cpu_m, x), (dev_m, x.to(DEV))):
        y = m(xx)
        y.square().sum().backward()
        ys.append(y)
    close(ys[1], ys[0], 2e-5)
    close(dev_m.weight.grad, cpu_m.weight.grad, 2e-4)
    assert (dev_m.weight.grad.cpu()[~mask] == 0).all()
    torch.optim.SGD(dev_m.parameters(), lr=0.1).step()
    assert (dev_m.weight.detach().cpu()[~mask] == 0).all()


def test_sparse_decode_layout_on_cuda_checks_the_structure():
    # CUDA keeps no single-token layout: sparse_decode_layout only checks the arrays (and returns an
    # empty tensor), sparse_decode_layout_info says nothing is used, sparse_linear runs without one
    g = gen("decode_layout")
    w = torch.randn(33, 70, generator=g) * (torch.rand(33, 70, generator=g) < 0.2)
    rp, ci, v = (a.to(DEV) for a in ops.dense_to_csr(w))
    layout = P.sparse_decode_layout(rp, ci, v, 70, True)
    assert layout.device.type == "cuda" and layout.numel() == 0
    kind, nbytes, current = P.sparse_decode_layout_info(layout, rp, ci, v, 70)
    assert (kind, nbytes, current) == (-1, 0, 0)
    assert ops.sparse_decode_layout_info(layout, rp, ci, v, 70) == {"kind": None, "bytes": 0, "current": False}
    x = torch.randn(3, 70, generator=g)
    close(ops.sparse_linear(x.to(DEV), rp, ci, v, None, 70, layout=layout), x.double() @ w.double().t(), 2e-5)
    bad = ci.clone()
    bad[0] = 70  # a column past in_features
    with pytest.raises((RuntimeError, ValueError)):
        P.sparse_decode_layout(rp, bad, v, 70, True)

# ============================================================================ 2:4 semi-structured
def weight24(N, K, g, dtype=torch.float32):
    """A [N, K] weight keeping at most 2 of every 4 inputs (exactly 2 in full groups)."""
    k4 = (K + 3) // 4 * 4
    order = torch.rand(N, k4 // 4, 4, generator=g).argsort(-1).argsort(-1)
    mask = (order < 2).reshape(N, k4)[:, :K]
    w = torch.randn(N, K, generator=g) * mask
    return w.to(dtype), mask


def compute_dtype(vdtype):
    """The dtype the products are computed in: the tensor cores take fp16/bf16, so fp32 values and
    activations are rounded to bf16 first (the CPU kernel keeps fp32)."""
    return torch.bfloat16 if vdtype == torch.float32 and torch.device(DEV).type == "cuda" else vdtype


# tiles: M <= 32 vs larger activation tiles, 16-row weight tiles, K padded to 32 (values) and 8 (x)
SEMI_SHAPES = [(1, 4, 1), (1, 8, 16), (2, 36, 15), (31, 72, 17), (32, 100, 64), (33, 64, 65),
               (100, 260, 130), (1, 4096, 33), (257, 1000, 16)]


@pytest.mark.parametrize("M,K,N", SEMI_SHAPES)
@pytest.mark.parametrize("vdtype", FLOATS)
def test_semi24_linear(M, K, N, vdtype):
    g = gen("semi24", M, K, N)
    w, mask = weight24(N, K, g, vdtype)
    values, meta = P.semi24_compress(w, mask, vdtype)
    x = torch.randn(M, K, generator=g).to(vdtype)
    bias = torch.randn(N, generator=g).to(vdtype) if N % 2 else None
    y = P.semi24_linear(x.to(DEV), values.to(DEV), meta.to(DEV), None if bias is None else bias.to(DEV), K)
    on_dev(y)
    assert y.dtype == vdtype and y.shape == (M, N)
    ct = compute_dtype(vdtype)
    ref = x.to(ct).double() @ w.to(ct).double().t() + (0 if bias is None else bias.double())
    tol = max(EPS[vdtype], 1e-3 if K > 1000 else 2e-4)
    close(y, ref, tol)
    close(y, P.semi24_linear(x, values, meta, bias, K), max(tol, EPS[ct]))


@pytest.mark.parametrize("M", [1, 32, 33])
def test_semi24_linear_misaligned_and_strided_input(M):
    g = gen("semi24-layout", M)
    K, N = 40, 48
    w, mask = weight24(N, K, g, torch.float16)
    values, meta = ops.semi24_compress(w.to(DEV), mask.to(DEV))
    x = torch.randn(M, K, generator=g).half().to(DEV)
    ref = ops.semi24_linear(x, values, meta, None, K)
    for xx in (misaligned(x), row_strided(x, 1), row_strided(x, 8)):
        exact(ops.semi24_linear(xx, values, meta, None, K), ref)  # the same kernel on a padded copy
    # fp16 values with fp32 activations: computed in fp16, returned in fp32
    y32 = ops.semi24_linear(x.float(), values, meta, None, K)
    assert y32.dtype == torch.float32
    close(y32, x.cpu().double() @ w.double().t(), 2e-3)


@pytest.mark.parametrize("N,K", [(1, 4), (17, 36), (33, 1000)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_semi24_compress_decompress(N, K, dtype):
    w, mask = weight24(N, K, gen("semi24-compress", N, K), dtype)
    values, meta = P.semi24_compress(w.to(DEV), mask.to(DEV), dtype)
    on_dev(values)
    on_dev(meta)
    vc, mc = P.semi24_compress(w, mask, dtype)
    exact(values, vc)
    exact(meta, mc)
    back = P.semi24_decompress(values, meta, K)
    on_dev(back)
    exact(back, w)
    exact(ops.semi24_decompress(values, meta, K), P.semi24_decompress(vc, mc, K))


@pytest.mark.parametrize("dtype", FLOATS)
def test_semisparselinear_module(dtype):
    torch.manual_seed(4)
    w, mask = weight24(70, 300, torch.Generator().manual_seed(5))
    lin = nn.Linear(300, 70)
    with torch.no_grad():
        lin.weight.copy_(w)
    cpu_layer = SemiSparseLinear.from_dense(lin, dtype=dtype)
    dev_layer = SemiSparseLinear.from_dense(copy.deepcopy(lin).to(DEV), dtype=dtype)
    moved = copy.deepcopy(cpu_layer).to(DEV)
    exact(dev_layer.meta, cpu_layer.meta)
    ct = compute_dtype(dtype)
    for shape in [(1, 300), (33, 300), (2, 5, 300)]:
        x = torch.randn(shape).to(dtype)
        ref = x.to(ct).double() @ w.to(ct).double().t() + lin.bias.detach().to(dtype).double()
        for layer in (dev_layer, moved):
            y = layer(x.to(DEV))
            assert y.dtype == dtype and y.shape == (*shape[:-1], 70)
            close(y, ref, max(EPS[dtype], 2e-4))


# ============================================================================ KD softmax-KL
def kd_rows_ref(s, t, T, reverse):
    """Per-row T^2 * KL in float64 (terms with zero target probability count 0)."""
    ls = torch.log_softmax(s.double() / T, -1)
    lt = torch.log_softmax(t.double() / T, -1)
    a, b = (lt, ls) if not reverse else (ls, lt)
    terms = torch.where(torch.isinf(a), torch.zeros_like(a), a.exp() * (a - b))
    return terms.sum(-1) * T * T


def kd_grad_ref(s, t, T, reverse, coef):
    sd = s.double().requires_grad_()
    (kd_rows_ref(sd, t, T, reverse) * coef.double()).sum().backward()
    return sd.grad


# (rows, vocabulary): V below, at and past the vector width, and up to 262144; many short rows
KD_SHAPES = [(1, 1), (1, 7), (3, 8), (2, 1000), (17, 33), (4, 32000), (2, 50257), (2, 128256),
             (1, 262144), (300, 64)]


@pytest.mark.parametrize("N,V", KD_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reverse", [False, True])
def test_kd_kl_div_forward_backward_fused(N, V, dtype, reverse):
    g = gen("kd", N, V)
    T = 2.0 if V % 2 else 0.7
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    coef = torch.rand(N, generator=g) + 0.5
    sd, td, cd = s.to(DEV), t.to(DEV), coef.to(DEV)
    loss, stats = P.kd_kl_div_forward(sd, td, T, reverse)
    on_dev(loss)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    loss_c, stats_c = P.kd_kl_div_forward(s, t, T, reverse)
    ref = kd_rows_ref(s, t, T, reverse)
    close(loss, ref, 2e-4)
    close(loss, loss_c, 2e-4)
    grad = P.kd_kl_div_backward(cd, sd, td, stats, T, reverse)
    on_dev(grad)
    assert grad.dtype == dtype and grad.shape == (N, V)
    gref = kd_grad_ref(s, t, T, reverse, coef)
    # gradient entries are ~T * (p_s - p_t): compare relative to the largest one
    gmax = max(gref.abs().max().item(), 1e-30)
    gtol = max(EPS[dtype], 1e-4)
    close(grad.double() / gmax, gref / gmax, gtol)
    close(grad.double() / gmax, P.kd_kl_div_backward(coef, s, t, stats_c, T, reverse).double() / gmax, gtol)
    loss_f, stats_f, grad_f = P.kd_kl_div_fused(sd, td, cd, T, reverse)
    on_dev(grad_f)
    close(loss_f, loss, 1e-5)
    close(stats_f, stats, 1e-5, equal_nan=True)
    close(grad_f.double() / gmax, grad.double() / gmax, gtol)


@pytest.mark.parametrize("V", [1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_kl_div_ops_misaligned_rows(V, dtype):
    # rows that are not 16-byte aligned take the scalar path of the kernels
    g = gen("kd-layout", V)
    s = (torch.randn(5, V, generator=g) * 2).to(dtype).to(DEV)
    t = (torch.randn(5, V, generator=g) * 2).to(dtype).to(DEV)
    coef = torch.ones(5, device=DEV)
    loss, stats = P.kd_kl_div_forward(s, t, 1.5, False)
    grad = P.kd_kl_div_backward(coef, s, t, stats, 1.5, False).double()
    gmax = grad.abs().max().item()
    for ss, tt in ((row_strided(s, 1), t), (s, misaligned(t)), (misaligned(s), row_strided(t, 5))):
        l2, st2 = P.kd_kl_div_forward(ss, tt, 1.5, False)
        close(l2, loss, 1e-5)
        g2 = P.kd_kl_div_backward(coef, ss, tt, st2, 1.5, False)
        close(g2.double() / gmax, grad / gmax, max(EPS[dtype], 1e-5))
        l3, _, g3 = P.kd_kl_div_fused(ss, tt, coef, 1.5, False)
        close(l3, loss, 1e-5)
        close(g3.double() / gmax, grad / gmax, max(EPS[dtype], 1e-5))


@pytest.mark.parametrize("shape", [(2, 5, 1000), (3, 128256)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_kl_div_autograd(shape, reduction, fused, dtype):
    g = gen("kd-autograd", shape, reduction)
    s = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) < 0.7
    mask.view(-1)[0] = True
    out = {}
    for dev in ("cpu", DEV):
        sg = s.to(dev).requires_grad_()
        loss = ops.kd_kl_div(sg, t.to(dev), 2.0, reduction, "forward", row_mask=mask.to(dev), fused=fused)
        (loss.sum() if reduction == "none" else loss).backward()
        out[dev] = (loss, sg.grad)
    on_dev(out[DEV][1])
    close(out[DEV][0], out["cpu"][0], 2e-4)
    gmax = out["cpu"][1].abs().max().item()
    close(out[DEV][1], out["cpu"][1], max(EPS[dtype], 1e-4) * max(gmax, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kdloss_module(dtype):
    g = gen("kdloss")
    s = (torch.randn(4, 6, 501, generator=g) * 2).to(dtype)
    t = (torch.randn(4, 6, 501, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 501, (4, 6), generator=g)
    labels[0, :2] = -100
    crit = KDLoss(temperature=2.0, alpha=0.5)
    res = {}
    for dev in ("cpu", DEV):
        sg = s.to(dev).requires_grad_()
        loss = crit(sg, t.to(dev), labels.to(dev))
        loss.backward()
        res[dev] = (loss, sg.grad)
    close(res[DEV][0], res["cpu"][0], max(EPS[dtype], 2e-4))
    gmax = res["cpu"][1].abs().max().item()
    close(res[DEV][1], res["cpu"][1], max(EPS[dtype], 1e-4) * gmax)


# ============================================================================ schemas on the GPU
# (the int8, quantization and KD ops have theirs in test_ops_*.py::test_opcheck[cuda])
def test_opcheck_sparse_masked_semi24_pack():
    g = gen("opcheck")
    w = torch.randn(12, 20, generator=g) * (torch.rand(12, 20, generator=g) < 0.5)
    rp, ci, v = (a.to(DEV) for a in ops.dense_to_csr(w))
    mask = (w != 0).to(DEV)
    wt = w.to(DEV).requires_grad_()
    for M in (1, 9):
        torch.library.opcheck(P.sparse_linear.default, (torch.randn(M, 20, device=DEV), rp, ci, v,
                                                        torch.randn(12, device=DEV), 20))
        torch.library.opcheck(P.masked_linear.default, (torch.randn(M, 20, device=DEV, requires_grad=True), wt,
                                                        mask, torch.randn(12, device=DEV, requires_grad=True)))
    torch.library.opcheck(P.masked_linear_grad_input.default, (torch.randn(5, 12, device=DEV), wt.detach(), mask))
    torch.library.opcheck(P.masked_linear_grad_weight.default, (torch.randn(5, 12, device=DEV),
                                                                torch.randn(5, 20, device=DEV), mask))
    w24, m24 = weight24(16, 40, g, torch.float16)
    torch.library.opcheck(P.semi24_compress.default, (w24.to(DEV), m24.to(DEV), torch.float16))
    values, meta = P.semi24_compress(w24.to(DEV), m24.to(DEV), torch.float16)
    torch.library.opcheck(P.semi24_decompress.default, (values, meta, 40))
    torch.library.opcheck(P.int8_pack_weight.default, (rand_i8(33, 67, g=g).to(DEV),))
