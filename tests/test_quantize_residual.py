"""Residual additions computed by int8 convs: ``Int8Conv2d(residual=True)`` (exact against the
op's float steps), the block rewrite of ``quantize`` (ResNet basic / bottleneck blocks, inverted
residuals, functional activations, operand order, broadcasting), uint8 shortcuts, save/load,
validate, torch.compile / export, ONNX, and bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pycompress
import cnn_models as cm
from pycompress.nn import Int8Conv2d

pytestmark = [pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                 reason="this build has no int8_conv2d op"),
              pytest.mark.usefixtures("one_thread")]



def structured(n, seed, shape=cm.INPUT_SHAPE):
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x + 0.5 * torch.randn(n, 1, 1, 1, generator=g) + 0.2 * torch.randn(n, c, h, w, generator=g)


CALIB = [structured(8, s) for s in (10, 11)]
TEST = structured(16, 99)


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def _quantize(model, **kw):
    return pycompress.quantize(copy.deepcopy(model), calibration_data=CALIB, return_result=True, **kw)


# ----------------------------------------------------------------------------- the layer
def _layer(act="relu", static_residual=True, out_uint8=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(12, 20, 3, padding=1)
    q = Int8Conv2d.from_float(conv, activation=act, input_quantization=(0.05, 3),
                              output_quantization=(0.04, 0 if act == "relu" else 100) if out_uint8 else None,
                              residual=True)
    if static_residual:
        q.set_residual_quantization(0.03, 7)
    return q


def _reference(q, x, r):
    """The op's steps in fp32: conv + bias (the op itself, activation off), + the residual's real
    value, the activation, the requantization."""
    y = q.conv_output(x)
    if r.dtype == torch.uint8:
        r = (r.to(torch.int32) - q.residual_zero_point).float() * q.residual_scale
    y = y + r.float()
    y = {"relu": torch.relu, "none": lambda t: t, "relu6": F.relu6}[q.activation](y)
    if q.output_scale is None:
        return y
    inv = torch.tensor(1.0) / q.output_scale
    return (torch.round(y * inv) + q.output_zero_point).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("act", ["relu", "none", "relu6"])
@pytest.mark.parametrize("rdtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("out_uint8", [True, False])
def test_residual_layer_is_exact(act, rdtype, out_uint8):
    q = _layer(act, out_uint8=out_uint8)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 12, 9, 11), generator=g, dtype=torch.uint8)
    if rdtype == torch.uint8:
        r = torch.randint(0, 256, (2, 20, 9, 11), generator=g, dtype=torch.uint8)
    else:
        r = torch.randn(2, 20, 9, 11, generator=g)
    got = q(x, r)
    want = _reference(q, x, r)
    assert got.dtype == want.dtype
    assert torch.equal(got.contiguous(), want.contiguous())


def test_residual_of_another_shape_is_broadcast_in_float():
    q = _layer("relu", out_uint8=False)
    x = torch.randint(0, 256, (2, 12, 9, 11), dtype=torch.uint8)
    r = torch.randn(2, 20, 1, 1)
    assert torch.equal(q(x, r), torch.relu(q.conv_output(x) + r))
    with pytest.raises(ValueError, match="cannot be added"):
        q(x, torch.randn(2, 7, 9, 11))


def test_residual_layer_bad_inputs():
    q = _layer()
    x = torch.randint(0, 256, (1, 12, 6, 6), dtype=torch.uint8)
    r = torch.randint(0, 256, (1, 20, 6, 6), dtype=torch.uint8)
    with pytest.raises(ValueError, match="residual"):
        q(x)
    with pytest.raises(TypeError, match="residual"):
        q(x, r.to(torch.int32))
    with pytest.raises(TypeError, match="residual"):
        q(x, [1.0])
    q.set_residual_quantization(None, None)
    with pytest.raises(ValueError, match="residual quantization"):
        q(x, r)
    plain = Int8Conv2d.from_float(nn.Conv2d(12, 20, 3, padding=1))
    with pytest.raises(ValueError, match="without one"):
        plain(x.float(), r.float())
    with pytest.raises(ValueError, match="residual input"):
        plain.set_residual_quantization(0.1, 0)
    with pytest.raises(ValueError, match="residual"):
        Int8Conv2d(4, 4, 1, static_residual=True)
    with pytest.raises(ValueError, match="residual input"):
        plain.set_sum_quantization(0.1, 0)
    with pytest.raises(ValueError, match="residual"):
        Int8Conv2d(4, 4, 1, static_sum=True)
    with pytest.raises(ValueError, match="sum"):
        q.set_sum_quantization(-1.0, 0)
    assert q.sum_scale is None  # a rejected value leaves the layer as it was


def test_residual_layer_config_round_trip():
    q = _layer()
    q.set_sum_quantization(0.06, 120)
    cfg = json.loads(json.dumps(q.config()))
    assert cfg["residual"] is True and cfg["static_residual"] is True and cfg["static_sum"] is True
    r = Int8Conv2d.from_config(cfg)
    r.load_state_dict(q.state_dict())
    assert float(r.sum_scale) == pytest.approx(0.06) and int(r.sum_zero_point) == 120
    x = torch.randint(0, 256, (1, 12, 6, 6), dtype=torch.uint8)
    res = torch.randint(0, 256, (1, 20, 6, 6), dtype=torch.uint8)
    assert torch.equal(r(x, res), q(x, res))
    assert "residual=uint8" in repr(q)


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_residual_blocks_are_fused_and_agree_with_fp32(name):
    model = getattr(cm, name)().eval()
    q, res = _quantize(model)
    ref = model(TEST)
    assert res.residual_blocks, "no residual addition was fused"
    for conv, info in res.residual.items():
        block = q.get_submodule(info["block"])
        assert isinstance(block, torch.fx.GraphModule)
        layer = q.get_submodule(conv)
        assert isinstance(layer, Int8Conv2d) and layer.residual
        assert not any(n.op == "call_function" and n.target in (torch.add, __import__("operator").add)
                       for n in block.graph.nodes)
    # the shortcut stays uint8 between blocks
    assert any(c in res.residual and info == "uint8" for c, info in
               ((c, res.residual[c]["residual"]) for c in res.residual))
    assert _cos(q(TEST), ref) > 0.999
    # the same state_dict keys as without the fusion, but for the quantization of more outputs
    q0, res0 = _quantize(model, fuse_residual=False)
    assert not res0.residual_blocks and not res0.residual

    def keys(m):
        return {k for k in m.state_dict() if not k.endswith(("output_scale", "output_zero_point", "residual_scale",
                                                               "residual_zero_point", "sum_scale", "sum_zero_point"))}
    assert keys(q) == keys(q0)
    assert len(res.uint8_edges) > len(res0.uint8_edges)
    assert _cos(q0(TEST), ref) > 0.999


def test_resnet_block_plan():
    model = cm.resnet().eval()
    q, res = _quantize(model)
    # basic blocks: the addition after conv2 (not the downsample's: the first operand's conv wins);
    # bottlenecks: after conv3; each with the ReLU after the addition
    assert res.residual_blocks == {"layer1.0": ["conv2"], "layer2.0": ["conv2"], "layer3.0": ["conv3"],
                                   "layer3.1": ["conv3"]}
    assert all(v["activation"] == "relu" for v in res.residual.values())
    # calibration records the range of each residual conv's own part of the sum (conv + folded
    # BatchNorm, before the addition), for the ONNX export: it covers what the float model computes
    for conv in res.residual:
        layer = q.get_submodule(conv)
        assert layer.sum_scale is not None and float(layer.sum_scale) > 0
        seen = []
        h = model.get_submodule(conv.rsplit(".", 1)[0] + ".bn" + conv[-1]).register_forward_hook(
            lambda m, a, out: seen.append(out))
        with torch.no_grad():
            for b in CALIB:
                model(b)
        h.remove()
        out = torch.cat([t.flatten() for t in seen])
        lo = (0 - int(layer.sum_zero_point)) * float(layer.sum_scale)
        hi = (255 - int(layer.sum_zero_point)) * float(layer.sum_scale)
        assert lo <= 0 <= hi and hi - lo <= (float(out.max()) - float(out.min())) * 1.001 + 1e-6
        assert hi - lo >= 0.5 * (float(out.quantile(0.999)) - float(out.quantile(0.001)))
    # the downsample feeds the residual as uint8
    assert ("layer2.0.downsample.0", "layer2.0.conv2") in res.uint8_edges
    assert q.get_submodule("layer2.0.downsample.0").output_dtype == torch.uint8
    # the shared ReLU is no longer called inside the rebuilt blocks
    block = q.get_submodule("layer3.0")
    assert not any(n.op == "call_module" and n.target == "relu" for n in block.graph.nodes)
    assert isinstance(block.relu, nn.ReLU)  # but kept as a submodule


class _FunctionalBlock(nn.Module):
    """``torch.add(identity, out)`` (operands swapped), then ``F.relu``."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(torch.add(x, out), inplace=True)


class _BroadcastBlock(nn.Module):
    """A residual of another shape: the per-image channel mean."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x.mean((2, 3), keepdim=True)


class _Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = block
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("block", [_FunctionalBlock, _BroadcastBlock])
def test_functional_and_broadcast_residuals(block):
    model = cm.randomize_batchnorm(_Net(block()).eval())
    q, res = _quantize(model)
    assert list(res.residual_blocks) == ["block"]
    assert _cos(q(TEST), model(TEST)) > 0.999


def test_root_level_addition_is_left_in_float():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    model = nn.Sequential(Root()).eval()  # the addition's owner is the Root module: fused
    q, res = _quantize(model)
    assert list(res.residual_blocks) == ["0"]
    root_only = Root().eval()
    q2, res2 = pycompress.quantize(copy.deepcopy(root_only), calibration_data=CALIB, return_result=True)
    assert not res2.residual_blocks and type(q2) is Root
    assert _cos(q2(TEST), root_only(TEST)) > 0.999


def test_fuse_residual_must_be_a_bool():
    with pytest.raises(TypeError, match="fuse_residual"):
        pycompress.quantize(cm.resnet().eval(), calibration_data=CALIB, fuse_residual="yes")


def test_dynamic_quantization_fuses_with_float_residuals():
    model = cm.resnet().eval()
    q, res = pycompress.quantize(copy.deepcopy(model), return_result=True)
    assert res.residual and all(v["residual"] == "float" for v in res.residual.values())
    assert _cos(q(TEST), model(TEST)) > 0.999


# ----------------------------------------------------------------------------- the workflow
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    model = getattr(cm, name)().eval()
    q, res = _quantize(model)
    y = q(TEST)
    d = pycompress.save(q, tmp_path / "m")
    manifest = json.loads((d / "pycompress.json").read_text())
    assert sorted(manifest["residual_blocks"]) == sorted(res.residual_blocks)
    restored = pycompress.load(d, getattr(cm, name)().eval())
    for b in res.residual_blocks:
        assert isinstance(restored.get_submodule(b), torch.fx.GraphModule)
    assert torch.equal(restored(TEST), y)
    # deepcopy / pickling of the rebuilt blocks
    assert torch.equal(copy.deepcopy(q)(TEST), y)


def test_load_into_another_architecture_leaves_the_model_unchanged(tmp_path):
    model = cm.resnet().eval()
    q, _ = _quantize(model)
    d = pycompress.save(q, tmp_path / "m")
    manifest = json.loads((d / "pycompress.json").read_text())
    manifest["residual_blocks"]["layer1.0"] = {"conv1": "relu"}  # not a residual layer
    (d / "pycompress.json").write_text(json.dumps(manifest))
    fresh = cm.resnet().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    types = [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match="residual"):
        pycompress.load(d, fresh)
    assert types == [type(m) for m in fresh.modules()]
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_validate_compile_and_export_of_fused_blocks():
    model = cm.resnet().eval()
    q, res = _quantize(model)
    report = pycompress.validate(model, q, CALIB)
    assert report.passed
    for conv in res.residual:
        assert conv in report.layers
    y = q(TEST)
    ep = torch.export.export(q, (TEST,))
    assert torch.equal(ep.module()(TEST), y)
    assert torch.equal(torch.compile(q)(TEST), y)


def test_onnx_export_of_fused_blocks_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = cm.resnet().eval()
    q, _ = _quantize(model)
    import onnx

    for fmt, conv in (("exact", "ConvInteger"), ("auto", "Conv")):
        path = tmp_path / f"r-{fmt}.onnx"
        pycompress.export_onnx(q, TEST[:2], path, int8_format=fmt)  # verify=True: agrees with the int8 model
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert conv in ops and "Add" in ops
