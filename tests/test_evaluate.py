"""pycompress.evaluate / compare: metric, counts, size, latency, tables and plots."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import pycompress
from pycompress.evaluation.evaluate import count_parameters
from _pylayer_models import int8_cls, mlp, teacher_dataset  # noqa: F401


def _dir_size(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def test_evaluate_reports_everything(tmp_path):
    model = mlp()
    data = teacher_dataset(model)
    rep = pycompress.evaluate(model, data, batch_sizes=(1, 8, 300), warmup=1, repeats=4, name="fp32")
    assert rep.name == "fp32" and rep.metric_name == "accuracy" and rep.metric == 1.0
    assert rep.samples == 256
    n = sum(p.numel() for p in model.parameters())
    assert rep.parameters == n and rep.nonzeros == n and rep.sparsity == 0.0
    pycompress.save(model, tmp_path / "m")
    assert rep.size_bytes == _dir_size(tmp_path / "m")
    assert set(rep.latency) == {1, 8, 300}  # 300 > 256 rows: rows are repeated
    for bs, lat in rep.latency.items():
        assert 0 < lat["p50_ms"] <= lat["p95_ms"]
        assert lat["throughput"] == pytest.approx(bs / (lat["mean_ms"] / 1e3))
    assert rep.compression_ratio is None and rep.metric_delta is None
    json.dumps(rep.to_dict())
    assert "fp32" in repr(rep) and "accuracy=1.0000" in repr(rep)


def test_accuracy_is_computed_per_sample():
    model = mlp()
    data = teacher_dataset(model, n_batches=3, batch=10)
    x, y = data[1]
    y = y.clone()
    y[:4] = (y[:4] + 1) % 10  # 4 wrong labels out of 30
    data[1] = (x, y)
    rep = pycompress.evaluate(model, data, batch_sizes=(), name="m")
    assert rep.metric == pytest.approx(26 / 30)
    assert rep.latency == {}


def test_lower_is_better_and_custom_metrics():
    model = mlp()
    data = teacher_dataset(model, n_batches=2, batch=16)
    ce = pycompress.evaluate(model, data, metric="cross_entropy", batch_sizes=())
    expected = sum(torch.nn.functional.cross_entropy(model(x), y).item() * len(y) for x, y in data) / 32
    assert ce.metric == pytest.approx(expected, rel=1e-5) and not ce.higher_is_better

    def top2(outputs, targets):
        return (outputs.topk(2, -1).indices == targets[:, None]).any(-1).float().mean().item()

    rep = pycompress.evaluate(model, data, metric=top2, batch_sizes=())
    assert rep.metric_name == "top2" and rep.metric == 1.0


def test_counts_of_sparse_and_quantized_models(int8_cls):
    model = mlp()
    with torch.no_grad():
        model[2].weight[:, :32] = 0
    params, nonzeros = count_parameters(model)
    assert params == sum(p.numel() for p in model.parameters())
    assert nonzeros == params - 64 * 32
    q = pycompress.quantize(mlp())
    qp, qnz = count_parameters(q)
    assert qp == params  # an int8 layer counts as its float equivalent
    dense = sum(int(torch.count_nonzero(q.get_submodule(n).to_float().weight)) +
                int(torch.count_nonzero(q.get_submodule(n).to_float().bias)) for n in ("0", "2", "4"))
    assert qnz == dense


def test_reference_gives_ratio_speedup_and_delta(int8_cls, tmp_path):
    model = mlp(d_in=256, hidden=256)
    data = teacher_dataset(model, n_batches=2, batch=32, d_in=256)
    base = pycompress.evaluate(model, data, batch_sizes=(1, 32), repeats=3, name="fp32")
    q = pycompress.quantize(mlp(d_in=256, hidden=256))
    rep = pycompress.evaluate(q, data, batch_sizes=(1, 32), repeats=3, reference=base, name="int8")
    assert rep.compression_ratio == pytest.approx(base.size_bytes / rep.size_bytes)
    assert 3.0 < rep.compression_ratio < 4.0  # int8 weights + fp32 scales vs fp32 weights
    assert set(rep.speedup) == {1, 32}
    assert rep.speedup[1] == pytest.approx(base.latency[1]["p50_ms"] / rep.latency[1]["p50_ms"])
    assert rep.metric_delta == pytest.approx(rep.metric - 1.0)
    assert rep.metric > 0.8

    md = pycompress.compare([base, rep], out_dir=tmp_path / "plots")
    lines = md.splitlines()
    assert lines[0].startswith("| model | accuracy | params | sparsity | size | ratio | bs1 p50 ms")
    assert lines[2].startswith("| fp32 | 1.0000 |") and lines[3].startswith("| int8 |")
    assert f"{rep.compression_ratio:.2f}x" in lines[3]
    png = tmp_path / "plots" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "compare.png" in md
    assert rep.to_markdown().splitlines()[2].startswith("| int8 |")


def test_no_metric_with_plain_batches_and_kwargs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, shift=0.0):
            return self.fc(x) + shift

    rep = pycompress.evaluate(Net(), [{"x": torch.randn(3, 4), "shift": 1.0}], metric=None,
                              batch_sizes=(1, 5), repeats=2)
    assert rep.metric is None and set(rep.latency) == {1, 5}
    assert pycompress.evaluate(Net(), torch.randn(2, 4), metric=None, batch_sizes=(2,), repeats=2).samples == 2


def test_training_flag_restored():
    model = mlp().train()
    pycompress.evaluate(model, teacher_dataset(mlp(), n_batches=1, batch=4), batch_sizes=(1,), repeats=1)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"metric": "f1"}, ValueError, "unknown metric 'f1'"),
        ({"metric": 3}, TypeError, "metric must be"),
        ({"batch_sizes": (0,)}, ValueError, "batch_sizes"),
        ({"batch_sizes": "32"}, ValueError, "batch_sizes"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"reference": {"size_bytes": 1}}, TypeError, "reference must be"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = mlp()
    with pytest.raises(exc, match=match):
        pycompress.evaluate(model, teacher_dataset(model, n_batches=1, batch=4), **kwargs)


def test_bad_data():
    model = mlp()
    with pytest.raises(ValueError, match="no batch"):
        pycompress.evaluate(model, [])
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        pycompress.evaluate(model, [torch.randn(4, 32)])
    with pytest.raises(ValueError, match=r"failed on batch 0 with inputs Tensor\(4, 5\)"):
        pycompress.evaluate(model, [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(ValueError, match="targets"):
        pycompress.evaluate(model, [(torch.randn(4, 32), torch.zeros(3, dtype=torch.long))])


def test_compare_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        pycompress.compare([])
    with pytest.raises(TypeError, match="EvaluationReport"):
        pycompress.compare([{"name": "x"}])


def test_compare_without_common_batch_sizes(tmp_path):
    model = mlp()
    data = teacher_dataset(model, n_batches=1, batch=4)
    a = pycompress.evaluate(model, data, batch_sizes=(1,), repeats=1, name="a")
    b = pycompress.evaluate(model, data, batch_sizes=(2,), repeats=1, name="b")
    md = pycompress.compare([a, b], out_dir=tmp_path)
    assert "p50" not in md.splitlines()[0]
    assert (tmp_path / "compare.png").exists()
    shutil.rmtree(tmp_path)


def test_progress_bars_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    from pycompress import _utils

    items = [1, 2, 3]
    assert _utils.progress_bar(items, "x", progress=False) is items
    assert _utils.progress_bar(items, "x", progress=None) is items  # pytest's stderr is no terminal
    monkeypatch.setattr(_utils.sys.stderr, "isatty", lambda: True, raising=False)
    assert _utils.progress_enabled(None)
    monkeypatch.setenv("PYCOMPRESS_PROGRESS", "0")
    assert not _utils.progress_enabled(None)
    monkeypatch.undo()

    model = mlp()
    data = teacher_dataset(model, n_batches=2, batch=4)
    capsys.readouterr()
    pycompress.validate(model, mlp(seed=1), [x for x, _ in data], tolerance=-1.0)
    assert capsys.readouterr().err == ""
    pycompress.validate(model, mlp(seed=1), [x for x, _ in data], tolerance=-1.0, progress=True)
    assert "validate" in capsys.readouterr().err
    pycompress.evaluate(model, data, batch_sizes=(), progress=True)
    assert "metric" in capsys.readouterr().err


def test_batches_of_any_size_are_built_from_the_data():
    from pycompress import _utils

    a = {"x": torch.arange(6).reshape(3, 2), "flag": True}
    b = {"x": torch.arange(6, 10).reshape(2, 2), "flag": True}
    out = _utils.make_batch_of_size([a, b], 7)
    assert out["flag"] is True
    assert out["x"][:, 0].tolist() == [0, 2, 4, 6, 8, 0, 2]
    t = _utils.make_batch_of_size([(torch.ones(2, 3), torch.zeros(2))], 1)
    assert t[0].shape == (1, 3) and t[1].shape == (1,)


@pytest.mark.skipif(not hasattr(pycompress, "prune"), reason="this build has no pycompress.prune")
def test_pruned_model_counts_and_size():
    model = mlp(d_in=128, hidden=256)
    data = teacher_dataset(model, n_batches=1, batch=16, d_in=128)
    base = pycompress.evaluate(model, data, batch_sizes=(), name="fp32")
    pycompress.prune(model, 0.9, scope="layer")
    masked = pycompress.evaluate(model, data, batch_sizes=(), reference=base, name="masked")
    assert masked.parameters == base.parameters
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "mask"))
    assert masked.nonzeros <= base.nonzeros - int(0.9 * weights) + 3
    assert masked.sparsity > 0.85
    pycompress.deploy_pruned(model, mode="sparse")
    sparse = pycompress.evaluate(model, data, batch_sizes=(), reference=base, name="sparse")
    assert sparse.nonzeros == masked.nonzeros and sparse.parameters == base.parameters
    assert sparse.compression_ratio > 2  # CSR stores only the kept weights
    assert sparse.metric == masked.metric


def test_num_threads_is_applied_and_restored():
    model = mlp()
    before = torch.get_num_threads()
    rep = pycompress.evaluate(model, teacher_dataset(model, n_batches=1, batch=4), batch_sizes=(2,), repeats=1,
                              num_threads=1)
    assert rep.threads == 1 and torch.get_num_threads() == before
