"""export_onnx for ONNX Runtime: the fused int8 graph, int8 embedding tables, and a verification
that passes correct files and rejects broken ones (wrong scale, transposed weight, saturation)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

import pycompress  # noqa: E402
from pycompress.export import onnx as onnx_export  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnx_exporters import available_exporters  # noqa: E402


def bert(layers=4, vocab=1024, hidden=32, seed=0):
    """A small BERT whose word-embedding table (vocab x hidden) is large enough to be stored int8."""
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def batch(n=6, seq=12, vocab=1024, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[n // 2:, seq - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_ort(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feed[i.name].numpy() for i in sess.get_inputs()})


def graph(path):
    return onnx.load(str(path)).graph


def mlp(d_in=64, hidden=64, d_out=64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).eval()


# --------------------------------------------------------------------------- the default graph


def test_default_graph_runs_ort_fused_integer_kernel(tmp_path):
    q = pycompress.quantize(bert(layers=2), "w8a8", warn=False)
    path = pycompress.export_onnx(q, batch(), tmp_path / "m.onnx")
    g = graph(path)
    mm = [n for n in g.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mm) == 2 * 6 + 1 and {n.domain for n in mm} == {"com.microsoft"}
    assert not [n for n in g.node if n.op_type in ("MatMul", "Gemm", "MatMulInteger")
                and n.input[1] in {i.name for i in g.initializer}]
    inits = {i.name: i for i in g.initializer}
    # u8 activations (zero point 128) x int8 weights, one scale per output column and per token
    for n in mm:
        assert inits[n.input[1]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[n.input[4]]).item() == 128
    # the session optimizer keeps them (no fall-back to float MatMul)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    nodes = graph(tmp_path / "opt.onnx").node
    opt = [n.op_type for n in nodes]
    assert opt.count("MatMulIntegerToFloat") == 13
    # attention: one fused kernel per layer where the exporter knows the head count (the
    # torch.export-based exporter), the exporter's MatMul / Softmax otherwise
    fused = opt.count("Attention") + opt.count("MultiHeadAttention")
    assert fused == 2 or (fused == 0 and opt.count("Softmax") == 2)
    # the residual Add + LayerNormalization and the FFN bias + Gelu stay unfused (ONNX Runtime's
    # SkipLayerNormalization and BiasGelu CPU kernels are the slower ones)
    assert "SkipLayerNormalization" not in opt and "BiasGelu" not in opt
    assert opt.count("LayerNormalization") == 1 + 2 * 2


def _optimized_ops(path, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in graph(tmp_path / "opt.onnx").node]


def _run_unoptimized(path, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feed[i.name].numpy() for i in sess.get_inputs()})


@pytest.mark.parametrize("quantized", [True, False])
def test_gelu_becomes_one_ort_kernel_with_the_same_products(tmp_path, monkeypatch, quantized):
    """The exact GELU (erf form) is written in the order ONNX Runtime fuses into one Gelu kernel
    (BiasGelu with the FFN bias of a float layer), and computes the same products as the
    exporter's own order."""
    model = bert(layers=2)
    if quantized:
        model = pycompress.quantize(model, "w8a8", warn=False)
    b = batch()
    path = pycompress.export_onnx(model, b, tmp_path / "m.onnx")
    ops = _optimized_ops(path, tmp_path)
    assert "Erf" not in ops and ops.count("Gelu") + ops.count("BiasGelu") == 2
    if "dynamo" in available_exporters():  # the default exporter, whose order needs the rewrite
        # a float FFN's bias is added inside the kernel; an int8 layer's output shape is not
        # recorded, which keeps its bias Add apart (see _hide_int8_linear_shapes)
        assert ops.count("BiasGelu") == (0 if quantized else 2)
        # below opset 20 (no Gelu operator) the rewrite is what makes the erf form fuse
        path = pycompress.export_onnx(model, b, tmp_path / "m18.onnx", exporter="dynamo", opset=18)
        ops = _optimized_ops(path, tmp_path)
        assert "Erf" not in ops and ops.count("Gelu") + ops.count("BiasGelu") == 2
        monkeypatch.setattr(onnx_export, "_reorder_gelu", lambda g: 0)
        plain = pycompress.export_onnx(model, b, tmp_path / "plain.onnx", exporter="dynamo", opset=18)
        assert "Erf" in _optimized_ops(plain, tmp_path)
        for y, z in zip(_run_unoptimized(path, b), _run_unoptimized(plain, b)):
            np.testing.assert_array_equal(y, z)


def test_gelu_rewrite_leaves_other_graphs_alone():
    from onnx import helper as h

    def model(extra_use):
        c = lambda name, v: h.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
        nodes = [c("s2", np.sqrt(2.0)), c("one", 1.0), c("half", 0.5),
                 h.make_node("Div", ["x", "s2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                 h.make_node("Add", ["e", "one"], ["a"]), h.make_node("Mul", ["half", "a"], ["m"]),
                 h.make_node("Mul", ["x", "m"], ["y"])]
        outs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])]
        if extra_use:  # the inner product is used elsewhere too: rewriting it would change that use
            outs.append(onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [4]))
        return h.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])], outs)

    g = model(False)
    assert onnx_export._reorder_gelu(g) == 1
    assert [list(n.input) for n in g.node if n.op_type == "Mul"] == [["x", "half"], ["m", "a"]]
    g = model(True)
    assert onnx_export._reorder_gelu(g) == 0
    assert [list(n.input) for n in g.node if n.op_type == "Mul"] == [["half", "a"], ["x", "m"]]


@pytest.mark.parametrize("fmt", ["auto", "standard", "u8s8", "contrib-u8u8"])
@pytest.mark.parametrize("act_bits", [8, 7])
def test_single_layer_gives_the_kernel_integers(tmp_path, fmt, act_bits):
    """One layer: no float op before the quantization, so ORT and the PyTorch kernel quantize the
    same values; every output agrees to float rounding."""
    torch.manual_seed(0)
    lin = pycompress.nn.Int8Linear.from_float(nn.Linear(96, 48), act_bits=act_bits)
    x = torch.randn(40, 96) * 3
    x[3] = 0  # an all-zero token
    path = pycompress.export_onnx(lin, x, tmp_path / "l.onnx", int8_format=fmt)
    (y,) = run_ort(path, {"input": x})
    ref = lin(x).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------- int8 embeddings


def test_embedding_tables_are_stored_int8(tmp_path):
    model = bert(layers=1)
    b = batch()
    fp = pycompress.export_onnx(model, b, tmp_path / "fp.onnx", int8_embeddings=False)
    q8 = pycompress.export_onnx(model, b, tmp_path / "e8.onnx")  # verified against dequantized tables
    words = model.embeddings.word_embeddings.weight
    tables = [i for i in graph(q8).initializer if tuple(i.dims) == tuple(words.shape)]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
    assert [tuple(i.dims) for i in graph(fp).initializer if tuple(i.dims) == tuple(words.shape)] == [tuple(words.shape)]
    # the file computes the per-row dequantized table exactly
    qt, scale = onnx_export._quantize_rows(words)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        deq.embeddings.word_embeddings.weight.copy_(qt.float() * scale[:, None])
        deq.embeddings.position_embeddings.weight.copy_(model.embeddings.position_embeddings.weight)
        ref = deq(**b).last_hidden_state.numpy()
    last = run_ort(q8, b)[0]
    np.testing.assert_allclose(last, ref, rtol=1e-4, atol=1e-4)
    # and stays close to the float table (8 bits per value, one scale per row)
    with torch.no_grad():
        full = model(**b).last_hidden_state.numpy()
    assert onnx_export._cos(last.ravel().astype(np.float64), full.ravel().astype(np.float64)) > 0.9999


def test_tied_embedding_stays_float(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(512, 64)
            self.head = nn.Linear(64, 512, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model = Tied().eval()
    assert onnx_export._int8_embedding_names(model) == []
    big = nn.Sequential(nn.Embedding(512, 64), nn.Linear(64, 8)).eval()
    assert onnx_export._int8_embedding_names(big) == ["0"]
    assert onnx_export._int8_embedding_names(nn.Sequential(nn.Embedding(512, 64, max_norm=1.0))) == []
    ids = torch.randint(0, 512, (4, 6))
    path = pycompress.export_onnx(model, ids, tmp_path / "tied.onnx")
    assert not [i for i in graph(path).initializer if i.data_type == onnx.TensorProto.INT8]


# --------------------------------------------------------------------------- verification


def test_verify_passes_a_deep_model_whose_engines_round_differently(tmp_path):
    """Six layers of requantization turn float differences of the last bit (LayerNorm, softmax,
    GELU in two engines) into one-step changes of some activations; the file is still right."""
    q = pycompress.quantize(bert(layers=6, hidden=64), "w8a8", warn=False)
    b = batch(n=8, seq=16)
    path = pycompress.export_onnx(q, b, tmp_path / "m.onnx")  # verify=True
    stats = onnx_export.verify_onnx(path, q, b)
    for s in stats:
        assert s["err"] <= onnx_export.VERIFY_RATIO * s["quant_err"] + 1e-4 * s["norm"] + 1e-6
        assert s["quant_err"] > 0


def _break(path, out, how):
    """Writes ``path`` with one mistake of the kind an exporter can make."""
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    mms = [n for n in g.node if n.op_type == "MatMulIntegerToFloat"]
    if how == "scale":  # every weight scale doubled (e.g. absmax / 63 instead of / 127)
        for n in mms:
            t = inits[n.input[3]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    elif how == "one-scale":  # one layer's weight scales 1.5x: the first FFN output projection
        n = ([n for n in mms if inits[n.input[1]].dims[0] > inits[n.input[1]].dims[1]] or mms[-1:])[0]
        t = inits[n.input[3]]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    elif how == "transposed":  # a square weight stored [out, in] instead of [in, out]: the first
        # attention output projection (square, and unlike q / k / v alone on its input)
        uses = [m.input[0] for m in mms]
        n = next(n for n in mms if len(set(inits[n.input[1]].dims)) == 1 and uses.count(n.input[0]) == 1)
        t = inits[n.input[1]]
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def exported_bert(tmp_path_factory):
    """A 4-layer BERT, quantized and exported (verified) once for the tests that break its file."""
    q = pycompress.quantize(bert(layers=4, hidden=64), "w8a8", warn=False)
    b = batch(n=8, seq=16)
    path = tmp_path_factory.mktemp("bert") / "good.onnx"
    pycompress.export_onnx(q, b, path, output_names=["last_hidden_state", "pooler_output"])
    return q, b, path


@pytest.mark.parametrize("how", ["scale", "one-scale", "transposed"])
def test_verify_rejects_a_broken_bert_export(tmp_path, exported_bert, how):
    q, b, good = exported_bert
    onnx_export.verify_onnx(good, q, b)
    bad = _break(good, tmp_path / "bad.onnx", how)
    with pytest.raises(onnx_export.OnnxVerificationError,
                       match=r"output \d \('(last_hidden_state|pooler_output)'\) in ONNX Runtime is [0-9.e-]+ \(relative "
                             r"L2\).*x the PyTorch model's own quantization error") as e:
        onnx_export.verify_onnx(bad, q, b)
    assert "allowed: 2x" in str(e.value)


def _vpmaddubsw_emulation(lin, x, saturate=True):
    """``lin``'s output as ONNX Runtime's AVX2 u8 x s8 kernel computes it (CPUs without VNNI):
    u8 activations (int8 + 128) times s8 weights, pairs of products added in saturating int16."""
    xs = x.abs().amax(1, keepdim=True) / 127.0
    a = (torch.round(x * (127.0 / x.abs().amax(1, keepdim=True))) + 128).to(torch.int64)  # [M, K] in 1..255
    w = lin.weight.to(torch.int64).t()  # [K, N]
    prod = a[:, :, None] * w[None]  # [M, K, N]
    pairs = prod[:, 0::2] + prod[:, 1::2]
    if saturate:
        pairs = pairs.clamp(-32768, 32767)
    acc = pairs.sum(1) - 128 * w.sum(0)[None]  # the zero point's share, computed exactly
    return ((acc.double() * xs.double()) * lin.weight_scale.double() + lin.bias.double()).float()


def test_verify_rejects_a_saturating_integer_kernel(tmp_path, monkeypatch):
    """u8 x s8 with 8-bit weights and activations on a CPU without VNNI: ORT's vpmaddubsw kernel
    saturates pair sums. This CPU may have VNNI, so the runtime is replaced by an exact emulation
    of that kernel; the check must reject what it returns."""
    torch.manual_seed(0)
    lin = pycompress.nn.Int8Linear.from_float(nn.Linear(64, 32))
    x = torch.relu(torch.randn(16, 64)) * 4  # non-negative activations: large u8 values
    path = pycompress.export_onnx(lin, x, tmp_path / "l.onnx", int8_format="u8s8")
    emulated = _vpmaddubsw_emulation(lin, x)
    ref = lin(x).detach()
    # without saturation the emulation is the kernel's result; with it, it is not
    torch.testing.assert_close(_vpmaddubsw_emulation(lin, x, saturate=False), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(emulated, ref, rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(onnx_export, "_run_ort", lambda p, tensors, threads=None: [emulated.numpy()])
    with pytest.raises(onnx_export.OnnxVerificationError, match=r"output 0 \('output'\).*quantization error"):
        onnx_export.verify_onnx(path, lin, x)
    exact = _vpmaddubsw_emulation(lin, x, saturate=False).numpy()
    monkeypatch.setattr(onnx_export, "_run_ort", lambda p, tensors, threads=None: [exact])
    onnx_export.verify_onnx(path, lin, x)


def test_verify_rejects_a_broken_mlp_export(tmp_path):
    q = pycompress.quantize(mlp())
    x = torch.randn(32, 64)
    good = pycompress.export_onnx(q, x, tmp_path / "good.onnx")
    bad = _break(good, tmp_path / "bad.onnx", "one-scale")
    with pytest.raises(onnx_export.OnnxVerificationError, match=r"output 0 \('output'\).*worst row \d+"):
        onnx_export.verify_onnx(bad, q, x)


def test_float_model_is_held_to_float_tolerance(tmp_path, monkeypatch):
    """Without quantized activations there is no quantization error to compare with: the file must
    match to float rounding."""
    model = mlp()
    x = torch.randn(8, 64)
    real = onnx_export._run_ort
    monkeypatch.setattr(onnx_export, "_run_ort",
                        lambda p, t, threads=None: [o * (1 + 1e-3) for o in real(p, t, threads)])
    with pytest.raises(onnx_export.OnnxVerificationError, match="no quantized activations"):
        pycompress.export_onnx(model, x, tmp_path / "f.onnx")
