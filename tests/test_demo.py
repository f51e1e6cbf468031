"""The end-to-end demo: one process in this test, and 2 gloo processes under torchrun."""

from __future__ import annotations

import json
import os

import pytest
import torch

import torchrun_util
from pycompress import demo

NAMES = ["transferred fp32", "int8 w8a8", "pruned 50%", "pruned 90%", "pruned 2:4",
         "student distilled", "student w/o teacher", "distilled+pruned+int8",
         "structured 50% activation mean_abs", "structured 50% activation mean_abs +ft",
         "structured 50% activation std_weighted", "structured 50% activation std_weighted +ft",
         "structured 50% magnitude", "structured 50% magnitude +ft",
         "structured 50% mixed", "structured 50% mixed +ft"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(str(out), seed=0, quick=True, progress=False, log=lambda _m: None)
    return str(out), report


def test_writes_the_three_files(quick_run):
    out, report = quick_run
    for name in ("report.md", "report.json", "compare.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "report.json")) as f:
        stored = json.load(f)
    assert [r["model"] for r in stored["rows"]] == NAMES
    md = open(os.path.join(out, "report.md")).read()
    for name in NAMES:
        assert f"| {name} |" in md
    assert stored["config"]["world_size"] == 1 and stored["config"]["quick"] is True


def test_rows_are_consistent_measurements(quick_run):
    _, report = quick_run
    rows = {r["model"]: r for r in report["rows"]}
    ref = rows["transferred fp32"]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["delta"] == pytest.approx(r["accuracy"] - ref["accuracy"])
        assert r["compression"] == pytest.approx(ref["bytes"] / r["bytes"])
        assert r["speedup_b1"] == pytest.approx(ref["latency_ms_b1"] / r["latency_ms_b1"])
        assert r["latency_ms_b1"] > 0 and r["latency_ms_batch"] > 0
        assert r["nonzeros"] <= r["parameters"]
    assert ref["delta"] == 0.0 and ref["compression"] == 1.0
    # the compressed variants really are compressed
    assert rows["int8 w8a8"]["bytes"] < 0.4 * ref["bytes"]
    assert rows["pruned 90%"]["nonzeros"] < 0.2 * ref["parameters"]
    assert rows["pruned 50%"]["nonzeros"] < 0.6 * ref["parameters"]
    assert rows["student distilled"]["parameters"] < 0.05 * ref["parameters"]
    assert rows["distilled+pruned+int8"]["bytes"] < rows["student distilled"]["bytes"]
    for method in ("activation mean_abs", "activation std_weighted", "magnitude", "mixed"):
        for suffix in ("", " +ft"):
            r = rows[f"structured 50% {method}{suffix}"]
            # compact really removed the neurons: fewer parameters, all of them non-zero dense weights
            assert r["parameters"] < 0.6 * ref["parameters"]
            assert r["nonzeros"] >= 0.95 * r["parameters"]


def test_compacted_rows_reload_into_the_original_architecture(quick_run):
    import pycompress

    out, report = quick_run
    row = next(r for r in report["rows"] if r["model"] == "structured 50% activation std_weighted +ft")
    folder = os.path.join(out, "models", "structured_50pct_activation_std_weighted__ft")
    meta = json.load(open(os.path.join(folder, "pycompress.json")))
    model = demo.build_model(meta["factory_kwargs"]["hidden"], meta["factory_kwargs"]["classes"])
    pycompress.load(os.path.join(folder, "model"), model)
    assert model.fc1.out_features < demo.TEACHER_HIDDEN[0]
    x, y = demo.target_test_data(0).tensors
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(row["accuracy"])


def test_acceptance_int8_close_and_distillation_beats_baseline(quick_run):
    _, report = quick_run
    rows = {r["model"]: r for r in report["rows"]}
    assert abs(rows["int8 w8a8"]["delta"]) <= 0.01
    assert rows["student distilled"]["accuracy"] > rows["student w/o teacher"]["accuracy"]
    assert rows["transferred fp32"]["accuracy"] > 0.8
    assert report["source_accuracy"] > 0.9


def test_saved_models_reload(quick_run):
    import pycompress

    out, report = quick_run
    folder = os.path.join(out, "models", "int8_w8a8")
    meta = json.load(open(os.path.join(folder, "pycompress.json")))
    model = demo.build_model(meta["factory_kwargs"]["hidden"], meta["factory_kwargs"]["classes"])
    pycompress.load(os.path.join(folder, "model"), model)
    x, y = demo.target_test_data(0).tensors
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(report["rows"][1]["accuracy"])


@pytest.mark.distributed
def test_torchrun_two_processes(quick_run, tmp_path):
    _, single = quick_run
    out = tmp_path / "ddp"
    res = torchrun_util.run(["-m", "pycompress", "demo", "--task", "digits-mlp", "--quick", "--no-progress",
                             "--out", str(out)], timeout=180)
    assert res.returncode == 0, res.stdout[-4000:]
    assert res.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    assert "destroy_process_group" not in res.stdout
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["config"]["world_size"] == 2
    ddp = {r["model"]: r for r in report["rows"]}
    one = {r["model"]: r for r in single["rows"]}
    assert abs(ddp["student distilled"]["accuracy"] - one["student distilled"]["accuracy"]) <= 0.01
    assert abs(ddp["transferred fp32"]["accuracy"] - one["transferred fp32"]["accuracy"]) <= 0.01
