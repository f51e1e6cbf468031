"""pycompress.compact (and the structured pruning feeding it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pycompress
from _pylayer_models import tiny_bert
from pycompress.nn import MaskedLinear

transformers = pytest.importorskip("transformers")


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48, bias=bias), nn.ReLU(), nn.Linear(48, 40, bias=bias), nn.GELU(),
                         nn.Dropout(0.1), nn.Linear(40, 6, bias=bias)).eval()


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= tol * scale


def _removed_params(before: dict, after: dict) -> int:
    """Weights + bias entries that disappeared, from (out, in, bias) shapes."""
    n = 0
    for k, (o, i, b) in before.items():
        o2, i2, b2 = after[k]
        n += o * i - o2 * i2 + (o if b else 0) - (o2 if b2 else 0)
    return n


def _shapes(model):
    return {n: (m.out_features, m.in_features, m.bias is not None) for n, m in model.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")}


# --------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("method", ["magnitude", "activation", "mixed"])
def test_mlp_equivalence_and_exact_parameter_drop(method):
    model = _mlp()
    x = torch.randn(64, 16)
    pycompress.prune(model, 0.5, pattern="channel", method=method, calibration_data=[x[:32], x[32:]], scope="layer",
                     exclude="5")
    with torch.no_grad():
        ref = model(x)
    before, p0 = _shapes(model), _params(model)
    out, report = pycompress.compact(model, example_inputs=x, return_report=True)
    assert out is model
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and type(model[5]) is nn.Linear
    assert model[0].out_features == model[2].in_features < 48
    assert model[2].out_features == model[5].in_features < 40
    with torch.no_grad():
        assert _close(model(x), ref)
    assert p0 - _params(model) == _removed_params(before, _shapes(model)) > 0
    assert report.parameters_before == p0 and report.parameters_after == _params(model)
    assert {c["layer"] for c in report.compacted} == {"0", "2"} and not report.refused
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_folds_constant_of_removed_neurons_into_consumer_bias():
    # pruned neurons output act(bias) != 0: removing them must keep their contribution
    model = _mlp().train()  # example_inputs are compared in eval mode (dropout off)
    x = torch.randn(8, 16)
    pycompress.prune(model, 0.5, pattern="channel", scope="layer")
    _, report = pycompress.compact(model, x, return_report=True)
    assert model.training and report.max_abs_diff < 1e-5
    model = _mlp()
    with torch.no_grad():
        model[0].bias.fill_(0.7)
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", include="0")
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
        pycompress.compact(model)
        assert _close(model(x), ref)


def test_unstructured_mask_left_stays_masked_with_smaller_shape():
    model = _mlp()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", include="0")
    pycompress.prune(model, 0.3, include="2")  # unstructured mask on the consumer
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    pycompress.compact(model)
    assert type(model[0]) is nn.Linear and model[0].out_features == 24
    assert isinstance(model[2], MaskedLinear) and model[2].in_features == 24
    assert not bool(model[2].mask.all())
    with torch.no_grad():
        assert _close(model(x), ref)
    pycompress.deploy_pruned(model, mode="sparse")
    with torch.no_grad():
        assert _close(model(x), ref)


def test_consumer_without_bias_gets_one_and_a_note():
    model = _mlp(bias=False)
    with torch.no_grad():
        model[2].weight.add_(0.0)
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", include="2")
    # the pruned neurons of layer 2 output 0 (no bias) -> nothing to fold, no bias created
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    _, report = pycompress.compact(model, return_report=True)
    assert model[5].bias is None and not report.notes
    with torch.no_grad():
        assert _close(model(x), ref)

    class Shifted(nn.Module):  # GELU(x) + 1 after a bias-free producer: non-zero constant
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 12, bias=False), nn.Linear(12, 3, bias=False)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)) * 2.0)

    m = Shifted().eval()
    pycompress.prune(m, 0.5, pattern="channel", scope="layer", include="a")
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = m(x)
    _, report = pycompress.compact(m, return_report=True)
    assert m.b.bias is not None and any("no bias" in n for n in report.notes)
    with torch.no_grad():
        assert _close(m(x), ref)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h + self.down(torch.relu(self.up(h))))
        return self.head(h)


def test_residual_and_layernorm_are_refused_with_reason():
    model = Residual().eval()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", exclude="head")
    x = torch.randn(6, 12)
    with torch.no_grad():
        ref = model(x)
    _, report = pycompress.compact(model, x, return_report=True)
    # up -> relu -> down is an FFN and shrinks; inp and down feed the residual stream
    assert [c["layer"] for c in report.compacted] == ["up"]
    assert model.up.out_features == 32 and model.down.in_features == 32
    for name in ("inp", "down"):
        assert "cannot follow" in report.refused[name], report.refused
        assert isinstance(getattr(model, name), MaskedLinear)
        assert getattr(model, name).out_features == 32
    assert "add" in report.refused["down"] and "add" in report.refused["inp"]
    with torch.no_grad():
        assert _close(model(x), ref)
    assert "refused inp" in str(report)


def test_shared_layer_and_whole_layer_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    m = Twice()
    pycompress.prune(m, 0.5, pattern="channel", scope="layer", include="a")
    _, report = pycompress.compact(m, return_report=True)
    assert "called 2 times" in report.refused["a"]
    m2 = _mlp()
    pycompress.prune(m2, 0.5, pattern="channel", scope="layer", include="0")
    m2[0].set_mask(torch.zeros_like(m2[0].mask))
    _, report = pycompress.compact(m2, return_report=True)
    assert "every output channel" in report.refused["0"]


def test_quantized_pruned_model_compacts_to_smaller_int8():
    from pycompress.nn import Int8Linear

    model = _mlp()
    x = torch.randn(32, 16)
    pycompress.prune(model, 0.5, pattern="channel", method="activation", calibration_data=x, exclude="5")
    pycompress.quantize(model, mode="w8a16")
    with torch.no_grad():
        ref = model(x)
    _, report = pycompress.compact(model, x, return_report=True)
    assert isinstance(model[0], Int8Linear) and model[0].out_features < 48
    assert model[2].in_features == model[0].out_features
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) <= 1e-3 * max(float(ref.abs().max()), 1.0)
    assert any("int8" in n for n in report.notes)


def test_quantize_validate_evaluate_after_compact():
    from pycompress.nn import Int8Linear

    model = _mlp()
    x = torch.randn(64, 16)
    y = torch.randint(0, 6, (64,))
    pycompress.prune(model, 0.5, pattern="channel", method="mixed", calibration_data=x, exclude="5")
    masked = copy.deepcopy(model)
    pycompress.compact(model)
    rep = pycompress.validate(masked, model, x)  # narrower layers are skipped, listed with the reason
    assert rep.passed, rep
    assert rep.skipped and all("not compared" in why for why in rep.skipped.values())
    assert rep.max_abs_error < 1e-5
    ev = pycompress.evaluate(model, [(x, y)], batch_sizes=(1, 8), warmup=1, repeats=2)
    ev_masked = pycompress.evaluate(masked, [(x, y)], batch_sizes=(1, 8), warmup=1, repeats=2)
    assert ev.metric == ev_masked.metric and ev.parameters < ev_masked.parameters
    q = pycompress.quantize(copy.deepcopy(model))
    assert isinstance(q[0], Int8Linear) and q[0].out_features == model[0].out_features
    with torch.no_grad():
        assert float((q(x) - model(x)).norm() / model(x).norm()) < 0.05


def test_save_load_compacted_mlp_into_original_architecture(tmp_path):
    model = _mlp()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", exclude="5")
    pycompress.prune(model, 0.7, include="2")  # leaves a smaller MaskedLinear
    pycompress.compact(model)
    pycompress.save(model, tmp_path / "m")
    fresh = pycompress.load(tmp_path / "m", _mlp(seed=1))
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert _shapes(fresh) == _shapes(model) and isinstance(fresh[2], MaskedLinear)
    # narrower layers are accepted only from a compacted save; never wider ones
    def narrow(h):
        return nn.Sequential(nn.Linear(16, h), nn.ReLU(), nn.Linear(h, 40), nn.GELU(), nn.Dropout(0.1),
                             nn.Linear(40, 6))

    with pytest.raises(ValueError, match="architecture mismatch"):
        pycompress.load(tmp_path / "m", narrow(8))
    pycompress.save(_mlp(), tmp_path / "plain")
    with pytest.raises(ValueError, match="do not fit"):
        pycompress.load(tmp_path / "plain", narrow(24))


# --------------------------------------------------------------------------- BERT
def _batches(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hidden(model, batches):
    with torch.no_grad():
        return [model(**b).last_hidden_state for b in batches]


def test_bert_ffn_and_heads_compact_equivalence():
    model = tiny_bert()
    data = _batches()
    pycompress.prune(model, 0.5, pattern="channel", method="activation", calibration_data=data,
                     include="*intermediate.dense")
    pycompress.prune(model, 0.5, pattern="head", method="mixed", calibration_data=data)
    ref = _hidden(model, data)
    masked = copy.deepcopy(model)
    before, p0 = _shapes(model), _params(model)
    _, report = pycompress.compact(model, data, return_report=True)
    for layer in model.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.all_head_size == 16
        assert att.query.out_features == att.key.out_features == att.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features
        assert type(att.query) is nn.Linear and type(layer.intermediate.dense) is nn.Linear
    assert sum(l.intermediate.dense.out_features for l in model.encoder.layer) == 64
    for a, b in zip(_hidden(model, data), ref):
        assert _close(a, b)
    assert p0 - _params(model) == _removed_params(before, _shapes(model))
    assert sorted(c["kind"] for c in report.compacted) == ["channels"] * 2 + ["heads"] * 2
    assert model.config.pruned_heads.keys() == {0, 1}
    assert all(len(v) == 2 for v in model.config.pruned_heads.values())
    rep = pycompress.validate(masked, model, data)  # per-layer comparison skips the narrower layers
    assert rep.passed, rep
    assert {f"encoder.layer.{i}.{n}" for i in (0, 1) for n in ("attention.self", "attention.output.dense",
                                                                "intermediate.dense", "output.dense")} \
        == set(rep.skipped)


def test_bert_partial_heads_and_residual_layers_refused():
    model = tiny_bert()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", include=["*.query", "*attention.output.dense"])
    data = _batches()
    ref = _hidden(model, data)
    _, report = pycompress.compact(model, data, return_report=True)
    assert not report.compacted
    assert "whole heads" in report.refused["encoder.layer.0.attention.self.query"]
    assert "encoder.layer.0.attention.output.dense" in report.refused  # feeds the residual stream
    for a, b in zip(_hidden(model, data), ref):
        assert _close(a, b)


def test_bert_save_load_and_quantize_after_compact(tmp_path):
    model = tiny_bert()
    data = _batches()
    pycompress.prune(model, 0.5, pattern="channel", include="*intermediate.dense", scope="layer")
    pycompress.prune(model, 0.25, pattern="head", scope="layer")
    pycompress.compact(model)
    pycompress.save(model, tmp_path / "b")
    fresh = pycompress.load(tmp_path / "b", tiny_bert(seed=3))
    assert fresh.encoder.layer[1].attention.self.num_attention_heads == 3
    for a, b in zip(_hidden(fresh, data), _hidden(model, data)):
        assert torch.equal(a, b)
    q = pycompress.quantize(copy.deepcopy(model), exclude="pooler")
    pycompress.save(q, tmp_path / "q")
    fresh_q = pycompress.load(tmp_path / "q", tiny_bert(seed=4))
    for a, b, r in zip(_hidden(fresh_q, data), _hidden(q, data), _hidden(model, data)):
        assert torch.equal(a, b)
        assert float((a - r).norm() / r.norm()) < 0.1


# --------------------------------------------------------------------------- bad input
def test_compact_bad_input():
    with pytest.raises(TypeError, match="model"):
        pycompress.compact("model")
    with pytest.raises(ValueError, match="matches no module"):
        pycompress.compact(_mlp(), include="nope")
    with pytest.raises(ValueError, match="atol"):
        pycompress.compact(_mlp(), atol=-1)
    with pytest.raises(TypeError, match="example_inputs"):
        pycompress.compact(_mlp(), example_inputs=3)
    m = _mlp()
    _, report = pycompress.compact(m, return_report=True)  # nothing pruned: nothing to do
    assert not report.compacted and not report.refused
    assert report.parameters_before == report.parameters_after
