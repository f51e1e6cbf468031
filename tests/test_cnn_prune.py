"""CNN pruning: MaskedConv2d, prune on convolutions, channel dependency groups, compact of CNNs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import cnn_models as cm
import pycompress
from pycompress.nn import MaskedConv2d, MaskedLinear
from pycompress.nn.masked_linear import keep_masks
from pycompress.pruning.channels import channel_groups, prune_channels


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _rel_err(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snap):
    types, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ============================================================================ MaskedConv2d
CONV_CASES = [
    dict(cin=8, cout=6, k=3, padding=1),
    dict(cin=8, cout=6, k=3, padding=1, stride=2, bias=False),
    dict(cin=8, cout=8, k=3, padding="same", dilation=2),
    dict(cin=8, cout=6, k=4, padding="same"),                 # asymmetric "same"
    dict(cin=8, cout=6, k=3, padding=1, padding_mode="reflect"),
    dict(cin=8, cout=12, k=3, padding=1, groups=4),
    dict(cin=8, cout=8, k=3, padding=1, groups=8),            # depthwise
    dict(cin=8, cout=6, k=(1, 3), padding=(0, 1), padding_mode="circular"),
]


def _conv(case):
    c = dict(case)
    cin, cout, k = c.pop("cin"), c.pop("cout"), c.pop("k")
    return nn.Conv2d(cin, cout, k, **c)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_masked_conv_matches_conv_with_masked_weight(case):
    torch.manual_seed(0)
    conv = _conv(case)
    mask = torch.rand(conv.weight.shape) > 0.5
    mc = MaskedConv2d.from_float(conv, mask)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.mul_(mask)
    x = torch.randn(3, case["cin"], 9, 10, requires_grad=True)
    y, y_ref = mc(x), ref(x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, mc.weight], g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [x, ref.weight], g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref * mask, rtol=1e-4, atol=1e-5)
    assert torch.all(gw[~mask] == 0)
    if mc.bias is not None:
        (gb,) = torch.autograd.grad(mc(x), [mc.bias], g)
        torch.testing.assert_close(gb, g.sum((0, 2, 3)))
    # to_float gives back a plain conv with the masked weight
    back = mc.to_float()
    assert type(back) is nn.Conv2d and torch.equal(back.weight, ref.weight)
    torch.testing.assert_close(back(x), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masked_conv_weights_stay_zero_through_training(opt_name):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    mask = torch.rand(conv.weight.shape) > 0.6
    mc = MaskedConv2d.from_float(conv, mask)
    model = nn.Sequential(mc, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 3))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = mc.weight.detach().clone()
    for _ in range(10):
        loss = model(torch.randn(4, 6, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.all(mc.weight.grad[~mask] == 0)
        opt.step()
    assert torch.all(mc.weight[~mask] == 0)
    assert not torch.equal(mc.weight[mask], before[mask])  # kept weights did train


def test_keep_masks_covers_masked_conv():
    mc = MaskedConv2d.from_float(nn.Conv2d(4, 8, 3))
    opt = torch.optim.SGD(mc.parameters(), lr=0.1, momentum=0.9)
    handle = keep_masks(mc, opt)
    for _ in range(2):
        opt.zero_grad()
        mc(torch.randn(2, 4, 6, 6)).sum().backward()
        opt.step()
    new_mask = torch.rand(mc.weight.shape) > 0.5
    mc.set_mask(new_mask)  # momentum still holds values for newly pruned weights
    for _ in range(2):
        opt.zero_grad()
        mc(torch.randn(2, 4, 6, 6)).sum().backward()
        opt.step()
        assert torch.all(mc.weight[~new_mask] == 0)
    assert torch.all(opt.state[mc.weight]["momentum_buffer"][~new_mask] == 0)
    handle.remove()


def test_masked_conv_state_config_and_bad_input():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) > 0.5
    mc = MaskedConv2d.from_float(conv, mask)
    sd = mc.state_dict()
    assert set(sd) == {"weight", "mask"} and sd["mask"].dtype == torch.bool  # plain buffers
    cfg = mc.config()
    json.dumps(cfg)
    fresh = MaskedConv2d.from_config(cfg)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(fresh(x), mc(x))
    shared = MaskedConv2d.from_dense(conv, mask, share_parameters=True)
    assert shared.weight is conv.weight and torch.all(conv.weight[~mask] == 0)
    with pytest.raises(TypeError, match="bool"):
        mc.set_mask(mask.float())
    with pytest.raises(ValueError, match="shape"):
        mc.set_mask(torch.ones(6, 4, 1, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="Conv2d"):
        MaskedConv2d.from_float(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="divisible"):
        MaskedConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="padding_mode"):
        MaskedConv2d(4, 6, 3, padding_mode="mirror")


def test_masked_conv_compiles_forward_and_backward():
    torch.manual_seed(0)
    mc = MaskedConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), torch.rand(8, 4, 3, 3) > 0.5)
    x = torch.randn(2, 4, 6, 6)
    ref = mc(x)
    compiled = torch.compile(mc, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert torch.all(mc.weight.grad[~mc.mask] == 0) and mc.weight.grad[mc.mask].abs().sum() > 0


def test_masked_conv_save_load(tmp_path):
    model = cm.vgg()
    x = cm.images()
    pycompress.prune(model, 0.6, include="features.*")
    assert isinstance(model.features[0], MaskedConv2d)
    with torch.no_grad():
        ref = model(x)
    restored = pycompress.load(pycompress.save(model, tmp_path / "m"), cm.vgg(seed=3))
    assert isinstance(restored.features[0], MaskedConv2d)
    assert torch.equal(restored.features[0].mask, model.features[0].mask)
    with torch.no_grad():
        assert torch.equal(restored(x), ref)


# ============================================================================ prune: weight patterns on convs
def test_unstructured_prunes_convs_and_linears():
    model = cm.resnet()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    original = {n: w.detach().clone() for n, w in weights.items()}
    pycompress.prune(model, 0.7, scope="global")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (MaskedConv2d, MaskedLinear))}
    assert set(layers) == set(weights)
    for n, m in layers.items():
        assert m.weight is weights[n]  # the original Parameter objects: optimizers stay valid
    total = sum(m.mask.numel() for m in layers.values())
    pruned = sum(int((~m.mask).sum()) for m in layers.values())
    assert pruned == round(0.7 * total)
    # global magnitude: every pruned |w| <= every kept |w|
    kept_min = min(float(original[n].abs()[m.mask].min()) for n, m in layers.items())
    cut_max = max(float(original[n].abs()[~m.mask].max()) for n, m in layers.items() if (~m.mask).any())
    assert cut_max <= kept_min
    assert all(torch.all(m.weight[~m.mask] == 0) for m in layers.values())
    pycompress.prune(model, 0.5, scope="layer", include="layer1.*")
    for n, m in layers.items():
        if n.startswith("layer1."):
            assert int((~m.mask).sum()) == round(0.5 * m.mask.numel())


def test_unstructured_layer_scope_picks_smallest_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    pycompress.prune(model, 0.4, scope="layer")
    for m, wt in zip((model[0], model[2]), w):
        k = round(0.4 * wt.numel())
        thresh = wt.abs().flatten().sort().values[k - 1]
        assert torch.equal(~m.mask, wt.abs() <= thresh)


@pytest.mark.parametrize("cin", [8, 10])
def test_nm_runs_along_input_channels(cin):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    w = model[0].weight.detach().clone()
    pycompress.prune(model, None, pattern="2:4")
    mask = model[0].mask
    for o in range(6):
        for i in range(3):
            for j in range(3):
                col = mask[o, :, i, j]
                for start in range(0, cin, 4):
                    grp = col[start:start + 4]
                    want = 2 if len(grp) == 4 else -(-len(grp) * 2 // 4)
                    assert int(grp.sum()) == want
                    # the kept ones are the largest |w| of the group
                    vals = w[o, start:start + 4, i, j].abs()
                    assert float(vals[grp].min()) >= float(vals[~grp].max()) if (~grp).any() else True
    assert isinstance(model[2], MaskedConv2d)


def test_activation_unstructured_on_conv_uses_input_channel_norms():
    """Wanda on a grouped conv: |W[o, j]| * ||x_c|| with c the input channel that weight reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False))
    x = torch.randn(5, 4, 7, 7) * torch.tensor([0.1, 1.0, 5.0, 0.5])[None, :, None, None]
    w = model[0].weight.detach().clone()
    pycompress.prune(model, 0.5, method="activation", calibration_data=x, scope="layer")
    norm = x.transpose(0, 1).reshape(4, -1).norm(dim=1)
    # output channels 0..2 read inputs 0, 1; output channels 3..5 read inputs 2, 3
    per_weight = torch.stack([norm[:2]] * 3 + [norm[2:]] * 3)[:, :, None, None]
    score = w.abs() * per_weight
    k = round(0.5 * w.numel())
    order = torch.sort(score.flatten(), stable=True).indices
    want = torch.ones(w.numel(), dtype=torch.bool)
    want[order[:k]] = False
    assert torch.equal(model[0].mask.flatten(), want)


def test_gradual_pruning_on_a_cnn():
    model = cm.resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = pycompress.GradualPruning(model, 0.6, total_steps=4, optimizer=opt)
    x = cm.images(4)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    convs = [m for m in model.modules() if isinstance(m, MaskedConv2d)]
    assert convs
    total = sum(m.mask.numel() for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear)))
    pruned = sum(int((~m.mask).sum()) for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear)))
    assert abs(pruned / total - 0.6) < 0.01
    assert all(torch.all(m.weight[~m.mask] == 0) for m in convs)


def test_gradual_channel_pruning_on_a_cnn():
    model = cm.vgg()
    x = cm.images(8)
    sched = pycompress.GradualPruning(model, 0.5, total_steps=3, pattern="channel", scope="layer",
                                      example_inputs=x)
    pruned = []
    for _ in range(3):
        sched.step()
        pruned.append(int((~model.features[0].mask.reshape(16, -1).any(1)).sum()))
    assert pruned == sorted(pruned) and pruned[-1] == 8
    with torch.no_grad():
        ref = model(x)
    pycompress.compact(model, x)
    assert model.features[0].out_channels == 8
    with torch.no_grad():
        assert _rel_err(model(x), ref) <= 1e-5


# ============================================================================ dependency groups
def _group(groups, module, role="producer"):
    for g in groups:
        if any(m[0] == module and m[1] == role for m in g.members):
            return g
    raise AssertionError(f"no group with {role} {module}")


def test_resnet_groups_tie_every_branch_of_a_residual_sum():
    gs = channel_groups(cm.resnet(), cm.images(2))
    stream = _group(gs, "conv1")
    assert set(stream.modules("producer")) == {"conv1", "layer1.0.conv2"}
    assert set(stream.modules("batchnorm")) == {"bn1", "layer1.0.bn2"}
    assert set(stream.modules("reader")) == {"layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert not stream.fixed and stream.size == 16
    down = _group(gs, "layer2.0.conv2")
    assert set(down.modules("producer")) == {"layer2.0.conv2", "layer2.0.downsample.0"}
    assert set(down.modules("reader")) == {"layer3.0.conv1", "layer3.0.downsample.0"}
    last = _group(gs, "layer3.0.conv3")
    assert set(last.modules("producer")) == {"layer3.0.conv3", "layer3.0.downsample.0", "layer3.1.conv3"}
    assert set(last.modules("reader")) == {"layer3.1.conv1", "fc"}
    inner = _group(gs, "layer3.0.conv1")
    assert inner.modules() == ["layer3.0.conv1", "layer3.0.bn1", "layer3.0.conv2"]
    assert "reaches the model output" in _group(gs, "fc").reasons()
    assert "model input" in _group(gs, "conv1", "reader").reasons()


def test_mobilenet_groups_pass_through_depthwise_convs():
    gs = channel_groups(cm.mobilenet_v2(), cm.images(2))
    stem = _group(gs, "features.0.0")
    assert stem.modules("depthwise") == ["features.1.conv.0.0"]
    assert stem.modules("reader") == ["features.1.conv.1"]
    expand = _group(gs, "features.2.conv.0.0")
    assert expand.modules("depthwise") == ["features.2.conv.1.0"]
    assert set(expand.modules("batchnorm")) == {"features.2.conv.0.1", "features.2.conv.1.1"}
    assert expand.modules("reader") == ["features.2.conv.2"]
    res = _group(gs, "features.2.conv.2")  # the inverted residual of features.3 adds into it
    assert set(res.modules("producer")) == {"features.2.conv.2", "features.3.conv.2"}
    assert set(res.modules("reader")) == {"features.3.conv.0.0", "features.4.conv.0.0"}


def test_vgg_flatten_maps_each_channel_to_its_classifier_inputs():
    gs = channel_groups(cm.vgg(), cm.images(2))
    g = _group(gs, "features.14")
    assert ("classifier.0", "reader", 0, 48, 4) in g.members
    assert _group(gs, "classifier.0").modules("reader") == ["classifier.3"]


def test_concat_places_channels_at_offsets_and_keeps_the_input_slice():
    gs = channel_groups(cm.concat_net(), cm.images(2))
    g = _group(gs, "a.0")
    assert g.size == 8 + 10 + 3
    assert ("a.0", "producer", 0, 8, 1) in g.members and ("b.1.0", "producer", 8, 10, 1) in g.members
    assert g.fixed == [(18, 21, "model input")]
    stem = _group(gs, "stem.0")
    assert stem.modules("depthwise") == ["b.0.0"] and set(stem.modules("reader")) == {"a.0", "b.1.0"}


def test_channel_split_is_fixed_with_a_reason():
    gs = channel_groups(cm.split_net(), cm.images(2))
    stem = _group(gs, "stem.0")
    assert stem.fixed_mask().all() and "chunk" in "; ".join(stem.reasons())
    assert not _group(gs, "right.0").fixed


# ============================================================================ channel pruning + compact
METHODS = ["magnitude", "magnitude_l2", "activation", "mixed", "bn_scale"]


@pytest.mark.parametrize("name", list(cm.MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_channel_prune_compact_is_exact_and_small(name, method):
    model = cm.MODELS[name]()
    dense = copy.deepcopy(model)
    x = cm.images(8)
    calib = [cm.images(8, seed=s) for s in (2, 3)]
    pycompress.prune(model, 0.5, pattern="channel", method=method, scope="layer", calibration_data=calib,
                     example_inputs=x)
    with torch.no_grad():
        masked = model(x)
        assert _rel_err(masked, dense(x)) > 1e-3  # the pruning did something
    p0 = _params(dense)
    model, report = pycompress.compact(model, x, return_report=True)
    with torch.no_grad():
        out = model(x)
    assert _rel_err(out, masked) <= 1e-5
    assert _params(model) <= 0.6 * p0, (_params(model), p0)
    assert report.parameters_after == _params(model) and report.compacted
    assert not any(isinstance(m, (MaskedConv2d, MaskedLinear)) for m in model.modules())
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            if m.groups > 1:
                assert m.groups == m.in_channels == m.out_channels
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
    # the compacted model runs on other inputs and batch sizes, and matches there too
    y = cm.images(3, seed=9)
    assert model(y).shape == (3, 10)


def test_compacted_resnet_matches_in_train_mode_too():
    model = cm.resnet()
    x = cm.images(8)
    pycompress.prune(model, 0.5, pattern="channel", example_inputs=x)
    small = pycompress.compact(copy.deepcopy(model), x)
    model.train()
    small.train()
    with torch.no_grad():
        assert _rel_err(small(x), model(x)) <= 1e-5  # BatchNorm statistics are per channel


def _lowest(scores, k):
    return set(torch.sort(scores, stable=True).indices[:k].tolist())


def _pruned_rows(m):
    return set(torch.nonzero(~m.mask.reshape(m.mask.shape[0], -1).any(1)).flatten().tolist())


def test_magnitude_scores_are_filter_norms_averaged_over_producers():
    model = cm.vgg()
    w0 = model.features[0].weight.detach().clone()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", example_inputs=cm.images(2))
    assert _pruned_rows(model.features[0]) == _lowest(w0.abs().reshape(16, -1).mean(1), 8)
    cols = ~model.features[3].mask.transpose(0, 1).reshape(16, -1).any(1)
    assert set(torch.nonzero(cols).flatten().tolist()) == _lowest(w0.abs().reshape(16, -1).mean(1), 8)

    model = cm.vgg()
    w0 = model.features[0].weight.detach().clone()
    pycompress.prune(model, 0.5, pattern="channel", method="magnitude_l2", scope="layer",
                     example_inputs=cm.images(2))
    assert _pruned_rows(model.features[0]) == _lowest(w0.pow(2).reshape(16, -1).mean(1), 8)

    model = cm.resnet()  # residual stream: conv1 and layer1.0.conv2 write the same channels
    a, b = model.conv1.weight.detach(), model.layer1[0].conv2.weight.detach()
    score = (a.abs().reshape(16, -1).mean(1) + b.abs().reshape(16, -1).mean(1)) / 2
    pycompress.prune(model, 0.25, pattern="channel", scope="layer", example_inputs=cm.images(2))
    assert _pruned_rows(model.conv1) == _pruned_rows(model.layer1[0].conv2) == _lowest(score, 4)


def _reader_inputs(model, module, data):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in data:
            model(b)
    h.remove()
    return torch.cat(seen).transpose(0, 1).reshape(seen[0].shape[1], -1)


def test_activation_scores_are_the_channel_as_its_readers_see_it():
    data = [cm.images(8, seed=s) for s in (2, 3)]
    model = cm.vgg()
    a = _reader_inputs(model, model.features[7], data)  # after BN, ReLU and max pooling
    w7 = model.features[7].weight.detach().clone()
    ref = copy.deepcopy(model)
    pycompress.prune(model, 0.5, pattern="channel", method="activation", scope="layer", calibration_data=data)
    assert _pruned_rows(model.features[3]) == _lowest(a.abs().mean(1).double(), 8)
    pycompress.prune(ref, 0.5, pattern="channel", method="activation", activation_score="std_weighted",
                     scope="layer", calibration_data=data)
    score = a.double().std(1, unbiased=False) * w7.transpose(0, 1).reshape(16, -1).double().norm(dim=1)
    assert _pruned_rows(ref.features[3]) == _lowest(score, 8)


def test_bn_scale_and_mixed_extremes():
    data = cm.images(8)
    model = cm.vgg()
    gamma = model.features[1].weight.detach().abs().clone()
    pycompress.prune(model, 0.5, pattern="channel", method="bn_scale", scope="layer", calibration_data=data)
    assert _pruned_rows(model.features[0]) == _lowest(gamma.double(), 8)
    assert not isinstance(model.classifier[0], MaskedLinear) or not _pruned_rows(model.classifier[0])
    masks = {}
    for mix, method in ((1.0, "activation"), (0.0, "magnitude")):
        a, b = cm.resnet(), cm.resnet()
        pycompress.prune(a, 0.5, pattern="channel", method="mixed", mix=mix, scope="layer", calibration_data=data)
        pycompress.prune(b, 0.5, pattern="channel", method=method, scope="layer", calibration_data=data)
        masks[mix] = a.conv1.mask.clone()
        assert torch.equal(a.conv1.mask, b.conv1.mask) and torch.equal(a.layer3[1].conv2.mask, b.layer3[1].conv2.mask)
    assert not torch.equal(masks[1.0], masks[0.0])


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_global_scope_counts_all_prunable_channels(method):
    model = cm.mobilenet_v2()
    x = cm.images(8)
    _, report = prune_channels(model, 0.4, scope="global", method=method, calibration_data=x, return_report=True)
    prunable = sum(g["prunable"] for g in report.groups)
    assert report.channels_pruned == round(0.4 * prunable)
    sizes = [g["pruned"] / max(g["prunable"], 1) for g in report.groups if g["prunable"]]
    assert max(sizes) > min(sizes)  # ranked across groups, not per group
    assert all(g["pruned"] < g["channels"] for g in report.groups)
    with torch.no_grad():
        masked = model(x)
    pycompress.compact(model, x)
    with torch.no_grad():
        assert _rel_err(model(x), masked) <= 1e-5


def test_include_exclude_select_the_producers():
    model = cm.resnet()
    x = cm.images(4)
    _, report = prune_channels(model, 0.5, scope="layer", exclude="layer3", example_inputs=x, return_report=True)
    assert not isinstance(model.layer3[0].conv1, MaskedConv2d) or not _pruned_rows(model.layer3[0].conv1)
    assert not _pruned_rows(model.layer3[0].conv3) if isinstance(model.layer3[0].conv3, MaskedConv2d) else True
    assert len(_pruned_rows(model.layer2[0].conv2)) == 16  # its group's producers are all selected
    # layer3.0.conv1 reads the pruned channels: its input columns are masked, its rows are not
    cols = ~model.layer3[0].conv1.mask.transpose(0, 1).reshape(32, -1).any(1)
    assert int(cols.sum()) == 16
    assert "not selected" in report.refused["layer3.0.conv3"]
    assert "reaches the model output" in report.refused["fc"]


def test_concat_and_split_models_prune_and_compact_exactly():
    x = cm.images(8)
    for make in (cm.concat_net, cm.split_net):
        model = make()
        pycompress.prune(model, 0.5, pattern="channel", scope="layer", example_inputs=x)
        with torch.no_grad():
            masked = model(x)
        model, report = pycompress.compact(model, x, return_report=True)
        with torch.no_grad():
            assert _rel_err(model(x), masked) <= 1e-5
        assert report.compacted
    assert model.stem[0].out_channels == 16  # split_net: the channels split by chunk stay
    cat = pycompress.compact(prune_channels(cm.concat_net(), 0.5, scope="layer", example_inputs=x), x)
    assert cat.mix[0].in_channels == 4 + 5 + 3  # half of each branch, all of the input image


def test_compact_after_only_producer_rows_are_masked_refuses_with_reason():
    model = cm.vgg()
    x = cm.images(4)
    conv = model.features[0]
    mask = torch.ones_like(conv.weight, dtype=torch.bool)
    mask[:4] = False
    model.features[0] = MaskedConv2d.from_float(conv, mask)
    model, report = pycompress.compact(model, x, return_report=True)
    assert model.features[0].out_channels == 16
    assert "still reads" in report.refused["features.0"]


def test_quantize_and_save_load_after_compact(tmp_path):
    x = cm.images(8)
    for name, make in cm.MODELS.items():
        model = make()
        pycompress.prune(model, 0.5, pattern="channel", example_inputs=x, scope="layer")
        model = pycompress.compact(model, x)
        with torch.no_grad():
            ref = model(x)
        restored = pycompress.load(pycompress.save(model, tmp_path / name), make(seed=7))
        with torch.no_grad():
            assert torch.equal(restored(x), ref)
        q = pycompress.quantize(copy.deepcopy(model))
        assert any(type(m).__name__ == "Int8Linear" for m in q.modules())
        with torch.no_grad():
            qout = q(x)
        assert _rel_err(qout, ref) < 0.05
        q_restored = pycompress.load(pycompress.save(q, tmp_path / f"{name}-q"), make(seed=7))
        with torch.no_grad():
            assert torch.equal(q_restored(x), qout)


def test_load_refuses_a_compacted_cnn_wider_than_the_model(tmp_path):
    x = cm.images(4)
    model = pycompress.compact(prune_channels(cm.vgg(), 0.5, scope="layer", example_inputs=x), x)
    path = pycompress.save(model, tmp_path / "m")
    narrow = pycompress.compact(prune_channels(cm.vgg(), 0.75, scope="layer", example_inputs=x), x)
    with pytest.raises(ValueError, match="architecture mismatch"):
        pycompress.load(path, narrow)


# ============================================================================ bad input
def _one_channel_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 1, 3), nn.BatchNorm2d(1), nn.ReLU(), nn.Conv2d(1, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("case", ["sparsity_one", "sparsity_negative", "sparsity_none", "sparsity_str",
                                  "every_channel", "untraceable", "no_calibration", "no_example_inputs",
                                  "unknown_method", "unknown_activation_score", "bad_mix"])
def test_bad_input_raises_and_leaves_the_model_unchanged(case):
    x = cm.images(2)
    model = {"every_channel": _one_channel_net, "untraceable": cm.untraceable_net}.get(case, cm.resnet)()
    snap = _snapshot(model)
    kw = dict(pattern="channel", example_inputs=x)
    sparsity = 0.5
    err, match = ValueError, None
    if case == "sparsity_one":
        sparsity, match = 1.0, r"\[0, 1\)"
    elif case == "sparsity_negative":
        sparsity, match = -0.1, r"\[0, 1\)"
    elif case == "sparsity_none":
        sparsity, err, match = None, TypeError, "sparsity"
    elif case == "sparsity_str":
        sparsity, err, match = "0.5", TypeError, "sparsity"
    elif case == "every_channel":
        sparsity, kw["scope"], match = 0.6, "layer", "every channel"
    elif case == "untraceable":
        match = "torch.fx"
    elif case == "no_calibration":
        kw["method"], match = "activation", "calibration_data"
    elif case == "no_example_inputs":
        kw.pop("example_inputs")
        match = "example_inputs"
    elif case == "unknown_method":
        kw["method"], match = "taylor", "unknown method"
    elif case == "unknown_activation_score":
        kw["activation_score"], match = "median", "activation_score"
    elif case == "bad_mix":
        kw["method"], kw["mix"], kw["calibration_data"], match = "mixed", 1.5, x, "mix"
    with pytest.raises(err, match=match):
        pycompress.prune(model, sparsity, **kw)
    _assert_unchanged(model, snap)


def test_compact_of_pruned_cnn_needs_example_inputs_and_leaves_it_unchanged():
    model = prune_channels(cm.resnet(), 0.5, example_inputs=cm.images(2))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="example_inputs"):
        pycompress.compact(model)
    _assert_unchanged(model, snap)


def test_untraceable_model_still_prunes_unstructured():
    model = cm.untraceable_net()
    pycompress.prune(model, 0.5)
    assert isinstance(model.conv[0], MaskedConv2d)
    with pytest.raises(ValueError, match="torch.fx"):
        channel_groups(model, cm.images(2))


def test_full_size_architectures_have_torchvisions_parameter_counts():
    # the published parameter counts of torchvision's resnet18, resnet50, mobilenet_v2 and vgg16
    want = {cm.resnet18: 11_689_512, cm.resnet50: 25_557_032, cm.mobilenet_v2_imagenet: 3_504_872,
            cm.vgg16: 138_357_544}
    with torch.device("meta"):
        for make, n in want.items():
            assert _params(make()) == n, make.__name__


def test_full_size_resnet18_groups():
    gs = channel_groups(cm.resnet18(), torch.randn(1, 3, 64, 64))
    stem = _group(gs, "conv1")
    assert set(stem.modules("producer")) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert not stem.fixed
    assert sum(1 for g in gs if not g.fixed) == 4 + 8  # one stream per stage + the inside of every block


def test_linear_channel_pruning_in_a_cnn_head_still_compacts():
    """Rows of a hidden classifier layer pruned alone (readers not masked): the channel groups
    leave it, the linear path folds the constant outputs into the next layer's bias."""
    model = cm.vgg()
    x = cm.images(8)
    pycompress.prune(model, 0.5, pattern="channel", include="classifier.0")
    assert not isinstance(model.classifier[3], MaskedLinear)
    with torch.no_grad():
        ref = model(x)
    model, report = pycompress.compact(model, x, return_report=True)
    assert model.classifier[0].out_features == 32 and model.classifier[3].in_features == 32
    assert "classifier.0" not in report.refused
    with torch.no_grad():
        assert _rel_err(model(x), ref) <= 1e-5


def test_recipe_prunes_compacts_and_quantizes_a_cnn():
    model = cm.resnet()
    data = [cm.images(8, seed=s) for s in (1, 2)]
    recipe = {"steps": [{"prune": {"sparsity": 0.5, "pattern": "channel", "scope": "layer"}}, {"compact": {}},
                        {"quantize": {}}]}
    with torch.no_grad():
        dense = model(data[0])
    model, report = pycompress.compress(model, recipe, data)
    assert model.conv1.out_channels == 8 and model.layer3[1].conv3.out_channels == 32
    assert any(type(m).__name__ == "Int8Linear" for m in model.modules())
    assert model(data[0]).shape == dense.shape
    # narrower layers are reported as changed and cannot be reverted one at a time
    assert "conv1" in report.compressed_layers and "bn1" in report.compressed_layers
