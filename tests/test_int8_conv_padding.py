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

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.pycompress, "int8_conv2d"),
                                reason="this build has no int8_conv2d op")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
