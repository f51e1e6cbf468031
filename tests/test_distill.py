"""pycompress.distill: fused KD loss, frozen teacher, learning, determinism, pruning, checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import pycompress
from pycompress.export import serialization


def _data(n=128, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def _mlp(h, seed, dropout=0.0, d=10, classes=4):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(h, classes))


@pytest.fixture(scope="module")
def teacher():
    t = _mlp(64, seed=1, dropout=0.1)
    t, _ = pycompress.finetune(t, _data(), freeze=None, epochs=8, lr=1e-2, batch_size=32,
                               progress=False)
    return t


def _equal(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_loss_decreases_and_student_learns(teacher):
    student, hist = pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=6, lr=1e-2,
                                       batch_size=32, progress=False)
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]
    assert not student.training
    assert set(hist[0]) >= {"epoch", "loss", "accuracy", "samples", "seconds"}


def test_teacher_in_eval_without_grad_and_restored(teacher):
    teacher.train()
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append((m.training, o.requires_grad)))
    pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=1, batch_size=64,
                       progress=False)
    assert modes and all(m == (False, False) for m in modes)
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # the caller's mode is restored
    teacher.eval()


def test_uses_fused_kd_loss(teacher, monkeypatch):
    calls = []
    original = pycompress.nn.KDLoss.forward

    def spy(self, s, t, labels=None):
        calls.append((self.temperature, self.alpha, labels is None))
        return original(self, s, t, labels)

    monkeypatch.setattr(pycompress.nn.KDLoss, "forward", spy)
    pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=1, batch_size=64,
                       temperature=2.0, alpha=0.7, progress=False)
    assert calls == [(2.0, 0.7, False)] * 2
    calls.clear()
    pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=1, batch_size=64, alpha=1.0,
                       progress=False)
    assert calls == [(4.0, 1.0, True)] * 2  # alpha=1: pure distillation, labels unused


def test_deterministic_with_seed(teacher):
    kw = dict(epochs=2, batch_size=16, seed=3, lr=1e-2, progress=False)
    a, ha = pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(), **kw)
    torch.manual_seed(777)
    b, hb = pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(), **kw)
    assert _equal(a, b) and [h["loss"] for h in ha] == [h["loss"] for h in hb]
    c, _ = pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(),
                              **{**kw, "seed": 4})
    assert not _equal(a, c)


def test_unlabelled_samples_with_alpha_one(teacher):
    x, _ = _data().tensors
    unlabelled = TensorDataset(x, torch.full((len(x),), -100))
    student, hist = pycompress.distill(teacher, _mlp(16, seed=2), unlabelled, epochs=3, alpha=1.0,
                                       lr=1e-2, batch_size=32, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["accuracy"] != hist[0]["accuracy"]  # NaN: no labelled sample to score


def test_pruning_schedule_during_distillation(teacher):
    student, hist = pycompress.distill(teacher, _mlp(32, seed=2), _data(), epochs=3,
                                       batch_size=32, lr=1e-2, progress=False,
                                       pruning_schedule={"final_sparsity": 0.8})
    assert hist[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    w = torch.cat([m.weight.detach().flatten() * m.mask.flatten()
                   for m in student.modules() if hasattr(m, "mask")])
    assert (w == 0).float().mean().item() == pytest.approx(0.8, abs=0.02)
    student2 = _mlp(32, seed=2)
    sched = pycompress.GradualPruning(student2, final_sparsity=0.5, total_steps=8)
    student2, hist2 = pycompress.distill(teacher, student2, _data(), epochs=2, batch_size=32,
                                         progress=False, pruning_schedule=sched)
    assert hist2[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(TypeError, match="pruning_schedule"):
        pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=1, pruning_schedule=3,
                           progress=False)


def test_bf16_teacher_and_precomputed_logits(teacher, tmp_path):
    kw = dict(epochs=2, batch_size=32, seed=0, lr=1e-2, progress=False)
    ref, _ = pycompress.distill(teacher, _mlp(16, seed=2), _data(), **kw)
    half = _mlp(64, seed=1, dropout=0.1)
    half.load_state_dict(teacher.state_dict())
    half = half.to(torch.bfloat16)
    s_bf16, hist = pycompress.distill(half, _mlp(16, seed=2), _data(), **kw)
    assert next(s_bf16.parameters()).dtype == torch.float32
    assert hist[-1]["loss"] == hist[-1]["loss"]  # finite
    path = pycompress.precompute_teacher_logits(teacher, _data(), tmp_path / "t.npy",
                                                dtype="float32")
    streamed = pycompress.TeacherLogitsDataset(_data(), path)
    assert len(streamed) == 128 and streamed[3][2].shape == (4,)
    s_pre, _ = pycompress.distill(None, _mlp(16, seed=2), streamed, **kw)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(s_pre.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="teacher_logits"):
        pycompress.distill(None, _mlp(16, seed=2), _data(), **kw)
    with pytest.raises(ValueError, match="rows of logits"):
        pycompress.TeacherLogitsDataset(_data(n=10), path)


def test_checkpoint_crash_keeps_previous_and_resume_matches(teacher, tmp_path, monkeypatch):
    kw = dict(epochs=3, batch_size=32, seed=5, lr=1e-2, progress=False)
    full, _ = pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(), **kw)
    real_save, calls = serialization.save, []

    def crashing_save(model, path):
        calls.append(path)
        if len(calls) == 2:
            real_save(model, path)
            raise OSError("disk full")
        return real_save(model, path)

    monkeypatch.setattr(serialization, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(), **kw,
                           checkpoint_dir=str(tmp_path))
    monkeypatch.undo()
    assert open(tmp_path / "latest").read().strip() == "epoch-0001"
    assert os.path.isfile(tmp_path / "epoch-0001" / "state.pt")
    resumed, hist = pycompress.distill(teacher, _mlp(16, seed=2, dropout=0.2), _data(), **kw,
                                       checkpoint_dir=str(tmp_path), resume=True)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert _equal(full, resumed)
    state = torch.load(tmp_path / "epoch-0003" / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and "optimizer" in state and "rng" in state


def test_progress_bar_silent_off_tty(teacher, capsys):
    pycompress.distill(teacher, _mlp(16, seed=2), _data(), epochs=1, batch_size=64,
                       progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_bad_arguments(teacher):
    s = _mlp(16, seed=2)
    with pytest.raises(ValueError, match="temperature"):
        pycompress.distill(teacher, s, _data(), temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        pycompress.distill(teacher, s, _data(), alpha=1.5)
    with pytest.raises(ValueError, match="different"):
        pycompress.distill(s, s, _data())
    with pytest.raises(TypeError, match="student"):
        pycompress.distill(teacher, "student", _data())
    with pytest.raises(TypeError, match="pairs"):
        pycompress.distill(teacher, s, TensorDataset(torch.randn(8, 10)), batch_size=4,
                           progress=False)
    with pytest.raises(ValueError, match="lr"):
        pycompress.distill(teacher, s, _data(), lr=-1, progress=False)


@pytest.mark.parametrize("bad", [4, 11, -3])
def test_labels_out_of_range_name_the_label_and_the_classes(teacher, bad):
    x, y = _data().tensors
    y = y.clone()
    y[9] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is out of range.*4 classes"):
        pycompress.distill(teacher, _mlp(16, seed=2), TensorDataset(x, y), epochs=1, alpha=0.5,
                           batch_size=32, shuffle=False, progress=False)
    # labels are not used with alpha=1: any value is accepted
    pycompress.distill(teacher, _mlp(16, seed=2), TensorDataset(x, y), epochs=1, alpha=1.0,
                       batch_size=32, progress=False)


def test_a_plain_list_of_pairs_is_accepted(teacher):
    x, y = _data().tensors
    pairs = [(x[i], y[i]) for i in range(len(x))]
    _, hist = pycompress.distill(teacher, _mlp(16, seed=2), pairs, epochs=2, lr=1e-2, batch_size=32,
                                 progress=False)
    _, ref = pycompress.distill(teacher, _mlp(16, seed=2), TensorDataset(x, y), epochs=2, lr=1e-2,
                                batch_size=32, progress=False)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref], rel=1e-5)
