"""pycompress.prune / GradualPruning / deploy_pruned."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pycompress
from pycompress.nn import MaskedLinear, SparseLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80))
        self.head = nn.Linear(80, 10)
        self.norm = nn.LayerNorm(80)

    def forward(self, x):
        return self.head(self.norm(self.enc(x)))


def _sparsity(model):
    tot = kept = 0
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            tot += m.mask.numel()
            kept += int(m.mask.sum())
    return 1 - kept / tot


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_unstructured_sparsity_exact(scope, sparsity):
    model = Net()
    x = torch.randn(3, 64)
    pycompress.prune(model, sparsity, scope=scope)
    assert all(isinstance(m, MaskedLinear) for m in (model.enc[0], model.enc[2], model.head))
    assert abs(_sparsity(model) - sparsity) <= 0.01
    if scope == "layer":
        for m in (model.enc[0], model.enc[2], model.head):
            assert abs(m.sparsity - sparsity) <= 0.01
    model(x)  # still runs


def test_global_magnitude_keeps_largest():
    model = Net()
    ref = copy.deepcopy(model)
    pycompress.prune(model, 0.8)
    allw = torch.cat([m.weight.detach().abs().reshape(-1) for m in (ref.enc[0], ref.enc[2], ref.head)])
    thr = allw.sort().values[round(0.8 * allw.numel())]
    for m, r in zip((model.enc[0], model.enc[2], model.head), (ref.enc[0], ref.enc[2], ref.head)):
        assert torch.all(r.weight.abs()[m.mask] >= thr - 1e-7)
        assert torch.all(m.weight[~m.mask] == 0)
        assert torch.equal(m.weight[m.mask], r.weight[m.mask])


@pytest.mark.parametrize("K", [64, 66, 67])
def test_n_m_pattern(K):
    model = nn.Sequential(nn.Linear(K, 32))
    pycompress.prune(model, None, pattern="2:4")
    mask = model[0].mask
    full = K // 4 * 4
    groups = mask[:, :full].reshape(32, -1, 4).sum(-1)
    assert torch.all(groups == 2)
    r = K - full
    if r:
        assert torch.all(mask[:, full:].sum(-1) == -(-r * 2 // 4))
    # kept weights are the largest of each group
    w = model[0].weight.detach()
    assert torch.all(w[:, :full].reshape(32, -1, 4).abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="fixes sparsity"):
        pycompress.prune(nn.Sequential(nn.Linear(8, 4)), 0.9, pattern="2:4")
    pycompress.prune(nn.Sequential(nn.Linear(8, 4)), 0.5, pattern="2:4")  # consistent value accepted


def test_n_m_keeps_largest_in_group():
    lin = nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
    model = nn.Sequential(lin)
    pycompress.prune(model, None, pattern="2:4")
    assert model[0].mask.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_channel_pattern(scope):
    model = nn.Sequential(nn.Linear(40, 200), nn.ReLU(), nn.Linear(200, 100))
    pycompress.prune(model, 0.5, pattern="channel", scope=scope)
    for m in (model[0], model[2]):
        rows = m.mask.all(1) | (~m.mask).all(1)
        assert torch.all(rows)  # whole rows only
    assert abs(_sparsity(model) - 0.5) <= 0.01


def test_include_exclude_and_reprune():
    model = Net()
    pycompress.prune(model, 0.5, include="enc.*", exclude=["enc.2"])
    assert isinstance(model.enc[0], MaskedLinear)
    assert type(model.enc[2]) is nn.Linear and type(model.head) is nn.Linear
    old = model.enc[0].mask.clone()
    pycompress.prune(model, 0.8, include="enc.0")
    assert abs(model.enc[0].sparsity - 0.8) <= 0.01
    assert torch.all(old | ~model.enc[0].mask)  # previously pruned stay pruned


def test_prune_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="sparsity"):
        pycompress.prune(model, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        pycompress.prune(model, -0.1)
    with pytest.raises(ValueError, match="pattern"):
        pycompress.prune(model, 0.5, pattern="blocks")
    with pytest.raises(ValueError, match="pattern"):
        pycompress.prune(model, 0.5, pattern="5:4")
    with pytest.raises(ValueError, match="scope"):
        pycompress.prune(model, 0.5, scope="model")
    with pytest.raises(ValueError, match="method"):
        pycompress.prune(model, 0.5, method="random")
    with pytest.raises(TypeError, match="include"):
        pycompress.prune(model, 0.5, include=3)
    with pytest.raises(TypeError, match="model"):
        pycompress.prune("model", 0.5)


def test_gradual_pruning_schedule_and_training():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    params_before = {id(p) for p in model.parameters()}
    sched = pycompress.GradualPruning(model, final_sparsity=0.9, total_steps=20, start_step=2, frequency=5,
                                      optimizer=opt)
    assert {id(p) for p in model.parameters()} == params_before  # the optimizer still trains them
    targets, prev_masks = [], None
    for step in range(30):
        x = torch.randn(16, 64)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        targets.append(sched.step())
        masks = [m.mask.clone() for m in model.modules() if isinstance(m, MaskedLinear)]
        if prev_masks is not None:
            for a, b in zip(prev_masks, masks):
                assert torch.all(a | ~b)  # once pruned, stays pruned
        prev_masks = masks
        for m in model.modules():
            if isinstance(m, MaskedLinear):
                assert torch.all(m.weight[~m.mask] == 0)
    assert targets == sorted(targets)
    assert abs(sched.current_sparsity - 0.9) < 1e-9
    assert abs(_sparsity(model) - 0.9) <= 0.01
    assert sched.sparsity_at(2) == 0.0
    assert abs(sched.sparsity_at(12) - (0.9 - 0.9 * 0.5 ** 3)) < 1e-9


def test_gradual_pruning_deterministic_across_replicas():
    torch.manual_seed(3)
    a = Net()
    with torch.no_grad():  # many ties
        for p in a.parameters():
            p.copy_(torch.round(p * 4) / 4)
    b = copy.deepcopy(a)
    sa = pycompress.GradualPruning(a, 0.7, total_steps=4)
    sb = pycompress.GradualPruning(b, 0.7, total_steps=4)
    for _ in range(4):
        sa.step()
        sb.step()
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, MaskedLinear):
            assert torch.equal(ma.mask, mb.mask)


def test_gradual_pruning_bad_arguments():
    with pytest.raises(ValueError, match="final_sparsity"):
        pycompress.GradualPruning(Net(), 1.5, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        pycompress.GradualPruning(Net(), 0.5, total_steps=0)
    with pytest.raises(ValueError, match="N:M"):
        pycompress.GradualPruning(Net(), 0.5, total_steps=10, pattern="2:4")


@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_deploy_pruned(mode):
    model = Net()
    pycompress.prune(model, 0.9)
    x = torch.randn(4, 64)
    ref = model(x).detach()
    pycompress.deploy_pruned(model, mode=mode)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    kinds = {type(m) for m in (model.enc[0], model.enc[2], model.head)}
    if mode == "sparse":
        assert kinds == {SparseLinear}
    elif mode == "dense":
        assert kinds == {nn.Linear}
    else:
        assert kinds <= {SparseLinear, nn.Linear}
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        pycompress.deploy_pruned(model, mode="fast")
