"""2:4 semi-structured sparsity: packer, metadata layout (emulated sparse tensor core fragments),
CPU kernels on every ISA, SemiSparseLinear, deploy_pruned, bad inputs, and CUDA kernel checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pycompress
import pycompress.ops as ops
from pycompress.nn import MaskedLinear, SemiSparseLinear

from semi24_emulation import INVALID_NIBBLES, run_kernel


def _mask24(N, K, gen=None, density=(0, 1, 2)):
    """Random 2:4 mask [N, K]: each group of 4 keeps 0, 1 or 2 random positions."""
    k4 = (K + 3) // 4 * 4
    scores = torch.rand(N, k4 // 4, 4, generator=gen)
    counts = torch.tensor(density)[torch.randint(len(density), (N, k4 // 4), generator=gen)]
    order = scores.argsort(-1).argsort(-1)
    keep = order < counts.unsqueeze(-1)
    return keep.reshape(N, k4)[:, :K].contiguous()


def _weight24(N, K, gen=None, dtype=torch.float32):
    mask = _mask24(N, K, gen)
    w = torch.randn(N, K, generator=gen) * mask
    return w.to(dtype), mask


def _decode_meta(meta: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Positions [N, Kp/4, 2] of the kept weights, read from the documented meta layout."""
    Kp = (K + 31) // 32 * 32
    words = meta.to(torch.int32) & 0xFFFF
    pos = torch.zeros(N, Kp // 4, 2, dtype=torch.int64)
    for n in range(N):
        nt, r = divmod(n, 16)
        g, h = r % 8, r // 8
        for c in range(Kp // 16):
            kt, t = divmod(c, 2)
            word = int(words[nt, kt, 2 * (2 * g + t) + h])
            for q in range(4):
                nib = (word >> (4 * q)) & 15
                pos[n, 4 * c + q, 0] = nib & 3
                pos[n, 4 * c + q, 1] = (nib >> 2) & 3
    return pos


# ----------------------------------------------------------------------------- packer / layout
@pytest.mark.parametrize("N,K", [(1, 1), (5, 3), (16, 32), (17, 37), (33, 100), (40, 64)])
def test_compress_layout_matches_documentation(N, K):
    gen = torch.Generator().manual_seed(N * 131 + K)
    w, mask = _weight24(N, K, gen)
    values, meta = ops.semi24_compress(w, mask)
    Kp = (K + 31) // 32 * 32
    assert values.shape == (N, Kp // 2) and values.dtype == torch.float32
    assert meta.shape == ((N + 15) // 16, Kp // 32, 32) and meta.dtype == torch.int16
    pos = _decode_meta(meta, N, K)
    assert bool((pos[..., 0] < pos[..., 1]).all()), "indices must be distinct and increasing"
    wp = torch.nn.functional.pad(w, (0, Kp - K)).view(N, Kp // 4, 4)
    mp = torch.nn.functional.pad(mask, (0, Kp - K)).view(N, Kp // 4, 4)
    v = values.view(N, Kp // 4, 2)
    for s in range(2):
        gathered = wp.gather(-1, pos[..., s:s + 1]).squeeze(-1)
        assert torch.equal(v[..., s], gathered)  # the value at the named position
    # every kept weight is named by one of the two indices
    named = torch.zeros_like(mp)
    named.scatter_(-1, pos, True)
    assert bool((named | ~mp).all())
    # padding rows of the last tile: indices (0, 1) in every group
    words = meta.to(torch.int32) & 0xFFFF
    for n in range(N, meta.shape[0] * 16):
        nt, r = divmod(n, 16)
        for c in range(Kp // 16):
            kt, t = divmod(c, 2)
            assert int(words[nt, kt, 2 * (2 * (r % 8) + t) + r // 8]) == 0x4444


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_decompress_roundtrip(dtype):
    w, mask = _weight24(21, 45, torch.Generator().manual_seed(3))
    values, meta = ops.semi24_compress(w, mask, dtype=dtype)
    assert values.dtype == dtype
    assert torch.equal(ops.semi24_decompress(values, meta, 45), w.to(dtype))


def test_compress_mask_drops_unmasked_weights():
    w = torch.randn(4, 8)  # dense weight, mask selects 2 of 4
    mask = _mask24(4, 8, torch.Generator().manual_seed(1), density=(2,))
    values, meta = ops.semi24_compress(w, mask)
    assert torch.equal(ops.semi24_decompress(values, meta, 8), w * mask)


@pytest.mark.parametrize("config,M,N,K,dt", [
    ("small_m", 20, 40, 100, torch.float16),   # K tail (100 -> 104 -> 128), N tail, 2 k-blocks
    ("small_m", 3, 70, 40, torch.float16),     # 2 blocks along N, odd number of k-steps
    ("small_m", 9, 17, 70, torch.bfloat16),
    ("large_m", 9, 17, 70, torch.bfloat16),    # odd k-steps (Kp = 96), N tail, M tail
])
def test_cuda_kernel_layout_emulated(config, M, N, K, dt):
    """The CUDA kernel's loads + the PTX fragment/metadata semantics reproduce x @ W.T + b."""
    gen = torch.Generator().manual_seed(M + N + K)
    w, mask = _weight24(N, K, gen, dtype=dt)
    values, meta = ops.semi24_compress(w, mask)
    x = torch.randn(M, K, generator=gen).to(dt)
    bias = torch.randn(N, generator=gen)
    y = run_kernel(x, values, meta, bias, K, config)
    ref = x.double() @ w.double().t() + bias.double()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


def test_emulation_detects_layout_errors():
    """The emulation is sensitive to the metadata layout: swapping the row halves of the words
    (a plausible packing mistake) gives wrong results."""
    gen = torch.Generator().manual_seed(7)
    w, mask = _weight24(16, 32, gen, dtype=torch.float16)
    values, meta = ops.semi24_compress(w, mask)
    x = torch.randn(8, 32, generator=gen).half()
    bad = meta.view(1, 1, 16, 2).flip(-1).reshape(meta.shape).contiguous()
    ref = x.double() @ w.double().t()
    good = run_kernel(x, values, meta, None, 32, "small_m")
    torch.testing.assert_close(good, ref)
    try:
        wrong = run_kernel(x, values, bad, None, 32, "small_m")
    except AssertionError:
        return  # an invalid nibble was caught
    assert not torch.allclose(wrong, ref)


# ----------------------------------------------------------------------------- CPU kernels
SHAPES = [(0, 8, 3), (1, 1, 1), (1, 3, 5), (2, 31, 7), (3, 33, 17), (4, 64, 16), (5, 100, 33),
          (9, 37, 21), (33, 70, 9), (40, 130, 18),
          (6, 300, 150), (70, 200, 130)]  # several K blocks, N panels and activation-row blocks


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_matches_dense_cpu(cpu_isa, M, K, N, vdtype):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    w, mask = _weight24(N, K, gen)
    values, meta = ops.semi24_compress(w, mask, dtype=vdtype)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    y = ops.semi24_linear(x, values, meta, bias, K)
    ref = x.double() @ w.to(vdtype).double().t() + bias.double()
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y0 = ops.semi24_linear(x, values, meta, None, K)
    torch.testing.assert_close(y0.double(), ref - bias.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_linear_half_inputs_cpu(cpu_isa, xdtype):
    w, mask = _weight24(19, 50, torch.Generator().manual_seed(5))
    values, meta = ops.semi24_compress(w, mask)
    for M in (1, 6):
        x = torch.randn(M, 50).to(xdtype)
        y = ops.semi24_linear(x, values, meta, None, 50)
        assert y.dtype == xdtype
        ref = (x.float() @ w.t()).to(xdtype)
        torch.testing.assert_close(y, ref)


def test_linear_noncontiguous_and_leading_dims():
    w, mask = _weight24(12, 40, torch.Generator().manual_seed(2))
    values, meta = ops.semi24_compress(w, mask)
    x = torch.randn(3, 5, 80)[..., ::2]  # strided
    y = ops.semi24_linear(x, values, meta, None, 40)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- module
def _pruned_masked(K, N, bias=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(K, N, bias=bias))
    pycompress.prune(model, None, pattern="2:4")
    assert isinstance(model[0], MaskedLinear)
    return model[0]


@pytest.mark.parametrize("bias", [True, False])
def test_module_from_masked_linear(bias):
    ml = _pruned_masked(70, 23, bias)
    layer = SemiSparseLinear.from_dense(ml)
    x = torch.randn(2, 3, 70)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ml(x), rtol=1e-5, atol=1e-5)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    assert torch.equal(dense.weight, ml.weight.detach() * ml.mask)
    assert "format=2:4/float32" in repr(layer) and "in_features=70" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_half_storage(dtype):
    ml = _pruned_masked(64, 32)
    layer = SemiSparseLinear.from_dense(ml, dtype=dtype)
    assert layer.values.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(5, 64)
    ref = x @ (ml.weight.detach() * ml.mask).to(dtype).float().t() + ml.bias.detach().to(dtype).float()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_module_state_dict_config_roundtrip():
    layer = SemiSparseLinear.from_dense(_pruned_masked(45, 19), dtype=torch.bfloat16)
    cfg = json.loads(json.dumps(layer.config()))
    fresh = SemiSparseLinear.from_config(cfg)
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 45)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="format"):
        SemiSparseLinear.from_config({**cfg, "format": "csr"})
    with pytest.raises(ValueError, match="dtype"):
        SemiSparseLinear.from_config({**cfg, "dtype": "int8"})


def test_module_save_load(tmp_path):
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    pycompress.prune(model, None, pattern="2:4")
    pycompress.deploy_pruned(model, mode="semi24")
    assert isinstance(model[0], SemiSparseLinear) and isinstance(model[2], SemiSparseLinear)
    pycompress.save(model, tmp_path / "m")
    fresh = pycompress.load(tmp_path / "m", nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)))
    assert isinstance(fresh[0], SemiSparseLinear)
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), model(x))


def test_module_torch_compile_fullgraph():
    layer = SemiSparseLinear.from_dense(_pruned_masked(48, 20))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(compiled(x), layer(x))


def test_opcheck():
    w, mask = _weight24(18, 40, torch.Generator().manual_seed(9))
    for vdtype in (torch.float32, torch.float16):
        values, meta = ops.semi24_compress(w, mask, dtype=vdtype)
        for M in (1, 6):
            torch.library.opcheck(torch.ops.pycompress.semi24_linear.default,
                                  (torch.randn(M, 40), values, meta, torch.randn(18), 40))
        torch.library.opcheck(torch.ops.pycompress.semi24_linear.default,
                              (torch.randn(3, 40).bfloat16(), values, meta, None, 40))
        torch.library.opcheck(torch.ops.pycompress.semi24_decompress.default, (values, meta, 40))
    torch.library.opcheck(torch.ops.pycompress.semi24_compress.default, (w, mask, torch.float16))
    torch.library.opcheck(torch.ops.pycompress.semi24_compress.default, (w, None, None))


def test_deploy_pruned_semi24_and_auto():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    pycompress.prune(model, None, pattern="2:4")
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
    import copy
    semi = pycompress.deploy_pruned(copy.deepcopy(model), mode="semi24")
    assert all(isinstance(semi[i], SemiSparseLinear) for i in (0, 2))
    torch.testing.assert_close(semi(x), ref, rtol=1e-5, atol=1e-5)
    auto = pycompress.deploy_pruned(copy.deepcopy(model), mode="auto")
    with torch.no_grad():
        torch.testing.assert_close(auto(x), ref, rtol=1e-5, atol=1e-5)
    # 50% unstructured with one group of four keeping three weights: never 2:4
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[:, ::2] = True
    mask[5, 8:12] = torch.tensor([True, True, True, False])
    mask[5, 12:16] = False
    unstructured = nn.Sequential(nn.Linear(64, 32))
    pycompress.prune(unstructured, 0.5, pattern="unstructured")
    unstructured[0].set_mask(mask)
    with pytest.raises(ValueError, match="not 2:4"):
        pycompress.deploy_pruned(unstructured, mode="semi24")
    assert type(unstructured[0]).__name__ == "MaskedLinear"  # the model is left as it was


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bias", [True, False])
def test_module_calls_go_through_the_op(bias):
    # SemiSparseLinear.forward calls torch.ops.pycompress.semi24_linear itself: the dense result,
    # visible to every mode and transform, clear errors for bad inputs
    from direct_calls import check_every_isa, check_module_calls

    w, mask = _weight24(24, 40, torch.Generator().manual_seed(3))
    lin = nn.Linear(40, 24, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = SemiSparseLinear.from_dense(lin, mask)

    def reference(inp):
        with torch.no_grad():
            return lin(inp.float()).to(inp.dtype)

    check_module_calls(m, reference, "pycompress::semi24_linear", atol=1e-5)
    check_every_isa(m, reference, atol=1e-5)


def test_not_24_names_row_and_group():
    w = torch.zeros(3, 10)
    w[2, 4:7] = 1.0  # row 2, group 1 keeps 3 of 4
    with pytest.raises(ValueError, match=r"row 2, group 1 \(columns 4\.\.7\) keeps 3 of 4"):
        ops.semi24_compress(w)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1, 8:10] = True
    mask[0, 0:4] = True
    with pytest.raises(ValueError, match=r"mask is not 2:4.*row 0, group 0"):
        SemiSparseLinear.from_dense(nn.Linear(10, 3), mask)
    with pytest.raises(ValueError, match="not 2:4"):  # a dense layer without a mask
        SemiSparseLinear.from_dense(nn.Linear(8, 2))
    # the C++ check is the second line (raw op)
    with pytest.raises(ValueError, match="row 2, group 1"):
        torch.ops.pycompress.semi24_compress(w, None, None)


def test_bad_inputs():
    w, mask = _weight24(8, 16, torch.Generator().manual_seed(4))
    values, meta = ops.semi24_compress(w, mask)
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="x"):
        ops.semi24_linear(x.to(torch.int32), values, meta, None, 16)
    with pytest.raises(ValueError, match="in_features=16"):
        ops.semi24_linear(torch.randn(2, 15), values, meta, None, 16)
    with pytest.raises(ValueError, match="values must have"):
        ops.semi24_linear(torch.randn(2, 40), values, meta, None, 40)
    with pytest.raises(ValueError, match="meta must have shape"):
        ops.semi24_linear(x, values, meta[:, :, :16], None, 16)
    with pytest.raises(TypeError, match="meta"):
        ops.semi24_linear(x, values, meta.to(torch.int32), None, 16)
    with pytest.raises(TypeError, match="values"):
        ops.semi24_linear(x, values.to(torch.float64), meta, None, 16)
    with pytest.raises(ValueError, match="bias"):
        ops.semi24_linear(x, values, meta, torch.randn(7), 16)
    with pytest.raises(TypeError, match="in_features"):
        ops.semi24_linear(x, values, meta, None, 16.0)
    with pytest.raises(TypeError, match="weight"):
        ops.semi24_compress(w.to(torch.int64))
    with pytest.raises(TypeError, match="mask"):
        ops.semi24_compress(w, mask.float())
    with pytest.raises(ValueError, match="shape"):
        ops.semi24_compress(w, mask[:, :8])
    with pytest.raises(TypeError, match="dtype"):
        ops.semi24_compress(w, mask, dtype=torch.int8)
    with pytest.raises(TypeError):
        SemiSparseLinear.from_dense(nn.Conv1d(2, 2, 1))
    # raw ops keep their TORCH_CHECKs
    with pytest.raises(RuntimeError, match="meta must have shape"):
        torch.ops.pycompress.semi24_linear(x, values, meta[:, :, :16].contiguous(), None, 16)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.pycompress.semi24_linear(torch.randn(2, 15), values, meta, None, 16)


def test_meta_words_never_invalid():
    w, mask = _weight24(20, 64, torch.Generator().manual_seed(11))
    w[3] = 0  # empty rows and groups still get valid metadata
    _, meta = ops.semi24_compress(w, mask & (w != 0))
    words = meta.to(torch.int32) & 0xFFFF
    for q in range(4):
        nibs = set(((words >> (4 * q)) & 15).unique().tolist())
        assert not nibs & INVALID_NIBBLES


# ----------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(0, 32, 16), (1, 8, 1), (1, 4096, 64), (7, 24, 15), (17, 40, 17), (33, 100, 70),
               (130, 72, 33), (257, 1000, 130), (64, 4096, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("M,K,N", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_dense_with_zeros(M, K, N, dtype):
    gen = torch.Generator().manual_seed(M + 7 * K + 13 * N)
    w, mask = _weight24(N, K, gen, dtype=dtype)
    values, meta = ops.semi24_compress(w.cuda(), mask.cuda())
    assert values.is_cuda and meta.is_cuda and values.dtype == dtype
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen)
    y = ops.semi24_linear(x.cuda(), values, meta, bias.cuda(), K)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = x.double() @ w.double().t() + bias.double()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * max(1.0, K ** 0.5 / 8))
    # fp32 activations: computed in the values' dtype, returned in fp32
    y32 = ops.semi24_linear(x.float().cuda(), values, meta, None, K)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.cpu().double(), ref - bias.double(), rtol=tol, atol=tol * max(1.0, K ** 0.5 / 8))


@pytest.mark.cuda
def test_cuda_module_matches_cpu_module():
    ml = _pruned_masked(300, 77)
    cpu_layer = SemiSparseLinear.from_dense(ml, dtype=torch.float16)
    gpu_layer = SemiSparseLinear.from_dense(ml, dtype=torch.float16).cuda()
    assert torch.equal(gpu_layer.meta.cpu(), cpu_layer.meta)
    x = torch.randn(2, 5, 300).half()
    torch.testing.assert_close(gpu_layer(x.cuda()).cpu().float(), cpu_layer(x).float(), rtol=1e-2, atol=2e-2)
    fp32_layer = SemiSparseLinear.from_dense(ml).cuda()  # fp32 values: bf16 on the tensor cores
    torch.testing.assert_close(fp32_layer(x.float().cuda()).cpu(), cpu_layer(x.float()), rtol=3e-2, atol=6e-2)
    compiled = torch.compile(gpu_layer, fullgraph=True)
    torch.testing.assert_close(compiled(x.cuda()), gpu_layer(x.cuda()))


@pytest.mark.cuda
def test_cuda_opcheck():
    w, mask = _weight24(24, 72, torch.Generator().manual_seed(12), dtype=torch.float16)
    values, meta = ops.semi24_compress(w.cuda(), mask.cuda())
    for M in (1, 40):
        torch.library.opcheck(torch.ops.pycompress.semi24_linear.default,
                              (torch.randn(M, 72, device="cuda").half(), values, meta, None, 72))
