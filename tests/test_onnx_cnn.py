"""export_onnx of quantized CNNs, run by ONNX Runtime and checked against the PyTorch int8 model:
Int8Conv2d as QuantizeLinear + ConvInteger + the op's fp32 epilogue (exact), or, for the layers
that ONNX Runtime can fuse into QLinearConv, as DequantizeLinear around Conv (int8_format="qdq")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cnn_models  # noqa: E402
import pycompress  # noqa: E402
from onnx_exporters import available_exporters  # noqa: E402
from pycompress.export import onnx as onnx_export  # noqa: E402
from pycompress.nn import Int8Conv2d  # noqa: E402

EXPORTERS = available_exporters()


def run_ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def quantized(name, calibrated, seed=0):
    model = cnn_models.MODELS[name](seed)
    calib = [cnn_models.images(8, seed=3)] if calibrated else None
    return pycompress.quantize(model, calibration_data=calib)


def qdq_layers(q):
    return sum((onnx_export._qdq_conv_weights(m) is not None) for m in q.modules() if isinstance(m, Int8Conv2d))


def assert_conv_forms(path, q, qdq: bool):
    """Every float Conv of the file reads dequantized uint8 activations and int8 weights; with
    ``qdq`` there is one per layer that ONNX Runtime can fuse, and it fuses each into QLinearConv;
    the other layers are ConvInteger."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for n in convs:
        dq = [producer.get(i) for i in n.input[:2]]
        assert all(d is not None and d.op_type == "DequantizeLinear" for d in dq), n
        w = dq[1].input[0]
        w_type = inits[w].data_type if w in inits else None
        assert w_type in (None, onnx.TensorProto.INT8), w_type
    n_qdq = qdq_layers(q) if qdq else 0
    assert len(convs) == n_qdq, (len(convs), n_qdq)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node].count("QLinearConv")
    assert fused == n_qdq, (fused, n_qdq)
    return n_qdq


def assert_near_pytorch(path, q, x):
    """QLinearConv requantizes with ONNX Runtime's own rounding (the bias rounded to the sum's
    scale, one rounding of the rescaled sum): outputs land a step from the PyTorch op's now and
    then, well within the model's own quantization error."""
    y = run_ort(path, x)
    with torch.no_grad():
        ref = q(x)
    (st,) = onnx_export.compare_outputs([ref], [y])
    assert st["cosine"] >= 0.9999, st
    onnx_export.verify_onnx(path, q, x)  # raises beyond the allowance


def assert_close_to_pytorch(path, q, x):
    """ONNX Runtime computes the same int32 sums as the PyTorch op (same uint8 activations,
    same weights) and the same fp32 epilogue, and requantizes as the op does (times the fp32
    reciprocal of the scale): the same uint8 values, so the outputs differ by float rounding
    only (the fp32 head, SiLU's formula), far less than 1e-5 of the largest output in these
    models; a wrong scale, zero point or weight layout changes it by the order of the output."""
    y = run_ort(path, x)
    with torch.no_grad():
        ref = q(x)
    (st,) = onnx_export.compare_outputs([ref], [y])
    assert st["cosine"] >= 0.99999 and st["max_abs"] <= 1e-5 * st["scale"], st
    return st


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "vgg"])
@pytest.mark.parametrize("fmt", ["exact", "auto"])
def test_cnn_models(tmp_path, name, calibrated, exporter, fmt):
    q = quantized(name, calibrated)
    convs = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    assert convs and all(m.static_input == calibrated for m in convs)
    assert any(m.output_dtype is torch.uint8 for m in convs) == calibrated
    path = pycompress.export_onnx(q, cnn_models.images(4), tmp_path / f"{name}.onnx", exporter=exporter,
                                  int8_format=fmt)
    # "auto" fuses the calibrated layers with a uint8 output or a uint8 residual
    n_qdq = assert_conv_forms(path, q, qdq=fmt == "auto")
    assert (0 < n_qdq <= len(convs)) if calibrated and fmt == "auto" else n_qdq == 0
    n_int = op_types(path).count("ConvInteger")
    # dynamic layers add one ConvInteger on a [1, C, H, W] ones tensor for the zero-point correction
    assert n_int == (len(convs) - n_qdq if calibrated else 2 * len(convs)), (n_int, len(convs))
    # dynamic batch axis: other batch sizes than the example's
    for n in (1, 5):
        x = cnn_models.images(n, seed=10 + n)
        if n_qdq:
            assert_near_pytorch(path, q, x)
        else:  # integers only: the PyTorch model's sums and epilogues
            assert_close_to_pytorch(path, q, x)
    # and the verification rule accepts it on a fresh batch; the float twin differs (the yardstick)
    (st,) = onnx_export.verify_onnx(path, q, cnn_models.images(3, seed=20))
    assert st["quant_err"] > 0 and st["err"] <= (2.0 if n_qdq else 0.1) * st["quant_err"], st


@pytest.mark.parametrize("fmt, dtype", [("exact", onnx.TensorProto.UINT8), ("standard", onnx.TensorProto.UINT8),
                                        ("u8s8", onnx.TensorProto.INT8), ("qdq", onnx.TensorProto.UINT8),
                                        ("auto", onnx.TensorProto.UINT8)])
def test_conv_weight_types(tmp_path, fmt, dtype):
    """uint8 weights (int8 + 128, zero point 128) unless the form names int8 ones: ONNX Runtime's
    ConvInteger is fast for uint8 weights only, and u8 x u8 is exact everywhere."""
    q = quantized("vgg" if fmt in ("qdq", "auto") else "resnet", True)  # vgg: its last conv, with a float output, is not fused
    path = pycompress.export_onnx(q, cnn_models.images(2), tmp_path / "r.onnx", int8_format=fmt,
                                  exporter=EXPORTERS[-1])
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    conv_w = [inits[n.input[1]] for n in model.graph.node if n.op_type == "ConvInteger" and n.input[1] in inits]
    assert conv_w and all(w.data_type == dtype for w in conv_w)
    # "qdq", "auto": the convs they do not fuse keep the exact form with uint8 weights
    (assert_near_pytorch if fmt in ("qdq", "auto") else assert_close_to_pytorch)(path, q, cnn_models.images(3, seed=5))


class ActNet(nn.Module):
    """Strided, dilated, grouped and depthwise convs with SiLU and Hardswish, padding off-centre."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.a1 = nn.SiLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.a2 = nn.Hardswish()
        self.c3 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.a3 = nn.ReLU6()
        self.c4 = nn.Conv2d(8, 6, (1, 3), padding=(0, 1), bias=False)

    def forward(self, x):
        return self.c4(self.a3(self.c3(self.a2(self.c2(self.a1(self.c1(x)))))))


@pytest.mark.parametrize("calibrated", [False, True], ids=["dynamic", "static"])
def test_activations_and_conv_shapes(tmp_path, calibrated):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 11, 13)
    q = pycompress.quantize(ActNet().eval(), calibration_data=[torch.randn(8, 3, 11, 13)] if calibrated else None)
    acts = {m.activation for m in q.modules() if isinstance(m, Int8Conv2d)}
    assert {"silu", "hardswish", "relu6"} <= acts, acts
    path = pycompress.export_onnx(q, x, tmp_path / "act.onnx", exporter=EXPORTERS[0], int8_format="qdq")
    ops = op_types(path)
    assert "HardSwish" in ops and "Sigmoid" in ops and "Clip" in ops
    if assert_conv_forms(path, q, qdq=True):
        assert_near_pytorch(path, q, torch.randn(2, 3, 11, 13))
    else:
        assert_close_to_pytorch(path, q, torch.randn(2, 3, 11, 13))


@pytest.mark.parametrize("calibrated, fmt, residual", [(False, "auto", False), (True, "exact", False),
                                                       (True, "qdq", False), (True, "qdq", True)],
                         ids=["dynamic", "static", "static-qdq", "static-qdq-residual"])
def test_broken_conv_export_fails_verify(tmp_path, calibrated, fmt, residual, monkeypatch):
    """A file with one conv's weight scales doubled must be rejected, and not written (with
    "qdq", a conv that ONNX Runtime fuses into QLinearConv, with or without a residual)."""
    q = quantized("resnet", calibrated)
    convs = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    # the third conv, or with "qdq" the first that takes that form (1-based, in module order)
    target = next(i for i, m in enumerate(convs) if onnx_export._qdq_conv_weights(m) is not None
                  and m.residual == residual) + 1 if fmt == "qdq" else 3
    orig = onnx_export._ExportInt8Conv2d.__init__
    seen = []

    def doubled(self, layer, fmt):  # the export works on a copy: count the layers converted
        orig(self, layer, fmt)
        seen.append(layer)
        if (len(seen) - 1) % len(convs) + 1 == target:
            assert fmt != "qdq" or self.fmt == onnx_export._CONV_QDQ
            self.weight_scale.mul_(2)

    monkeypatch.setattr(onnx_export._ExportInt8Conv2d, "__init__", doubled)
    out = tmp_path / "broken.onnx"
    with pytest.raises(onnx_export.OnnxVerificationError, match="quantization error"):
        pycompress.export_onnx(q, cnn_models.images(4), out, exporter=EXPORTERS[-1], int8_format=fmt)
    assert not out.exists()
    # the same file written without the check is rejected by verify_onnx
    pycompress.export_onnx(q, cnn_models.images(4), out, exporter=EXPORTERS[-1], verify=False, int8_format=fmt)
    with pytest.raises(onnx_export.OnnxVerificationError):
        onnx_export.verify_onnx(out, q, cnn_models.images(4, seed=9))


def test_single_layer_model(tmp_path):
    """An Int8Conv2d exported on its own (the model's root), dynamic per-image quantization:
    images of very different ranges in one batch keep their own scales."""
    torch.manual_seed(0)
    q = Int8Conv2d.from_float(nn.Conv2d(4, 6, 3, stride=2, padding=1), activation="relu")
    x = torch.randn(2, 4, 9, 9)
    path = pycompress.export_onnx(q, x, tmp_path / "one.onnx", exporter=EXPORTERS[0])
    assert op_types(path).count("ConvInteger") == 2
    mixed = torch.cat([torch.randn(1, 4, 9, 9) * 100, torch.rand(1, 4, 9, 9) + 1, torch.randn(1, 4, 9, 9) * 1e-3])
    y = run_ort(path, mixed)
    with torch.no_grad():
        for i in range(3):  # each image as the PyTorch op computes it alone
            ref = q(mixed[i:i + 1])
            (st,) = onnx_export.compare_outputs([ref], [y[i:i + 1]])
            assert st["cosine"] >= 0.99999 and st["max_abs"] <= 1e-5 * st["scale"], (i, st)


def test_qdq_channel_without_weights(tmp_path):
    """A channel with next to no weights and a bias (as BatchNorm folding leaves in pretrained
    networks) has no int32 bias at its own sums' scale: it gets the smallest scale that holds the
    bias, and the layer still fuses into QLinearConv and agrees with PyTorch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[2].weight[5].mul_(1e-12)
        net[2].bias[5] = 2.0
    q = pycompress.quantize(net.eval(), calibration_data=[torch.randn(8, 3, 12, 12)])
    layer = q[2]
    assert isinstance(layer, Int8Conv2d) and float(layer.weight_scale.reshape(-1)[5]) < 1e-10
    w, ws = onnx_export._qdq_conv_weights(layer)
    assert float(ws[5]) * float(layer.input_scale) * 2 ** 30 >= 2.0 - 1e-6 and torch.equal(w[5], torch.zeros_like(w[5]))
    assert torch.equal(w[:5], layer.weight[:5]) and torch.equal(ws[:5], layer.weight_scale.reshape(-1)[:5])
    x = torch.randn(2, 3, 12, 12)
    path = pycompress.export_onnx(q, x, tmp_path / "dead.onnx", exporter=EXPORTERS[-1], int8_format="qdq")
    assert assert_conv_forms(path, q, qdq=True) == 2
    assert_near_pytorch(path, q, torch.randn(3, 3, 12, 12))


def _optimized_ops(path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("calibrated_sum", [True, False], ids=["calibrated-sum", "bound"])
def test_qdq_residual_convs(tmp_path, calibrated_sum):
    """A residual conv in the "qdq" form: Conv -> QuantizeLinear -> DequantizeLinear at the scale
    of the sum before the residual, Add, the activation, the output's quantization. ONNX Runtime
    fuses the conv into QLinearConv and the addition into QLinearAdd; the one rounding more than
    the PyTorch op stays well within the model's own quantization error. Without a calibrated
    range (``sum_scale`` None) the sum gets the widest range that changes no output."""
    q = quantized("resnet", True)
    res = [m for m in q.modules() if isinstance(m, Int8Conv2d) and m.residual]
    assert res and all(m.residual_scale is not None and m.sum_scale is not None for m in res)
    if not calibrated_sum:
        for m in res:
            m.set_sum_quantization(None, None)
    # a float output bounds nothing: such a layer needs the calibrated range
    assert all((onnx_export._qdq_conv_weights(m) is not None) == (calibrated_sum or m.output_scale is not None)
               for m in res)
    assert any(m.output_scale is None for m in res)
    path = pycompress.export_onnx(q, cnn_models.images(4), tmp_path / "r.onnx", int8_format="qdq",
                                  exporter=EXPORTERS[-1])
    assert ("ConvInteger" in op_types(path)) != calibrated_sum
    ops = _optimized_ops(path)
    assert ops.count("QLinearConv") == qdq_layers(q)
    # every addition whose result is requantized runs on uint8, whatever produced the residual
    # (a max pool, a downsampling conv, the previous block)
    assert ops.count("QLinearAdd") == sum(m.output_scale is not None for m in res), ops
    x = cnn_models.images(5, seed=7)
    assert_near_pytorch(path, q, x)
    (st,) = onnx_export.verify_onnx(path, q, x)
    assert st["err"] <= 1.5 * st["quant_err"], st


@pytest.mark.parametrize("act", ["relu", "none", "relu6"])
def test_qdq_residual_sum_range_changes_no_output(act):
    """Clamping the sum before the residual to the range ``_qdq_sum_quantization`` derives from the
    output's and the residual's quantization (no calibrated range) changes no output: the
    layer's arithmetic with the clamp, over every residual value and sums far outside the range."""
    torch.manual_seed(0)
    q = Int8Conv2d.from_float(nn.Conv2d(4, 4, 1), activation=act, input_quantization=(0.05, 3),
                              output_quantization=(0.04, 0 if act != "none" else 100), residual=True)
    q.set_residual_quantization(0.03, 7)
    scale, zp = onnx_export._qdq_sum_quantization(q)
    lo, hi = (0 - zp) * scale, (255 - zp) * scale
    c = torch.linspace(-40.0, 40.0, 20001)[:, None]                       # conv + bias
    r = ((torch.arange(256) - 7) * 0.03)[None, :]                         # every residual value
    f = {"relu": torch.relu, "none": lambda t: t, "relu6": F.relu6}[act]

    def out(c):
        return torch.clamp(torch.round(f(c + r) / 0.04) + int(q.output_zero_point), 0, 255)
    assert torch.equal(out(c), out(c.clamp(lo, hi)))
    # the range is no wider than needed: the output's span (from 0 after a ReLU) and the residual's
    o_lo = 0.0 if act != "none" else -100 * 0.04
    o_hi = min((255 - int(q.output_zero_point)) * 0.04, 6.0 if act == "relu6" else math.inf)
    assert hi - lo <= (o_hi - o_lo + 255 * 0.03) * 255 / 254 * 1.0001
    # a calibrated range narrower than that is used, cut to it (and covered whole)
    q.set_sum_quantization(0.01, 100)
    scale, zp = onnx_export._qdq_sum_quantization(q)
    assert (0 - zp) * scale <= -1.0 and (255 - zp) * scale >= 1.55 and scale <= 0.01 * 255 / 254 * 1.0001


def test_auto_falls_back_to_the_exact_form(tmp_path, monkeypatch):
    """``int8_format="auto"`` writes the fused conv form; a file of that form that fails the check
    is written again in the exact form, with a warning; ``"qdq"`` raises instead."""
    q = quantized("resnet", True)
    x = cnn_models.images(4)
    orig = onnx_export._qdq_conv_weights

    def doubled(layer):  # the fused form only: every weight scale doubled
        r = orig(layer)
        return None if r is None else (r[0], r[1] * 2)

    monkeypatch.setattr(onnx_export, "_qdq_conv_weights", doubled)
    with pytest.raises(onnx_export.OnnxVerificationError, match="quantization error"):
        pycompress.export_onnx(q, x, tmp_path / "q.onnx", int8_format="qdq", exporter=EXPORTERS[-1])
    assert not (tmp_path / "q.onnx").exists()
    with pytest.warns(UserWarning, match="exact form"):
        path = pycompress.export_onnx(q, x, tmp_path / "a.onnx", exporter=EXPORTERS[-1])
    ops = op_types(path)
    assert "Conv" not in ops and ops.count("ConvInteger") == len([m for m in q.modules() if isinstance(m, Int8Conv2d)])
    assert_close_to_pytorch(path, q, cnn_models.images(3, seed=6))
