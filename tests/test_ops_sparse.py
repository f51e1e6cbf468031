"""Sparse ops: CSR sparse_linear and the fused masked_linear (exactness, autograd, opcheck)."""

from __future__ import annotations

import pytest
import torch

import pycompress
import pycompress.ops as ops
from pycompress._ext import cpu_isas as pycompress_isas


def _random_sparse(N, K, sparsity, device="cpu", dtype=torch.float32):
    w = torch.randn(N, K, device=device, dtype=dtype)
    mask = torch.rand(N, K, device=device) >= sparsity
    return w * mask, mask


SHAPES = [(1, 1, 1), (1, 7, 5), (3, 33, 17), (8, 64, 40), (13, 100, 9), (32, 257, 130), (70, 96, 33),
          (129, 50, 64), (1, 300, 70), (9, 136, 20), (17, 1030, 12)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense(cpu_isa, M, K, N, sparsity, bias):
    w, mask = _random_sparse(N, K, sparsity)
    b = torch.randn(N) if bias else None
    x = torch.randn(M, K)
    rp, ci, v = ops.dense_to_csr(w, mask)
    assert ci.dtype == torch.int16 and rp.dtype == torch.int32
    y = ops.sparse_linear(x, rp, ci, v, b, K)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


_EXPECTED_KIND = {"scalar": "checked", "avx2": "sliced", "avx512": ("chunked", "sliced"), "amx": ("chunked", "sliced")}


@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (300, 70), (96, 600), (40000, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
def test_sparse_linear_decode_layout_matches_dense(cpu_isa, K, N, sparsity):
    # single-token calls with the layout built for this ISA (sliced on AVX2, chunked where it pays
    # on AVX-512, header only on scalar CPUs); N = 600 spans several row windows, K = 40000 needs
    # int32 indices
    w, mask = _random_sparse(N, K, sparsity)
    b = torch.randn(N)
    rp, ci, v = ops.dense_to_csr(w, mask)
    layout = ops.sparse_decode_layout(rp, ci, v, K)
    info = ops.sparse_decode_layout_info(layout, rp, ci, v, K)
    assert info["current"] and info["bytes"] == layout.numel()
    assert info["kind"] in (_EXPECTED_KIND[cpu_isa] if rp.numel() > 1 else "checked")
    tol = 1e-4 if K < 10000 else 5e-4  # fp32 sums of up to 40000 products
    for i in range(3):
        x = torch.randn(1, K)
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
        torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=layout), ref, atol=tol, rtol=tol)
    # an in-place change of the values makes the layout stale: the call runs on the CSR arrays
    with torch.no_grad():
        v.mul_(-2.0)
    assert not ops.sparse_decode_layout_info(layout, rp, ci, v, K)["current"]
    x = torch.randn(1, K)
    ref = torch.nn.functional.linear(x.double(), -2.0 * w.double(), b.double()).float()
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=layout), ref, atol=tol, rtol=tol)
    layout = ops.sparse_decode_layout(rp, ci, v, K)
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=layout), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("N", [1024, 1000])
def test_sparse_linear_decode_layout_threaded(cpu_isa, N):
    # enough kept weights for several 256-row windows shared by 2 threads (N = 1000: a short last
    # window and a short last slice)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, mask = _random_sparse(N, 1024, 0.5)
        b = torch.randn(N)
        rp, ci, v = ops.dense_to_csr(w, mask)
        layout = ops.sparse_decode_layout(rp, ci, v, 1024)
        for _ in range(3):
            x = torch.randn(1, 1024)
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
            torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, 1024, layout=layout), ref,
                                       atol=2e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(previous)


def test_sparse_linear_decode_layout_padding_never_reads_inputs(cpu_isa):
    # an inf in column c reaches exactly the rows that keep c (CSR and every layout)
    w, mask = _random_sparse(300, 64, 0.9)
    rp, ci, v = ops.dense_to_csr(w, mask)
    for layout in (None, ops.sparse_decode_layout(rp, ci, v, 64)):
        for c in (0, 63):
            x = torch.randn(1, 64)
            x[0, c] = float("inf")
            y = ops.sparse_linear(x, rp, ci, v, None, 64, layout=layout)
            assert torch.equal(~torch.isfinite(y[0]), mask[:, c])


@pytest.mark.parametrize("pattern", ["random", "dense columns", "half", "wide"])
def test_sparse_linear_chunked_layout(pattern):
    # AVX-512: the column-chunked layout (a chunk's kept weights past its step count go to a
    # sliced rest, which the dense columns fill)
    if "avx512" not in pycompress_isas():
        pytest.skip("the column-chunked layout is an AVX-512 path")
    N, K, sparsity = {"random": (300, 200, 0.9), "dense columns": (64, 100, 0.9), "half": (40, 62, 0.5),
                      "wide": (1000, 1300, 0.9)}[pattern]
    previous, threads = pycompress.active_cpu_isa(), torch.get_num_threads()
    pycompress.set_cpu_isa("avx512")
    torch.set_num_threads(2)
    try:
        w, mask = _random_sparse(N, K, sparsity)
        if pattern == "dense columns":
            mask[:, 5:12] = True
            w = torch.randn(N, K) * mask
        b = torch.randn(N)
        rp, ci, v = ops.dense_to_csr(w, mask)
        layout = ops.sparse_decode_layout(rp, ci, v, K)
        info = ops.sparse_decode_layout_info(layout, rp, ci, v, K)
        assert info["kind"] == "chunked" and info["current"]
        # the slots hold each kept weight once (4 bytes + a 1-byte index), plus padding
        assert info["bytes"] >= v.numel() * 5
        for _ in range(3):
            x = torch.randn(1, K)
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
            torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=layout), ref, atol=2e-4,
                                       rtol=1e-4)
        # under AVX2 the chunked layout is not used (the call runs on the CSR arrays); a layout
        # built under AVX2 is the sliced one
        pycompress.set_cpu_isa("avx2")
        torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=layout), ref, atol=2e-4, rtol=1e-4)
        sliced = ops.sparse_decode_layout(rp, ci, v, K)
        assert ops.sparse_decode_layout_info(sliced, rp, ci, v, K)["kind"] == "sliced"
        torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, b, K, layout=sliced), ref, atol=2e-4, rtol=1e-4)
        # inf in a column reaches exactly the rows that keep it (padding selects a zero input)
        pycompress.set_cpu_isa("avx512")
        for c in (0, K - 1):
            x = torch.randn(1, K)
            x[0, c] = float("inf")
            for lay in (layout, sliced):
                y = ops.sparse_linear(x, rp, ci, v, None, K, layout=lay)
                assert torch.equal(~torch.isfinite(y[0]), mask[:, c])
    finally:
        pycompress.set_cpu_isa(previous)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("M", [1, 9, 32, 48, 64, 100])
def test_sparse_linear_unsorted_rows(cpu_isa, M):
    # column indices in any order within a row (valid CSR) give the same product on every path
    # (the column-blocked M >= 2 kernels walk each row with a cursor)
    w, mask = _random_sparse(150, 700, 0.8)
    rp, ci, v = ops.dense_to_csr(w, mask)
    g = torch.Generator().manual_seed(3)
    perm = torch.arange(ci.numel())
    for n in range(150):
        a, b = int(rp[n]), int(rp[n + 1])
        perm[a:b] = a + torch.randperm(b - a, generator=g)
    ci, v = ci[perm].contiguous(), v[perm].contiguous()
    bias = torch.randn(150)
    for layout in (None, ops.sparse_decode_layout(rp, ci, v, 700)):
        x = torch.randn(M, 700)
        ref = torch.nn.functional.linear(x.double(), w.double(), bias.double()).float()
        torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, bias, 700, layout=layout), ref, atol=2e-4,
                                   rtol=1e-4)


def test_sparse_linear_decode_layout_is_used_only_while_current():
    # the layout records the arrays it was built from: another layer's layout, arrays changed in
    # place, replaced or re-allocated, or a layout written to, all fall back to the checked CSR
    # arrays (same result); a tensor that is not a layout is an error
    w, mask = _random_sparse(70, 40, 0.8)
    rp, ci, v = ops.dense_to_csr(w, mask)
    layout = ops.sparse_decode_layout(rp, ci, v, 40)
    x = torch.randn(1, 40)
    ref = torch.nn.functional.linear(x.double(), w.double()).float()

    def current(lay, *csr):
        return ops.sparse_decode_layout_info(lay, *(csr or (rp, ci, v)), 40)["current"]

    assert current(layout)
    rp2, ci2, v2 = rp.clone(), ci.clone(), v.clone()  # equal arrays, other tensors
    assert not current(layout, rp2, ci2, v2)
    torch.testing.assert_close(ops.sparse_linear(x, rp2, ci2, v2, None, 40, layout=layout), ref, atol=1e-4,
                               rtol=1e-4)
    w_other, m_other = _random_sparse(70, 40, 0.8)
    other = ops.dense_to_csr(w_other, m_other)
    assert not current(layout, *other)
    torch.testing.assert_close(ops.sparse_linear(x, *other, None, 40, layout=layout),
                               torch.nn.functional.linear(x.double(), w_other.double()).float(), atol=1e-4, rtol=1e-4)
    written = layout.clone()
    assert current(written)
    written[-1] = 7
    assert not current(written)
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, None, 40, layout=written), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ci[0] = 40  # a corrupt index: the stale layout is not used, the checked arrays raise
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sparse_linear(x, rp, ci, v, None, 40, layout=layout)
    with pytest.raises(RuntimeError, match="not a sparse_decode_layout result"):
        ops.sparse_linear(x, rp2, ci2, v2, None, 40, layout=torch.zeros(512, dtype=torch.uint8))
    with pytest.raises(TypeError, match="layout"):
        ops.sparse_linear(x, rp2, ci2, v2, None, 40, layout=layout.float())
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sparse_decode_layout(rp, ci, v, 40)  # building checks the arrays completely
    with pytest.raises(TypeError, match="pack"):
        ops.sparse_decode_layout(rp2, ci2, v2, 40, pack=1)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_check_csr_names_each_structural_error(device, dtype):
    # check_csr: what SparseLinear runs once on non-CPU devices (the CUDA kernel does not check)
    w, mask = _random_sparse(12, 20, 0.5, device=device)
    rp, ci, v = ops.dense_to_csr(w, mask, index_dtype=dtype)
    ops.check_csr(rp, ci, v, 20)
    for name, edit, words in (("row_ptr", lambda t: t.__setitem__(0, 1), "start at 0"),
                              ("row_ptr", lambda t: t.__setitem__(3, int(t[5]) + 1), "non-decreasing"),
                              ("col_idx", lambda t: t.__setitem__(0, 20), "out of range"),
                              ("col_idx", lambda t: t.__setitem__(-1, -1), "out of range")):
        arrays = {"row_ptr": rp.clone(), "col_idx": ci.clone(), "values": v}
        edit(arrays[name])
        with pytest.raises(RuntimeError, match=words):
            ops.check_csr(arrays["row_ptr"], arrays["col_idx"], v, 20)
        with pytest.raises(RuntimeError, match=words):
            ops.sparse_linear(torch.randn(2, 20, device=device), arrays["row_ptr"], arrays["col_idx"], v, None, 20)
    with pytest.raises(TypeError, match="in_features"):
        ops.check_csr(rp, ci, v, 2.0)


def test_sparse_linear_decode_layout_pack_false_and_inference_tensors():
    w, mask = _random_sparse(300, 96, 0.8)
    rp, ci, v = ops.dense_to_csr(w, mask)
    x = torch.randn(1, 96)
    ref = torch.nn.functional.linear(x.double(), w.double()).float()
    header = ops.sparse_decode_layout(rp, ci, v, 96, pack=False)
    assert ops.sparse_decode_layout_info(header, rp, ci, v, 96) == {"kind": "checked", "bytes": 256, "current": True}
    full = ops.sparse_decode_layout(rp, ci, v, 96)
    assert full.numel() > v.numel() * 5  # a copy of every kept weight
    for lay in (header, full):
        for m in (1, 4):
            xm = x.expand(m, 96)
            torch.testing.assert_close(ops.sparse_linear(xm, rp, ci, v, None, 96, layout=lay), ref.expand(m, -1),
                                       atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        irp, ici, iv = rp.clone(), ci.clone(), v.clone()
        lay = ops.sparse_decode_layout(irp, ici, iv, 96)
        # inference tensors have no version counter: nothing to tell a change by, never current
        assert ops.sparse_decode_layout_info(lay, irp, ici, iv, 96)["current"] is False
        torch.testing.assert_close(ops.sparse_linear(x, irp, ici, iv, None, 96, layout=lay), ref, atol=1e-4,
                                   rtol=1e-4)


def test_no_process_wide_layout_state():
    # the layouts live in tensors the caller holds: nothing in the extension keeps layers' data
    import pathlib

    import pycompress._C as C

    assert not [n for n in dir(C) if "layout" in n or "module_cpu" in n]
    assert not hasattr(ops, "clear_decode_layouts") and not hasattr(ops, "set_decode_layout")
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    sources = [p for p in csrc.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")]
    assert sources
    for p in sources:
        text = p.read_text()
        for word in ("TensorKeyedCache", "SellCache", "CsrCheckCache", "unsafeGetTensorImpl", "PythonTorchFunctionTLS",
                     "tls_local_dispatch_key_set"):
            assert word not in text, (p, word)


@pytest.mark.parametrize("M", [1, 2, 8, 9, 24, 33])
def test_sparse_linear_strided_activations(cpu_isa, M):
    # rows of x further apart than K (a slice of a wider tensor), and a transposed view
    K, N = 75, 40
    w, mask = _random_sparse(N, K, 0.8)
    rp, ci, v = ops.dense_to_csr(w, mask)
    wide = torch.randn(M, K + 13)
    x = wide[:, 5:5 + K]
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, None, K), ref.float(), atol=1e-4, rtol=1e-4)
    xt = torch.randn(K, M).t()
    torch.testing.assert_close(ops.sparse_linear(xt, rp, ci, v, None, K), (xt.double() @ w.double().t()).float(),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M", [1, 5, 16, 200])
def test_sparse_linear_int32_index_and_devices(device, M):
    K, N = 300, 70
    w, mask = _random_sparse(N, K, 0.8, device=device)
    rp, ci, v = ops.dense_to_csr(w, mask, index_dtype=torch.int32)
    x = torch.randn(M, K, device=device)
    y = ops.sparse_linear(x, rp, ci, v, None, K)
    torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4)


def test_sparse_linear_all_zero_rows_and_empty():
    K, N = 40, 12
    w = torch.zeros(N, K)
    w[3, 5] = 2.0
    rp, ci, v = ops.dense_to_csr(w)
    assert v.numel() == 1
    x = torch.randn(9, K)
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, None, K), x @ w.t())
    rp0, ci0, v0 = ops.dense_to_csr(torch.zeros(N, K))
    b = torch.randn(N)
    torch.testing.assert_close(ops.sparse_linear(x, rp0, ci0, v0, b, K), b.expand(9, N))
    assert ops.sparse_linear(torch.randn(0, K), rp, ci, v, None, K).shape == (0, N)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_linear_low_precision_inputs(dtype):
    w, mask = _random_sparse(24, 48, 0.7)
    rp, ci, v = ops.dense_to_csr(w, mask)
    x = torch.randn(5, 3, 48).to(dtype)
    y = ops.sparse_linear(x, rp, ci, v, None, 48)
    assert y.dtype == dtype and y.shape == (5, 3, 24)
    torch.testing.assert_close(y.float(), x.float() @ w.t(), atol=2e-2, rtol=2e-2)


def test_csr_round_trip():
    w, mask = _random_sparse(17, 29, 0.6)
    rp, ci, v = ops.dense_to_csr(w, mask)
    assert torch.equal(ops.csr_to_dense(rp, ci, v, 29), w)


def test_sparse_linear_bad_inputs():
    w, mask = _random_sparse(8, 16, 0.5)
    rp, ci, v = ops.dense_to_csr(w, mask)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="in_features"):
        ops.sparse_linear(torch.randn(2, 15), rp, ci, v, None, 16)
    with pytest.raises(TypeError, match="row_ptr"):
        ops.sparse_linear(x, rp.long(), ci, v, None, 16)
    with pytest.raises(TypeError, match="values"):
        ops.sparse_linear(x, rp, ci, v.double(), None, 16)
    with pytest.raises(TypeError, match="x"):
        ops.sparse_linear(x.int(), rp, ci, v, None, 16)
    with pytest.raises(ValueError, match="bias"):
        ops.sparse_linear(x, rp, ci, v, torch.randn(7), 16)
    with pytest.raises(ValueError, match="same length"):
        ops.sparse_linear(x, rp, ci, v[:-1], None, 16)
    bad = ci.clone()
    bad[0] = 16
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sparse_linear(x, rp, bad, v, None, 16)
    bad_rp = rp.clone()
    bad_rp[-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr"):
        ops.sparse_linear(x, bad_rp, ci, v, None, 16)


# ----------------------------------------------------------------------------- masked_linear
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_masked_linear_forward_backward(cpu_isa, M, K, N, sparsity):
    w = torch.randn(N, K, requires_grad=True)
    mask = torch.rand(N, K) >= sparsity
    b = torch.randn(N, requires_grad=True)
    x = torch.randn(M, K, requires_grad=True)
    y = ops.masked_linear(x, w, mask, b)
    g = torch.randn_like(y)
    y.backward(g)
    wr = w.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, wr * mask, br)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, br.grad)
    assert torch.all(w.grad[~mask] == 0)


def test_masked_linear_devices_and_leading_dims(device):
    w = torch.randn(20, 30, device=device, requires_grad=True)
    mask = torch.rand(20, 30, device=device) > 0.5
    x = torch.randn(2, 3, 30, device=device)
    y = ops.masked_linear(x, w, mask)
    assert y.shape == (2, 3, 20)
    torch.testing.assert_close(y, x @ (w * mask).t(), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert torch.all(w.grad[~mask] == 0)


def test_masked_linear_bad_inputs():
    w = torch.randn(4, 6)
    m = torch.ones(4, 6, dtype=torch.bool)
    x = torch.randn(2, 6)
    with pytest.raises(TypeError, match="mask"):
        ops.masked_linear(x, w, m.float())
    with pytest.raises(ValueError, match="mask"):
        ops.masked_linear(x, w, m[:, :5])
    with pytest.raises(ValueError, match="features"):
        ops.masked_linear(torch.randn(2, 5), w, m)
    with pytest.raises(TypeError, match="dtype"):
        ops.masked_linear(x.double(), w, m)
    with pytest.raises(ValueError, match="bias"):
        ops.masked_linear(x, w, m, torch.randn(3))
    with pytest.raises(TypeError, match="weight"):
        ops.masked_linear(x, "w", m)


def test_opcheck():
    w, mask = _random_sparse(12, 20, 0.6)
    rp, ci, v = ops.dense_to_csr(w, mask)
    for M in (1, 9):
        torch.library.opcheck(torch.ops.pycompress.sparse_linear.default,
                              (torch.randn(M, 20), rp, ci, v, torch.randn(12), 20))
    wt = torch.randn(12, 20, requires_grad=True)
    for M in (1, 7):
        torch.library.opcheck(torch.ops.pycompress.masked_linear.default,
                              (torch.randn(M, 20, requires_grad=True), wt, mask, torch.randn(12, requires_grad=True)))
        torch.library.opcheck(torch.ops.pycompress.masked_linear.default,
                              (torch.randn(M, 20), wt, mask, None))
    torch.library.opcheck(torch.ops.pycompress.masked_linear_grad_input.default,
                          (torch.randn(5, 12), wt.detach(), mask))
    torch.library.opcheck(torch.ops.pycompress.masked_linear_grad_weight.default,
                          (torch.randn(5, 12), torch.randn(5, 20), mask))


def test_torch_compile_fullgraph():
    w, mask = _random_sparse(16, 24, 0.7)
    rp, ci, v = ops.dense_to_csr(w, mask)

    def f(x):
        return ops.sparse_linear(x, rp, ci, v, None, 24) + ops.masked_linear(x, w, mask)

    x = torch.randn(4, 24)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, 2 * (x @ w.t()), atol=1e-4, rtol=1e-4)


def test_sparse_linear_rejects_corrupt_buffers_on_every_device(device):
    w, mask = _random_sparse(10, 20, 0.5, device=device)
    rp, ci, v = ops.dense_to_csr(w, mask)
    x = torch.randn(3, 20, device=device)
    torch.testing.assert_close(ops.sparse_linear(x, rp, ci, v, None, 20), x @ w.t(), atol=1e-4, rtol=1e-4)
    ci[0] = 25  # in-place change after a successful call must be caught again
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sparse_linear(x, rp, ci, v, None, 20)


def test_sparse_linear_input_gradient():
    w, mask = _random_sparse(12, 30, 0.8)
    rp, ci, v = ops.dense_to_csr(w, mask)
    x = torch.randn(5, 30, requires_grad=True)
    g = torch.randn(5, 12)
    ops.sparse_linear(x, rp, ci, v, None, 30).backward(g)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.pycompress.sparse_linear.default,
                          (torch.randn(3, 30, requires_grad=True), rp, ci, v, None, 30))
