"""Zero-padding modules in int8 CNNs: uint8 chains through ``nn.ZeroPad2d`` / ``nn.ConstantPad2d(0)``,
asymmetric padding of the int8 conv op (every CPU code path, against ``F.pad`` + ``F.conv2d`` on
the exact integer values), the padding module absorbed into ``Int8Conv2d`` by ``quantize``, and
what relies on it: save/load, recipe revert, validate and ONNX export of an EfficientNet-Lite0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pycompress
from pycompress.nn import Int8Conv2d
from pycompress.quantization import fuse

pytestmark = [pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                 reason="this build has no int8_conv2d op"),
              pytest.mark.usefixtures("one_thread")]



def structured(n, seed, shape=(3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x + 0.5 * torch.randn(n, 1, 1, 1, generator=g) + 0.2 * torch.randn(n, c, h, w, generator=g)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def _uint8_inputs(model, x):
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].dtype))
               for n, m in model.named_modules() if isinstance(m, Int8Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sorted(n for n, d in seen.items() if d == torch.uint8)


def _unchained(model, edges):
    out = copy.deepcopy(model)
    for p, _ in edges:
        out.get_submodule(p).set_output_quantization(None, None)
    return out


# --------------------------------------------------------------------------- uint8 chains through padding
class SharedPadNet(nn.Module):
    """conv -> BN -> ReLU -> pad, whose output two convs read (the pad cannot be absorbed into one
    conv); ``act``: the activation after the first conv."""

    def __init__(self, pad: nn.Module, act: nn.Module):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.act0 = act
        self.pad = pad
        self.conv_a = nn.Conv2d(8, 8, 3, stride=2)
        self.conv_b = nn.Conv2d(8, 8, 3, stride=2, groups=8)

    def forward(self, x):
        y = self.act0(self.bn0(self.conv0(x)))
        p = self.pad(y)
        z = self.conv_a(p) + self.conv_b(p)
        return z.mean((2, 3))


CALIB = [structured(8, s) for s in (10, 11)]
TEST = structured(16, 99)


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((0, 1, 0, 1)), nn.ConstantPad2d((1, 2, 0, 1), 0.0),
                                 nn.ZeroPad2d((1, -1, 0, 1))], ids=["zero", "constant0", "crop"])
def test_uint8_chain_passes_a_zero_padding_module_after_relu(pad):
    torch.manual_seed(0)
    model = _randomize_bn(SharedPadNet(pad, nn.ReLU()))
    ref = copy.deepcopy(model)
    _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True, warn=False)
    assert ("conv0", "conv_a") in res.uint8_edges and ("conv0", "conv_b") in res.uint8_edges
    assert int(model.conv0.output_zero_point) == 0
    assert isinstance(model.pad, type(pad))  # shared by two convs: stays, and runs on uint8
    assert _uint8_inputs(model, TEST) == ["conv_a", "conv_b"]
    # a padded 0 byte stands for the real value 0: the same result as quantizing the float values
    # after the padding at the consumers' entry
    unchained = _unchained(model, res.uint8_edges)
    assert _uint8_inputs(unchained, TEST) == []
    with torch.no_grad():
        assert torch.equal(model(TEST), unchained(TEST))
        err = (model(TEST) - ref(TEST)).norm() / ref(TEST).norm()
    assert err < 0.05


@pytest.mark.parametrize("case", ["no_relu", "constant1"])
def test_no_uint8_chain_through_padding_that_is_not_exact(case):
    torch.manual_seed(0)
    if case == "no_relu":  # the zero point is not 0: a padded 0 byte would not stand for 0
        model = _randomize_bn(SharedPadNet(nn.ZeroPad2d((0, 1, 0, 1)), nn.Identity()))
    else:
        model = _randomize_bn(SharedPadNet(nn.ConstantPad2d((0, 1, 0, 1), 1.0), nn.ReLU()))
    _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True, warn=False)
    assert not any(p == "conv0" for p, _ in res.uint8_edges)
    assert _uint8_inputs(model, TEST) == []


# --------------------------------------------------------------------------- the op's asymmetric padding
# (N, Cin, H, W, Cout, k, stride, (top, bottom, left, right), dilation, groups)
PAD_CASES = [
    (2, 5, 9, 11, 7, (3, 3), 1, (0, 1, 0, 1), 1, 1),       # regular 3x3, TF "SAME" of an even map
    (1, 19, 8, 10, 33, (3, 3), 2, (0, 1, 0, 1), 1, 1),     # regular 3x3 stride 2 (EfficientNet stem)
    (1, 16, 7, 9, 20, (3, 3), 2, (2, 0, 1, 3), 1, 1),      # every side different, one side 0
    (3, 16, 6, 9, 16, (1, 1), 1, (0, 1, 0, 2), 1, 1),      # 1x1 stride 1 padded only after: not plain rows
    (2, 64, 5, 6, 32, (1, 1), 1, (0, 2, 0, 1), 1, 1),      # 1x1, channels a multiple of 64 (AMX rows)
    (1, 67, 5, 5, 20, (1, 1), 2, (1, 0, 0, 1), 1, 1),      # 1x1 stride 2
    (2, 8, 10, 9, 12, (3, 3), 1, (1, 3, 2, 0), 2, 2),      # groups 2, dilation 2
    (1, 12, 7, 8, 20, (3, 2), (2, 1), (0, 1, 1, 0), 1, 4),  # groups 4, asymmetric kernel and stride
    (2, 24, 9, 10, 24, (3, 3), 1, (0, 1, 0, 1), 1, 24),    # depthwise 3x3
    (1, 37, 12, 10, 37, (3, 3), 2, (0, 1, 0, 1), 1, 37),   # depthwise 3x3 stride 2 (EfficientNet)
    (1, 64, 11, 13, 64, (3, 3), 2, (2, 0, 0, 2), 1, 64),   # depthwise 3x3 stride 2, one side only
    (2, 18, 12, 11, 18, (5, 5), 1, (1, 3, 3, 1), 1, 18),   # depthwise 5x5
    (1, 40, 14, 16, 40, (5, 5), 2, (1, 2, 1, 2), 1, 40),   # depthwise 5x5 stride 2 (EfficientNet)
    (1, 9, 13, 12, 9, (5, 5), 2, (4, 1, 0, 5), 2, 9),      # depthwise 5x5 stride 2 dilation 2
    (1, 21, 3, 4, 21, (5, 5), 1, (3, 2, 1, 4), 1, 21),     # depthwise, kernel wider than the image
]


def _pad_case(case):
    n, cin, h, w, cout, k, s, p, d, g = case
    return dict(n=n, cin=cin, h=h, w=w, cout=cout, k=k, stride=s, padding=p, dilation=d, groups=g)


def _padded_reference_input(x, scale, zp, pads):
    """``x`` padded (top, bottom, left, right) with the value that stands for 0: the zero point
    of each image for quantized ``x``, 0.0 for float ``x`` (quantized to the zero point)."""
    t, b, l, r = pads
    if x.is_floating_point():
        return F.pad(x, (l, r, t, b), value=0.0)
    z = zp.reshape(-1, 1, 1, 1).to(torch.int32)
    return (F.pad(x.to(torch.int32) - z, (l, r, t, b)) + z).to(x.dtype)


def _check_against_padded_reference(c, kind, act, out_dtype=None):
    from reference import conv2d_ref
    from test_int8_conv_ops import make_input, make_weight

    import pycompress.ops as ops

    x, scale, zp = make_input(kind, c["n"], c["cin"], c["h"], c["w"])
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    bias = torch.randn(c["cout"])
    kw = dict(x_scale=scale, x_zero_point=zp, stride=c["stride"], dilation=c["dilation"], groups=c["groups"],
              activation=act, out_dtype=out_dtype, out_scale=0.05, out_zero_point=3)
    y = ops.int8_conv2d(x, w, ws, bias, padding=c["padding"], w_packed=ops.int8_conv2d_pack_weight(w, c["groups"]),
                        **kw)
    ref = conv2d_ref(_padded_reference_input(x, scale, zp, c["padding"]), w, ws, bias, padding=0, **kw)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    if y.dtype.is_floating_point:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    else:
        assert torch.equal(y, ref)
    return y


@pytest.mark.parametrize("case", PAD_CASES, ids=[f"p{i}" for i in range(len(PAD_CASES))])
@pytest.mark.parametrize("kind", ["uint8", "int8", "float_dynamic", "float_static"])
def test_asymmetric_padding_exact(case, kind, cpu_isa):
    c = _pad_case(case)
    for act in ("none", "relu6"):
        _check_against_padded_reference(c, kind, act)
    _check_against_padded_reference(c, kind, "relu", out_dtype=torch.uint8)


def test_two_and_four_value_padding_agree():
    import pycompress.ops as ops

    x = torch.randint(0, 256, (2, 6, 9, 8), dtype=torch.uint8)
    w = torch.randint(-128, 128, (10, 6, 3, 3), dtype=torch.int8)
    ws, sc, zp = torch.rand(10), torch.tensor([0.1]), torch.tensor([7], dtype=torch.int32)
    for p2, p4 in ((1, (1, 1, 1, 1)), ((2, 0), (2, 2, 0, 0)), ((0, 3), [0, 0, 3, 3])):
        a = ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=zp, padding=p2)
        b = ops.int8_conv2d(x, w, ws, x_scale=sc, x_zero_point=zp, padding=p4)
        assert torch.equal(a, b)
    assert ops.int8_conv2d_output_size((9, 8), (3, 3), 2, (0, 1, 0, 1)) == (4, 4)
    assert ops.int8_conv2d_output_size((9, 8), (3, 3), 2, (1, 1)) == (5, 4)


def test_bad_padding_is_refused_clearly():
    import pycompress.ops as ops

    x = torch.randint(0, 256, (1, 4, 6, 6), dtype=torch.uint8)
    w = torch.randint(-128, 128, (4, 4, 3, 3), dtype=torch.int8)
    sc, zp = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    for bad in ((1, 2, 3), (1, 1, 1, 1, 1), ()):
        with pytest.raises(TypeError, match="padding must be"):
            ops.int8_conv2d(x, w, torch.ones(4), x_scale=sc, x_zero_point=zp, padding=bad)
        with pytest.raises(ValueError, match="padding must have 2 values .* or 4"):
            torch.ops.pycompress.int8_conv2d(x, sc, zp, w, torch.ones(4), None, None, [1, 1], list(bad), [1, 1], 1,
                                             "none", None, 1.0, 0)
    with pytest.raises(ValueError, match="padding values must be >= 0"):
        ops.int8_conv2d(x, w, torch.ones(4), x_scale=sc, x_zero_point=zp, padding=(0, -1, 0, 1))
    with pytest.raises(ValueError, match="padding values must be >= 0"):
        torch.ops.pycompress.int8_conv2d(x, sc, zp, w, torch.ones(4), None, None, [1, 1], [0, -1, 0, 1], [1, 1], 1,
                                         "none", None, 1.0, 0)
    with pytest.raises(ValueError, match="output would be empty"):
        ops.int8_conv2d(x[:, :, :1, :1], w, torch.ones(4), x_scale=sc, x_zero_point=zp, padding=(0, 1, 1, 0))


def test_fake_kernel_and_opcheck_with_four_value_padding():
    import pycompress.ops as ops

    x = torch.randint(0, 256, (2, 6, 7, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (6, 1, 3, 3), dtype=torch.int8)
    ws, bias = torch.rand(6), torch.randn(6)
    sc, zp = torch.rand(2) + 0.1, torch.randint(0, 256, (2,), dtype=torch.int32)
    args = (x, sc, zp, w, ws, bias, ops.int8_conv2d_pack_weight(w, 6), [2, 2], [0, 1, 2, 0], [1, 1], 6, "relu6",
            None, 1.0, 0)
    torch.library.opcheck(torch.ops.pycompress.int8_conv2d.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        y = torch.ops.pycompress.int8_conv2d(torch.empty(3, 6, 8, 8, dtype=torch.uint8), torch.ones(1),
                                             torch.zeros(1, dtype=torch.int32), torch.empty(6, 1, 5, 5, dtype=torch.int8),
                                             torch.ones(6), None, None, [2, 2], [1, 2, 1, 2], [1, 1], 6, "none",
                                             None, 1.0, 0)
        assert y.shape == (3, 6, 4, 4)


# --------------------------------------------------------------------------- Int8Conv2d with a padding module
def test_from_float_takes_the_padding_module_and_to_float_gives_it_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, stride=2, groups=6)
    pad = nn.ZeroPad2d((0, 1, 0, 1))
    q = Int8Conv2d.from_float(conv, activation="relu6", pad=pad)
    assert q.padding == (0, 1, 0, 1) and q.padding4 == (0, 1, 0, 1)
    x = torch.randn(2, 6, 10, 10)
    want = F.relu6(conv(pad(x)))
    y = q(x)
    assert y.shape == want.shape and (y - want).norm() / want.norm() < 0.02
    twin = q.to_float(with_activation=True)
    assert [type(m) for m in twin] == [nn.ZeroPad2d, nn.Conv2d, nn.ReLU6]
    assert twin[0].padding == (0, 1, 0, 1) and twin[1].padding == (0, 0)
    with torch.no_grad():
        deq = F.relu6(F.conv2d(pad(x), q.dequantized_weight(), q.bias, stride=2, groups=6))
        torch.testing.assert_close(twin(x), deq)
    # symmetric totals stay a pair; the conv's own padding adds up with the module's
    q2 = Int8Conv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), pad=nn.ConstantPad2d((1, 1, 2, 2), 0.0))
    assert q2.padding == (3, 2) and isinstance(q2.to_float(), nn.Conv2d)
    # config round trip
    r = Int8Conv2d.from_config(q.config())
    r.load_state_dict(q.state_dict())
    assert r.padding == q.padding and torch.equal(r(x), y)
    assert "padding=(0, 1, 0, 1)" in repr(q)
    for bad in (nn.ConstantPad2d(1, 0.5), nn.ZeroPad2d((-1, 1, 0, 0)), nn.ReflectionPad2d(1)):
        with pytest.raises(ValueError, match="pad must be an nn.ZeroPad2d"):
            Int8Conv2d.from_float(conv, pad=bad)


# --------------------------------------------------------------------------- EfficientNet-Lite0
EFF_SHAPE = (3, 64, 64)  # sides a multiple of 32: the demo's TF "SAME" padding is exact
EFF_CALIB = [structured(4, s, EFF_SHAPE) for s in (30, 31)]
EFF_TEST = structured(6, 77, EFF_SHAPE)


def _effnet(seed=0):
    from pycompress.demo.efficientnet import EfficientNetLite0

    torch.manual_seed(seed)
    return _randomize_bn(EfficientNetLite0(num_classes=10, dropout=0.0), seed)


@pytest.fixture(scope="module")
def effnet_pair():
    torch.set_num_threads(1)
    ref = _effnet()
    model = copy.deepcopy(ref)
    _, res = pycompress.quantize(model, calibration_data=EFF_CALIB, return_result=True, warn=False)
    return ref, model, res


def _pads(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)))


def test_effnet_padding_is_computed_by_the_int8_convs(effnet_pair):
    ref, model, res = effnet_pair
    pads = _pads(ref)
    assert len(pads) == 5  # the stem and the first block of four stride-2 stages
    assert _pads(model) == []
    assert sorted(res.padded.values()) == pads and all(p in res.identities for p in pads)
    for conv, pad in res.padded.items():
        q = model.get_submodule(conv)
        assert isinstance(q, Int8Conv2d) and q.fused_modules[0] == pad
        assert len(q.padding) == 4 and q.padding4[1] == q.padding4[0] + 1  # TF "SAME": one more after
        assert pad in res.members(conv)
    # no padding copy runs in float (nor at all) in the converted model
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        model(EFF_TEST[:1])
    names = {e.key for e in prof.key_averages()}
    assert "aten::constant_pad_nd" not in names and "aten::pad" not in names
    # the padded depthwise convs of the stride-2 blocks read their expansion conv's uint8 output
    padded_dw = [c for c in res.padded if c.endswith("dw_conv")]
    assert len(padded_dw) == 4
    for c in padded_dw:
        assert (c.replace("dw_conv", "expand_conv"), c) in res.uint8_edges
    residual = set(res.uint8_residual_edges)  # uint8 shortcuts read as residuals
    assert _uint8_inputs(model, EFF_TEST[:1]) == sorted(c for e in res.uint8_edges if e not in residual for c in e[1:])
    with torch.no_grad():
        want, got = ref(EFF_TEST), model(EFF_TEST)
    cos = F.cosine_similarity(got, want, dim=1)
    assert cos.min() > 0.99, cos


def test_effnet_absorbed_padding_is_exact(effnet_pair):
    """Each conv that computes its padding module gives the bits of the same layer (same
    quantization) without padding, run on the padding module's output."""
    ref, model, res = effnet_pair
    inputs = {}
    handles = [model.get_submodule(c).register_forward_pre_hook(
        lambda m, a, c=c: inputs.__setitem__(c, a[0])) for c in res.padded]
    with torch.no_grad():
        model(EFF_TEST[:2])
    for h in handles:
        h.remove()
    for conv, pad in res.padded.items():
        q = model.get_submodule(conv)
        plain = copy.deepcopy(q)
        plain.padding = (0, 0)
        x = inputs[conv]
        if x.dtype == torch.uint8:  # pad the bytes with the zero point, the value 0
            zp = int(q.input_zero_point)
            xp = (F.pad(x.to(torch.int32) - zp, _torch_pad(q.padding4)) + zp).to(torch.uint8)
        else:
            xp = F.pad(x, _torch_pad(q.padding4))
        with torch.no_grad():
            a, b = q(x), plain(xp)
        assert a.dtype == b.dtype and torch.equal(a, b), conv


def _torch_pad(p4):
    t, b, l, r = p4
    return (l, r, t, b)


def test_effnet_save_load_is_exact(effnet_pair, tmp_path):
    import json

    _, model, res = effnet_pair
    out = pycompress.save(model, tmp_path / "effnet")
    manifest = json.loads((out / "pycompress.json").read_text())
    assert set(res.padded.values()) <= set(manifest["identities"])
    fresh = pycompress.load(out, _effnet(seed=5))
    assert _pads(fresh) == []

    def kind(m):  # every fx.GraphModule (a rebuilt residual block) has a class of its own
        return torch.fx.GraphModule if isinstance(m, torch.fx.GraphModule) else type(m)
    assert [kind(m) for m in fresh.modules()] == [kind(m) for m in model.modules()]
    assert fresh.stem_conv.padding == model.stem_conv.padding
    with torch.no_grad():
        assert torch.equal(fresh(EFF_TEST), model(EFF_TEST))


def test_effnet_validate_compares_pad_conv_bn_act(effnet_pair):
    ref, model, res = effnet_pair
    report = pycompress.validate(ref, model, [EFF_TEST], layers=True, progress=False,
                                 tolerance={"layer_cosine": 0.98})
    assert report.passed, report.failures
    for conv in res.padded:
        assert report.layers[conv].calls == 1 and report.layers[conv].cosine > 0.99, conv
    assert not set(report.layers) & set(res.padded.values())


def test_effnet_recipe_revert_restores_the_float_model():
    ref = _effnet()

    def metric(m):
        with torch.no_grad():
            want = ref(EFF_TEST)
            return -((m(EFF_TEST) - want).norm() / want.norm()).item()

    model, report = pycompress.compress(copy.deepcopy(ref), {"steps": [{"quantize": {"exclude": "classifier"}}]},
                                        EFF_CALIB, metric=metric, max_drop=0.0)
    assert report.within_budget and not report.compressed_layers
    assert _pads(model) == _pads(ref)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    with torch.no_grad():
        assert torch.equal(model(EFF_TEST), ref(EFF_TEST))


def test_effnet_onnx_export_verifies(effnet_pair, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pycompress.export import onnx as onnx_export
    import onnx

    _, model, res = effnet_pair
    # the exact form (ConvInteger) and the default one (Conv that ONNX Runtime fuses)
    for fmt, conv in (("exact", "ConvInteger"), ("auto", "Conv")):
        path = pycompress.export_onnx(model, EFF_TEST[:2], tmp_path / f"effnet-{fmt}.onnx", int8_format=fmt)
        nodes = onnx.load(str(path)).graph.node
        assert "Pad" not in [n.op_type for n in nodes] and conv in [n.op_type for n in nodes]
        pads = [list(a.ints) for n in nodes if n.op_type == conv for a in n.attribute if a.name == "pads"]
        # ONNX order [top, left, bottom, right]: the stride-2 convs pad one more after the image
        assert [0, 0, 1, 1] in pads and [1, 1, 2, 2] in pads
        (st,) = onnx_export.verify_onnx(path, model, EFF_TEST[2:5])
        assert st["cosine"] > (0.9999 if fmt == "exact" else 0.999), st


# --------------------------------------------------------------------------- where a padding module stays
class PadConvNet(nn.Module):
    """stem: pad -> conv (stride 2) -> BN -> ReLU6; then pad -> depthwise 5x5 stride 2 -> BN ->
    ReLU6 -> 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.pad0 = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv0 = nn.Conv2d(3, 16, 3, 2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.act0 = nn.ReLU6()
        self.pad1 = nn.ConstantPad2d((1, 2, 1, 2), 0.0)
        self.dw = nn.Conv2d(16, 16, 5, 2, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU6()
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.act0(self.bn0(self.conv0(self.pad0(x))))
        y = self.act1(self.bn1(self.dw(self.pad1(y))))
        return self.pw(y)


def test_padding_modules_of_excluded_or_unconverted_convs_stay():
    torch.manual_seed(0)
    ref = _randomize_bn(PadConvNet())
    model = copy.deepcopy(ref)
    _, res = pycompress.quantize(model, calibration_data=CALIB, exclude="dw", return_result=True, warn=False)
    assert res.padded == {"conv0": "pad0"} and type(model.pad1) is nn.ConstantPad2d
    assert type(model.pad0) is nn.Identity and isinstance(model.dw, nn.Conv2d)
    with torch.no_grad():
        assert (model(TEST) - ref(TEST)).norm() / ref(TEST).norm() < 0.05
    # dynamic quantization (no calibration data) absorbs the padding as well
    model = copy.deepcopy(ref)
    _, res = pycompress.quantize(model, return_result=True, warn=False)
    assert res.padded == {"conv0": "pad0", "dw": "pad1"} and not res.uint8_edges
    assert model.dw.padding == (1, 2, 1, 2)
    with torch.no_grad():
        assert (model(TEST) - ref(TEST)).norm() / ref(TEST).norm() < 0.05


def test_absorbed_padding_under_torch_export_and_compile():
    torch.manual_seed(0)
    model = _randomize_bn(PadConvNet())
    _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True, warn=False)
    assert res.padded == {"conv0": "pad0", "dw": "pad1"} and ("conv0", "dw") in res.uint8_edges
    x = TEST[:3]
    with torch.no_grad():
        want = model(x)
        assert torch.equal(torch.export.export(model, (x,)).module()(x), want)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_of_asymmetric_padding_runs_in_onnxruntime(tmp_path, exporter):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pycompress.export import onnx as onnx_export

    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        if not onnx_export._exporter_supports_dynamo():
            pytest.skip("this torch.onnx has no dynamo exporter with custom translation tables")
    torch.manual_seed(0)
    for calibrated in (True, False):
        model = _randomize_bn(PadConvNet())
        pycompress.quantize(model, calibration_data=CALIB if calibrated else None, warn=False)
        path = pycompress.export_onnx(model, TEST[:2], tmp_path / f"m{calibrated}.onnx", exporter=exporter)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = TEST[4:9]
        y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            ref = model(x)
        (st,) = onnx_export.compare_outputs([ref], [y.numpy()])
        assert st["cosine"] >= 0.99999 and st["max_abs"] <= 1e-3 * st["scale"], st


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("case", PAD_CASES + [(2, 32, 9, 12, 48, (3, 3), 2, (0, 1, 0, 1), 1, 1),
                                              (1, 64, 10, 9, 64, (3, 3), 1, (2, 0, 1, 2), 1, 2)],
                         ids=[f"p{i}" for i in range(len(PAD_CASES))] + ["gemm_s2", "gemm_groups"])
@pytest.mark.parametrize("kind", ["uint8", "float_dynamic"])
def test_cuda_asymmetric_padding_same_bits_as_cpu(case, kind):
    """The CUDA kernels place taps by the top / left padding and take Ho / Wo from the binding:
    the CPU kernels' bits (checked there against F.pad + F.conv2d) for every padding."""
    from test_int8_conv_ops import make_input, make_weight

    import pycompress.ops as ops

    c = _pad_case(case)
    x, scale, zp = make_input(kind, c["n"], c["cin"], c["h"], c["w"])
    w, ws = make_weight(c["cout"], c["cin"] // c["groups"], c["k"])
    bias = torch.randn(c["cout"])
    for act, out_dtype in (("none", None), ("relu6", None), ("relu", torch.uint8)):
        kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
                  activation=act, out_dtype=out_dtype, out_scale=0.05, out_zero_point=3)
        want = ops.int8_conv2d(x, w, ws, bias, x_scale=scale, x_zero_point=zp, **kw)
        cuda = (lambda t: None if t is None else t.cuda())
        got = ops.int8_conv2d(x.cuda(), w.cuda(), ws.cuda(), bias.cuda(), x_scale=cuda(scale),
                              x_zero_point=cuda(zp), **kw)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.cpu(), want), (act, (got.cpu().float() - want.float()).abs().max())


# --------------------------------------------------------------------------- torch's asymmetric "same"
@pytest.mark.parametrize("k,dilation,groups", [((4, 4), 1, 1), ((2, 3), (1, 2), 1), ((4, 4), 1, 8), ((3, 3), 1, 1)])
def test_same_padding_with_an_even_receptive_field(k, dilation, groups):
    """torch pads "same" with the extra row / column after the image: so does Int8Conv2d, bit
    for bit against the unpadded layer on torch's padded input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, k, padding="same", dilation=dilation, groups=groups)
    q = Int8Conv2d.from_float(conv, input_quantization=(0.05, 100))
    tot = [d * (kk - 1) for d, kk in zip(conv.dilation, conv.kernel_size)]
    p4 = (tot[0] // 2, tot[0] - tot[0] // 2, tot[1] // 2, tot[1] - tot[1] // 2)
    assert q.padding4 == p4 and (len(q.padding) == 4) == (tot[0] % 2 == 1 or tot[1] % 2 == 1)
    x = torch.randn(2, 8, 9, 10)
    plain = copy.deepcopy(q)
    plain.padding = (0, 0)
    with torch.no_grad():
        y = q(x)
        assert y.shape == conv(x).shape
        assert torch.equal(y, plain(F.pad(x, (p4[2], p4[3], p4[0], p4[1]))))
        assert (y - conv(x)).norm() / conv(x).norm() < 0.02
        torch.testing.assert_close(q.to_float()(x), F.conv2d(x, q.dequantized_weight(), q.bias, padding="same",
                                                             dilation=conv.dilation, groups=groups))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), copy.deepcopy(conv))
    ref = copy.deepcopy(model)
    _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True, warn=False)
    assert res.convs == ["0", "2"] and not res.skipped and res.bias_corrected == ["0", "2"]
    with torch.no_grad():
        assert (model(TEST) - ref(TEST)).norm() / ref(TEST).norm() < 0.05
