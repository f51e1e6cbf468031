"""MaskedLinear / SparseLinear modules: exactness, masks held through training, state_dict."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from pycompress.nn import MaskedLinear, SparseLinear
from pycompress.nn.masked_linear import keep_masks


def _pruned_linear(K, N, sparsity, bias=True):
    lin = nn.Linear(K, N, bias=bias)
    mask = torch.rand(N, K) >= sparsity
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masked_weights_stay_zero_through_training(opt_name):
    torch.manual_seed(1)
    lin = nn.Linear(37, 19)
    mask = torch.rand(19, 37) > 0.7
    ml = MaskedLinear.from_dense(lin, mask)
    model = nn.Sequential(ml, nn.ReLU(), nn.Linear(19, 3))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = ml.weight.detach().clone()
    for _ in range(15):
        x = torch.randn(8, 37)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.all(ml.weight.grad[~mask] == 0)
        opt.step()
    assert torch.all(ml.weight[~mask] == 0)
    assert not torch.equal(ml.weight[mask], before[mask])  # kept weights did train


def test_keep_masks_after_mask_change_with_momentum():
    ml = MaskedLinear.from_dense(nn.Linear(16, 8))
    opt = torch.optim.SGD(ml.parameters(), lr=0.1, momentum=0.9)
    handle = keep_masks(ml, opt)
    for _ in range(3):
        opt.zero_grad()
        ml(torch.randn(4, 16)).sum().backward()
        opt.step()
    new_mask = torch.rand(8, 16) > 0.5
    ml.set_mask(new_mask)  # momentum buffers still hold values for newly pruned weights
    for _ in range(3):
        opt.zero_grad()
        ml(torch.randn(4, 16)).sum().backward()
        opt.step()
        assert torch.all(ml.weight[~new_mask] == 0)
    assert torch.all(opt.state[ml.weight]["momentum_buffer"][~new_mask] == 0)
    handle.remove()


def test_masked_linear_module_matches_dense_and_round_trip():
    lin, mask = _pruned_linear(50, 30, 0.6)
    ml = MaskedLinear.from_dense(lin, mask)
    x = torch.randn(7, 50)
    torch.testing.assert_close(ml(x), lin(x), atol=1e-5, rtol=1e-5)
    assert "sparsity=" in repr(ml)
    cfg = json.loads(json.dumps(ml.config()))
    fresh = MaskedLinear.from_config(cfg)
    fresh.load_state_dict(ml.state_dict())
    torch.testing.assert_close(fresh(x), ml(x))
    assert torch.equal(fresh.mask, mask)
    dense = ml.to_dense()
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense(x), ml(x), atol=1e-5, rtol=1e-5)


def test_masked_linear_bad_mask():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="shape"):
        MaskedLinear.from_dense(lin, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        MaskedLinear.from_dense(lin, torch.ones(3, 4))
    with pytest.raises(TypeError, match="Linear"):
        MaskedLinear.from_dense(nn.ReLU(), None)


@pytest.mark.parametrize("K,N", [(1, 1), (33, 17), (768, 64), (129, 300)])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
@pytest.mark.parametrize("M", [1, 3, 8, 40])
def test_sparse_linear_equals_dense_with_zeros(K, N, sparsity, M):
    lin, _ = _pruned_linear(K, N, sparsity)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(M, K)
    torch.testing.assert_close(sl(x), lin(x), atol=1e-4, rtol=1e-4)
    assert sl.nnz == int((lin.weight != 0).sum())


def test_sparse_linear_forward_paths():
    # the op skips autograd when no gradient is needed and records the input gradient
    # otherwise; both give the dense result, for every input layout
    lin, _ = _pruned_linear(70, 30, 0.9)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(2, 5, 70)
    ref = lin(x).detach()
    torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sl(x[:, 1]), ref[:, 1], atol=1e-4, rtol=1e-4)  # strided rows
        torch.testing.assert_close(sl(x[0, 2]), ref[0, 2], atol=1e-4, rtol=1e-4)  # 1-D input
    with torch.inference_mode():
        torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
    y16 = sl(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), ref, atol=5e-2, rtol=5e-2)
    assert not sl(x).requires_grad
    xg = x.clone().requires_grad_(True)
    y = sl(xg)
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(xg.grad, lin.weight.detach().sum(0).expand(2, 5, 70), atol=1e-4, rtol=1e-4)


def test_sparse_linear_inference_call_stays_visible():
    # the module's call of the op must stay visible to dispatch modes, the profiler,
    # the tracer or functorch transforms
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    lin, _ = _pruned_linear(48, 20, 0.8)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(3, 48)
    ref = lin(x).detach()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Record():
            torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
        assert any("sparse_linear" in f for f in seen)
        seen.clear()

        class RecordFn(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with RecordFn():
            torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
        assert any("sparse_linear" in f for f in seen)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sl(x)
        assert any("sparse_linear" in e.name for e in prof.events())
        traced = torch.jit.trace(sl, x)
        assert "sparse_linear" in str(traced.graph)
        torch.testing.assert_close(traced(x), ref, atol=1e-4, rtol=1e-4)
        ys = torch.func.vmap(sl)(x.unsqueeze(1))
        torch.testing.assert_close(ys.squeeze(1), ref, atol=1e-4, rtol=1e-4)
    sl.row_ptr = sl.row_ptr.to("meta")  # a buffer on another device: a clear error, no crash
    with torch.no_grad(), pytest.raises(ValueError, match="same device"):
        sl(x)


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_module_calls_go_through_the_op(bias):
    # SparseLinear.forward calls torch.ops.pycompress.sparse_linear itself (with its layout): the
    # dense result, visible to every mode and transform, clear errors for bad inputs
    from direct_calls import check_every_isa, check_module_calls

    lin, _ = _pruned_linear(40, 12, 0.8, bias=bias)
    sl = SparseLinear.from_dense(lin)

    def reference(inp):
        with torch.no_grad():
            return lin(inp.float()).to(inp.dtype)

    check_module_calls(sl, reference, "pycompress::sparse_linear", atol=1e-5)
    check_every_isa(sl, reference, atol=1e-5)


def test_sparse_linear_module_rejects_bad_inputs_and_corrupt_buffers():
    lin, _ = _pruned_linear(40, 16, 0.5)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(3, 40)
    with torch.no_grad():
        sl(x)  # buffers checked and remembered
        with pytest.raises(TypeError, match="x"):
            sl(x.int())
        with pytest.raises(TypeError, match="x"):
            sl([[1.0] * 40])
        with pytest.raises(ValueError, match="in_features"):
            sl(torch.randn(3, 41))
        sl.col_idx[0] = 40  # in-place change: checked again on the next call
        with pytest.raises(RuntimeError, match="out of range"):
            sl(x)
        with pytest.raises(RuntimeError, match="out of range"):
            sl(x[:1])


def test_sparse_linear_explicit_mask_and_masked_source():
    lin = nn.Linear(20, 10)
    mask = torch.rand(10, 20) > 0.5
    sl = SparseLinear.from_dense(lin, mask)
    ref = nn.functional.linear(torch.ones(2, 20), lin.weight * mask, lin.bias)
    torch.testing.assert_close(sl(torch.ones(2, 20)), ref, atol=1e-5, rtol=1e-5)
    sl2 = SparseLinear.from_dense(MaskedLinear.from_dense(lin, mask))
    torch.testing.assert_close(sl2(torch.ones(2, 20)), ref, atol=1e-5, rtol=1e-5)


def test_sparse_linear_state_dict_round_trip_and_size():
    torch.manual_seed(0)
    lin, mask = _pruned_linear(512, 256, 0.9)
    sl = SparseLinear.from_dense(lin)
    cfg = json.loads(json.dumps(sl.config()))
    assert cfg["nnz"] == sl.nnz
    fresh = SparseLinear.from_config(cfg)
    fresh.load_state_dict(sl.state_dict())
    x = torch.randn(5, 512)
    torch.testing.assert_close(fresh(x), sl(x))

    def nbytes(module):
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        return buf.tell()

    assert nbytes(sl) <= 0.25 * nbytes(lin)
    assert "sparsity=90" in repr(sl) or "sparsity=89" in repr(sl)
    dense = sl.to_dense()
    torch.testing.assert_close(dense(x), lin(x), atol=1e-4, rtol=1e-4)


def _layout_kind_for(isa):
    return {"scalar": ("checked",), "avx2": ("sliced",)}.get(isa, ("chunked", "sliced"))


def test_sparse_linear_decode_layout_buffer_round_trips(tmp_path):
    # the layout is a non-persistent buffer built whenever the CSR buffers are set: state_dict,
    # torch.save of the state or of the whole module, deepcopy and .to() all give a current layout
    # and the same outputs, bit for bit
    import copy

    import pycompress

    torch.manual_seed(0)
    lin, _ = _pruned_linear(300, 200, 0.9)
    sl = SparseLinear.from_dense(lin)
    assert "decode_layout" in dict(sl.named_buffers()) and "decode_layout" not in sl.state_dict()
    info = sl.decode_layout_info()
    assert info["enabled"] and info["current"] and info["kind"] in _layout_kind_for(pycompress.active_cpu_isa())
    assert info["bytes"] == sl.decode_layout.numel() >= sl.nnz * 5
    xs = [torch.randn(1, 300), torch.randn(7, 300)]
    with torch.no_grad():
        ref = [sl(x) for x in xs]

    fresh = SparseLinear.from_config(sl.config())
    assert fresh.decode_layout_info()["kind"] is None  # placeholder buffers: nothing built
    fresh.load_state_dict(sl.state_dict())
    torch.save(sl.state_dict(), tmp_path / "sd.pt")
    from_file = SparseLinear.from_config(sl.config())
    from_file.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.save(sl, tmp_path / "module.pt")
    pickled = torch.load(tmp_path / "module.pt", weights_only=False)
    moved = copy.deepcopy(sl).to("meta").to_empty(device="cpu")
    moved.load_state_dict(sl.state_dict())
    shared = copy.deepcopy(sl).share_memory()
    for other in (fresh, from_file, pickled, copy.deepcopy(sl), sl.to("cpu"), moved, shared):
        assert other.decode_layout_info() == info
        assert other.decode_layout.data_ptr() != sl.decode_layout.data_ptr() or other is sl
        with torch.no_grad():
            for x, r in zip(xs, ref):
                assert torch.equal(other(x), r)


def test_sparse_linear_decode_layout_follows_cpu_isa_and_edits():
    import pycompress
    from pycompress._ext import cpu_isas

    lin, _ = _pruned_linear(300, 200, 0.9)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(1, 300)
    ref = lin(x).detach()
    previous = pycompress.active_cpu_isa()
    try:
        for built in cpu_isas():
            pycompress.set_cpu_isa(built)
            sl.relayout()
            assert sl.decode_layout_info()["kind"] in _layout_kind_for(built)
            for used in cpu_isas():  # a layout of another ISA is used where it can run, else the CSR
                pycompress.set_cpu_isa(used)
                torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
    finally:
        pycompress.set_cpu_isa(previous)
    sl.relayout()
    # an in-place edit leaves the layout stale (not used, results still right) until relayout()
    with torch.no_grad():
        sl.values.mul_(2)
    assert not sl.decode_layout_info()["current"]
    ref2 = 2 * (ref - lin.bias.detach()) + lin.bias.detach()
    torch.testing.assert_close(sl(x), ref2, atol=1e-4, rtol=1e-4)
    sl.relayout()
    assert sl.decode_layout_info()["current"]
    torch.testing.assert_close(sl(x), ref2, atol=1e-4, rtol=1e-4)


def test_sparse_linear_decode_layout_switch_and_environment():
    import os
    import subprocess
    import sys

    lin, _ = _pruned_linear(96, 520, 0.8)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(1, 96)
    ref = lin(x).detach()
    assert sl.set_decode_layout(False) is True
    assert sl.decode_layout_info() == {"enabled": False, "kind": "checked", "bytes": 256, "current": True}
    torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
    assert sl.set_decode_layout(True) is False
    assert sl.decode_layout_info()["bytes"] > sl.nnz * 5
    torch.testing.assert_close(sl(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        sl.set_decode_layout(1)
    code = ("import torch; from pycompress.nn import SparseLinear; "
            "print(SparseLinear.from_dense(torch.nn.Linear(8, 8)).decode_layout_info()['kind'])")
    env = dict(os.environ, PYCOMPRESS_SPARSE_DECODE_LAYOUT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "checked"


def test_sparse_linear_loads_corrupt_buffers_without_layout():
    # a state whose structure does not check loads (strict loading is about names and shapes) but
    # leaves no layout, and every call raises the structural error
    lin, _ = _pruned_linear(40, 16, 0.5)
    sl = SparseLinear.from_dense(lin)
    state = sl.state_dict()
    state["col_idx"] = state["col_idx"].clone()
    state["col_idx"][3] = 40
    fresh = SparseLinear.from_config(sl.config())
    fresh.load_state_dict(state)
    assert fresh.decode_layout_info()["kind"] is None
    for m in (1, 3):
        with pytest.raises(RuntimeError, match="out of range"):
            fresh(torch.randn(m, 40))
    with pytest.raises(RuntimeError, match="out of range"):
        fresh.relayout()


def test_sparse_linear_no_bias_and_bad_config():
    lin, _ = _pruned_linear(16, 8, 0.5, bias=False)
    sl = SparseLinear.from_dense(lin)
    assert sl.bias is None
    torch.testing.assert_close(sl(torch.ones(1, 16)), lin(torch.ones(1, 16)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nnz"):
        SparseLinear(4, 4, 17)
    with pytest.raises(ValueError, match="format"):
        SparseLinear.from_config({"format": "coo", "in_features": 4, "out_features": 4, "nnz": 1})
    with pytest.raises(ValueError, match="in_features"):
        sl(torch.randn(2, 15))


def test_sparse_linear_cuda(device):
    lin, _ = _pruned_linear(96, 40, 0.9)
    lin = lin.to(device)
    sl = SparseLinear.from_dense(lin)
    for M in (1, 6, 33):
        x = torch.randn(M, 96, device=device)
        torch.testing.assert_close(sl(x), lin(x), atol=1e-4, rtol=1e-4)


def test_sparse_linear_export_and_compile():
    lin, _ = _pruned_linear(48, 24, 0.8)
    model = nn.Sequential(SparseLinear.from_dense(lin), nn.ReLU())
    x = torch.randn(3, 48)
    ref = model(x)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), ref)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), ref)


def test_masked_linear_compile_backward():
    lin = nn.Linear(20, 12)
    ml = MaskedLinear.from_dense(lin, torch.rand(12, 20) > 0.5)
    x = torch.randn(4, 20)
    out = torch.compile(ml, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    assert torch.all(ml.weight.grad[~ml.mask] == 0)
    torch.testing.assert_close(out, nn.functional.linear(x, lin.weight * ml.mask, lin.bias), atol=1e-5, rtol=1e-5)
