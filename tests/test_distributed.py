"""Data-parallel finetune/distill on 2 gloo processes (torchrun) against one process."""

from __future__ import annotations

import os

import pytest
import torch

import dist_worker
import torchrun_util
from pycompress.distillation import distributed as pdist

pytestmark = pytest.mark.distributed

SCENARIOS = "equivalence,errors,pruning,resume,fsdp"


def _load(outdir, name, rank):
    return torch.load(os.path.join(outdir, f"{name}-rank{rank}.pt"), weights_only=True)


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in b:
        if b[k].is_floating_point():
            d = (a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12)
            worst = max(worst, d)
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch (2 gloo ranks) running every scenario of tests/dist_worker.py."""
    out = tmp_path_factory.mktemp("ddp")
    res = torchrun_util.run([os.path.join(torchrun_util.REPO, "tests", "dist_worker.py"),
                             SCENARIOS, str(out)], timeout=120)
    assert res.returncode == 0, res.stdout[-4000:]
    return str(out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The same scenarios in this process (no process group)."""
    out = tmp_path_factory.mktemp("single")
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for name in SCENARIOS.split(","):
        rec: dict = {"world_size": 1}
        dist_worker.SCENARIOS[name](rec, str(out / f"ckpt-{name}"))
        torch.save(rec, out / f"{name}-rank0.pt")
    return str(out)


def test_two_processes_equal_one_process(two_ranks, one_rank):
    r0, r1 = _load(two_ranks, "equivalence", 0), _load(two_ranks, "equivalence", 1)
    single = _load(one_rank, "equivalence", 0)
    assert r0["world_size"] == 2 and single["world_size"] == 1
    # distill, shuffle=False, last partial batch of 4; shuffle=True with a last batch of 3 (2/1
    # split); finetune with a 20-sample global batch
    for key in ("distill", "distill_shuffle", "finetune"):
        assert _max_rel(r0[key], single[key]) <= 1e-4, key
    torch.testing.assert_close(r0["distill_loss"], single["distill_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["finetune_acc"], single["finetune_acc"])


def test_identical_weights_on_every_rank_and_unwrapped(two_ranks):
    r0, r1 = _load(two_ranks, "equivalence", 0), _load(two_ranks, "equivalence", 1)
    for key in ("distill", "distill_shuffle", "finetune"):
        assert _max_rel(r1[key], r0[key]) == 0.0, key
    assert r0["is_ddp"] == 0
    assert r0["keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix
    # metrics are all-reduced: every rank reports the same global values
    torch.testing.assert_close(r0["distill_loss"], r1["distill_loss"], rtol=0, atol=0)


def test_bad_world_batch_combinations_rejected(two_ranks):
    for rank in (0, 1):
        errors = _load(two_ranks, "errors", rank)["errors"]
        assert "divisible by the number of processes (2)" in errors["odd_batch"]
        assert "fewer than the 2 processes" in errors["tiny_data"]
        # every rank stops at the same step (no rank left waiting in a collective)
        assert "out of range for a model with 4 classes (epoch 1, step 1)" in errors["bad_label"]
    assert _load(two_ranks, "errors", 1)["errors"]["bad_label"].startswith("label 9 is out of range")
    assert "on another rank" in _load(two_ranks, "errors", 0)["errors"]["bad_label"]


def test_pruning_masks_identical_across_ranks(two_ranks, one_rank):
    p0, p1 = _load(two_ranks, "pruning", 0), _load(two_ranks, "pruning", 1)
    single = _load(one_rank, "pruning", 0)
    assert len(p0["masks_seen"]) == len(p1["masks_seen"]) == 2 * 4 + 1  # every step + the end
    for m0, m1 in zip(p0["masks_seen"], p1["masks_seen"]):
        assert m0.numel() > 0 and torch.equal(m0, m1)
    assert float(p0["sparsity"][-1]) == pytest.approx(0.75, abs=0.02)
    assert _max_rel(p1["pruned"], p0["pruned"]) == 0.0
    assert _max_rel(p0["pruned"], single["pruned"]) <= 1e-4


def test_resume_equals_uninterrupted(two_ranks, one_rank):
    for outdir, ranks in ((two_ranks, (0, 1)), (one_rank, (0,))):
        for rank in ranks:
            rec = _load(outdir, "resume", rank)
            assert _max_rel(rec["resumed"], rec["full"]) == 0.0
            assert rec["resumed_epochs"] == [1, 2, 3]
    assert os.path.isfile(os.path.join(two_ranks, "ckpt-resume", "latest"))


def test_fsdp_sharded_teacher(two_ranks):
    for rank in (0, 1):
        rec = _load(two_ranks, "fsdp", rank)
        if "skipped" in rec:
            pytest.skip(rec["skipped"])
        assert _max_rel(rec["fsdp"], rec["plain"]) <= 1e-5
        assert rec["tiny_ok"] == 1  # a rank without samples still joins the teacher's gathers


def test_process_group_destroyed_at_the_end(two_ranks):
    for rank in (0, 1):
        with open(os.path.join(two_ranks, f"group-rank{rank}.txt")) as f:
            assert f.read() == "0"


def test_caller_initialized_group_is_used_and_kept(tmp_path):
    res = torchrun_util.run([os.path.join(torchrun_util.REPO, "tests", "dist_worker.py"),
                             "usergroup", str(tmp_path)], timeout=90)
    assert res.returncode == 0, res.stdout[-4000:]
    r0, r1 = _load(tmp_path, "usergroup", 0), _load(tmp_path, "usergroup", 1)
    assert r0["still_initialized"] == 1 and r0["world"] == 2
    assert _max_rel(r1["student"], r0["student"]) == 0.0


def test_global_batch_sampler_covers_every_sample_once():
    ds = dist_worker.data(n=23)
    for world in (1, 2, 4):
        seen = []
        samplers = [pdist.GlobalBatchSampler(ds, 8, num_replicas=world, rank=r, shuffle=True,
                                             seed=3) for r in range(world)]
        for s in samplers:
            s.set_epoch(2)
        steps = [list(s) for s in samplers]
        assert all(len(st) == 3 for st in steps)  # ceil(23 / 8)
        for step in range(3):
            for r, s in enumerate(samplers):
                n_local, n_global = s.shares(step)
                if n_local:
                    assert len(steps[r][step]) == n_local
                    seen += steps[r][step]
        assert sorted(seen) == list(range(23))
        single = pdist.GlobalBatchSampler(ds, 8, shuffle=True, seed=3)
        single.set_epoch(2)
        assert all(s.order() == single.order() for s in samplers)  # same order as one process
    a = pdist.GlobalBatchSampler(ds, 8, shuffle=True, seed=3)
    a.set_epoch(0)
    b = pdist.GlobalBatchSampler(ds, 8, shuffle=True, seed=3)
    b.set_epoch(1)
    assert a.order() != b.order()  # set_epoch reshuffles


def test_check_batching_errors():
    with pytest.raises(ValueError, match="divisible"):
        pdist.check_batching(10, 3, 2)
    with pytest.raises(ValueError, match="fewer than"):
        pdist.check_batching(1, 2, 2)
    with pytest.raises(ValueError, match="positive integer"):
        pdist.check_batching(10, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        pdist.check_batching(0, 2, 1)


def test_world_size_without_launcher_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        pdist.setup("cpu")
