"""pycompress.nn.Int8Linear: accuracy, state_dict round trips, devices, dtypes, torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pycompress.ops as ops
from pycompress.nn import Int8Linear

MODES = ["w8a8", "w8a16"]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def make_linear(k=256, n=192, bias=True, device="cpu"):
    lin = nn.Linear(k, n, bias=bias).to(device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_accuracy_vs_fp32(mode, bias, device, cpu_isa):
    lin = make_linear(bias=bias, device=device)
    q = Int8Linear.from_float(lin, mode=mode)
    x = torch.randn(37, 256, device=device)
    with torch.no_grad():
        ref = lin(x)
    y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 0.02


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_3d(mode, dtype, device):
    lin = make_linear(device=device)
    q = Int8Linear.from_float(lin, mode=mode)
    x = torch.randn(2, 9, 256, device=device)
    with torch.no_grad():
        ref = lin(x)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 9, 192)
    assert rel_err(y, ref) < 0.02


def test_buffers_and_quantization():
    lin = make_linear(k=64, n=10)
    q = Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (10, 64)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (10,)
    assert q.bias.dtype == torch.float32
    w = lin.weight.detach()
    torch.testing.assert_close(q.weight_scale, w.abs().amax(1) / 127)
    assert (q.weight.abs().amax(1) == 127).all()
    assert q.in_features == 64 and q.out_features == 10 and q.mode == "w8a8"
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}
    assert "in_features=64" in repr(q) and "mode=w8a8" in repr(q)
    assert set(Int8Linear.from_float(make_linear(bias=False)).state_dict()) == {"weight", "weight_scale"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(mode, bias, device):
    q = Int8Linear.from_float(make_linear(bias=bias), mode=mode).to(device)
    cfg = json.loads(json.dumps(q.config()))
    fresh = Int8Linear.from_config(cfg).to(device)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 256, device=device)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    assert fresh.config() == q.config()


def test_load_state_dict_repacks_cpu_weight():
    a = Int8Linear.from_float(make_linear())
    b = Int8Linear(256, 192)
    x = torch.randn(4, 256)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # editing the weight in place needs an explicit repack
    with torch.no_grad():
        b.weight.neg_()
    b.repack()
    torch.testing.assert_close(b(x), ops.int8_linear(x, b.weight, b.weight_scale, b.bias), rtol=0, atol=0)


def test_to_float():
    lin = make_linear()
    q = Int8Linear.from_float(lin)
    f = q.to_float()
    assert isinstance(f, nn.Linear)
    torch.testing.assert_close(f.weight, q.weight.float() * q.weight_scale[:, None])
    assert rel_err(f.weight, lin.weight) < 0.01
    x = torch.randn(3, 256)
    assert rel_err(q(x), f(x)) < 0.02


def test_dtype_cast_keeps_fp32_scales(device):
    q = Int8Linear.from_float(make_linear()).to(device)
    scale = q.weight_scale.clone()
    q = q.half()
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    torch.testing.assert_close(q.weight_scale, scale, rtol=0, atol=0)
    y = q(torch.randn(3, 256, device=device).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_device_moves():
    from conftest import CUDA_OK, CUDA_WHY

    if not CUDA_OK:
        pytest.skip(CUDA_WHY)
    q = Int8Linear.from_float(make_linear())
    x = torch.randn(6, 256)
    y_cpu = q(x)
    qc = q.to("cuda")
    assert qc.weight.is_cuda and qc.weight_scale.is_cuda
    torch.testing.assert_close(qc(x.cuda()).cpu(), y_cpu, rtol=0, atol=0)
    back = qc.to("cpu")
    torch.testing.assert_close(back(x), y_cpu, rtol=0, atol=0)


def test_bad_construction():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(4, 4, mode="w4a4")
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))
    q = Int8Linear.from_float(make_linear())
    with pytest.raises(ValueError, match="last dimension"):
        q(torch.randn(3, 255))


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    model = nn.Sequential(Int8Linear.from_float(make_linear(), mode=mode), nn.ReLU(),
                          Int8Linear.from_float(make_linear(192, 64), mode=mode))
    x = torch.randn(2, 7, 256)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_torch_export(mode):
    model = nn.Sequential(Int8Linear.from_float(make_linear(), mode=mode))
    x = torch.randn(3, 256)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    op = "int8_linear_w8a16" if mode == "w8a16" else "int8_linear"
    assert any(f"pycompress.{op}." in t for t in targets), targets
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- 7-bit activations


def _errors_vs_fp32(rows: str, **variants) -> dict:
    """Relative errors against fp32 of Int8Linear variants (name -> from_float kwargs) and of
    torch.ao dynamic int8 ("torch.ao") on one 256 -> 192 layer and 37 tokens."""
    import warnings

    lin = make_linear()
    x = torch.randn(37, 256)
    if rows == "row-scaled":  # tokens of very different magnitudes (per-tensor scales suffer)
        x = x * torch.logspace(-1, 1, 37)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        ao = quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        ref = lin(x)
        errs = {name: rel_err(Int8Linear.from_float(lin, **kw)(x), ref) for name, kw in variants.items()}
        errs["torch.ao"] = rel_err(ao(x), ref)
    return errs


@pytest.mark.parametrize("rows", ["gaussian", "row-scaled"])
def test_act7_accuracy_vs_fp32_and_torch_ao(rows, cpu_isa):
    e = _errors_vs_fp32(rows, act7={"act_bits": 7}, act8={})
    assert e["act7"] < 0.02, e
    assert e["act7"] < e["torch.ao"], e
    assert e["act8"] <= e["act7"], e  # 8-bit activations stay the more accurate default


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_act7_half_inputs_exact(dtype, device):
    lin = make_linear(device=device)
    q7 = Int8Linear.from_float(lin, act_bits=7)
    x = torch.randn(2, 9, 256, device=device).to(dtype)
    y = q7(x)
    assert y.dtype == dtype and y.shape == (2, 9, 192)
    torch.testing.assert_close(
        y, ops.int8_linear(x, q7.weight, q7.weight_scale, q7.bias, act_bits=7), rtol=0, atol=0)
    with torch.no_grad():
        assert rel_err(y, lin(x.float())) < 0.02


def test_act7_config_round_trip(device):
    q = Int8Linear.from_float(make_linear(), act_bits=7).to(device)
    assert q.act_bits == 7 and "act_bits=7" in repr(q)
    cfg = json.loads(json.dumps(q.config()))
    assert cfg["act_bits"] == 7
    fresh = Int8Linear.from_config(cfg).to(device)
    assert fresh.act_bits == 7
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 256, device=device)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    assert fresh.config() == q.config()
    # configs written before the option existed rebuild 8-bit layers
    old = {k: v for k, v in cfg.items() if k != "act_bits"}
    assert Int8Linear.from_config(old).act_bits == 8
    # 7 and 8 bits really differ
    q8 = Int8Linear.from_config({**cfg, "act_bits": 8}).to(device)
    q8.load_state_dict(q.state_dict())
    assert not torch.equal(q8(x), q(x))


@pytest.mark.parametrize("option", ["act_bits", "weight_bits"])
def test_bits_bad_values(option):
    lin = make_linear()
    for bad in (6, 16, 0, True):
        with pytest.raises(ValueError, match=f"{option} must be 8 or 7"):
            Int8Linear.from_float(lin, **{option: bad})
        with pytest.raises(ValueError, match=f"{option} must be 8 or 7"):
            Int8Linear(4, 4, **{option: bad})
    with pytest.raises(ValueError, match=f"{option}=7 applies to mode='w8a8' only"):
        Int8Linear.from_float(lin, mode="w8a16", **{option: 7})
    with pytest.raises(ValueError, match=f"{option} must be 8 or 7"):
        Int8Linear.from_config({"in_features": 4, "out_features": 4, option: 4})


def test_act7_torch_compile_and_export():
    model = nn.Sequential(Int8Linear.from_float(make_linear(), act_bits=7), nn.ReLU(),
                          Int8Linear.from_float(make_linear(192, 64), act_bits=7))
    x = torch.randn(2, 7, 256)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=0)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- 7-bit weights


@pytest.mark.parametrize("rows", ["gaussian", "row-scaled"])
def test_weight7_accuracy_vs_fp32_and_torch_ao(rows, cpu_isa):
    e = _errors_vs_fp32(rows, w7a7={"act_bits": 7, "weight_bits": 7}, a7={"act_bits": 7},
                        w7={"weight_bits": 7})
    assert Int8Linear.from_float(make_linear(), act_bits=7, weight_bits=7).weight.abs().max().item() == 63
    assert e["w7a7"] < 0.03, e
    assert e["w7"] < 0.025, e
    assert e["a7"] < e["w7a7"], e  # the weights' lost bit shows
    if rows == "row-scaled":
        assert e["w7a7"] < e["torch.ao"], e  # per-token scales still beat one scale per tensor


def test_weight7_layer_matches_op_and_round_trips(device):
    lin = make_linear(device=device)
    q = Int8Linear.from_float(lin, act_bits=7, weight_bits=7)
    assert "weight_bits=7" in repr(q) and "weight_bits" not in repr(Int8Linear.from_float(lin))
    x = torch.randn(3, 5, 256, device=device)
    torch.testing.assert_close(q(x), ops.int8_linear(x, q.weight, q.weight_scale, q.bias, act_bits=7),
                               rtol=0, atol=0)
    cfg = json.loads(json.dumps(q.config()))
    assert cfg["weight_bits"] == 7
    fresh = Int8Linear.from_config(cfg).to(device)
    fresh.load_state_dict(q.state_dict())
    assert fresh.weight_bits == 7 and fresh.config() == q.config()
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    assert Int8Linear.from_config({k: v for k, v in cfg.items() if k != "weight_bits"}).weight_bits == 8
    # 7-bit weights with 8-bit activations (on AVX2: vpmaddubsw with A + 128)
    q87 = Int8Linear.from_float(lin, weight_bits=7)
    with torch.no_grad():
        assert rel_err(q87(x), lin(x)) < 0.03



@pytest.mark.parametrize("mode,act_bits", [("w8a8", 8), ("w8a8", 7), ("w8a16", 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_module_calls_go_through_the_op(mode, act_bits, bias):
    # Int8Linear.forward calls torch.ops.pycompress.int8_linear* itself: the validated wrapper's
    # result bit for bit, visible to every mode and transform, clear errors for bad inputs
    from direct_calls import check_every_isa, check_module_calls

    q = Int8Linear.from_float(make_linear(96, 40, bias=bias), mode=mode, act_bits=act_bits)
    op_name = "pycompress::int8_linear" if mode == "w8a8" else "pycompress::int8_linear_w8a16"

    def reference(inp):
        with torch.no_grad():
            if mode == "w8a16":
                return ops.int8_linear_w8a16(inp, q.weight, q.weight_scale, q.bias)
            return ops.int8_linear(inp, q.weight, q.weight_scale, q.bias, act_bits=act_bits)

    check_module_calls(q, reference, op_name, atol=0)
    check_every_isa(q, reference, atol=0)


def test_module_call_without_a_usable_packed_weight():
    # a packed weight that does not fit the weight (a new weight set without repack) is not used:
    # the call packs per call, as the wrapper does, and repack() restores the packed copy
    q = Int8Linear.from_float(make_linear(64, 24))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = q(x)
        q.weight_packed = q.weight_packed[:-1]
        assert torch.equal(q(x), ref)
        q.repack()
        assert q.weight_packed.numel() == ops.int8_packed_bytes(24, 64)
        assert torch.equal(q(x), ref)


def test_module_call_stays_visible_to_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    q = Int8Linear.from_float(make_linear(64, 24))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = q(x)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        assert torch.equal(q(x), ref)
    assert any("int8_linear" in f for f in seen)
