"""export_onnx writes F.scaled_dot_product_attention as one fused operator (the standard Attention
from opset 23, ONNX Runtime's MultiHeadAttention below) where it can, and the exporter's own form
elsewhere; either way ONNX Runtime's output matches PyTorch's."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import pycompress  # noqa: E402
from pycompress.export import onnx as onnx_export  # noqa: E402
from onnx_exporters import available_exporters  # noqa: E402

EXPORTERS = available_exporters()
FUSED = ("Attention", "MultiHeadAttention")


class SDPA(nn.Module):
    """q, k, v (and a mask) as graph inputs: their head counts and sizes are static in the trace."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


class SelfAttention(nn.Module):
    """A transformer attention block: projections, head split / merge around SDPA."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h, self.d = heads, d
        self.qkv = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.out = nn.Linear(d, d)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.h, self.d // self.h).transpose(1, 2) for p in self.qkv)
        keep = mask[:, None, None, :].bool().expand(b, 1, s, s)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(y.transpose(1, 2).reshape(b, s, self.d))


def _inputs(hq=4, hk=4, sq=6, skv=6, d=8, dv=8, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hk, skv, d, generator=g),
            torch.randn(b, hk, skv, dv, generator=g))


def _key_padding(b=3, sq=6, skv=6, shape="full"):
    keep = torch.ones(b, skv, dtype=torch.bool)
    keep[1, skv - 2:] = False
    keep[2, 1:] = False
    if shape == "keys":
        return keep[:, None, None, :]
    return keep[:, None, None, :].expand(b, 1, sq, skv).contiguous()


def _run(path, args):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feed)[0]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _export_checked(model, args, path, **kw):
    """Exports with static shapes and checks ONNX Runtime's output against torch's."""
    with torch.no_grad():
        ref = model(*args).numpy()
    path = pycompress.export_onnx(model, args, path, dynamic_axes={}, **kw)
    np.testing.assert_allclose(_run(path, args), ref, rtol=1e-5, atol=1e-5)
    return path


def _opsets(exporter):
    return [18, 23] if exporter == "dynamo" else [18]


CASES = {
    "no mask": (dict(), lambda: None),
    "bool mask [B,1,Sq,Skv]": (dict(), lambda: _key_padding()),
    "bool mask [B,1,1,Skv]": (dict(), lambda: _key_padding(shape="keys")),
    "float mask": (dict(), lambda: torch.where(_key_padding(), 0.0, -1e4) + 0.1 * torch.randn(3, 1, 6, 6)),
    "causal": (dict(is_causal=True), lambda: None),
    "scale": (dict(scale=0.3), lambda: _key_padding()),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_matches_torch(tmp_path, exporter, case):
    kw, make_mask = CASES[case]
    q, k, v = _inputs()
    mask = make_mask()
    args = (q, k, v) if mask is None else (q, k, v, mask)
    model = SDPA(**kw).eval()
    for opset in _opsets(exporter):
        path = _export_checked(model, args, tmp_path / f"m{opset}.onnx", opset=opset, exporter=exporter)
        ops = _ops(path)
        want = "Attention" if opset >= 23 else "MultiHeadAttention"
        if case == "causal" and opset < 23:
            want = None  # ONNX Runtime's MultiHeadAttention: no causal form here
        if want:
            assert ops.count(want) == 1 and "Softmax" not in ops, (opset, ops)
            assert "Transpose" in ops  # to the 3-D layout and back
        else:
            assert not set(FUSED) & set(ops)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cross_attention_and_value_size(tmp_path, exporter):
    """Fewer queries than keys, a value size other than the key size, a mask on the keys."""
    q, k, v = _inputs(sq=3, skv=7, dv=5)
    mask = _key_padding(sq=3, skv=7, shape="keys")
    for opset in _opsets(exporter):
        path = _export_checked(SDPA().eval(), (q, k, v, mask), tmp_path / f"m{opset}.onnx", opset=opset,
                               exporter=exporter)
        assert set(FUSED) & set(_ops(path))


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="opset 23 needs the torch.export-based exporter")
def test_causal_with_more_keys_keeps_the_exporters_form(tmp_path):
    """torch aligns a causal mask with more keys than queries to the top left; the fused operators
    are not asked to."""
    path = _export_checked(SDPA(is_causal=True).eval(), _inputs(sq=3, skv=6), tmp_path / "m.onnx", opset=23,
                           exporter="dynamo")
    assert "Softmax" in _ops(path)


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="opset 23 needs the torch.export-based exporter")
@pytest.mark.skipif("enable_gqa" not in F.scaled_dot_product_attention.__doc__, reason="torch without enable_gqa")
def test_grouped_query_attention(tmp_path):
    args, model = _inputs(hq=4, hk=2), SDPA(enable_gqa=True).eval()
    path = _export_checked(model, args, tmp_path / "m23.onnx", opset=23, exporter="dynamo")
    node = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert len(node) == 1
    attrs = {a.name: a.i for a in node[0].attribute if a.type == onnx.AttributeProto.INT}
    assert attrs["q_num_heads"] == 4 and attrs["kv_num_heads"] == 2
    # ONNX Runtime's MultiHeadAttention has one head count: the exporter's form below opset 23
    path = _export_checked(model, args, tmp_path / "m18.onnx", opset=18, exporter="dynamo")
    assert not set(FUSED) & set(_ops(path))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_attention_block_with_projections(tmp_path, exporter):
    """The model's own head split and merge around the fused node: ONNX Runtime cancels the
    transposes, and int8 projections export and verify around it."""
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(4, 10, 32)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[2:, 7:] = 0
    q = pycompress.quantize(model, "w8a8", warn=False)
    with torch.no_grad():
        ref = q(x, mask).numpy()
    path = pycompress.export_onnx(q, (x, mask), tmp_path / "m.onnx", exporter=exporter)
    ops = _ops(path)
    assert ops.count("MatMulIntegerToFloat") == 4
    if exporter == "dynamo":
        assert set(FUSED) & set(ops)
    np.testing.assert_allclose(_run(path, (x, mask)), ref, rtol=1e-4, atol=1e-4)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    opt = _ops(tmp_path / "opt.onnx")
    if set(FUSED) & set(opt):
        assert "Transpose" not in opt


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_attention_exporter_form_and_standard_operators(tmp_path, exporter):
    q, k, v = _inputs()
    mask = _key_padding()
    model = SDPA().eval()
    path = pycompress.export_onnx(model, (q, k, v, mask), tmp_path / "e.onnx", opset=18, exporter=exporter,
                                  attention="exporter")
    assert not set(FUSED) & set(_ops(path)) and "Softmax" in _ops(path)
    # the standard-operator int8 forms keep ONNX Runtime's contrib attention out of the file
    path = pycompress.export_onnx(model, (q, k, v, mask), tmp_path / "s.onnx", opset=18, exporter=exporter,
                                  int8_format="standard")
    assert not set(FUSED) & set(_ops(path))
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(path)).graph.node)


def test_bad_attention_and_opset_arguments(tmp_path):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="attention"):
        pycompress.export_onnx(SDPA(), (q, k, v), tmp_path / "m.onnx", attention="flash")
    with pytest.raises(ValueError, match="TorchScript exporter writes opsets up to 20"):
        pycompress.export_onnx(SDPA(), (q, k, v), tmp_path / "m.onnx", exporter="torchscript", opset=23)
    assert not (tmp_path / "m.onnx").exists()


def test_torchscript_export_leaves_torchs_own_symbolic_registered(tmp_path):
    """The fused symbolic is registered for pycompress's export only."""
    q, k, v = _inputs()
    pycompress.export_onnx(SDPA(), (q, k, v), tmp_path / "ours.onnx", exporter="torchscript", opset=18)
    assert "MultiHeadAttention" in _ops(tmp_path / "ours.onnx")
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(SDPA(), (q, k, v), str(tmp_path / "plain.onnx"), opset_version=18, **kw)
    assert "MultiHeadAttention" not in _ops(tmp_path / "plain.onnx")


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="the default opset 23 needs the torch.export-based exporter")
def test_default_opset_follows_the_installed_onnxruntime(tmp_path, monkeypatch):
    q, k, v = _inputs()
    path = pycompress.export_onnx(SDPA(), (q, k, v), tmp_path / "m.onnx", exporter="dynamo")
    version = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
    expected = onnx_export._default_opset(True)
    assert version == expected
    monkeypatch.setattr(ort, "__version__", "1.22.1")
    assert onnx_export._default_opset(True) == onnx_export.DEFAULT_OPSET == 18
    assert onnx_export._default_opset(False) == 18
