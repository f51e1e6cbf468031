"""pycompress.quantize: which layers are swapped, selection globs, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pycompress
from pycompress.quantization.quantize import QuantizationResult
from _pylayer_models import HAS_INT8, SmallCNN, int8_cls, mlp  # noqa: F401


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantize_mlp_swaps_every_linear(int8_cls, mode):
    model = mlp()
    ref = copy.deepcopy(model)
    out = pycompress.quantize(model, mode=mode)
    assert out is model
    linears = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        layer = model.get_submodule(name)
        assert isinstance(layer, int8_cls), name
        assert layer.mode == mode
        assert layer.weight.dtype == torch.int8
        assert tuple(layer.weight.shape) == tuple(ref.get_submodule(name).weight.shape)
    x = torch.randn(16, 32)
    with torch.no_grad():
        assert _cos(model(x), ref(x)) > 0.999


def test_quantize_w8a16_is_closer_than_w8a8(int8_cls):
    ref = mlp()
    x = torch.randn(64, 32)
    errs = {}
    for mode in ("w8a8", "w8a16"):
        q = pycompress.quantize(copy.deepcopy(ref), mode=mode)
        with torch.no_grad():
            errs[mode] = (q(x) - ref(x)).norm().item() / ref(x).norm().item()
    assert 0 < errs["w8a16"] < errs["w8a8"] < 0.05, errs


def test_include_exclude_globs_regex_and_ancestors(int8_cls):
    model = SmallCNN()
    pycompress.quantize(model, exclude="head.3")
    assert isinstance(model.head[1], int8_cls) and type(model.head[3]) is nn.Linear

    model = SmallCNN()
    pycompress.quantize(model, include="head")  # an ancestor name selects everything inside
    assert isinstance(model.head[1], int8_cls) and isinstance(model.head[3], int8_cls)

    model = SmallCNN()
    pycompress.quantize(model, include=["re:head\\.[13]"], exclude=["*.3"])
    assert isinstance(model.head[1], int8_cls) and type(model.head[3]) is nn.Linear


def test_cnn_convolutions_become_int8_and_stay_float_in_w8a16(int8_cls):
    conv_cls = getattr(pycompress.nn, "Int8Conv2d", None)
    if conv_cls is None or not hasattr(torch.ops.pycompress, "int8_conv2d"):
        pytest.skip("this build has no Int8Conv2d")
    model = SmallCNN().eval()
    ref = copy.deepcopy(model)
    _, result = pycompress.quantize(model, return_result=True)
    assert result.skipped == {} and result.convs == ["features.0", "features.4"]
    assert isinstance(model.features[0], conv_cls) and isinstance(model.features[1], nn.Identity)  # BN folded
    assert isinstance(model.head[1], int8_cls) and isinstance(model.head[3], int8_cls)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _cos(model(x), ref(x)) > 0.99
    model = SmallCNN().eval()
    with pytest.warns(UserWarning, match="features.0: Conv2d"):
        _, result = pycompress.quantize(model, mode="w8a16", return_result=True)
    assert set(result.skipped) == {"features.0", "features.4"}  # listed, never silently left
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.weight.dtype == torch.float32 for c in convs)


class _SubLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        # add_bias_kv: an attention module Int8MultiheadAttention does not replace
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
        self.custom = _SubLinear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.fc(self.custom(h))


def test_unconvertible_layers_are_left_alone_and_listed(int8_cls):
    model = _WithAttention().eval()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left in floating point") as rec:
        _, result = pycompress.quantize(model, return_result=True)
    assert isinstance(result, QuantizationResult)
    assert result.converted == ["fc"]
    assert set(result.skipped) == {"attn", "custom"}  # its out_proj is not listed on its own
    assert "add_bias_kv" in result.skipped["attn"]
    assert "attn: " in str(rec[0].message)
    assert type(model.attn.out_proj) is type(ref.attn.out_proj)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert _cos(model(x), ref(x)) > 0.99
    assert result.to_dict()["converted"] == ["fc"]
    assert "converted=1" in repr(result)


def test_layers_refused_by_the_constructor_are_listed(int8_cls):
    model = nn.Sequential(nn.Linear(8, 8).double(), nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, result = pycompress.quantize(model, return_result=True)
    assert "0" in result.skipped and result.converted == ["1"]


def test_quantize_is_idempotent(int8_cls):
    model = pycompress.quantize(mlp())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, result = pycompress.quantize(model, return_result=True)
    assert result.converted == [] and result.skipped == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_training_flag_is_kept(int8_cls):
    model = mlp().train()
    pycompress.quantize(model)
    assert model[0].training
    model = mlp().eval()
    pycompress.quantize(model)
    assert not model[0].training


def test_bad_mode(int8_cls):
    with pytest.raises(ValueError, match="mode must be one of"):
        pycompress.quantize(mlp(), mode="int4")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"include": "decoder.*"}, ValueError, "matches no module"),
        ({"exclude": ["0", "nothing_here"]}, ValueError, "'nothing_here' matches no module"),
        ({"include": "re:(unclosed"}, ValueError, "invalid regular expression"),
        ({"include": "[0-9"}, ValueError, "malformed glob"),
        ({"include": ""}, ValueError, "empty pattern"),
        ({"include": []}, ValueError, "empty list"),
        ({"include": 3}, TypeError, "include must be"),
        ({"exclude": [None]}, TypeError, "patterns must be strings"),
    ],
)
def test_bad_globs(int8_cls, kwargs, exc, match):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        pycompress.quantize(model, **kwargs)
    assert all(type(m) is not int8_cls for m in model.modules())  # nothing converted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        pycompress.quantize({"weight": torch.zeros(2, 2)})


def test_missing_int8_layer_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(pycompress.nn, "Int8Linear", raising=False)
    with pytest.raises(RuntimeError, match="Int8Linear is not available"):
        pycompress.quantize(mlp())


def test_masked_linear_is_quantized_with_its_mask(int8_cls):
    masked_cls = getattr(pycompress.nn, "MaskedLinear", None)
    if masked_cls is None:
        pytest.skip("this build has no pycompress.nn.MaskedLinear")
    lin = nn.Linear(32, 16)
    mask = torch.rand(16, 32) > 0.5
    model = nn.Sequential(masked_cls.from_dense(lin, mask), nn.ReLU(), nn.Linear(16, 4))
    _, result = pycompress.quantize(model, return_result=True)
    assert result.converted == ["0", "2"]
    q = model[0]
    assert isinstance(q, int8_cls)
    assert torch.all(q.weight[~mask] == 0)  # pruned weights stay exactly zero


@pytest.mark.skipif(not HAS_INT8, reason="the examples use the compiled Int8Linear")
@pytest.mark.parametrize("module", ["quantization.quantize", "evaluation.validate", "evaluation.evaluate", "recipe",
                                    "export.serialization", "nn.registry", "pruning.gradual"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"pycompress.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_a_layer_registered_twice_is_replaced_everywhere(int8_cls):
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    ref = copy.deepcopy(model)
    _, result = pycompress.quantize(model, return_result=True)
    assert result.converted == ["0"]
    assert model[0] is model[2] and isinstance(model[2], int8_cls)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert _cos(model(x), ref(x)) > 0.999


@pytest.mark.skipif(not HAS_INT8, reason="act_bits/weight_bits are features of the compiled Int8Linear")
@pytest.mark.parametrize("options", [{"act_bits": 7}, {"act_bits": 7, "weight_bits": 7}])
def test_7_bit_options(tmp_path, options):
    import inspect

    params = inspect.signature(pycompress.nn.Int8Linear.from_float).parameters
    if any(name not in params for name in options):
        pytest.skip(f"this Int8Linear lacks one of {sorted(options)}")
    ref = mlp()
    model = pycompress.quantize(copy.deepcopy(ref), **options)
    layers = [model.get_submodule(n) for n in ("0", "2", "4")]
    assert all(getattr(m, name) == 7 for m in layers for name in options)
    if "weight_bits" in options:
        assert all(m.weight.abs().max().item() <= 63 for m in layers)
    x = torch.randn(16, 32)
    assert pycompress.validate(ref, model, x).passed
    pycompress.save(model, tmp_path / "m")
    fresh = pycompress.load(tmp_path / "m", mlp(seed=2))
    assert all(getattr(fresh[0], name) == 7 for name in options)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for name in options:
        with pytest.raises(ValueError, match=f"{name} must be 8 or 7"):
            pycompress.quantize(mlp(), **{name: 4})
        with pytest.raises(ValueError, match="w8a8.* only"):
            pycompress.quantize(mlp(), mode="w8a16", **{name: 7})
