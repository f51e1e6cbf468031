"""pycompress.prune / GradualPruning / deploy_pruned."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pycompress
from _pylayer_models import tiny_bert
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


@pytest.mark.parametrize("method,pattern", [("activation", "channel"), ("mixed", "unstructured")])
def test_gradual_pruning_with_a_data_method_recollects_statistics(method, pattern):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    data = [torch.randn(8, 16) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = (x for x in data)  # a one-shot iterator is kept as a list
    sched = pycompress.GradualPruning(model, 0.6, total_steps=6, frequency=2, pattern=pattern, method=method,
                                      calibration_data=gen, exclude="4", optimizer=opt)
    pruned_at = 0
    for _ in range(6):
        loss = model(torch.randn(16, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = copy.deepcopy(model)
        target = sched.sparsity_at(sched.step_count + 1)
        sched.step()
        if sched.current_sparsity == target and target > 0:
            # the masks are those of a one-shot prune of the current weights with the same data
            expect = pycompress.prune(before, target, pattern=pattern, method=method, calibration_data=data,
                                      exclude="4")
            for name in ("0", "2"):
                assert torch.equal(model.get_submodule(name).mask, expect.get_submodule(name).mask), name
            pruned_at += 1
    assert pruned_at == 3 and abs(sched.current_sparsity - 0.6) < 1e-9
    if pattern == "channel":  # rows, and compact can remove them
        assert all(bool((~model[i].mask.any(1)).any()) for i in (0, 2))
    with pytest.raises(ValueError, match="calibration_data"):
        pycompress.GradualPruning(nn.Sequential(nn.Linear(4, 4)), 0.5, total_steps=2, method="activation")
    with pytest.raises(ValueError, match="unknown method"):
        pycompress.GradualPruning(nn.Sequential(nn.Linear(4, 4)), 0.5, total_steps=2, method="random")


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
    # auto: a timer under which only enc.0 (64 inputs) is faster sparse
    timer = (lambda layer, x: 1.0 if isinstance(layer, SparseLinear) and layer.in_features == 64 else 2.0)
    pycompress.deploy_pruned(model, mode=mode, timer=timer if mode == "auto" else None)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    kinds = [type(m) for m in (model.enc[0], model.enc[2], model.head)]
    if mode == "sparse":
        assert kinds == [SparseLinear] * 3
    elif mode == "dense":
        assert kinds == [nn.Linear] * 3
    else:
        assert kinds == [SparseLinear, nn.Linear, nn.Linear]
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        pycompress.deploy_pruned(model, mode="fast")


# ----------------------------------------------------------------------------- importance methods
def _two_layer(w0, w1=None):
    w0 = torch.as_tensor(w0, dtype=torch.float32)
    m = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU())
    with torch.no_grad():
        m[0].weight.copy_(w0)
        m[0].bias.zero_()
    return m


def _pruned_rows(layer):
    return [i for i in range(layer.mask.shape[0]) if not bool(layer.mask[i].any())]


def test_channel_magnitude_is_l1_norm():
    # row 0: L1 3, L2 3; row 1: L1 4, L2 2; row 2: L1 1; row 3: L1 8
    w = [[3.0, 0, 0, 0], [1.0, 1, 1, 1], [0.5, 0.5, 0, 0], [2.0, 2, 2, 2]]
    m = _two_layer(w)
    pycompress.prune(m, 0.5, pattern="channel", scope="layer")
    assert _pruned_rows(m[0]) == [0, 2]  # L2 would have dropped row 1, not row 0


def test_channel_magnitude_global_normalizes_by_in_features():
    a, b = nn.Linear(2, 2), nn.Linear(8, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 1.0], [0.2, 0.2]]))      # mean |w|: 1.0, 0.2
        b.weight.copy_(torch.tensor([[0.5] * 8, [0.1] * 8]))        # L1: 4.0, 0.8; mean |w|: 0.5, 0.1
    model = nn.Sequential(a, b)
    pycompress.prune(model, 0.5, pattern="channel")  # 10 of 20 weights: rows b1 (8) + a1 (2)
    assert _pruned_rows(model[0]) == [1] and _pruned_rows(model[1]) == [1]


def _contribution(x, producer, act, consumer):
    """Hand computation of the channel activation score: standard deviation of
    act(producer(x)) over all tokens times the L2 norm of the consumer's input column."""
    with torch.no_grad():
        a = torch.cat([act(producer(b)).reshape(-1, producer.out_features) for b in x]).double()
        return a.std(0, unbiased=False).float() * consumer.weight.norm(dim=0)


def _relu_probe():
    """Linear(5, 5) = identity -> ReLU -> Linear(5, 3) that ignores input 2, and three inputs:
    neuron 0 negative (dead after the ReLU), 1 and 3 small and varying, 2 large and varying,
    4 large and constant."""
    first, second = nn.Linear(5, 5), nn.Linear(5, 3)
    with torch.no_grad():
        first.weight.copy_(torch.eye(5))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]] * 3))
    x = torch.tensor([[-9.0, 0.5, 8.0, 0.3, 7.0], [-7.0, 0.4, 2.0, 0.2, 7.0], [-8.0, 0.1, 5.0, 0.4, 7.0]])
    return nn.Sequential(first, nn.ReLU(), second), x


def test_channel_activation_is_the_contribution_seen_by_the_consumer():
    # neuron 0: large but negative (ReLU -> 0); neuron 2: large and varying, but the consumer ignores
    # it; neuron 4: large but the same for every input; neurons 1 and 3: small, varying, used
    model, x = _relu_probe()
    pycompress.prune(model, 0.6, pattern="channel", scope="layer", method="activation", calibration_data=x,
                     include="0", activation_score="std_weighted")
    assert _pruned_rows(model[0]) == [0, 2, 4]
    # exact: sum over batches and tokens, any element-wise op in between, consumer column norms
    torch.manual_seed(0)
    lin, out = nn.Linear(6, 8), nn.Linear(8, 5)
    base = nn.Sequential(lin, nn.GELU(), nn.Dropout(0.5), out)
    xs = [torch.randn(3, 5, 6), torch.randn(2, 5, 6)]
    other = [-3 * x for x in xs]  # other data, other score
    score = _contribution(xs, lin, nn.functional.gelu, out)
    score2 = _contribution(other, lin, nn.functional.gelu, out)
    assert sorted(score2.argsort()[:4].tolist()) != sorted(score.argsort()[:4].tolist())
    for data, s in ((xs, score), (other, score2)):
        model = copy.deepcopy(base)
        pycompress.prune(model, 0.5, pattern="channel", scope="layer", method="activation", calibration_data=data,
                         include="0", activation_score="std_weighted")
        assert _pruned_rows(model[0]) == sorted(s.argsort()[:4].tolist())


def test_channel_activation_sums_over_consumers_and_uses_their_mask():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 10), nn.Linear(10, 3), nn.Linear(10, 4)

        def forward(self, x):
            h = torch.relu(self.a(x)) * 2.0
            return self.b(h).sum(-1) + self.c(h).sum(-1)

    torch.manual_seed(3)
    model = Fork()
    pycompress.prune(model, 0.5, include="c")  # the consumer c is masked: its masked columns count
    x = torch.randn(32, 5)
    with torch.no_grad():
        a = (torch.relu(model.a(x)) * 2.0).std(0, unbiased=False)
        score = a * model.b.weight.norm(dim=0) + a * (model.c.weight * model.c.mask).norm(dim=0)
    pycompress.prune(model, 0.3, pattern="channel", scope="layer", method="activation", calibration_data=x,
                     include="a", activation_score="std_weighted")
    assert _pruned_rows(model.a) == sorted(score.argsort()[:3].tolist())


def test_channel_activation_falls_back_to_own_output_without_consumer():
    w = torch.eye(4)
    x1 = torch.tensor([[5.0, -4.0, 0.1, 0.2], [-5.0, 4.0, 0.3, -0.2]])   # mean|y| = 5, 4, 0.2, 0.2
    m = _two_layer(w)  # Linear -> ReLU -> model output: no consumer
    pycompress.prune(m, 0.5, pattern="channel", method="activation", activation_score="std_weighted",
                     calibration_data=x1)
    assert _pruned_rows(m[0]) == [2, 3]  # the layer's own output, before the ReLU
    m = _two_layer(w)
    pycompress.prune(m, 0.5, pattern="channel", method="activation", activation_score="std_weighted",
                     calibration_data=[x1.flip(1), x1.flip(1)])
    assert _pruned_rows(m[0]) == [0, 1]
    # Net: enc.2 -> LayerNorm -> head, so enc.2 falls back; enc.0 -> ReLU -> enc.2 has a consumer
    torch.manual_seed(4)
    model = Net()
    xs = [torch.randn(3, 64), torch.randn(5, 64)]
    with torch.no_grad():
        own = torch.cat([model.enc(x) for x in xs]).abs().mean(0)
    contrib = _contribution(xs, model.enc[0], torch.relu, model.enc[2])
    pycompress.prune(model, 0.25, pattern="channel", scope="layer", method="activation", calibration_data=xs,
                     activation_score="std_weighted")
    assert _pruned_rows(model.enc[2]) == sorted(own.argsort()[:20].tolist())
    assert _pruned_rows(model.enc[0]) == sorted(contrib.argsort()[:24].tolist())
    assert _pruned_rows(model.head) != []


def test_channel_activation_bert_ffn_uses_the_output_projection():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    layer = model.encoder.layer[0]
    seen = []
    h = layer.intermediate.register_forward_hook(lambda mod, a, y: seen.append(y.detach().reshape(-1, 24)))
    batch = {"input_ids": torch.randint(0, 50, (2, 7))}
    with torch.no_grad():
        model(**batch)
    h.remove()
    score = torch.cat(seen).std(0, unbiased=False) * layer.output.dense.weight.norm(dim=0)
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", method="activation", calibration_data=batch,
                     include="*intermediate.dense", activation_score="std_weighted")
    assert _pruned_rows(layer.intermediate.dense) == sorted(score.argsort()[:12].tolist())


def test_channel_mixed_combines_normalized_scores():
    torch.manual_seed(1)
    lin, out = nn.Linear(5, 10), nn.Linear(10, 3)
    model = nn.Sequential(lin, nn.Tanh(), out)
    x = torch.randn(16, 5) * torch.tensor([3.0, 0.1, 1.0, 0.5, 2.0])
    act = _contribution([x], lin, torch.tanh, out)
    with torch.no_grad():
        mag = lin.weight.abs().sum(1)
    for mix in (0.0, 0.3, 1.0):
        m = copy.deepcopy(model)
        pycompress.prune(m, 0.4, pattern="channel", scope="layer", method="mixed", mix=mix,
                         calibration_data=x, include="0", activation_score="std_weighted")
        score = mix * act / act.mean() + (1 - mix) * mag / mag.mean()
        assert _pruned_rows(m[0]) == sorted(score.argsort()[:4].tolist()), mix


def _mean_abs(x, producer, act):
    """Hand computation of the default channel activation score: mean |act(producer(x))| over all
    tokens of all batches (the neuron's activation as its consumer sees it)."""
    with torch.no_grad():
        a = torch.cat([act(producer(b)).reshape(-1, producer.out_features) for b in x]).double()
        return a.abs().mean(0).float()


def _channel_act(model, names, data, activation_score):
    """The channel activation scores prune computes, read from its statistics."""
    from pycompress.pruning.graph import consumers_of
    from pycompress.pruning.prune import _channel_activations, _collect_stats

    layers = [(n, model.get_submodule(n)) for n in names]
    stats = _collect_stats(model, layers, data, need_out=True, consumers=consumers_of(model, names))
    _channel_activations(model, layers, stats, activation_score)
    return {n: (stats[n]["channel_act"], stats[n]["channel_act_source"]) for n in names}


def test_channel_activation_mean_abs_is_the_default_and_uses_the_consumer_input():
    # after the ReLU: neuron 0 is dead (always 0), mean |a| = 0, 1/3, 5, 0.3, 7
    model, x = _relu_probe()
    score, source = _channel_act(model, ["0"], x, "mean_abs")["0"]
    assert source == "consumers"
    torch.testing.assert_close(score, torch.tensor([0.0, 1.0 / 3, 5.0, 0.3, 7.0]))
    assert float(score[0]) == 0.0  # dead ReLU neuron
    m = copy.deepcopy(model)
    pycompress.prune(m, 0.6, pattern="channel", scope="layer", method="activation", calibration_data=x, include="0")
    assert _pruned_rows(m[0]) == [0, 1, 3]  # the constant neuron 4 and the ignored neuron 2 stay
    m2 = copy.deepcopy(model)
    pycompress.prune(m2, 0.6, pattern="channel", scope="layer", method="activation", calibration_data=x,
                     include="0", activation_score="mean_abs")
    assert torch.equal(m2[0].mask, m[0].mask)
    m3 = copy.deepcopy(model)
    pycompress.prune(m3, 0.6, pattern="channel", scope="layer", method="activation", calibration_data=x,
                     include="0", activation_score="std_weighted")
    assert _pruned_rows(m3[0]) == [0, 2, 4]
    # exact: over all batches and tokens, after any element-wise ops (GELU, dropout in eval)
    torch.manual_seed(0)
    lin, out = nn.Linear(6, 8), nn.Linear(8, 5)
    base = nn.Sequential(lin, nn.GELU(), nn.Dropout(0.5), out)
    xs = [torch.randn(3, 5, 6), torch.randn(2, 5, 6)]
    want = _mean_abs(xs, lin, nn.functional.gelu)
    got, source = _channel_act(base, ["0"], xs, "mean_abs")["0"]
    assert source == "consumers"
    torch.testing.assert_close(got, want)
    # the pre-activation would rank differently: the score really is taken after the GELU
    with torch.no_grad():
        pre = torch.cat([lin(b).reshape(-1, 8) for b in xs]).abs().mean(0)
    assert not torch.allclose(pre, want)
    model = copy.deepcopy(base)
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", method="activation", calibration_data=xs,
                     include="0")
    assert _pruned_rows(model[0]) == sorted(want.argsort()[:4].tolist())


def test_channel_activation_mean_abs_pools_consumers_and_falls_back_to_own_output():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 10), nn.Linear(10, 3), nn.Linear(10, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h * 2.0).sum(-1) + self.c(h).sum(-1)

    torch.manual_seed(3)
    model = Fork()
    x = torch.randn(32, 5)
    with torch.no_grad():
        h = torch.relu(model.a(x))
        want = torch.cat([h * 2.0, h]).abs().mean(0)  # both consumers' inputs, every token
    got, source = _channel_act(model, ["a"], x, "mean_abs")["a"]
    assert source == "consumers"
    torch.testing.assert_close(got, want)
    # no consumer (Linear -> ReLU -> model output): mean |y| of the layer's own output (before the ReLU)
    w = torch.eye(4)
    x1 = torch.tensor([[5.0, -4.0, 0.1, 0.2], [-5.0, 4.0, 0.3, -0.2]])   # mean|y| = 5, 4, 0.2, 0.2
    m = _two_layer(w)
    got, source = _channel_act(m, ["0"], x1, "mean_abs")["0"]
    assert source == "output"
    torch.testing.assert_close(got, torch.tensor([5.0, 4.0, 0.2, 0.2]))
    pycompress.prune(m, 0.5, pattern="channel", method="activation", calibration_data=x1)
    assert _pruned_rows(m[0]) == [2, 3]
    # Net: enc.2 -> LayerNorm -> head falls back; enc.0 -> ReLU -> enc.2 has a consumer
    torch.manual_seed(4)
    model = Net()
    xs = [torch.randn(3, 64), torch.randn(5, 64)]
    with torch.no_grad():
        own = torch.cat([model.enc(x) for x in xs]).abs().mean(0)
    seen = _mean_abs(xs, model.enc[0], torch.relu)
    pycompress.prune(model, 0.25, pattern="channel", scope="layer", method="activation", calibration_data=xs)
    assert _pruned_rows(model.enc[2]) == sorted(own.argsort()[:20].tolist())
    assert _pruned_rows(model.enc[0]) == sorted(seen.argsort()[:24].tolist())


def test_channel_mixed_uses_the_selected_activation_score():
    torch.manual_seed(1)
    lin, out = nn.Linear(5, 10), nn.Linear(10, 3)
    model = nn.Sequential(lin, nn.Tanh(), out)
    x = torch.randn(16, 5) * torch.tensor([3.0, 0.1, 1.0, 0.5, 2.0])
    with torch.no_grad():
        mag = lin.weight.abs().sum(1)
    for act_score, act in (("mean_abs", _mean_abs([x], lin, torch.tanh)),
                           ("std_weighted", _contribution([x], lin, torch.tanh, out))):
        score = 0.5 * act / act.mean() + 0.5 * mag / mag.mean()
        m = copy.deepcopy(model)
        pycompress.prune(m, 0.4, pattern="channel", scope="layer", method="mixed", calibration_data=x,
                         include="0", activation_score=act_score)
        assert _pruned_rows(m[0]) == sorted(score.argsort()[:4].tolist()), act_score


def test_activation_score_in_gradual_pruning_and_bad_values():
    torch.manual_seed(6)
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    x = torch.randn(16, 8)
    masks = {}
    for act_score in ("mean_abs", "std_weighted"):
        m = copy.deepcopy(base)
        sched = pycompress.GradualPruning(m, 0.5, total_steps=1, pattern="channel", method="activation",
                                          calibration_data=x, include="0", activation_score=act_score)
        sched.step()
        expect = pycompress.prune(copy.deepcopy(base), 0.5, pattern="channel", method="activation",
                                  calibration_data=x, include="0", activation_score=act_score)
        assert torch.equal(m[0].mask, expect[0].mask)
        masks[act_score] = m[0].mask
    assert not torch.equal(masks["mean_abs"], masks["std_weighted"])  # the keyword reached prune
    for kwargs in ({"pattern": "channel", "method": "activation", "calibration_data": x},
                   {"pattern": "unstructured"}, {"pattern": "2:4", "method": "mixed", "calibration_data": x}):
        with pytest.raises(ValueError, match=r"unknown activation_score 'std'; supported: 'mean_abs', 'std_weighted'"):
            pycompress.prune(copy.deepcopy(base), 0.5 if kwargs["pattern"] != "2:4" else None,
                             activation_score="std", **kwargs)
    with pytest.raises(ValueError, match="unknown activation_score"):
        pycompress.prune(copy.deepcopy(base), 0.5, activation_score=None)
    with pytest.raises(ValueError, match="unknown activation_score"):
        pycompress.GradualPruning(base, 0.5, total_steps=2, activation_score="MEAN_ABS")
    assert type(base[0]) is nn.Linear  # refused before the model was touched


def test_unstructured_activation_is_wanda_and_nm():
    torch.manual_seed(2)
    lin = nn.Linear(8, 6)
    model = nn.Sequential(lin)
    x = torch.randn(20, 8) * torch.linspace(0.1, 3.0, 8)
    score = lin.weight.detach().abs() * x.pow(2).sum(0).sqrt()
    m = copy.deepcopy(model)
    pycompress.prune(m, 0.5, scope="layer", method="activation", calibration_data=x)
    expected = torch.ones(48, dtype=torch.bool)
    expected[score.reshape(-1).argsort()[:24]] = False
    assert torch.equal(m[0].mask.reshape(-1), expected)
    m = copy.deepcopy(model)
    pycompress.prune(m, None, pattern="2:4", method="activation", calibration_data=x)
    top = score.reshape(6, 2, 4).argsort(-1, descending=True)[..., :2]
    want = torch.zeros(6, 2, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(6, 8)
    assert torch.equal(m[0].mask, want)
    m = copy.deepcopy(model)
    pycompress.prune(m, 0.5, scope="layer", method="mixed", mix=0.25, calibration_data=x)
    w = lin.weight.detach().abs()
    mixed = 0.25 * score / score.mean() + 0.75 * w / w.mean()
    expected = torch.ones(48, dtype=torch.bool)
    expected[mixed.reshape(-1).argsort()[:24]] = False
    assert torch.equal(m[0].mask.reshape(-1), expected)


@pytest.mark.parametrize("method", ["activation", "mixed"])
@pytest.mark.parametrize("pattern,scope", [("channel", "global"), ("channel", "layer"),
                                           ("unstructured", "global"), ("unstructured", "layer")])
def test_data_methods_reach_the_requested_sparsity(method, pattern, scope):
    model = Net()
    data = [torch.randn(8, 64) for _ in range(3)]
    ref = copy.deepcopy(model)
    pycompress.prune(model, 0.5, pattern=pattern, scope=scope, method=method, calibration_data=data)
    assert abs(_sparsity(model) - 0.5) <= 0.01
    assert model.training  # restored
    for a, b in zip(model.parameters(), ref.parameters()):  # calibration never trains
        assert a.shape == b.shape


def test_data_method_dict_and_tuple_batches():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x, scale=1.0):
            return self.b(torch.relu(self.a(x * scale)))

    m = KW()
    pycompress.prune(m, 0.5, pattern="channel", method="activation",
                     calibration_data=[{"x": torch.randn(3, 4), "scale": 2.0}, (torch.randn(3, 4),)])
    assert abs(_sparsity(m) - 0.5) <= 0.1


def test_head_pattern_prunes_whole_heads():
    model = tiny_bert(vocab_size=50, intermediate_size=48)
    ids = torch.randint(0, 50, (2, 10))
    for method, scope in (("magnitude", "global"), ("activation", "layer"), ("mixed", "global")):
        m = copy.deepcopy(model)
        pycompress.prune(m, 0.5, pattern="head", scope=scope, method=method, calibration_data={"input_ids": ids})
        removed = 0
        for layer in m.encoder.layer:
            att = layer.attention.self
            rows = [(~getattr(att, p).mask.any(1)).reshape(4, 8) for p in ("query", "key", "value")]
            heads = rows[0].all(1)
            assert torch.equal(heads, rows[1].all(1)) and torch.equal(heads, rows[2].all(1))
            assert not bool((rows[0].any(1) & ~heads).any())  # whole heads only
            assert 1 <= int((~heads).sum())
            removed += int(heads.sum())
            if scope == "layer":
                assert int(heads.sum()) == 2
        assert removed == 4
    # activation importance of heads: mean |attention output| of the head's slice
    m = copy.deepcopy(model)
    seen = []
    h = m.encoder.layer[0].attention.self.register_forward_hook(lambda mod, a, out: seen.append(out[0]))
    with torch.no_grad():
        m(input_ids=ids)
    h.remove()
    act = seen[0].reshape(-1, 4, 8).abs().mean((0, 2))
    pycompress.prune(m, 0.25, pattern="head", scope="layer", method="activation",
                     calibration_data={"input_ids": ids}, include="encoder.layer.0")
    q = m.encoder.layer[0].attention.self.query
    assert (~q.mask.any(1)).reshape(4, 8).all(1).nonzero().flatten().tolist() == [int(act.argmin())]
    assert type(m.encoder.layer[1].attention.self.query) is nn.Linear


def test_data_methods_bad_input():
    model = Net()
    with pytest.raises(ValueError, match="calibration_data"):
        pycompress.prune(model, 0.5, pattern="channel", method="activation")
    with pytest.raises(ValueError, match="calibration_data"):
        pycompress.prune(model, 0.5, method="mixed")
    with pytest.raises(ValueError, match="mix"):
        pycompress.prune(model, 0.5, method="mixed", mix=1.5, calibration_data=torch.randn(2, 64))
    with pytest.raises(TypeError, match="mix"):
        pycompress.prune(model, 0.5, method="mixed", mix="half", calibration_data=torch.randn(2, 64))
    with pytest.raises(ValueError, match="no batch"):
        pycompress.prune(model, 0.5, method="activation", calibration_data=[])
    with pytest.raises(ValueError, match="failed"):
        pycompress.prune(model, 0.5, method="activation", calibration_data=torch.randn(2, 7))
    with pytest.raises(TypeError, match="calibration_data"):
        pycompress.prune(model, 0.5, method="activation", calibration_data=5)
    with pytest.raises(ValueError, match="matches no module"):
        pycompress.prune(model, 0.5, include="encoder.*")
    with pytest.raises(ValueError, match="no attention"):
        pycompress.prune(model, 0.5, pattern="head")
    with pytest.raises(ValueError, match="never ran"):
        class Unused(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

            def forward(self, x):
                return self.a(x)

        pycompress.prune(Unused(), 0.5, method="activation", calibration_data=torch.randn(2, 4))
    assert all(type(m) is not MaskedLinear for m in model.modules())  # nothing half-done


# --------------------------------------------------------------------------- tied weights
class _Tied(nn.Module):
    """``b`` reuses ``a``'s weight (its own bias): one weight, two uses with different inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * 3.0 - 1.0)))


def _tied_data():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(12, 16, generator=g) * torch.linspace(0.2, 4.0, 16) for _ in range(2)]


@pytest.mark.parametrize("method", ["activation", "mixed", "magnitude"])
@pytest.mark.parametrize("pattern", ["channel", "unstructured"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tied_weights_get_one_mask_and_the_requested_sparsity(method, pattern, scope):
    model = _Tied()
    pycompress.prune(model, 0.5, pattern=pattern, scope=scope, method=method, calibration_data=_tied_data())
    assert model.a.weight is model.b.weight
    assert torch.equal(model.a.mask, model.b.mask)
    shared_zeros = int((model.a.weight == 0).sum())
    if scope == "layer":
        assert shared_zeros == 128  # exactly half of the one shared [16, 16] weight
        assert int((~model.c.mask).sum()) == 32
    else:  # distinct weights: 256 shared + 64 of c, half of them pruned
        assert shared_zeros + int((~model.c.mask).sum()) == 160


def test_tied_weights_unstructured_activation_scores_every_use():
    """Wanda on a shared weight: |W_ij| times the input norm over the tokens of both uses."""
    model = _Tied()
    data = _tied_data()
    seen = {"a": [], "b": []}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0]))
             for n in ("a", "b")]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    norm = torch.cat(seen["a"] + seen["b"]).pow(2).sum(0).sqrt()
    score = model.a.weight.detach().abs() * norm
    expected = torch.ones(256, dtype=torch.bool)
    expected[score.reshape(-1).argsort()[:128]] = False
    pycompress.prune(model, 0.5, scope="layer", method="activation", calibration_data=data, include=["a", "b"])
    assert torch.equal(model.a.mask.reshape(-1), expected)


def test_gradual_pruning_final_below_initial_is_refused():
    model = Net()
    with pytest.raises(ValueError, match=r"final_sparsity \(0.2\) must be >= initial_sparsity \(0.8\)"):
        pycompress.GradualPruning(model, final_sparsity=0.2, total_steps=10, initial_sparsity=0.8)
    assert type(model.enc[0]) is nn.Linear  # refused before the model was touched
    pycompress.GradualPruning(Net(), final_sparsity=0.5, total_steps=10, initial_sparsity=0.5)  # constant is fine


def test_gradual_pruning_load_state_dict_names_what_is_wrong():
    sched = pycompress.GradualPruning(Net(), 0.5, total_steps=4)
    sched.step()
    saved = sched.state_dict()
    with pytest.raises(ValueError, match=r"missing key\(s\) 'current_sparsity', 'step_count'"):
        sched.load_state_dict({})
    with pytest.raises(ValueError, match=r"missing key\(s\) 'current_sparsity'"):
        sched.load_state_dict({"step_count": 1})
    with pytest.raises(TypeError, match="state must be a dict"):
        sched.load_state_dict([1, 0.5])
    with pytest.raises(ValueError, match="step_count"):
        sched.load_state_dict({"step_count": -1, "current_sparsity": 0.1})
    with pytest.raises(ValueError, match="current_sparsity"):
        sched.load_state_dict({"step_count": 1, "current_sparsity": 1.5})
    assert sched.state_dict() == saved  # a refused state changes nothing
    other = pycompress.GradualPruning(Net(), 0.5, total_steps=4)
    other.load_state_dict(saved)
    assert other.state_dict() == saved


@pytest.mark.parametrize("pattern", ["unstructured", "channel", "2:4"])
def test_prune_on_the_meta_device_is_refused_and_changes_nothing(pattern):
    model = Net().to("meta")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"meta device"):
        pycompress.prune(model, None if pattern == "2:4" else 0.5, pattern=pattern)
    assert {n: type(m) for n, m in model.named_modules()} == before
    repr(model)
    bert = tiny_bert().to("meta")
    with pytest.raises(ValueError, match=r"meta device"):
        pycompress.prune(bert, 0.5, pattern="head")
    assert not any(isinstance(m, MaskedLinear) for m in bert.modules())


# --------------------------------------------------------------------------- deploy_pruned(mode="auto")
def _fixed_timer(times: dict, calls: list):
    """A timer giving each layer kind a fixed time per call (seconds), recording what it timed."""
    def timer(layer, x):
        calls.append((type(layer).__name__, x.shape[0]))
        return times[type(layer).__name__]
    return timer


@pytest.mark.parametrize("faster, want", [("SparseLinear", SparseLinear), ("Linear", nn.Linear)])
def test_deploy_auto_follows_the_timer(faster, want):
    model = Net()
    pycompress.prune(model, 0.9)
    x = torch.randn(4, 64)
    ref = model(x).detach()
    calls = []
    times = {"SparseLinear": 2.0, "Linear": 2.0, "SemiSparseLinear": 9.0}  # 90% unstructured may be 2:4
    times[faster] = 1.0
    pycompress.deploy_pruned(model, mode="auto", batch_sizes=(1, 8), timer=_fixed_timer(times, calls))
    assert {type(m) for m in (model.enc[0], model.enc[2], model.head)} == {want}
    # both kinds timed at every batch size, for every layer (dense wins: stops at the first size)
    assert ("Linear", 1) in calls and ("SparseLinear", 1) in calls
    assert len([c for c in calls if c[1] == 8 and c[0] != "SemiSparseLinear"]) == (6 if want is SparseLinear else 0)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_deploy_auto_needs_sparse_faster_at_every_batch_size():
    model = Net()
    pycompress.prune(model, 0.9)

    def timer(layer, x):  # sparse faster at one row only
        sparse = isinstance(layer, SparseLinear)
        return (1.0 if sparse else 2.0) if x.shape[0] == 1 else (3.0 if sparse else 2.0)

    pycompress.deploy_pruned(model, mode="auto", batch_sizes=(1, 32), timer=timer)
    assert {type(m) for m in (model.enc[0], model.enc[2], model.head)} == {nn.Linear}


def test_deploy_auto_semi24_follows_the_timer():
    from pycompress.nn import SemiSparseLinear

    for semi_time, want in ((0.5, SemiSparseLinear), (5.0, SparseLinear)):
        model = Net()
        pycompress.prune(model, None, pattern="2:4")
        times = {"SparseLinear": 1.0, "Linear": 2.0, "SemiSparseLinear": semi_time}
        pycompress.deploy_pruned(model, mode="auto", timer=_fixed_timer(times, []))
        assert [type(m) for m in (model.enc[0], model.enc[2], model.head)] == [want] * 3


def test_deploy_timer_bad_values():
    model = Net()
    pycompress.prune(model, 0.5)
    with pytest.raises(TypeError, match="timer must be a callable"):
        pycompress.deploy_pruned(model, timer=3.0)
    with pytest.raises(ValueError, match=r"timer returned 'fast'.*layer 'enc.0'"):
        pycompress.deploy_pruned(model, timer=lambda layer, x: "fast")
    with pytest.raises(ValueError, match=r"timer returned nan"):
        pycompress.deploy_pruned(model, timer=lambda layer, x: float("nan"))
    assert all(isinstance(m, MaskedLinear) for m in (model.enc[0], model.enc[2], model.head))
