"""Channel pruning with compensation: the pruned channels' mean folded into their readers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cnn_models as cm
import pycompress
from pycompress.pruning.channels import prune_channels
from test_cnn_prune import _assert_unchanged as _assert_state_unchanged, _snapshot


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _assert_unchanged(model, snap):
    _assert_state_unchanged(model, snap)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def _pruned(model, compensate, method="magnitude", sparsity=0.3, **kw):
    x = cm.images(8)
    calib = [cm.images(16, seed=s) for s in (2, 3)]
    m = copy.deepcopy(model)
    m, report = prune_channels(m, sparsity, scope="layer", method=method, calibration_data=calib, example_inputs=x,
                               compensate=compensate, return_report=True, **kw)
    return m, report


@pytest.mark.parametrize("name", list(cm.MODELS))
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_compensation_brings_the_masked_model_closer_to_the_dense_one(name, method):
    dense = cm.MODELS[name]()
    held_out = cm.images(16, seed=9)
    with torch.no_grad():
        ref = dense(held_out)
        plain, _ = _pruned(dense, False, method)
        comp, report = _pruned(dense, True, method)
        e_plain, e_comp = _rel(plain(held_out), ref), _rel(comp(held_out), ref)
        assert e_comp < e_plain, (e_comp, e_plain)
        assert report.compensated and not report.uncompensated
        # the same channels are pruned: only biases / BatchNorm means differ
        for (n, a), (_, b) in zip(plain.named_modules(), comp.named_modules()):
            if hasattr(a, "mask"):
                assert torch.equal(a.mask, b.mask), n
        # compact() reproduces the compensated masked model
        masked = comp(held_out)
        x = cm.images(8)
        small = pycompress.compact(comp, x)
        assert _rel(small(held_out), masked) <= 1e-5


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    return cm.randomize_batchnorm(net, 1).eval()


@pytest.mark.parametrize("include", [["0"], ["3"]])
def test_masked_mode_is_exact_for_a_1x1_reader_and_a_linear_after_pooling(include):
    """A pruned channel carries the constant act(BN(0)); a 1x1 unpadded reader (folded into the
    BatchNorm after it, which has no bias) and a Linear after global pooling see exactly it."""
    dense = _bn_net()
    comp, report = _pruned(dense, "masked", sparsity=0.5, include=include)
    plain, _ = _pruned(dense, False, sparsity=0.5, include=include)
    producer = comp.get_submodule(include[0])
    rows = producer.mask.reshape(producer.mask.shape[0], -1).any(1)
    assert int((~rows).sum()) > 0
    only_producers = copy.deepcopy(dense)
    with torch.no_grad():
        only_producers.get_submodule(include[0]).weight[~rows] = 0
    reader = "3" if include == ["0"] else "8"
    assert reader in report.compensated
    if reader == "3":
        assert report.compensated[reader] == "running_mean of 4"
    y = cm.images(5, seed=11)
    with torch.no_grad():
        want = only_producers(y)
        assert _rel(plain(y), want) > 1e-3  # dropping the constant changes the output
        torch.testing.assert_close(comp(y), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pycompress.compact(comp, y)(y), want, rtol=1e-5, atol=1e-5)


def test_mean_mode_keeps_the_mean_output_of_a_linear_reader_on_the_data():
    """A Linear reading pruned channels after global pooling: replacing them by their mean over
    the data keeps the mean of its outputs over that data exactly."""
    dense = _bn_net()
    calib = [cm.images(16, seed=s) for s in (2, 3)]
    comp, report = prune_channels(copy.deepcopy(dense), 0.5, scope="layer", include=["3"], calibration_data=calib,
                                  example_inputs=calib[0], return_report=True)
    assert list(report.compensated) == ["8"]
    data = torch.cat(calib)
    with torch.no_grad():
        torch.testing.assert_close(comp(data).mean(0), dense(data).mean(0), rtol=1e-5, atol=1e-5)
        assert _rel(comp(data), dense(data)) > 1e-3


def test_save_load_round_trips_after_compensation(tmp_path):
    x = cm.images(8)
    for name, make in cm.MODELS.items():
        model, _ = _pruned(make(), True)
        with torch.no_grad():
            ref = model(x)
        restored = pycompress.load(pycompress.save(model, tmp_path / name), make(seed=7))
        small = pycompress.compact(model, x)
        restored_small = pycompress.load(pycompress.save(small, tmp_path / f"{name}-small"), make(seed=7))
        with torch.no_grad():
            assert torch.equal(restored(x), ref)
            assert torch.equal(restored_small(x), small(x))


def test_a_reader_without_bias_or_batchnorm_is_left_and_reported():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, bias=False),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    keys = set(net.state_dict())
    comp, report = _pruned(net, True, sparsity=0.5, include=["0"])
    assert "2" in report.uncompensated and "2" not in report.compensated
    assert comp.get_submodule("2").bias is None
    assert {k for k in comp.state_dict() if not k.endswith("mask")} == keys
    plain, _ = _pruned(net, False, sparsity=0.5, include=["0"])
    y = cm.images(4, seed=5)
    with torch.no_grad():
        assert torch.equal(comp(y), plain(y))


@pytest.mark.parametrize("case", ["bad_value", "bad_data"])
def test_errors_leave_the_model_unchanged(case):
    model = cm.resnet()
    snap = _snapshot(model)
    x = cm.images(2)
    if case == "bad_value":
        with pytest.raises(ValueError, match="compensate"):
            prune_channels(model, 0.5, example_inputs=x, compensate="median")
    else:  # the compensation pass fails on the data: hooks are removed, nothing is changed
        with pytest.raises(ValueError, match="5 channels"):
            prune_channels(model, 0.5, example_inputs=x, calibration_data=[torch.randn(2, 5, 16, 16)])
    _assert_unchanged(model, snap)


def test_prune_passes_compensate_through_and_checks_it():
    model = cm.MODELS["resnet"]()
    calib = [cm.images(16, seed=s) for s in (2, 3)]  # as _pruned
    kw = dict(pattern="channel", scope="layer", method="magnitude", calibration_data=calib, example_inputs=cm.images(8))
    plain = pycompress.prune(copy.deepcopy(model), 0.3, compensate=False, **kw)
    comp = pycompress.prune(copy.deepcopy(model), 0.3, **kw)  # default: the mean is folded in
    direct, _ = _pruned(model, True)
    x = cm.images(8, seed=5)
    with torch.no_grad():
        assert torch.equal(comp(x), direct(x))
        assert not torch.equal(plain(x), comp(x))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="compensate"):
        pycompress.prune(model, 0.3, compensate="median", **kw)
    _assert_unchanged(model, snap)
    lin = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="compensate"):
        pycompress.prune(lin, 0.5, compensate="median")
