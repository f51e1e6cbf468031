"""pycompress.validate: output agreement, per-layer errors on the same inputs, reports, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import pycompress
from pycompress.evaluation.validate import ValidationReport
from _pylayer_models import KwargsNet, int8_cls, mlp  # noqa: F401


def test_identical_models_agree_perfectly():
    ref = mlp()
    rep = pycompress.validate(ref, copy.deepcopy(ref), torch.randn(8, 32))
    assert isinstance(rep, ValidationReport)
    assert rep.passed and rep.layers == {}
    assert rep.cosine == pytest.approx(1.0) and rep.max_abs_error == 0.0
    assert rep.top1_agreement == 1.0 and rep.kl_div == pytest.approx(0.0, abs=1e-12)


def test_metrics_match_a_direct_computation():
    ref = mlp()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand[4].weight.add_(0.05 * torch.randn_like(cand[4].weight))
    xs = [torch.randn(8, 32), torch.randn(5, 32)]
    rep = pycompress.validate(ref, cand, xs, layers=False)
    with torch.no_grad():
        r = torch.cat([ref(x) for x in xs]).double()
        c = torch.cat([cand(x) for x in xs]).double()
    assert rep.rows == 13 and rep.batches == 2
    assert rep.cosine == pytest.approx(torch.nn.functional.cosine_similarity(r, c, dim=-1).mean().item(), rel=1e-9)
    assert rep.max_abs_error == pytest.approx((r - c).abs().max().item())
    assert rep.mean_abs_error == pytest.approx((r - c).abs().mean().item())
    assert rep.top1_agreement == pytest.approx((r.argmax(-1) == c.argmax(-1)).double().mean().item())
    kl = torch.nn.functional.kl_div(torch.log_softmax(c, -1), torch.log_softmax(r, -1), log_target=True,
                                    reduction="batchmean").item()
    assert rep.kl_div == pytest.approx(kl, rel=1e-6)
    assert rep.relative_error == pytest.approx(((r - c).norm() / r.norm()).item())


def test_per_layer_errors_use_the_reference_inputs(int8_cls):
    ref = mlp()
    cand = pycompress.quantize(copy.deepcopy(ref))
    x = torch.randn(16, 32)
    rep = pycompress.validate(ref, cand, x)
    assert rep.passed
    assert sorted(rep.layers) == ["0", "2", "4"]
    for name, err in rep.layers.items():
        assert err.reference_type == "Linear" and err.candidate_type == int8_cls.__name__
        assert err.calls == 1
        assert 0.999 < err.cosine <= 1.0 and 0 < err.relative_error < 0.05
    # the error of layer 4 is measured on the input the *reference* layer 4 saw
    seen = {}
    h = ref[4].register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        ref(x)
        h.remove()
        expected = ((cand[4](seen["x"]) - seen["y"]).double().norm() / seen["y"].double().norm()).item()
    assert rep.layers["4"].relative_error == pytest.approx(expected, rel=1e-9)
    assert rep.worst_layers(1)[0].relative_error == max(e.relative_error for e in rep.layers.values())


def test_tolerance_failures_are_explained(int8_cls):
    ref = mlp()
    cand = pycompress.quantize(copy.deepcopy(ref))
    x = torch.randn(16, 32)
    rep = pycompress.validate(ref, cand, x, tolerance={"max_abs_error": 0.0, "layer_cosine": 0.5})
    assert not rep.passed
    assert len(rep.failures) == 1 and "max_abs_error" in rep.failures[0]
    assert "FAILED" in repr(rep) and "max_abs_error" in repr(rep)
    assert pycompress.validate(ref, cand, x, tolerance=0.9).passed
    strict = pycompress.validate(ref, cand, x, tolerance={"layer_cosine": 1.0 + 1e-9})
    assert not strict.passed and "layer_cosine" in strict.failures[0]


def test_report_serializations(int8_cls):
    ref = mlp()
    rep = pycompress.validate(ref, pycompress.quantize(copy.deepcopy(ref)), torch.randn(8, 32))
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["passed"] is True and set(d["layers"]) == {"0", "2", "4"}
    md = rep.to_markdown()
    assert md.startswith("**Validation PASSED**")
    assert "| cosine |" in md and "| 0 | Linear → " in md
    assert "PASSED" in repr(rep) and "worst_layer=" in repr(rep)


def test_dict_batches_and_dict_outputs():
    ref = KwargsNet()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.out.weight.mul_(1.01)
    batch = {"x": torch.randn(6, 16), "scale": torch.tensor(2.0)}
    rep = pycompress.validate(ref, cand, [batch, (torch.randn(3, 16),)])
    assert rep.output == "logits" and rep.logits and rep.rows == 9
    assert 0.99 < rep.cosine < 1.0


def test_hidden_state_outputs_have_no_logits_metrics():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return {"last_hidden_state": self.fc(x)}

    ref = Enc()
    rep = pycompress.validate(ref, copy.deepcopy(ref), torch.randn(2, 4, 8))
    assert rep.output == "last_hidden_state" and not rep.logits
    assert rep.top1_agreement is None and rep.kl_div is None and rep.rows == 8
    rep = pycompress.validate(ref, copy.deepcopy(ref), torch.randn(2, 4, 8), tolerance={"top1_agreement": 0.9})
    assert not rep.passed and "not logits" in rep.failures[0]


def test_nan_outputs_fail():
    ref = mlp()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand[4].bias[0] = float("nan")
    rep = pycompress.validate(ref, cand, torch.randn(4, 32))
    assert not rep.passed and any("NaN" in f for f in rep.failures)
    assert math.isnan(rep.cosine)


def test_training_flags_restored():
    ref, cand = mlp().train(), mlp(seed=1).eval()
    pycompress.validate(ref, cand, torch.randn(4, 32), tolerance=-1.0)
    assert ref.training and not cand.training


def test_wrong_input_shape_names_the_shapes():
    ref = mlp()
    with pytest.raises(ValueError, match=r"reference model .*batch 0.*Tensor\(4, 7\)"):
        pycompress.validate(ref, copy.deepcopy(ref), torch.randn(4, 7))


def test_output_shape_mismatch():
    with pytest.raises(ValueError, match=r"candidate output .* shape \(4, 3\) but the reference's has \(4, 10\)"):
        pycompress.validate(mlp(), mlp(d_out=3), torch.randn(4, 32))


@pytest.mark.parametrize(
    "tolerance, exc, match",
    [({"cosin": 0.9}, ValueError, "unknown key 'cosin'"), ("high", TypeError, "tolerance must be"),
     ({"cosine": "x"}, ValueError, "must be a number"), (True, TypeError, "tolerance must be")],
)
def test_bad_tolerance(tolerance, exc, match):
    ref = mlp()
    with pytest.raises(exc, match=match):
        pycompress.validate(ref, copy.deepcopy(ref), torch.randn(2, 32), tolerance=tolerance)


def test_bad_arguments():
    ref = mlp()
    with pytest.raises(ValueError, match="same module object"):
        pycompress.validate(ref, ref, torch.randn(2, 32))
    with pytest.raises(ValueError, match="no batch"):
        pycompress.validate(ref, copy.deepcopy(ref), [])
    with pytest.raises(TypeError, match="iterable of batches"):
        pycompress.validate(ref, copy.deepcopy(ref), 3)
    with pytest.raises(TypeError, match="a batch must be"):
        pycompress.validate(ref, copy.deepcopy(ref), [3.0])
    with pytest.raises(TypeError, match="candidate must be"):
        pycompress.validate(ref, "model", torch.randn(2, 32))


def test_compacted_layers_are_skipped_with_a_reason(int8_cls):
    ref = mlp()
    x = torch.randn(16, 32)
    masked = pycompress.prune(copy.deepcopy(ref), 0.5, pattern="channel", scope="layer", exclude="4")
    small = pycompress.compact(copy.deepcopy(masked))
    assert small[0].out_features == 32 and small[2].in_features == 32 and small[4].in_features == 32
    # against the masked model (same outputs): every layer changed width, none is compared
    rep = pycompress.validate(masked, small, x)  # layers=True is the default
    assert rep.passed, rep
    assert rep.layers == {} and sorted(rep.skipped) == ["0", "2", "4"]
    assert "out_features 64 -> 32" in rep.skipped["0"] and "in_features 64 -> 32" in rep.skipped["2"]
    assert "in_features 64 -> 32" in rep.skipped["4"] and "out_features" not in rep.skipped["4"]
    # against the dense original: same layer types, different widths, still skipped
    rep = pycompress.validate(ref, small, x, tolerance=0.0)
    assert sorted(rep.skipped) == ["0", "2", "4"] and rep.layers == {} and rep.passed
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert set(d["skipped"]) == {"0", "2", "4"}
    assert "Layers not compared:" in rep.to_markdown() and "skipped=3" in repr(rep)
    # layers of unchanged width are still compared: quantize the compacted model
    q = pycompress.quantize(copy.deepcopy(small))
    rep = pycompress.validate(small, q, x)
    assert sorted(rep.layers) == ["0", "2", "4"] and rep.skipped == {}
    # a layer tolerance never fails because of the skipped layers; the compared ones count
    partly = copy.deepcopy(masked)
    pycompress.compact(partly, include="0")  # 0 shrinks, 2 loses input columns; 4 stays
    partly[4] = pycompress.quantize(nn.Sequential(partly[4]))[0]
    rep = pycompress.validate(masked, partly, x, tolerance={"cosine": 0.99, "layer_cosine": 0.99})
    assert rep.passed, rep
    assert sorted(rep.skipped) == ["0", "2"] and sorted(rep.layers) == ["4"] and rep.layers["4"].calls == 1


def test_nan_inputs_are_refused_with_the_nan_named(int8_cls):
    ref = mlp()
    cand = pycompress.quantize(copy.deepcopy(ref))
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"batch 1.*1 NaN value.*input"):
        pycompress.validate(ref, cand, [torch.randn(4, 32), x])
    with pytest.raises(ValueError, match=r"batch 0.*128 NaN values"):
        pycompress.validate(ref, cand, {"x": torch.full((4, 32), float("nan"))})


class _LogOf(nn.Module):
    """Finite inputs, NaN outputs for some rows (log of a negative number)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return torch.log(self.fc(x))


def test_non_finite_reference_outputs_are_never_a_perfect_agreement():
    torch.manual_seed(0)
    ref = _LogOf()
    x = torch.randn(16, 8)
    assert torch.isnan(ref(x)).any()
    rep = pycompress.validate(ref, copy.deepcopy(ref), x, tolerance={"top1_agreement": 0.5})
    assert not rep.passed
    assert any("reference output holds" in f and "NaN" in f for f in rep.failures), rep.failures
    for k in ("cosine", "min_cosine", "max_abs_error", "top1_agreement", "kl_div", "relative_error"):
        assert math.isnan(rep.metrics[k]), (k, rep.metrics[k])
    assert rep.reference_nonfinite > 0 and rep.to_dict()["reference_nonfinite"] == rep.reference_nonfinite


def test_nan_candidate_rows_count_as_disagreement():
    ref = mlp()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand[4].weight[:, 0] = float("nan")
    rep = pycompress.validate(ref, cand, torch.randn(6, 32), tolerance=-1.0)  # every row is NaN
    assert rep.top1_agreement == 0.0 and math.isnan(rep.max_abs_error) and not rep.passed


def test_zero_row_batch_says_there_is_nothing_to_compare(int8_cls):
    ref = mlp()
    cand = pycompress.quantize(copy.deepcopy(ref))
    with pytest.raises(ValueError, match=r"batch 0 has 0 rows: nothing to compare"):
        pycompress.validate(ref, cand, torch.randn(0, 32))
    with pytest.raises(ValueError, match=r"batch 1 has 0 rows: nothing to compare"):
        pycompress.validate(ref, cand, [torch.randn(2, 32), torch.randn(0, 32)])
