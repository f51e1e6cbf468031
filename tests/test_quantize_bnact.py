"""``quantize`` on CNNs built with a BatchNorm that applies its activation itself (timm's
``BatchNormAct2d``, recognised by its structure without importing timm): folding, activation
fusion, uint8 chains, residual additions, save/load, validate, and the modules left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycompress
import cnn_models as cm
from pycompress.nn import Int8Conv2d
from pycompress.nn.residual import batchnorm_act_activation, is_batchnorm_act

pytestmark = [pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                 reason="this build has no int8_conv2d op"),
              pytest.mark.usefixtures("one_thread")]



class BatchNormAct2d(nn.BatchNorm2d):
    """The structure of timm's ``BatchNormAct2d``: BatchNorm, then ``drop``, then ``act``."""

    def __init__(self, num_features, act_layer=nn.ReLU6, drop_layer=None):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                         self.weight, self.bias, bn_training, self.momentum or 0.0, self.eps)
        x = self.drop(x)
        return self.act(x)


class InvertedResidual(nn.Module):
    """timm's EfficientNet block without squeeze-excitation: pw -> dw -> pwl, + shortcut."""

    def __init__(self, c, mid, act=nn.ReLU6):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, act)
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c, None)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.bn2(self.conv_dw(x))
        x = self.se(self.aa(x))
        x = self.bn3(self.conv_pwl(x))
        return self.drop_path(x) + shortcut


class Net(nn.Module):
    def __init__(self, act=nn.ReLU6):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(16, act)
        self.blocks = nn.Sequential(InvertedResidual(16, 48, act), InvertedResidual(16, 48, act))
        self.conv_head = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = BatchNormAct2d(32, act)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(self.bn1(self.conv_stem(x)))
        x = self.bn2(self.conv_head(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def net(seed=0, act=nn.ReLU6):
    torch.manual_seed(seed)
    return cm.randomize_batchnorm(Net(act), seed).eval()


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    return x + 0.2 * torch.randn(n, 3, 16, 16, generator=g)


CALIB = [images(8, s) for s in (10, 11)]
TEST = images(16, 99)
BNS = ["bn1", "bn2"] + [f"blocks.{i}.bn{j}" for i in (0, 1) for j in (1, 2, 3)]


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def _quantize(model, **kw):
    return pycompress.quantize(copy.deepcopy(model), calibration_data=CALIB, return_result=True, **kw)


def test_structure_is_recognised():
    assert batchnorm_act_activation(BatchNormAct2d(4)) == "relu6"
    assert batchnorm_act_activation(BatchNormAct2d(4, nn.SiLU)) == "silu"
    assert batchnorm_act_activation(BatchNormAct2d(4, None)) == "none"
    assert batchnorm_act_activation(BatchNormAct2d(4, nn.GELU)) is None
    assert batchnorm_act_activation(BatchNormAct2d(4, drop_layer=nn.Dropout).eval()) == "relu6"
    assert batchnorm_act_activation(BatchNormAct2d(4, drop_layer=nn.Dropout).train()) is None
    assert is_batchnorm_act(BatchNormAct2d(4, nn.GELU))

    class Other(BatchNormAct2d):  # not a direct BatchNorm2d subclass, another name
        pass
    assert not is_batchnorm_act(Other(4)) and not is_batchnorm_act(nn.BatchNorm2d(4))
    plain = nn.BatchNorm2d(4)
    plain.drop, plain.act = nn.Identity(), nn.ReLU()
    assert not is_batchnorm_act(plain)


@pytest.mark.parametrize("act,kind", [(nn.ReLU6, "relu6"), (nn.SiLU, "silu")])
def test_batchnorm_act_is_folded_fused_chained_and_residual(act, kind):
    model = net(act=act)
    q, res = _quantize(model)
    assert sorted(res.folded.values()) == sorted(BNS)
    for name in BNS:
        assert type(q.get_submodule(name)) is nn.Identity, name
    for i in (0, 1):
        b = f"blocks.{i}"
        assert q.get_submodule(f"{b}.conv_pw").activation == kind
        assert q.get_submodule(f"{b}.conv_dw").activation == kind
        pwl = q.get_submodule(f"{b}.conv_pwl")
        assert isinstance(pwl, Int8Conv2d) and pwl.residual is True and pwl.activation == "none"
        assert (f"{b}.conv_pw", f"{b}.conv_dw") in res.uint8_edges
        assert (f"{b}.conv_dw", f"{b}.conv_pwl") in res.uint8_edges
    assert q.conv_stem.activation == kind and q.conv_head.activation == kind
    assert res.residual_blocks == {"blocks.0": ["conv_pwl"], "blocks.1": ["conv_pwl"]}
    assert ("blocks.0.conv_pwl", "blocks.1.conv_pw") in res.uint8_edges
    with torch.no_grad():
        assert _cos(q(TEST), model(TEST)) > 0.999


def test_save_load_round_trip_and_validate(tmp_path):
    model = net()
    q, res = _quantize(model)
    with torch.no_grad():
        y = q(TEST)
    d = pycompress.save(q, tmp_path / "m")
    restored = pycompress.load(d, net(seed=5))
    for name in BNS:
        assert type(restored.get_submodule(name)) is nn.Identity
    with torch.no_grad():
        assert torch.equal(restored(TEST), y)
    report = pycompress.validate(model, q, CALIB)
    assert report.passed
    for conv in res.convs:
        assert conv in report.layers and report.layers[conv].cosine > 0.99, conv


def test_load_refuses_a_model_whose_module_is_not_replaceable(tmp_path):
    q, _ = _quantize(net())
    d = pycompress.save(q, tmp_path / "m")
    fresh = net(seed=5)
    fresh.bn1 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU6())  # neither BatchNorm nor activation
    fresh.bn1.drop, fresh.bn1.act = nn.Identity(), nn.ReLU6()
    with pytest.raises(ValueError, match="bn1"):
        pycompress.load(d, fresh)


def test_training_mode_batchnorm_is_not_folded():
    model = net()
    model.blocks[0].bn2.train()
    q, res = _quantize(model)
    assert "blocks.0.bn2" not in res.folded.values()
    assert type(q.blocks[0].bn2) is BatchNormAct2d
    assert q.blocks[0].conv_dw.activation == "none"
    assert "blocks.1.bn2" in res.folded.values()
    # the same as a training-mode nn.BatchNorm2d and nn.ReLU6 there (the batch statistics of the
    # depthwise conv's output are small: they amplify its quantization error alike)
    plain = copy.deepcopy(model)
    bn = nn.BatchNorm2d(48)
    bn.load_state_dict(model.blocks[0].bn2.state_dict())
    plain.blocks[0].bn2 = nn.Sequential(bn.train(), nn.ReLU6())
    q2, res2 = _quantize(plain)
    assert sorted(res2.folded.values()) == sorted(res.folded.values())
    with torch.no_grad():
        got = q(TEST)
        assert torch.equal(got, q2(TEST))
        assert _cos(got, model(TEST)) > 0.95


def test_training_dropout_is_not_folded():
    model = net()
    model.blocks[1].bn1.drop = nn.Dropout(0.5).train()
    torch.manual_seed(2)
    q, res = _quantize(model)
    assert "blocks.1.bn1" not in res.folded.values()
    assert type(q.blocks[1].bn1) is BatchNormAct2d and q.blocks[1].conv_pw.activation == "none"
    assert "blocks.0.bn1" in res.folded.values()
    with torch.no_grad():
        outs = []
        for m in (model, q):
            torch.manual_seed(3)  # the same dropout mask
            outs.append(m(TEST))
    assert _cos(outs[1], outs[0]) > 0.99


def test_unfusable_activation_is_not_folded():
    model = net()
    model.blocks[0].bn1.act = nn.GELU()
    model.blocks[1].bn3.act = nn.GELU()  # the residual addition after it is not fused either
    q, res = _quantize(model)
    assert "blocks.0.bn1" not in res.folded.values() and "blocks.1.bn3" not in res.folded.values()
    assert type(q.blocks[0].bn1) is BatchNormAct2d and type(q.blocks[1].bn3) is BatchNormAct2d
    assert "blocks.1" not in res.residual_blocks and "blocks.0" in res.residual_blocks
    with torch.no_grad():
        assert _cos(q(TEST), model(TEST)) > 0.999
