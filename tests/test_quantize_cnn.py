"""pycompress.quantize on CNNs: Int8Conv2d conversion, BatchNorm folding, activation fusion, uint8
chains, calibration observers, bias correction, save/load, compress, torch.compile / export, and
bad inputs that leave the model unchanged."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pycompress
import cnn_models as cm
from pycompress.nn import Int8Conv2d
from pycompress.quantization import fuse, observers

pytestmark = [pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                 reason="this build has no int8_conv2d op"),
              pytest.mark.usefixtures("one_thread")]

SHAPE = cm.INPUT_SHAPE





def structured(n, seed, shape=SHAPE):
    """Random but image-like inputs: smooth low-frequency patterns, per-image brightness and a
    little pixel noise (not i.i.d. Gaussian pixels)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(n, 1, 1, 1, generator=g) + 0.2 * torch.randn(n, c, h, w, generator=g)
    return x


CALIB = [structured(16, s) for s in (10, 11)]
TEST = structured(48, 99)

MODELS = {
    "resnet": cm.resnet,
    "mobilenet_v2": cm.mobilenet_v2,
    "vgg": cm.vgg,
}


def _quantize(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pycompress.quantize(model, return_result=True, **kw)


def _metrics(ref, q, x):
    with torch.no_grad():
        a, b = ref(x), q(x)
    cos = F.cosine_similarity(a.double(), b.double(), dim=1).mean().item()
    agree = (a.argmax(1) == b.argmax(1)).double().mean().item()
    return cos, agree


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, before):
    state, types = before
    now = model.state_dict()
    return (types == [type(m) for m in model.modules()] and now.keys() == state.keys()
            and all(now[k].dtype == v.dtype and now[k].shape == v.shape
                    and bool(((now[k] == v) | (now[k] != now[k]) & (v != v)).all()) for k, v in state.items()))


# ----------------------------------------------------------------------------- conversion, accuracy
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("calibrated", [False, True])
def test_models_convert_and_agree_with_fp32(name, calibrated):
    ref = MODELS[name]()
    model = copy.deepcopy(ref)
    _, res = _quantize(model, calibration_data=CALIB if calibrated else None, example_inputs=CALIB[0])
    convs = [n for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(res.convs) == sorted(convs) and not res.skipped
    assert all(isinstance(model.get_submodule(n), Int8Conv2d) for n in convs)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())  # every BN folded
    assert res.int8_mac_fraction == 1.0
    assert res.traced is True
    assert sorted(res.static) == (sorted(convs) if calibrated else [])
    assert sorted(res.bias_corrected) == (sorted(convs) if calibrated else [])
    cos, agree = _metrics(ref, model, TEST)
    assert cos > 0.999 and agree >= 0.95, (cos, agree)


def test_full_size_resnet18_structure_without_running():
    """The torchvision-layout ResNet-18: every conv converted, every BN folded, the shared relu of
    the basic blocks fused but kept, and the conv1 -> conv2 edges uint8 (checked on the plan)."""
    model = cm.resnet18()
    sources = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = fuse.analyse(model, sources, residual=False)
    assert plan.traced and len(plan.groups) == 20
    assert all(g.bn for g in plan.groups.values())
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    for b in blocks:
        g = plan.groups[f"{b}.conv1"]
        assert g.activation == "relu" and g.act == f"{b}.relu" and not g.act_replaced
        assert plan.chains[f"{b}.conv1"].consumers == [f"{b}.conv2"]
        assert plan.groups[f"{b}.conv2"].act is None  # the residual add comes first
    assert plan.groups["conv1"].act_replaced  # the stem's relu is called once
    assert set(plan.chains) == {f"{b}.conv1" for b in blocks}

    # with the residual additions computed by the convs: each block's conv2 adds the shortcut and
    # applies the ReLU; every block output reaches the next block's convs as uint8, the stem's
    # (through the max pool) too, and the downsample convs give their shortcut as uint8
    plan = fuse.analyse(model, sources)
    for b in blocks:
        g = plan.groups[f"{b}.conv2"]
        assert (g.block, g.activation, g.act) == (b, "relu", None)
    order = ["conv1"] + [f"{b}.conv2" for b in blocks[:-1]]
    for prev, b in zip(order, blocks):
        chain = plan.chains[prev]
        down = f"{b}.downsample.0"
        if down in sources:
            assert chain.consumers == sorted([f"{b}.conv1", down]) and not chain.residual_consumers
            assert plan.chains[down].residual_consumers == [f"{b}.conv2"]
        else:
            assert chain.consumers == [f"{b}.conv1"] and chain.residual_consumers == [f"{b}.conv2"]
    assert plan.chains["conv1"].pools == ["maxpool"]
    assert "layer4.1.conv2" not in plan.chains  # the average pool needs float


def test_batchnorm_folding_is_exact_in_float():
    torch.manual_seed(0)
    for bias in (False, True):
        for groups in (1, 4):
            conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups, bias=bias)
            bn = cm.randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(12)), seed=3)[0].eval()
            folded = fuse.fold_batchnorm(conv, bn)
            x = torch.randn(4, 8, 9, 9)
            with torch.no_grad():
                want = bn(conv(x)).double()
                got = folded(x).double()
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6


def test_fusion_plan_of_the_small_models():
    """Without the residual fusion (tested in test_quantize_residual.py)."""
    model = cm.resnet()
    _, res = _quantize(model, calibration_data=CALIB, fuse_residual=False)
    # the stem relu is called once: replaced; a block's self.relu is called several times: kept
    assert res.fused["conv1"] == {"module": "relu", "activation": "relu", "replaced": True}
    assert res.fused["layer1.0.conv1"] == {"module": "layer1.0.relu", "activation": "relu", "replaced": False}
    assert isinstance(model.relu, nn.Identity) and isinstance(model.layer1[0].relu, nn.ReLU)
    assert res.folded["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert model.layer1[0].conv1.fused_modules == ("layer1.0.bn1", "layer1.0.relu")
    assert sorted(res.uint8_edges) == [("layer1.0.conv1", "layer1.0.conv2"), ("layer2.0.conv1", "layer2.0.conv2"),
                                       ("layer3.0.conv1", "layer3.0.conv2"), ("layer3.0.conv2", "layer3.0.conv3"),
                                       ("layer3.1.conv1", "layer3.1.conv2"), ("layer3.1.conv2", "layer3.1.conv3")]
    mb = cm.mobilenet_v2()
    _, res = _quantize(mb, calibration_data=CALIB, fuse_residual=False)
    assert all(f["activation"] == "relu6" and f["replaced"] for f in res.fused.values())
    # expansion -> depthwise -> projection stay uint8; a projection followed by a residual add does not
    assert ("features.2.conv.0.0", "features.2.conv.1.0") in res.uint8_edges
    assert ("features.2.conv.1.0", "features.2.conv.2") in res.uint8_edges
    assert not any(p == "features.5.conv.2" for p, _ in res.uint8_edges)  # residual: float
    assert ("features.1.conv.1", "features.2.conv.0.0") in res.uint8_edges  # no residual there


def _uint8_inputs(model, x, residual=False):
    """The convs that get a uint8 input (``residual=True``: a uint8 residual)."""
    seen = {}
    i = 1 if residual else 0
    handles = [m.register_forward_pre_hook(
        lambda mod, a, n=n: seen.__setitem__(n, a[i].dtype if len(a) > i else None))
        for n, m in model.named_modules() if isinstance(m, Int8Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sorted(n for n, d in seen.items() if d == torch.uint8)


@pytest.mark.parametrize("name", list(MODELS))
def test_uint8_chains_happen_and_are_exact(name):
    model = MODELS[name]()
    _, res = _quantize(model, calibration_data=CALIB)
    residual = set(res.uint8_residual_edges)
    consumers = sorted(c for e in res.uint8_edges if e not in residual for c in e[1:])
    assert consumers, "no uint8 edge at all"
    assert _uint8_inputs(model, TEST[:4]) == consumers  # the edges really carry uint8 tensors
    assert _uint8_inputs(model, TEST[:4], residual=True) == sorted(c for _, c in residual)
    for p, c in res.uint8_edges:
        prod, cons = model.get_submodule(p), model.get_submodule(c)
        assert prod.output_dtype == torch.uint8
        if (p, c) in residual:
            assert torch.equal(prod.output_scale, cons.residual_scale)
            assert torch.equal(prod.output_zero_point, cons.residual_zero_point)
        else:
            assert torch.equal(prod.output_scale, cons.input_scale)
            assert torch.equal(prod.output_zero_point, cons.input_zero_point)
    # requantizing in the producer's epilogue == quantizing the float output at the consumer's entry
    # (a shortcut read as a residual is not quantized by its reader: those producers stay uint8)
    unchained = copy.deepcopy(model)
    for p in {p for p, _ in res.uint8_edges} - {p for p, _ in residual}:
        unchained.get_submodule(p).set_output_quantization(None, None)
    assert _uint8_inputs(unchained, TEST[:4], residual=True) == sorted(c for _, c in residual)
    with torch.no_grad():
        assert torch.equal(model(TEST), unchained(TEST))


def test_maxpool_passes_uint8_only_where_torch_computes_it_exactly():
    model = cm.vgg()
    _, res = _quantize(model, calibration_data=CALIB)
    pool = nn.MaxPool2d(2)
    across = ("features.3", "features.7")  # conv -> relu -> max pool -> conv
    if fuse.maxpool_takes_uint8(pool, torch.device("cpu")):
        assert across in res.uint8_edges
    else:
        assert across not in res.uint8_edges
    assert ("features.0", "features.3") in res.uint8_edges


def test_vgg_view_after_the_features_keeps_working():
    """VGG flattens with .view: the conv whose output reaches it returns a contiguous tensor,
    the others may keep the channels-last layout."""
    model = cm.vgg()
    _, res = _quantize(model)
    assert model.features[14].channels_last_output is False
    assert model.features[0].channels_last_output is True
    with torch.no_grad():
        model(TEST[:2])


def test_channels_last_outputs_only_where_the_layout_cannot_matter():
    model = cm.resnet()
    _quantize(model)
    # every path ends at another conv or at torch.flatten before the classifier
    assert all(m.channels_last_output for m in model.modules() if isinstance(m, Int8Conv2d))
    seg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    _quantize(seg)
    assert seg[0].channels_last_output and not seg[2].channels_last_output  # the model's output
    with torch.no_grad():
        assert seg(TEST[:2]).is_contiguous()


# ----------------------------------------------------------------------------- calibration
def test_observers_and_qparams():
    assert observers.qparams(0.0, 2.55) == (pytest.approx(0.01), 0)
    s, z = observers.qparams(-1.0, 1.0)
    assert z in (127, 128) and s == pytest.approx(2 / 255)
    assert observers.qparams(0.5, 1.0)[1] == 0  # the range always holds 0
    assert observers.qparams(0.0, 0.0) == (1.0, 0)
    x = torch.linspace(0, 1, 100001)
    heavy = torch.cat([x, torch.tensor([50.0])])
    mm = observers.make_observer("minmax")
    pc = observers.make_observer(("percentile", 99.9))
    mse = observers.make_observer("mse")
    for o in (mm, pc, mse):
        o.observe(heavy)
        o.observe_histogram(heavy)
    assert mm.range() == (0.0, 50.0)
    lo, hi = pc.range()
    assert lo == 0.0 and abs(hi - 0.999) < 50 / 2048  # within one histogram bin
    assert mse.range()[1] < 50.0  # the outlier is clipped
    with pytest.raises(ValueError, match="observer must be one of"):
        observers.make_observer("kl")
    nan = observers.make_observer("minmax", "conv 'a' input")
    with pytest.raises(ValueError, match="conv 'a' input.*NaN or inf"):
        nan.observe(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", ("percentile", 99.9)])
def test_every_observer_gives_an_accurate_model(observer):
    ref = cm.mobilenet_v2()
    model = copy.deepcopy(ref)
    _, res = _quantize(model, calibration_data=CALIB, observer=observer)
    assert res.observer == (observer if isinstance(observer, str) else "percentile")
    cos, agree = _metrics(ref, model, TEST)
    assert cos > 0.999 and agree >= 0.95


def test_percentile_range_is_inside_the_minmax_range():
    ranges = {}
    for obs in ("minmax", "percentile"):
        model = cm.resnet()
        _quantize(model, calibration_data=CALIB, observer=obs, bias_correction=False)
        ranges[obs] = model.layer2[0].conv1.input_scale.item()
    assert ranges["percentile"] <= ranges["minmax"]


def test_bias_correction_removes_the_mean_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    data = [torch.randn(8, 16, 10, 10) + 1.0 for _ in range(4)]  # non-zero mean inputs
    errs = {}
    for bc in (False, True):
        model = nn.Sequential(copy.deepcopy(conv))
        _quantize(model, calibration_data=data, bias_correction=bc, observer="minmax")
        with torch.no_grad():
            diff = torch.cat([(model(x) - conv(x)) for x in data]).mean(dim=(0, 2, 3))
        errs[bc] = diff.abs().mean().item()
    assert errs[True] < errs[False] / 5, errs


def _layer_bias(ref, q, convs, folded, data):
    """Mean over the convs of |mean output error per channel| / output std, each int8 conv run on
    the float model's input of that conv (before its activation), on ``data``."""
    fm, qm = dict(ref.named_modules()), dict(q.named_modules())
    acc, handles = {}, []
    for n in convs:
        layer = copy.deepcopy(qm[n])
        layer.set_output_quantization(None, None)
        layer.activation = "none"
        if layer.residual:  # the conv before the residual addition it also computes
            layer = layer.conv_output
        seen = {}

        def pre(mod, args, seen=seen):
            seen["x"] = args[0]

        def post(mod, args, out, n=n, layer=layer, seen=seen):
            d = (out - layer(seen["x"])).double()
            s = acc.setdefault(n, [0.0, 0, 0.0])
            s[0] = s[0] + d.sum((0, 2, 3))
            s[1] += d.shape[0] * d.shape[2] * d.shape[3]
            s[2] = max(s[2], out.std().item())
        handles += [fm[n].register_forward_pre_hook(pre), fm[folded.get(n, n)].register_forward_hook(post)]
    with torch.no_grad():
        for x in data:
            ref(x)
    for h in handles:
        h.remove()
    return sum((v[0] / v[1]).abs().mean().item() / v[2] for v in acc.values()) / len(acc)


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_bias_correction_removes_the_systematic_error_of_every_conv_on_held_out_data(name):
    ref = MODELS[name]()
    held_out = [TEST[:24], TEST[24:]]
    bias = {}
    for bc in (False, True):
        model = copy.deepcopy(ref)
        _, res = _quantize(model, calibration_data=CALIB, bias_correction=bc)
        assert sorted(res.bias_corrected) == (sorted(res.convs) if bc else [])
        bias[bc] = _layer_bias(ref, model, res.convs, res.folded, held_out)
    assert bias[True] < bias[False] / 4, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_its_dtype(dtype):
    ref = cm.mobilenet_v2().to(dtype)
    model = copy.deepcopy(ref)
    _, res = _quantize(model, calibration_data=[c.to(dtype) for c in CALIB])
    assert res.uint8_edges
    with torch.no_grad():
        a, b = ref(TEST.to(dtype)), model(TEST.to(dtype))
    assert b.dtype == dtype  # the uint8-fed convs answer in the model's dtype, not float32
    assert F.cosine_similarity(a.float(), b.float(), dim=1).mean().item() > 0.999


def test_generator_calibration_data_is_read_once_into_memory():
    model = cm.resnet()
    gen = (x for x in CALIB)
    _, res = _quantize(model, calibration_data=gen)
    assert res.static and res.bias_corrected


# ----------------------------------------------------------------------------- selection, skips
def test_skipped_convs_are_listed_and_counted_in_the_mac_fraction():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
            self.c = nn.Conv1d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            y = self.c(y.flatten(2)).mean(2)
            return self.fc(y)

    model = Net().eval()
    ref = copy.deepcopy(model)
    _, res = _quantize(model, calibration_data=CALIB)
    assert res.convs == ["a"] and set(res.converted) == {"a", "fc"}
    assert "padding_mode='reflect'" in res.skipped["b"] and "Conv1d" in res.skipped["c"]
    per_image_a = 8 * 16 * 16 * 3 * 9
    per_image_b = 8 * 16 * 16 * 8 * 9
    assert res.conv_macs == {"a": per_image_a, "b": per_image_b}
    assert res.int8_mac_fraction == pytest.approx(per_image_a / (per_image_a + per_image_b))
    cos, _ = _metrics(ref, model, TEST)
    assert cos > 0.999


def test_no_inputs_no_mac_fraction_and_w8a16_keeps_convs():
    _, res = _quantize(cm.resnet())
    assert res.int8_mac_fraction is None and res.conv_macs == {}
    model = cm.resnet()
    _, res = _quantize(model, mode="w8a16", example_inputs=CALIB[0])
    assert res.convs == [] and "mode='w8a8'" in res.skipped["conv1"]
    assert res.int8_mac_fraction == 0.0 and res.converted == ["fc"]


def test_exclude_keeps_a_stage_in_float_with_its_batchnorms():
    model = cm.resnet()
    ref = copy.deepcopy(model)
    _, res = _quantize(model, calibration_data=CALIB, exclude="layer3")
    assert not any(n.startswith("layer3") for n in res.convs)
    assert type(model.layer3[0].conv1) is nn.Conv2d and type(model.layer3[0].bn1) is nn.BatchNorm2d
    assert 0.5 < res.int8_mac_fraction < 1.0
    assert not any(c.startswith("layer3") for _, c in res.uint8_edges)
    assert _metrics(ref, model, TEST)[0] > 0.999


def test_shared_conv_and_weight_readers_are_not_fused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.peek = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = self.bn(self.shared(self.shared(self.stem(x))))  # the same conv twice
            h = h + F.conv2d(h, self.peek.weight).mean(1, keepdim=True)  # the weight read directly
            return self.fc(h.mean((2, 3)))

    model = cm.randomize_batchnorm(Net()).eval()
    ref = copy.deepcopy(model)
    _, res = _quantize(model, calibration_data=CALIB)
    assert "shared" in res.convs and "shared" not in res.folded
    assert type(model.bn) is nn.BatchNorm2d
    assert "peek" in res.skipped and "read directly" in res.skipped["peek"]
    assert res.uint8_edges == []  # the second call of `shared` is fed by the first
    assert _metrics(ref, model, TEST)[0] > 0.999


def test_train_mode_batchnorm_is_not_folded_and_flags_are_kept():
    model = cm.resnet().train()
    _, res = _quantize(model)
    assert res.folded == {} and type(model.bn1) is nn.BatchNorm2d
    assert model.conv1.training


def test_untraceable_model_is_converted_layer_by_layer_with_a_warning():
    model = cm.untraceable_net()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="could not trace"):
        _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True)
    assert res.traced is False and res.convs == ["conv.0"] and res.folded == {}
    assert type(model.conv[1]) is nn.BatchNorm2d
    assert res.static == ["conv.0"]
    assert _metrics(ref, model, TEST)[0] > 0.999


def test_masked_conv_is_quantized_with_its_mask():
    from pycompress.nn import MaskedConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    mask = torch.rand(conv.weight.shape) > 0.5
    model = nn.Sequential(MaskedConv2d.from_float(conv, mask), nn.ReLU()).eval()
    _, res = _quantize(model, calibration_data=CALIB)
    assert res.convs == ["0"] and res.fused["0"]["replaced"]
    assert torch.all(model[0].weight[~mask] == 0)


def test_quantize_twice_changes_nothing():
    model = cm.mobilenet_v2()
    _quantize(model, calibration_data=CALIB)
    before = _state(model)
    _, res = _quantize(model, calibration_data=CALIB)
    assert res.converted == [] and res.skipped == {} and res.int8_mac_fraction == 1.0
    assert _unchanged(model, before)


# ----------------------------------------------------------------------------- bad inputs
def _nan_weight(model):
    with torch.no_grad():
        model.layer2[0].conv2.weight[0, 0, 0, 0] = float("nan")
    return model


@pytest.mark.parametrize("case", ["nan_weight", "nan_data", "inf_data", "empty", "wrong_channels", "bad_observer",
                                  "bias_correction_without_data"])
def test_bad_input_raises_and_leaves_the_model_unchanged(case):
    model = cm.resnet()
    kw = {"calibration_data": CALIB}
    match = None
    if case == "nan_weight":
        _nan_weight(model)
        match = r"layer 'layer2.0.conv2'.*NaN or inf"
    elif case in ("nan_data", "inf_data"):
        bad = CALIB[1].clone()
        bad[3, 0, 2, 2] = float("nan") if case == "nan_data" else float("inf")
        kw["calibration_data"] = [CALIB[0], bad]
        match = r"conv 'conv1' input.*NaN or inf"
    elif case == "empty":
        kw["calibration_data"] = []
        match = "calibration_data holds no batch"
    elif case == "wrong_channels":
        kw["calibration_data"] = [torch.randn(2, 4, 16, 16)]
        match = "failed on batch 0"
    elif case == "bad_observer":
        kw["observer"] = "entropy"
        match = "observer must be one of"
    else:
        kw = {"bias_correction": True}
        match = "needs calibration_data"
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        pycompress.quantize(model, **kw)
    assert _unchanged(model, before)


def test_bad_input_to_a_converted_model_names_the_layer():
    model = cm.resnet()
    _quantize(model, calibration_data=CALIB)
    with pytest.raises(ValueError, match=r"Int8Conv2d 'conv1'.*3 input channels"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"Int8Conv2d 'conv1'.*4-D"):
        model(torch.randn(3, 16, 16))


# ----------------------------------------------------------------------------- save / load, compile, export
@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_is_exact(tmp_path, name):
    model = MODELS[name]()
    _, res = _quantize(model, calibration_data=CALIB)
    out = pycompress.save(model, tmp_path / name)
    manifest = json.loads((out / "pycompress.json").read_text())
    assert set(res.identities) <= set(manifest["identities"])
    fresh = pycompress.load(out, MODELS[name](seed=7))

    def kind(m):  # every fx.GraphModule has a class of its own
        return torch.fx.GraphModule if isinstance(m, torch.fx.GraphModule) else type(m)
    assert [kind(m) for m in fresh.modules()] == [kind(m) for m in model.modules()]
    for n in res.convs:
        assert fresh.get_submodule(n).layer_name == n
    with torch.no_grad():
        assert torch.equal(fresh(TEST), model(TEST))


def test_load_refuses_an_identity_where_the_model_has_another_module(tmp_path):
    model = cm.resnet()
    _quantize(model, calibration_data=CALIB)
    out = pycompress.save(model, tmp_path / "m")
    manifest = json.loads((out / "pycompress.json").read_text())
    manifest["identities"].append("avgpool")
    (out / "pycompress.json").write_text(json.dumps(manifest))
    fresh = cm.resnet(seed=3)
    before = _state(fresh)
    with pytest.raises(ValueError, match="'avgpool' was saved as nn.Identity"):
        pycompress.load(out, fresh)
    assert _unchanged(fresh, before)


def test_torch_compile_and_export_of_a_quantized_resnet():
    model = cm.resnet()
    _quantize(model, calibration_data=CALIB)
    x = TEST[:4]
    with torch.no_grad():
        want = model(x)
        # inductor fuses the float parts (residual adds, pooling) in its own order: close, not equal
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), want, rtol=1e-4, atol=1e-5)
        ep = torch.export.export(model, (x,))
        assert torch.equal(ep.module()(x), want)


# ----------------------------------------------------------------------------- validate, evaluate, compress
def test_validate_and_evaluate_run_on_a_quantized_cnn():
    ref = cm.mobilenet_v2()
    model = copy.deepcopy(ref)
    _quantize(model, calibration_data=CALIB)
    report = pycompress.validate(ref, model, [TEST[:24], TEST[24:]])
    assert report.passed and report.metrics["cosine"] > 0.999
    labels = ref(TEST).argmax(1)
    ev = pycompress.evaluate(model, [(TEST, labels)], metric="accuracy")
    assert ev.metric >= 0.95


def test_compress_quantizes_a_cnn_statically():
    model = cm.resnet()
    model, report = pycompress.compress(model, {"steps": [{"quantize": {}}]}, CALIB)
    assert isinstance(model.layer1[0].conv1, Int8Conv2d) and model.layer1[0].conv1.static_input
    assert report.validation.passed


def _rel_error_metric(ref, x):
    with torch.no_grad():
        want = ref(x)

    def metric(m):
        with torch.no_grad():
            return -((m(x) - want).norm() / want.norm()).item()
    return metric


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_compress_max_drop_reverts_convs_with_their_batchnorms(name):
    ref = MODELS[name]()
    metric = _rel_error_metric(ref, TEST)
    # the budget: a third of the error of the fully quantized model
    full = copy.deepcopy(ref)
    _, full_res = _quantize(full, calibration_data=CALIB)
    budget = -metric(full) / 3
    model, report = pycompress.compress(copy.deepcopy(ref), {"steps": [{"quantize": {}}]}, CALIB,
                                        metric=metric, max_drop=budget)
    assert report.reverted and report.within_budget
    reverted = [r["layer"] for r in report.reverted]
    for layer in reverted:
        assert type(model.get_submodule(layer)) is type(ref.get_submodule(layer))
        for member in full_res.members(layer):  # the BatchNorm / activation folded into it is back
            assert type(model.get_submodule(member)) is type(ref.get_submodule(member))
            assert member not in report.compressed_layers
    assert all(m not in report.sensitivity for c in full_res.convs for m in full_res.members(c))
    assert metric(model) >= -budget - 1e-12
    # the sensitivity of a conv was measured with its BatchNorm folded (not applied twice)
    assert all(v < 0.5 for v in report.sensitivity.values()), report.sensitivity
    with torch.no_grad():
        model(TEST[:2])  # the model still runs (uint8 producers of reverted convs output float)


def test_compress_reverting_every_conv_gives_back_the_float_model():
    ref = cm.mobilenet_v2()
    model, report = pycompress.compress(copy.deepcopy(ref), {"steps": [{"quantize": {"exclude": "classifier"}}]},
                                        CALIB, metric=_rel_error_metric(ref, TEST), max_drop=0.0)
    assert report.within_budget and not report.compressed_layers
    with torch.no_grad():
        assert torch.equal(model(TEST), ref(TEST))


# ----------------------------------------------------------------------------- validate
@pytest.mark.parametrize("name", list(MODELS))
def test_validate_compares_each_int8_conv_with_its_folded_chain(name):
    """Each converted conv is compared with the reference's conv -> BatchNorm -> activation it
    absorbed, and a uint8 output by its real values: the per-layer report stays meaningful."""
    ref = MODELS[name]()
    model = copy.deepcopy(ref)
    _, res = _quantize(model, calibration_data=CALIB, example_inputs=CALIB[0])
    assert res.uint8_edges or name == "vgg" or res.folded
    report = pycompress.validate(ref, model, [TEST], layers=True, progress=False,
                                 tolerance={"layer_relative_error": 0.05, "layer_cosine": 0.98})
    assert report.passed, report.failures
    fused = set(res.folded.values()) | {f["module"] for f in res.fused.values()}
    assert set(res.convs) <= set(report.layers) and not set(report.layers) & fused
    assert all(report.layers[c].relative_error < 0.05 for c in res.convs)
