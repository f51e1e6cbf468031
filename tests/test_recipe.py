"""pycompress.compress and recipe parsing: steps, files, bad recipes, accuracy-aware fallback."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import pycompress
from pycompress.recipe import CompressionReport, load_recipe
from _pylayer_models import int8_cls, mlp, teacher_dataset  # noqa: F401


def test_load_recipe_forms(tmp_path):
    steps = [{"quantize": {"mode": "w8a16", "exclude": "head"}}]
    expected = [("quantize", {"mode": "w8a16", "exclude": "head"})]
    assert load_recipe({"steps": steps}) == expected
    assert load_recipe(steps) == expected
    assert load_recipe(["quantize"]) == [("quantize", {})]
    (tmp_path / "r.json").write_text(json.dumps({"name": "int8", "steps": steps}))
    assert load_recipe(tmp_path / "r.json") == expected
    (tmp_path / "r.yaml").write_text("steps:\n  - quantize:\n      mode: w8a16\n      exclude: head\n")
    assert load_recipe(str(tmp_path / "r.yaml")) == expected


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"steps": [{"distill": {}}]}, "unknown step 'distill'; known steps: prune, quantize, deploy, compact"),
        ({"steps": [{"quantize": {"modee": "w8a8"}}]}, "unknown argument 'modee'; allowed: mode, include, exclude, act_bits"),
        ({"steps": [{"quantize": {}, "prune": {}}]}, "exactly one step name"),
        ({"steps": [{"quantize": {"exclude": "re:(x"}}]}, "invalid regular expression"),
        ({"steps": [{"quantize": ["w8a8"]}]}, "arguments must be a mapping"),
        ({"steps": []}, "no steps"),
        ({"steps": "quantize"}, "steps must be a list"),
        ({"stages": []}, "unknown top-level key"),
        ({"name": "x"}, "no 'steps' list"),
    ],
)
def test_bad_recipes(int8_cls, recipe, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(recipe)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        pycompress.compress(model, recipe, torch.randn(4, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_pattern_matching_nothing_is_refused_before_any_step(int8_cls):
    model = mlp()
    recipe = [{"quantize": {"include": "0"}}, {"quantize": {"exclude": "classifier"}}]
    with pytest.raises(ValueError, match=r"recipe step 1 \(quantize\): exclude pattern 'classifier' matches no module"):
        pycompress.compress(model, recipe, torch.randn(4, 32))
    assert type(model[0]) is nn.Linear  # step 0 did not run


@pytest.mark.skipif(not hasattr(pycompress, "deploy_pruned"), reason="this build has no pycompress.deploy_pruned")
def test_regex_patterns_only_in_quantize_steps():
    with pytest.raises(ValueError, match="understood by quantize steps only"):
        load_recipe([{"deploy": {"include": "re:.*"}}])
    assert load_recipe([{"deploy": {"mode": "dense", "include": "*"}}]) == [("deploy", {"mode": "dense", "include": "*"})]


def test_bad_recipe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "r.toml").write_text("x = 1")
    with pytest.raises(ValueError, match="unknown extension"):
        load_recipe(tmp_path / "r.toml")
    (tmp_path / "r.yaml").write_text("steps: [quantize: {mode: w8a8\n")
    with pytest.raises(ValueError, match="could not be parsed"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.json").write_text("{steps: ")
    with pytest.raises(ValueError, match="could not be parsed"):
        load_recipe(tmp_path / "r.json")


def test_compress_quantize_step_reports(int8_cls, tmp_path):
    model = mlp()
    ref = copy.deepcopy(model)
    (tmp_path / "r.yaml").write_text("steps:\n  - quantize: {mode: w8a8, exclude: '4'}\n")
    out, rep = pycompress.compress(model, tmp_path / "r.yaml", [torch.randn(8, 32) for _ in range(3)])
    assert out is model and isinstance(rep, CompressionReport)
    assert rep.compressed_layers == {"0": int8_cls.__name__, "2": int8_cls.__name__}
    assert rep.steps[0]["step"] == "quantize" and rep.steps[0]["changed"] == ["0", "2"]
    assert rep.metric_name is None and rep.reverted == [] and rep.within_budget is None
    assert rep.validation.passed and sorted(rep.validation.layers) == ["0", "2"]
    json.dumps(rep.to_dict())
    assert "| quantize |" in rep.to_markdown()
    assert "compressed_layers=2" in repr(rep)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x).flatten(), ref(x).flatten(), 0) > 0.99


def _outlier_mlp() -> nn.Module:
    """Layer '2' sees one huge activation channel that barely matters in float: per-token int8
    quantization of its input rounds every other channel to zero, so quantizing '2' destroys
    the accuracy while quantizing '0' and '4' costs almost nothing."""
    model = mlp(d_in=32, hidden=64, d_out=10, seed=3)
    with torch.no_grad():
        model[0].weight[0].mul_(1000.0)
        model[0].bias[0] = 1000.0
        model[2].weight[:, 0] = 1e-6
    return model


def test_max_drop_reverts_the_most_sensitive_layer(int8_cls):
    model = _outlier_mlp()
    data = teacher_dataset(_outlier_mlp(), n_batches=4, batch=64)
    recipe = {"steps": [{"quantize": {"mode": "w8a8"}}]}
    unconstrained, rep0 = pycompress.compress(_outlier_mlp(), recipe, data, metric="accuracy")
    assert rep0.baseline_metric == 1.0 and rep0.compressed_metric < 0.7  # the recipe alone hurts
    model, rep = pycompress.compress(model, recipe, data, metric="accuracy", max_drop=0.02)
    assert rep.baseline_metric == 1.0
    assert rep.compressed_metric == rep0.compressed_metric
    assert [r["layer"] for r in rep.reverted] == ["2"]
    assert set(rep.sensitivity) == {"0", "2", "4"}
    assert max(rep.sensitivity, key=rep.sensitivity.get) == "2"
    assert rep.reverted[0]["sensitivity"] == rep.sensitivity["2"] > 10 * max(rep.sensitivity["0"], rep.sensitivity["4"])
    assert rep.within_budget and rep.final_metric >= 0.98
    assert type(model[2]) is nn.Linear and torch.equal(model[2].weight, _outlier_mlp()[2].weight)
    assert isinstance(model[0], int8_cls) and isinstance(model[4], int8_cls)
    assert rep.compressed_layers == {"0": int8_cls.__name__, "4": int8_cls.__name__}
    md = rep.to_markdown()
    assert "| 2 |" in md and "met" in md


def test_max_drop_with_a_model_metric_and_lower_is_better(int8_cls):
    x = torch.randn(64, 32)
    ref_model = _outlier_mlp()
    with torch.no_grad():
        target = ref_model(x)

    def neg_mse(m):
        with torch.no_grad():
            return -torch.nn.functional.mse_loss(m(x), target).item()

    model, rep = pycompress.compress(_outlier_mlp(), [{"quantize": {}}], x, metric=neg_mse, max_drop=1e-3)
    assert rep.metric_name == "neg_mse" and rep.within_budget
    assert "2" in [r["layer"] for r in rep.reverted]

    data = teacher_dataset(_outlier_mlp(), n_batches=2, batch=64)
    model, rep = pycompress.compress(_outlier_mlp(), [{"quantize": {}}], data, metric="cross_entropy", max_drop=0.05)
    assert not rep.higher_is_better and rep.within_budget
    assert rep.final_metric <= rep.baseline_metric + 0.05


def test_max_drop_arguments(int8_cls):
    with pytest.raises(ValueError, match="max_drop needs a metric"):
        pycompress.compress(mlp(), [{"quantize": {}}], torch.randn(4, 32), max_drop=0.01)
    with pytest.raises(ValueError, match="max_drop must be"):
        pycompress.compress(mlp(), [{"quantize": {}}], torch.randn(4, 32), metric="accuracy", max_drop=-1)
    with pytest.raises(ValueError, match="no batch"):
        pycompress.compress(mlp(), [{"quantize": {}}], [])
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        pycompress.compress(mlp(), [{"quantize": {}}], [torch.randn(4, 32)], metric="accuracy")
    with pytest.raises(ValueError, match=r"Tensor\(4, 3\)"):
        pycompress.compress(mlp(), [{"quantize": {}}], torch.randn(4, 3))


def test_prune_then_quantize_recipe(int8_cls):
    if not hasattr(pycompress, "prune"):
        pytest.skip("this build has no pycompress.prune")
    model = mlp()
    data = teacher_dataset(mlp(), n_batches=2, batch=64)
    recipe = {"steps": [{"prune": {"sparsity": 0.5, "pattern": "2:4", "exclude": "4"}},
                        {"quantize": {"mode": "w8a8"}}]}
    model, rep = pycompress.compress(model, recipe, data, metric="accuracy")
    assert [s["step"] for s in rep.steps] == ["prune", "quantize"]
    assert rep.steps[0]["changed"] == ["0", "2"]
    assert rep.steps[1]["changed"] == ["0", "2", "4"]
    w = model[0].weight.reshape(model[0].out_features, -1, 4)
    assert torch.all((w != 0).sum(-1) <= 2)  # the 2:4 pattern survives quantization


def test_prune_fallback_reverts_until_within_budget(int8_cls):
    if not hasattr(pycompress, "prune"):
        pytest.skip("this build has no pycompress.prune")
    data = teacher_dataset(mlp(), n_batches=4, batch=64)
    recipe = [{"prune": {"sparsity": 0.9, "scope": "layer"}}, {"quantize": {"mode": "w8a8"}}]
    _, plain = pycompress.compress(mlp(), recipe, data, metric="accuracy")
    assert plain.compressed_metric < 0.9  # 90% sparsity without fine-tuning costs accuracy
    model, rep = pycompress.compress(mlp(), recipe, data, metric="accuracy", max_drop=0.1)
    assert rep.compressed_metric == plain.compressed_metric
    assert rep.reverted and rep.within_budget and rep.final_metric >= 0.9
    reverted = [r["layer"] for r in rep.reverted]
    assert set(reverted) | set(rep.compressed_layers) == {"0", "2", "4"}
    for name in reverted:
        assert type(model.get_submodule(name)) is nn.Linear
    for name in rep.compressed_layers:
        assert isinstance(model.get_submodule(name), int8_cls)
    sens = [r["sensitivity"] for r in rep.reverted]
    assert sens == sorted(sens, reverse=True)  # most sensitive first


def test_prune_step_with_a_data_method_uses_the_calibration_inputs():
    data = teacher_dataset(mlp(), n_batches=2, batch=32)
    inputs = [x for x, _ in data]
    for method, extra in (("activation", {}), ("mixed", {"mix": 0.25}),
                          ("activation", {"activation_score": "std_weighted"})):
        recipe = [{"prune": {"sparsity": 0.5, "pattern": "channel", "method": method, "exclude": "4", **extra}}]
        model, rep = pycompress.compress(mlp(), recipe, data, metric="accuracy")  # (inputs, labels) pairs
        direct = pycompress.prune(mlp(), 0.5, pattern="channel", method=method, exclude="4",
                                  calibration_data=inputs, **extra)
        for name in ("0", "2"):
            assert torch.equal(model.get_submodule(name).mask, direct.get_submodule(name).mask)
        # magnitude would have chosen other neurons: the data was used
        mag = pycompress.prune(mlp(), 0.5, pattern="channel", exclude="4")
        assert not torch.equal(model[0].mask, mag[0].mask)
        assert rep.steps[0]["arguments"] == recipe[0]["prune"]  # the data is not copied into the report
        json.dumps(rep.to_dict(), allow_nan=False)


def test_data_method_without_calibration_inputs_is_a_clear_error():
    recipe = [{"prune": {"sparsity": 0.5, "pattern": "channel", "method": "activation"}}]
    for calib in (None, []):
        model = mlp()
        with pytest.raises(ValueError, match=r"recipe step 0 \(prune\): method='activation' .*needs calibration_inputs"):
            pycompress.compress(model, recipe, calib)
        assert type(model[0]) is nn.Linear  # untouched
    with pytest.raises(ValueError, match="'calibration_data' cannot be given in a recipe"):
        load_recipe([{"prune": {"sparsity": 0.5, "method": "activation", "calibration_data": [1.0]}}])
    with pytest.raises(ValueError, match="'example_inputs' cannot be given in a recipe"):
        load_recipe([{"compact": {"example_inputs": [1.0]}}])


def test_compact_step_after_channel_pruning(int8_cls):
    data = teacher_dataset(mlp(), n_batches=2, batch=32)
    inputs = [x for x, _ in data]
    recipe = {"steps": [{"prune": {"sparsity": 0.5, "pattern": "channel", "method": "activation", "exclude": "4"}},
                        "compact", {"quantize": {"mode": "w8a8", "include": "4"}}]}
    masked = pycompress.prune(mlp(), 0.5, pattern="channel", method="activation", exclude="4",
                              calibration_data=inputs)
    model, rep = pycompress.compress(mlp(), recipe, data, metric="accuracy")
    assert [s["step"] for s in rep.steps] == ["prune", "compact", "quantize"]
    assert rep.steps[1]["changed"] == ["0", "2", "4"] and rep.steps[1]["skipped"] == {}
    assert rep.steps[1]["arguments"] == {}
    assert model[0].out_features == masked[0].out_features - int((~masked[0].mask.any(1)).sum())
    assert model[2].in_features == model[0].out_features and model[4].in_features == model[2].out_features
    assert type(model[0]) is nn.Linear and isinstance(model[4], int8_cls)
    assert sorted(rep.compressed_layers) == ["0", "2", "4"]
    assert rep.validation is not None and set(rep.validation.skipped) == {"0", "2", "4"}
    # the compacted layers cannot be put back one at a time: the fallback says so
    model, rep = pycompress.compress(mlp(), recipe, data, metric="accuracy", max_drop=0.0)
    assert rep.compressed_metric < 1.0 and not rep.within_budget  # 50% of the neurons, no fine-tune
    assert rep.reverted == [] and any("cannot be reverted" in n for n in rep.notes)
    assert "cannot be reverted" in rep.to_markdown()
    with torch.no_grad():
        assert model(inputs[0]).shape == (32, 10)
    # compact arguments (include / exclude, atol) are passed on; refusals are reported
    recipe = [{"prune": {"sparsity": 0.5, "pattern": "channel", "scope": "layer"}}, {"compact": {"atol": 1e-4}}]
    model, rep = pycompress.compress(mlp(), recipe, inputs)
    assert "4" in rep.steps[1]["skipped"]  # the last layer feeds the model output
    assert model[4].out_features == 10
