"""KDLoss: alpha mixing of the fused KD term with cross-entropy, ignore_index, compile, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pycompress.nn import KDLoss


def kdloss_ref(s, t, labels, T, alpha, reduction, ignore_index, direction):
    """Reference in float64: per-row T^2 KL over kept rows + masked cross-entropy."""
    V = s.shape[-1]
    s2, t2 = s.double().reshape(-1, V), t.double().reshape(-1, V)
    ls, lt = F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1)
    inp, tgt = (ls, lt) if direction == "forward" else (lt, ls)
    rows = F.kl_div(inp, tgt, log_target=True, reduction="none").sum(-1) * T * T
    if labels is None:
        keep = torch.ones(rows.shape[0], dtype=torch.bool)
    else:
        keep = labels.reshape(-1) != ignore_index
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    n = max(int(keep.sum()), 1)
    kd = {"sum": rows.sum(), "batchmean": rows.sum() / n, "mean": rows.sum() / (n * V),
          "none": rows.reshape(s.shape[:-1])}[reduction]
    if labels is None:
        return kd
    ce_red = "mean" if reduction in ("batchmean", "mean") else reduction
    ce = F.cross_entropy(s2, labels.reshape(-1), ignore_index=ignore_index, reduction=ce_red)
    if ce_red == "none":
        ce = ce.reshape(labels.shape)
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_matches_reference(reduction, alpha, direction, device):
    s = torch.randn(3, 4, 51)
    t = torch.randn(3, 4, 51)
    labels = torch.randint(0, 51, (3, 4))
    labels[0, 1] = labels[2, 3] = -100
    loss_fn = KDLoss(temperature=2.0, alpha=alpha, reduction=reduction, direction=direction)
    sg = s.clone().to(device).requires_grad_()
    out = loss_fn(sg, t.to(device), labels.to(device))
    sr = s.clone().double().requires_grad_()
    ref = kdloss_ref(sr, t, labels, 2.0, alpha, reduction, -100, direction)
    assert out.shape == ref.shape
    if reduction == "none":
        keep = labels != -100
        torch.testing.assert_close(out.double().cpu()[keep], ref.detach()[keep], rtol=1e-4, atol=1e-6)
        assert (out.cpu()[~keep] == 0).all()
        g = torch.randn(ref.shape, dtype=torch.float64)
        (out * g.float().to(device)).sum().backward()
        (ref * g).sum().backward()
    else:
        torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-6)
        out.backward()
        ref.backward()
    grad = sg.grad.cpu()
    assert torch.isfinite(grad).all()
    assert (grad[0, 1] == 0).all() and (grad[2, 3] == 0).all()
    torch.testing.assert_close(grad.double(), sr.grad, rtol=1e-4, atol=1e-6)


def test_without_labels_is_kd_term(device):
    s = torch.randn(5, 20, device=device)
    t = torch.randn(5, 20, device=device)
    out = KDLoss(temperature=3.0, alpha=0.25)(s, t)
    torch.testing.assert_close(out.double().cpu(), kdloss_ref(s.cpu(), t.cpu(), None, 3.0, 0.25,
                                                               "batchmean", -100, "forward"))


def test_ignored_rows_do_not_count_in_batchmean(device):
    s = torch.randn(4, 10, device=device)
    t = torch.randn(4, 10, device=device)
    labels = torch.tensor([1, -100, -100, 2], device=device)
    kd_only = KDLoss(temperature=1.0, alpha=1.0)
    full = kd_only(s[[0, 3]], t[[0, 3]], labels[[0, 3]])
    torch.testing.assert_close(kd_only(s, t, labels), full)
    # everything ignored: a finite zero rather than NaN
    allign = torch.full((4,), -100, device=device)
    assert KDLoss(alpha=0.5)(s, t, allign).item() == 0.0


def test_custom_ignore_index_and_bf16(device):
    s = torch.randn(6, 33).bfloat16().to(device).requires_grad_()
    t = torch.randn(6, 33).bfloat16().to(device)
    labels = torch.tensor([0, 7, 7, 3, 2, 1], device=device)
    out = KDLoss(temperature=2.0, alpha=0.5, ignore_index=7)(s, t, labels)
    ref = kdloss_ref(s.detach().cpu(), t.cpu(), labels.cpu(), 2.0, 0.5, "batchmean", 7, "forward")
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-2, atol=1e-3)
    out.backward()
    assert s.grad.dtype == torch.bfloat16 and (s.grad[1:3] == 0).all()


def test_torch_compile_fullgraph(device):
    loss_fn = KDLoss(temperature=2.0, alpha=0.5)

    def step(s, t, y):
        return loss_fn(s, t, y)

    cstep = torch.compile(step, fullgraph=True)
    s = torch.randn(8, 64, device=device)
    t = torch.randn(8, 64, device=device)
    y = torch.randint(0, 64, (8,), device=device)
    y[3] = -100
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    oc, oe = cstep(a, t, y), step(b, t, y)
    torch.testing.assert_close(oc, oe)
    oc.backward()
    oe.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="direction"):
        KDLoss(direction="both")
    loss = KDLoss()
    s = torch.randn(3, 5)
    with pytest.raises(ValueError, match="labels"):
        loss(s, s, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        loss(s, s, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        loss(s, torch.randn(3, 6))
    assert "temperature=1.0" in repr(loss)


@pytest.mark.distributed
def test_distributed_data_parallel():
    """Two gloo ranks (torchrun), one shard each: the all-reduced gradient equals the mean of the
    shards' reference gradients."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import torchrun_util

    res = torchrun_util.run([os.path.join(torchrun_util.REPO, "tests", "kd_ddp_worker.py")],
                            timeout=120)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "ok rank 0" in res.stdout and "ok rank 1" in res.stdout
