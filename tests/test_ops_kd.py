"""kd_kl_div: loss and student gradient against F.kl_div(log_softmax) on every device and CPU path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pycompress.ops as ops

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
DIRECTIONS = ["forward", "reverse"]


def kd_ref(s, t, T, reduction="batchmean", direction="forward", mask=None):
    """The specification, in float64: F.kl_div(log_softmax(s/T), log_softmax(t/T)) * T**2.

    Rows are all leading positions: "none" gives one value per row and "batchmean" divides by
    the number of (kept) rows. Terms whose target probability is 0 contribute 0.
    """
    V = s.shape[-1]
    ls = F.log_softmax(s.double().reshape(-1, V) / T, -1)
    lt = F.log_softmax(t.double().reshape(-1, V) / T, -1)
    inp, tgt = (ls, lt) if direction == "forward" else (lt, ls)
    terms = F.kl_div(inp, tgt, log_target=True, reduction="none")
    terms = torch.where(tgt == -math.inf, torch.zeros_like(terms), terms)
    rows = terms.sum(-1) * T * T
    if mask is not None:
        rows = torch.where(mask.reshape(-1), rows, torch.zeros_like(rows))
        kept = max(int(mask.sum()), 1)
    else:
        kept = max(rows.shape[0], 1)
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / kept
    return rows.sum() / (kept * V)


def check(s, t, T, reduction, direction, *, mask=None, fused=None, rtol=1e-4, atol=1e-6,
          grad_rtol=1e-4, grad_atol=1e-7, upstream=1.0):
    sg = s.detach().clone().requires_grad_()
    out = ops.kd_kl_div(sg, t, T, reduction, direction, row_mask=mask, fused=fused)
    sr = s.detach().double().cpu().requires_grad_()
    ref = kd_ref(sr, t.cpu(), T, reduction, direction, None if mask is None else mask.cpu())
    assert out.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    g = torch.randn(out.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(upstream, dtype=torch.float64)
    (out * g.to(out.dtype).to(out.device)).sum().backward()
    (ref * g).sum().backward()
    assert sg.grad.dtype == s.dtype and sg.grad.shape == s.shape
    # fp32 rounding of log-probabilities makes tiny gradient entries noisy at the level of
    # 1e-5 of the largest one (the fp32 PyTorch expression is no better)
    atol = max(grad_atol, 1e-5 * sr.grad.abs().max().item()) if s.dtype != torch.float64 else grad_atol
    torch.testing.assert_close(sg.grad.double().cpu(), sr.grad, rtol=grad_rtol, atol=atol)
    return out, sg.grad


SHAPES = [(1, 1), (3, 1), (5, 17), (4, 1000), (2, 50257)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_reference_fp32(shape, T, reduction, direction, device, cpu_isa):
    s = (torch.randn(shape) * 3).to(device)
    t = (torch.randn(shape) * 3).to(device)
    # the gradient scale is T * (p_s - p_t) / rows: compare relative to its size
    check(s, t, T, reduction, direction, grad_atol=1e-6 / shape[0])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fused_and_two_pass_agree_with_reference(fused, reduction, direction, device, cpu_isa):
    s = (torch.randn(7, 3001) * 2).to(device)
    t = (torch.randn(7, 3001) * 2).to(device)
    check(s, t, 2.0, reduction, direction, fused=fused, upstream=2.5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_leading_dims_are_rows(direction, device):
    s = torch.randn(2, 3, 40, device=device)
    t = torch.randn(2, 3, 40, device=device)
    for reduction in REDUCTIONS:
        check(s, t, 1.5, reduction, direction)
    rows = ops.kd_kl_div(s, t, reduction="none", direction=direction)
    assert rows.shape == (2, 3)
    # batchmean divides by the number of rows (6), not by the first dimension
    torch.testing.assert_close(ops.kd_kl_div(s, t, direction=direction), rows.sum() / 6)


def test_non_contiguous_rows(device, cpu_isa):
    big_s = torch.randn(6, 64, device=device)
    big_t = torch.randn(6, 64, device=device)
    s, t = big_s[::2, :50], big_t[1::2, 3:53]
    assert not s.is_contiguous()
    check(s, t, 1.0, "sum", "forward")
    check(s.t().contiguous().t(), t, 1.0, "batchmean", "reverse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_half_inputs_fp32_accumulation(dtype, direction, fused, device, cpu_isa):
    s = (torch.randn(6, 2053) * 3).to(dtype).to(device)
    t = (torch.randn(6, 2053) * 3).to(dtype).to(device)
    # the reference sees the same rounded inputs; the loss is accumulated in fp32, the gradient
    # is rounded to the input dtype once
    check(s, t, 2.0, "batchmean", direction, fused=fused, rtol=1e-4, grad_rtol=1e-2,
          grad_atol=1e-5)


def test_mixed_dtypes_cast_teacher(device):
    s = torch.randn(4, 33, device=device)
    t = torch.randn(4, 33, device=device).to(torch.bfloat16)
    out = ops.kd_kl_div(s, t, 2.0)
    torch.testing.assert_close(out.double().cpu(), kd_ref(s.cpu(), t.float().cpu(), 2.0), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_huge_logits_are_stable(direction, T, device, cpu_isa):
    s = (torch.randn(4, 999) * 1e4).to(device)
    t = (torch.randn(4, 999) * 1e4).to(device)
    s[:, 0] = 1e4
    t[:, 1] = -1e4
    out, grad = check(s, t, T, "batchmean", direction, rtol=1e-3, grad_rtol=1e-3, grad_atol=1e-4)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # near-equal huge logits: the loss is a small difference of large numbers
    t2 = s + torch.randn_like(s)
    check(s, t2, T, "sum", direction, rtol=2e-3, atol=5e-3, grad_rtol=1e-3, grad_atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_masked_teacher_vocabulary(fused, device, cpu_isa):
    s = torch.randn(5, 300) * 2
    t = torch.randn(5, 300) * 2
    t[:, 100:200] = -math.inf  # excluded vocabulary
    t[2, :299] = -math.inf  # a single allowed token
    s, t = s.to(device), t.to(device)
    for reduction in ("batchmean", "none"):
        out, grad = check(s, t, 2.0, reduction, "forward", fused=fused)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_reverse_with_masked_teacher_is_infinite(device):
    # KL(p_s || p_t) is +inf when the student gives mass where the teacher has none
    s = torch.zeros(1, 4, device=device)
    t = torch.tensor([[0.0, 0.0, -math.inf, 0.0]], device=device)
    assert ops.kd_kl_div(s, t, direction="reverse").item() == math.inf
    assert math.isfinite(ops.kd_kl_div(s, t, direction="forward").item())


def test_identical_inputs_give_zero(device, cpu_isa):
    x = torch.randn(3, 513, device=device, requires_grad=True)
    out = ops.kd_kl_div(x, x.detach(), 3.0, "sum")
    assert abs(out.item()) < 1e-5
    out.backward()
    assert x.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(reduction, device):
    s = torch.randn(0, 10, device=device, requires_grad=True)
    t = torch.randn(0, 10, device=device)
    out = ops.kd_kl_div(s, t, reduction=reduction)
    if reduction == "none":
        assert out.shape == (0,)
        out.sum().backward()
    else:
        assert out.shape == () and out.item() == 0.0
        out.backward()
    assert s.grad.shape == (0, 10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_row_mask(reduction, fused, device, cpu_isa):
    s = torch.randn(8, 77)
    t = torch.randn(8, 77)
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    s[1] = math.nan  # excluded rows are never read into the result
    t[4] = math.inf
    s, t, mask = s.to(device), t.to(device), mask.to(device)
    sg = s.clone().requires_grad_()
    out = ops.kd_kl_div(sg, t, 2.0, reduction, row_mask=mask, fused=fused)
    keep = mask.cpu()
    ref_s = s.cpu()[keep].double().requires_grad_()
    ref_rows = kd_ref(ref_s, t.cpu()[keep], 2.0, "none")
    if reduction == "none":
        assert out.shape == (8,)
        assert (out[~mask] == 0).all()
        torch.testing.assert_close(out[mask].double().cpu(), ref_rows.detach(), rtol=1e-4, atol=1e-6)
        out.sum().backward()
        ref_rows.sum().backward()
    else:
        ref = {"sum": ref_rows.sum(), "batchmean": ref_rows.sum() / 5,
               "mean": ref_rows.sum() / (5 * 77)}[reduction]
        torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-6)
        out.backward()
        ref.backward()
    assert (sg.grad[~mask] == 0).all()
    torch.testing.assert_close(sg.grad[mask].double().cpu(), ref_s.grad, rtol=1e-4, atol=1e-7)


def test_all_rows_masked_gives_zero(device):
    s = torch.randn(3, 5, device=device, requires_grad=True)
    mask = torch.zeros(3, dtype=torch.bool, device=device)
    for reduction in ("batchmean", "mean", "sum"):
        out = ops.kd_kl_div(s, torch.randn(3, 5, device=device), reduction=reduction, row_mask=mask)
        assert out.item() == 0.0


def test_teacher_gets_no_gradient(device):
    s = torch.randn(3, 9, device=device, requires_grad=True)
    t = torch.randn(3, 9, device=device, requires_grad=True)
    ops.kd_kl_div(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_fused_backward_twice_and_upstream_scale(device):
    s = torch.randn(4, 50, device=device)
    t = torch.randn(4, 50, device=device)
    a = s.clone().requires_grad_()
    out = ops.kd_kl_div(a, t, 2.0, fused=True)
    out.backward(retain_graph=True)
    g1 = a.grad.clone()
    (out * 3).backward()  # second backward: recomputed, accumulated
    b = s.clone().requires_grad_()
    ops.kd_kl_div(b, t, 2.0, fused=False).backward()
    torch.testing.assert_close(g1, b.grad)
    torch.testing.assert_close(a.grad, 4 * b.grad)


def test_no_grad_mode_skips_gradient(device):
    s = torch.randn(4, 50, device=device, requires_grad=True)
    with torch.no_grad():
        out = ops.kd_kl_div(s, torch.randn(4, 50, device=device))
    assert not out.requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_float64(reduction, direction, fused):
    # float64 inputs run the kernels' float64 path: gradcheck compares the analytical
    # gradient of the backward kernel with finite differences of the forward kernel
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    if direction == "forward":
        t[0, 2] = -math.inf  # masked teacher entry (finite only in the forward direction)
    mask = torch.tensor([True, False, True])
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda x: ops.kd_kl_div(x, t, 1.7, reduction, direction, row_mask=m, fused=fused),
            (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_wrong_gradient():
    # the gradcheck above is not vacuous: a scaled gradient is rejected
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return ops.kd_kl_div(x, t, 2.0, "sum", fused=False)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                ops.kd_kl_div(xx, t, 2.0, "sum", fused=False).backward()
            return 1.01 * g * xx.grad

    assert not torch.autograd.gradcheck(Wrong.apply, (s,), raise_exception=False)


def test_opcheck(device):
    s = torch.randn(5, 37, device=device)
    t = torch.randn(5, 37, device=device)
    sr = s.clone().requires_grad_()
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.pycompress.kd_kl_div_forward.default, (s, t, 2.0, reverse))
        torch.library.opcheck(torch.ops.pycompress.kd_kl_div_forward.default, (sr, t, 0.5, reverse))
        _, stats = torch.ops.pycompress.kd_kl_div_forward(s, t, 2.0, reverse)
        torch.library.opcheck(torch.ops.pycompress.kd_kl_div_backward.default,
                              (torch.rand(5, device=device), s, t, stats, 2.0, reverse))
        torch.library.opcheck(torch.ops.pycompress.kd_kl_div_fused.default,
                              (s, t, torch.rand(5, device=device), 2.0, reverse))
        torch.library.opcheck(torch.ops.pycompress.kd_kl_div_forward.default,
                              (s.bfloat16(), t.bfloat16(), 1.0, reverse))


def test_torch_compile_fullgraph(device):
    def f(s, t):
        return ops.kd_kl_div(s, t, 2.0, "batchmean")

    cf = torch.compile(f, fullgraph=True)
    s = torch.randn(6, 129, device=device)
    t = torch.randn(6, 129, device=device)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    out_c, out_e = cf(a, t), f(b, t)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_bad_inputs():
    s = torch.randn(2, 5)
    with pytest.raises(TypeError, match="student_logits"):
        ops.kd_kl_div([[1.0]], s)
    with pytest.raises(TypeError, match="teacher_logits"):
        ops.kd_kl_div(s, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        ops.kd_kl_div(s, torch.randn(2, 6))
    for bad_t in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            ops.kd_kl_div(s, s, temperature=bad_t)
    with pytest.raises(TypeError, match="temperature"):
        ops.kd_kl_div(s, s, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="reduction"):
        ops.kd_kl_div(s, s, reduction="avg")
    with pytest.raises(ValueError, match="direction"):
        ops.kd_kl_div(s, s, direction="backward")
    with pytest.raises(ValueError, match="row_mask"):
        ops.kd_kl_div(s, s, row_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="row_mask"):
        ops.kd_kl_div(s, s, row_mask=torch.ones(2))
    with pytest.raises(ValueError, match="class"):
        ops.kd_kl_div(torch.randn(2, 0), torch.randn(2, 0))
    with pytest.raises(ValueError, match="dimension"):
        ops.kd_kl_div(torch.tensor(1.0), torch.tensor(1.0))
    # the C++ side keeps its own checks
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.pycompress.kd_kl_div_forward(s, s, -1.0, False)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.pycompress.kd_kl_div_forward(s, torch.randn(2, 4), 1.0, False)
    with pytest.raises(RuntimeError, match="grad_loss"):
        torch.ops.pycompress.kd_kl_div_backward(torch.ones(3), s, s, torch.zeros(2, 5), 1.0, False)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_long_rows_split_by_columns(direction, fused, dtype, device, cpu_isa):
    # one row of 100k classes: on CPU the row is split across threads and the partial
    # statistics are merged
    s = torch.randn(1, 100_003).to(dtype).to(device)
    t = torch.randn(1, 100_003).to(dtype).to(device)
    s[0, 77_777] = 8.0  # the maximum sits in a later part
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-2
    check(s, t, 1.0, "sum", direction, fused=fused, grad_rtol=grad_rtol, grad_atol=1e-7)
