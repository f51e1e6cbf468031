"""pycompress.finetune: heads, freezing, learning, determinism, checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import pycompress
from pycompress.distillation.finetune import find_head


def _data(n=96, d=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


class Net(nn.Module):
    def __init__(self, d=10, classes=5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


def _copy(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_new_head_frozen_backbone():
    torch.manual_seed(0)
    net = Net()
    before = _copy(net)
    net, hist = pycompress.finetune(net, _data(), num_classes=3, epochs=4, lr=5e-2,
                                    batch_size=16, progress=False)
    assert net.fc.out_features == 3
    after = net.state_dict()
    for k in before:
        if k.startswith("backbone."):
            assert torch.equal(before[k], after[k]), k
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert all(p.requires_grad for p in net.parameters())  # flags restored after the run
    assert not net.training


def test_freeze_none_trains_everything_and_learns():
    torch.manual_seed(0)
    net = Net(classes=3)
    before = _copy(net)
    net, hist = pycompress.finetune(net, _data(), freeze=None, epochs=6, lr=2e-2, batch_size=16,
                                    progress=False)
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]


def test_freeze_globs_and_custom_head():
    torch.manual_seed(0)
    net = Net()
    before = _copy(net)
    head = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    net, _ = pycompress.finetune(net, _data(), head=head, freeze=["backbone.0"], epochs=2,
                                 batch_size=32, progress=False)
    assert net.fc is head
    after = net.state_dict()
    assert torch.equal(before["backbone.0.weight"], after["backbone.0.weight"])
    assert not torch.equal(before["backbone.2.weight"], after["backbone.2.weight"])
    with pytest.raises(ValueError, match="matches no parameter"):
        pycompress.finetune(Net(classes=3), _data(), freeze=["nothing.*"], progress=False)


def test_deterministic_with_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = Net()
        torch.manual_seed(1234)  # the global RNG state must not matter
        net, hist = pycompress.finetune(net, _data(), num_classes=3, freeze=None, epochs=2,
                                        batch_size=16, seed=11, progress=False)
        runs.append((_copy(net), [h["loss"] for h in hist]))
        torch.manual_seed(99)
    assert runs[0][1] == runs[1][1]
    for k in runs[0][0]:
        assert torch.equal(runs[0][0][k], runs[1][0][k])
    torch.manual_seed(0)
    other, _ = pycompress.finetune(Net(), _data(), num_classes=3, freeze=None, epochs=2,
                                   batch_size=16, seed=12, progress=False)
    assert not torch.equal(other.fc.weight, runs[0][0]["fc.weight"])


def test_find_head_and_errors():
    assert find_head(Net())[0] == "fc"
    assert find_head(Net(), "backbone.2")[0] == "backbone.2"
    with pytest.raises(ValueError, match="no such module"):
        find_head(Net(), "nope")
    with pytest.raises(ValueError, match="no nn.Linear"):
        pycompress.finetune(nn.Sequential(nn.ReLU()), _data(), num_classes=3, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        pycompress.finetune(Net(), _data(), num_classes=0, progress=False)
    with pytest.raises(TypeError, match="Dataset"):  # a generator has no length
        pycompress.finetune(Net(classes=3), (p for p in [(torch.zeros(10), 0)]), progress=False)
    with pytest.raises(ValueError, match="divisible|positive"):
        pycompress.finetune(Net(classes=3), _data(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        pycompress.finetune(Net(classes=3), _data(), optimizer="lbfgs2", progress=False)
    with pytest.raises(ValueError, match="resume"):
        pycompress.finetune(Net(classes=3), _data(), resume=True, progress=False)


def test_checkpoint_and_resume(tmp_path):
    kw = dict(num_classes=3, freeze=None, batch_size=16, seed=4, progress=False)
    torch.manual_seed(0)
    full, _ = pycompress.finetune(Net(), _data(), epochs=3, **kw)
    torch.manual_seed(0)
    pycompress.finetune(Net(), _data(), epochs=2, checkpoint_dir=str(tmp_path), **kw)
    assert open(tmp_path / "latest").read().strip() == "epoch-0002"
    assert sorted(os.listdir(tmp_path)) == ["epoch-0002", "latest"]
    torch.manual_seed(0)
    resumed, hist = pycompress.finetune(Net(), _data(), epochs=3, checkpoint_dir=str(tmp_path),
                                        resume=True, **kw)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_labels_out_of_range_name_the_label_and_the_classes(bad):
    x, y = _data().tensors
    y = y.clone()
    y[5] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is out of range.*3 classes"):
        pycompress.finetune(Net(classes=3), TensorDataset(x, y), freeze=None, epochs=1, batch_size=16,
                            shuffle=False, progress=False)
    y[5] = -100  # ignore_index is fine
    pycompress.finetune(Net(classes=3), TensorDataset(x, y), freeze=None, epochs=1, batch_size=16, progress=False)


def test_a_plain_list_of_pairs_is_accepted():
    x, y = _data().tensors
    pairs = [(x[i], int(y[i])) for i in range(len(x))]
    torch.manual_seed(0)
    net, hist = pycompress.finetune(Net(), pairs, num_classes=3, epochs=2, lr=5e-2, batch_size=16, progress=False)
    torch.manual_seed(0)
    ref, ref_hist = pycompress.finetune(Net(), TensorDataset(x, y), num_classes=3, epochs=2, lr=5e-2,
                                        batch_size=16, progress=False)
    assert hist[-1]["samples"] == len(pairs)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-5)
    with pytest.raises(TypeError, match="with a length"):
        pycompress.finetune(Net(), iter(pairs), num_classes=3, epochs=1, progress=False)
