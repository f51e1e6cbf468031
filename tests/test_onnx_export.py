"""pycompress.export_onnx: standard int8 ONNX files, verified in ONNX Runtime."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import pycompress  # noqa: E402
from _pylayer_models import tiny_bert, user_model_module  # noqa: E402
from pycompress import cli
from onnx_exporters import available_exporters  # noqa: E402
from pycompress.export import onnx as onnx_export  # noqa: E402
from pycompress.nn import Int8Linear, MaskedLinear, SparseLinear  # noqa: E402

EXPORTERS = available_exporters()
HAS_DYNAMO = "dynamo" in EXPORTERS


def mlp(d_in=16, hidden=32, d_out=4, bias_last=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out, bias=bias_last)).eval()


def assert_matches(y, ref, min_cos=0.99999):
    (stats,) = onnx_export.compare_outputs([ref.detach()], [y])
    assert stats["cosine"] >= min_cos and stats["max_abs"] <= 1e-3 * stats["scale"] + 1e-6, stats


def run_ort(path, *arrays):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), arrays)}
    return sess.run(None, feed)


def op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def int_matmuls(path):
    """Integer matrix products: standard MatMulInteger or ONNX Runtime's MatMulIntegerToFloat."""
    return sum(o in ("MatMulInteger", "MatMulIntegerToFloat") for o in op_types(path))


def initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_w8a8_matches_pytorch_and_dynamic_batch(tmp_path, exporter):
    q = pycompress.quantize(mlp(bias_last=False))
    x = torch.randn(2, 16)
    path = pycompress.export_onnx(q, x, tmp_path / "m.onnx", exporter=exporter)
    assert path == str(tmp_path / "m.onnx")
    ops = op_types(path)
    assert int_matmuls(path) == 2 and "MatMul" not in ops and "Gemm" not in ops
    # default form: ONNX Runtime's MatMulIntegerToFloat; "standard": standard operators only
    assert [n.domain for n in onnx.load(path).graph.node if n.domain] == ["com.microsoft"] * 2
    std = pycompress.export_onnx(q, x, tmp_path / "std.onnx", exporter=exporter, int8_format="standard")
    assert op_types(std).count("MatMulInteger") == 2
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(std).graph.node)
    x5 = torch.randn(5, 16) * 3
    (y,) = run_ort(path, x5)
    assert y.shape == (5, 4)
    assert_matches(y, q(x5))


def test_weights_stay_8_bit_in_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    x = torch.randn(4, 256)
    fp32 = pycompress.export_onnx(model, x, tmp_path / "fp32.onnx")
    q = pycompress.quantize(copy.deepcopy(model))
    int8 = pycompress.export_onnx(q, x, tmp_path / "int8.onnx")
    inits = initializers(int8)
    w8 = [i for i in inits.values() if len(i.dims) == 2]
    assert len(w8) == 2 and all(i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for i in w8)
    assert sum(len(i.raw_data) for i in w8) == 2 * 256 * 256  # one byte per weight
    ratio = os.path.getsize(int8) / os.path.getsize(fp32)
    assert ratio < 0.35, ratio  # 1 byte per weight instead of 4 (+ fp32 scales, biases, metadata)


@pytest.mark.parametrize("fmt,act_bits,weight_bits,exporter", [
    ("s8s8", 8, 8, "torchscript"),
    ("contrib", 8, 8, "torchscript"),
    ("standard", 7, 8, "torchscript"),  # 7-bit activations: u8 x s8 cannot saturate
    ("auto", 7, 8, "torchscript"),
    ("contrib-u8s8", 7, 8, EXPORTERS[0]),
    ("auto", 8, 7, "torchscript"),  # weights in [-63, 63]: u8 x s8 cannot saturate either
    ("standard", 8, 7, EXPORTERS[0]),
    ("u8u8", 8, 8, "torchscript"),
    ("contrib", 8, 7, EXPORTERS[0]),
])
def test_int8_forms(tmp_path, fmt, act_bits, weight_bits, exporter):
    q = pycompress.quantize(mlp(), act_bits=act_bits, weight_bits=weight_bits)
    x = torch.randn(6, 16) * 4  # activations reach the ends of the 8-bit range
    path = pycompress.export_onnx(q, x, tmp_path / "m.onnx", int8_format=fmt, exporter=exporter)
    graph = onnx.load(path).graph
    if fmt.startswith("contrib") or fmt == "auto":
        assert [n.domain for n in graph.node if n.op_type == "MatMulIntegerToFloat"] == ["com.microsoft"] * 2
    else:
        assert op_types(path).count("MatMulInteger") == 2
    weights = [i for i in graph.initializer if len(i.dims) == 2]
    # every form but u8u8 stores int8 weights ("standard" is u8u8 for 8-bit x 8-bit layers)
    want = onnx.TensorProto.UINT8 if fmt == "u8u8" else onnx.TensorProto.INT8
    assert {i.data_type for i in weights} == {want}
    (y,) = run_ort(path, x)
    assert_matches(y, q(x))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_small_cnn(tmp_path):
    torch.manual_seed(0)
    q = pycompress.quantize(SmallCNN().eval())
    assert isinstance(q.fc1, Int8Linear)
    x = torch.randn(3, 1, 8, 8)
    path = pycompress.export_onnx(q, (x,), tmp_path / "cnn.onnx", exporter="torchscript")
    # the conv is an Int8Conv2d: an integer ConvInteger, no float Conv
    ops = op_types(path)
    assert ops.count("ConvInteger") >= 1 and "Conv" not in ops and int_matmuls(path) == 2
    (y,) = run_ort(path, x)
    assert_matches(y, q(x))


def test_bert_encoder_dict_inputs(tmp_path):
    q = pycompress.quantize(tiny_bert())
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    path = pycompress.export_onnx(q, {"input_ids": ids, "attention_mask": mask}, tmp_path / "bert.onnx")
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    assert int_matmuls(path) == 2 * 6 + 1  # q, k, v, o, ffn1, ffn2 + pooler
    ids5 = torch.randint(0, 64, (5, 8))
    mask5 = torch.ones(5, 8, dtype=torch.long)
    mask5[2:, 6:] = 0
    last, pooled = run_ort(path, ids5, mask5)
    with torch.no_grad():
        ref = q(input_ids=ids5, attention_mask=mask5)
    stats = onnx_export.compare_outputs([ref.last_hidden_state, ref.pooler_output], [last, pooled])
    assert all(s["cosine"] > 0.9999 for s in stats), stats


def test_w8a16(tmp_path):
    q = pycompress.quantize(mlp(), mode="w8a16")
    x = torch.randn(4, 16)
    path = pycompress.export_onnx(q, x, tmp_path / "w16.onnx")
    ops = op_types(path)
    assert ops.count("DequantizeLinear") == 2 and ops.count("MatMul") == 2 and "MatMulInteger" not in ops
    weights = [i for i in initializers(path).values() if len(i.dims) == 2]
    assert {i.data_type for i in weights} == {onnx.TensorProto.INT8}
    # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, which quantizes the
    # activations by default; with fp32 arithmetic requested the result is the float product
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), q(x), rtol=1e-4, atol=1e-5)
    (y_default,) = run_ort(path, x)
    (stats,) = onnx_export.compare_outputs([q(x).detach()], [y_default])
    assert stats["cosine"] >= 0.999, stats


def test_masked_and_sparse_become_dense(tmp_path):
    model = mlp()
    mask = torch.rand(32, 16) > 0.7
    model[0] = MaskedLinear.from_dense(model[0], mask)
    model[2] = SparseLinear.from_dense(nn.Linear(32, 4).requires_grad_(False))
    x = torch.randn(3, 16)
    path = pycompress.export_onnx(model, x, tmp_path / "sparse.onnx")
    ops = op_types(path)
    assert not any("pycompress" in o for o in ops)
    assert sum(o in ("Gemm", "MatMul") for o in ops) == 2
    # the pruned zeros are in the dense weight
    w = [onnx.numpy_helper.to_array(i) for i in initializers(path).values() if tuple(i.dims) in ((32, 16), (16, 32))]
    assert len(w) == 1 and (w[0] == 0).sum() >= int((~mask).sum())
    (y,) = run_ort(path, x)
    torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)


def test_verification_failure_reports_both_numbers(tmp_path, monkeypatch):
    real = onnx_export._run_ort

    def perturbed(path, tensors, threads=None):
        return [o + 0.5 * abs(o).max() for o in real(path, tensors, threads)]

    monkeypatch.setattr(onnx_export, "_run_ort", perturbed)
    with pytest.raises(onnx_export.OnnxVerificationError, match=r"cosine .* max abs difference"):
        pycompress.export_onnx(pycompress.quantize(mlp()), torch.randn(4, 16), tmp_path / "m.onnx")
    # verify=False skips ONNX Runtime
    assert pycompress.export_onnx(pycompress.quantize(mlp()), torch.randn(4, 16), tmp_path / "m.onnx",
                                  verify=False)


def test_bad_arguments(tmp_path):
    q = pycompress.quantize(mlp())
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="example_inputs do not fit"):
        pycompress.export_onnx(q, (x, x), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="failed with inputs"):
        pycompress.export_onnx(q, torch.randn(4, 15), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example_inputs"):
        pycompress.export_onnx(q, "x", tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pycompress.export_onnx(q, x, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(ValueError, match="path must name a file"):
        pycompress.export_onnx(q, x, tmp_path)
    with pytest.raises(ValueError, match="int8_format"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", int8_format="int4")
    with pytest.raises(ValueError, match="opset"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", opset=9)
    with pytest.raises(ValueError, match="input_names"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", input_names=["a", "b"])
    with pytest.raises(TypeError, match="nn.Module"):
        pycompress.export_onnx(lambda t: t, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="no write permission"):
            pycompress.export_onnx(pycompress.quantize(mlp()), torch.randn(4, 16), ro / "m.onnx")
    finally:
        ro.chmod(0o700)


def test_missing_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install '?pycompress\[onnx\]"):
        pycompress.export_onnx(pycompress.quantize(mlp()), torch.randn(4, 16), tmp_path / "m.onnx")


def test_import_pycompress_does_not_import_onnx():
    code = ("import sys, pycompress; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime', 'onnxscript')]; assert not bad, bad; assert pycompress.export_onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.fixture
def saved_model(tmp_path, monkeypatch):
    model = user_model_module(tmp_path, monkeypatch, "onnxmodels")
    pycompress.save(pycompress.quantize(model), str(tmp_path / "saved"))
    return tmp_path


def test_cli_export(saved_model, capsys):
    code = cli.main(["export", "--model", "onnxmodels:make", "--weights", "saved", "--onnx", "out.onnx",
                     "--input-shape", "8,16", "--exporter", "torchscript"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote" in out and "verified" in out
    assert int_matmuls(saved_model / "out.onnx") == 2


@pytest.mark.parametrize("args,needle", [
    (["--input-shape", "8,x"], "--input-shape must look like"),
    (["--input-shape", "8,16:complex"], "dtype must be one of"),
    ([], "either with --input-shape"),
    (["--input-shape", "8,16", "--input-shape", "8,16"], "export failed: example_inputs do not fit"),
    (["--input-shape", "8,16", "--onnx", "nowhere/out.onnx"], "does not exist"),
    (["--input-shape", "8,16", "--onnx", "out.txt"], "must name a .onnx file"),
    (["--input-shape", "8,16", "--weights", "missing"], "weights file not found"),
])
def test_cli_export_errors(saved_model, capsys, args, needle):
    argv = ["export", "--model", "onnxmodels:make", "--weights", "saved", "--onnx", "out.onnx"]
    for i in range(0, len(args), 2):
        if args[i] in argv and args[i] != "--input-shape":
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i:i + 2]
    code = cli.main(argv)
    _, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycompress: error: ") and needle in lines[0], err


class BranchOnBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * (2.0 if x.shape[0] == 3 else 1.0)


@pytest.mark.skipif(not HAS_DYNAMO, reason="torch.export-based exporter not available")
def test_warns_when_the_batch_axis_is_specialized(tmp_path):
    q = pycompress.quantize(BranchOnBatch().eval())
    with pytest.warns(UserWarning, match=r"exported with a fixed size: input\[0\] = 3"):
        pycompress.export_onnx(q, torch.randn(3, 8), tmp_path / "m.onnx", exporter="dynamo")


def test_compacted_bert_exports(tmp_path):
    """prune(channel/head) -> compact -> quantize -> export: narrower layers and fewer heads."""
    model = tiny_bert()
    ids = torch.randint(0, 64, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    pycompress.prune(model, 0.5, pattern="channel", include="*intermediate.dense", scope="layer",
                     method="activation", calibration_data=[batch])
    pycompress.prune(model, 0.5, pattern="head", scope="layer")
    pycompress.compact(model, batch)
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    q = pycompress.quantize(model, exclude="pooler")
    path = pycompress.export_onnx(q, batch, tmp_path / "compact.onnx")  # verify=True checks ORT vs torch
    shapes = sorted(tuple(i.dims) for i in initializers(path).values() if len(i.dims) == 2)
    assert (32, 32) in shapes and (16, 32) in shapes  # ffn weights [32, 32]; q/k/v [16, 32]
    assert int_matmuls(path) == 2 * 6
    last, _ = run_ort(path, ids, mask)
    with torch.no_grad():
        ref = q(**batch).last_hidden_state
    assert onnx_export.compare_outputs([ref], [last])[0]["cosine"] > 0.9999


# --------------------------------------------------------------------------- dynamic batch, atomic files
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("shape", [(1, 16), (1, 5, 16)])
def test_one_row_example_still_gives_a_dynamic_batch(tmp_path, exporter, shape):
    q = pycompress.quantize(mlp())
    path = pycompress.export_onnx(q, torch.randn(*shape), tmp_path / "m.onnx", exporter=exporter)
    graph = onnx.load(path).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim0.HasField("dim_value"), f"batch fixed to {dim0.dim_value}"
    x4 = torch.randn(4, *shape[1:])
    (y,) = run_ort(path, x4)
    assert y.shape == (4, *shape[1:-1], 4)
    assert_matches(y, q(x4))
    x1 = torch.randn(*shape)
    assert_matches(run_ort(path, x1)[0], q(x1))


def test_dynamic_axes_are_checked_against_the_inputs(tmp_path):
    q = pycompress.quantize(mlp())
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"dynamic_axes names 'inputs'.*inputs and outputs are: 'input', 'output'"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", dynamic_axes={"inputs": {0: "batch"}})
    with pytest.raises(ValueError, match=r"dynamic_axes\['input'\]: axis 2 is out of range.*rank 2"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", dynamic_axes={"input": {2: "batch"}})
    with pytest.raises(ValueError, match=r"dynamic_axes\['output'\]: axis -1 is out of range.*rank 2"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", dynamic_axes={"output": [-1]})
    with pytest.raises(TypeError, match=r"dynamic_axes\['input'\] must be"):
        pycompress.export_onnx(q, x, tmp_path / "m.onnx", dynamic_axes={"input": "batch"})
    assert not (tmp_path / "m.onnx").exists()


def test_zero_row_example_is_refused_and_leaves_no_file(tmp_path):
    q = pycompress.quantize(mlp())
    with pytest.raises(ValueError, match=r"example_inputs: input 'input' has 0 rows"):
        pycompress.export_onnx(q, torch.randn(0, 16), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def _listing(folder):
    return sorted(os.listdir(folder))


def test_failed_verification_keeps_the_previous_file(tmp_path, monkeypatch):
    q = pycompress.quantize(mlp())
    target = tmp_path / "m.onnx"
    pycompress.export_onnx(q, torch.randn(4, 16), target)
    before = target.read_bytes()
    real = onnx_export._run_ort

    def perturbed(path, tensors, threads=None):
        return [o + 0.5 * abs(o).max() for o in real(path, tensors, threads)]

    monkeypatch.setattr(onnx_export, "_run_ort", perturbed)
    other = pycompress.quantize(mlp(hidden=24))
    with pytest.raises(onnx_export.OnnxVerificationError, match=r"m.onnx: output 0.*previous file.*kept"):
        pycompress.export_onnx(other, torch.randn(4, 16), target)
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["m.onnx"]
    # a failure while writing leaves no partial file under the target name either
    monkeypatch.undo()
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    with pytest.raises(RuntimeError, match="boom"):
        pycompress.export_onnx(other, torch.randn(4, 16), tmp_path / "new.onnx")
    assert _listing(tmp_path) == ["m.onnx"]
    assert target.read_bytes() == before
