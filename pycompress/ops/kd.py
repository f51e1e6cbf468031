"""Fused knowledge-distillation loss: softmax-KL between student and teacher logits.

``kd_kl_div`` computes, per row of ``[..., V]`` logits, the KL divergence between the
temperature-softened teacher and student distributions in one pass over the logits, without
materializing any softmax/log-softmax of shape ``[..., V]``:

* ``direction="forward"``: ``KL(p_teacher || p_student) = Σ p_t (log p_t − log p_s)`` — the
  Hinton et al. / DistilBERT distillation loss, what
  ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)`` computes.
* ``direction="reverse"``: ``KL(p_student || p_teacher) = Σ p_s (log p_s − log p_t)``
  (mode-seeking; used e.g. by MiniLLM-style distillation).

Backed by three ``torch.ops.pycompress`` ops (fake kernels and autograd registered here):
``kd_kl_div_forward`` (per-row loss + O(rows) statistics), ``kd_kl_div_backward`` (recomputes
from the logits and writes the student gradient) and ``kd_kl_div_fused`` (loss and gradient in
one pass, optional in eager mode).
"""

from __future__ import annotations

import math

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import FLOAT_DTYPES, check_device_supported, check_same_device

__all__ = ["kd_kl_div"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
DIRECTIONS = ("forward", "reverse")
_KD_DTYPES = FLOAT_DTYPES + (torch.float64,)
_STATS = 5


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fake kernels + autograd
@torch.library.register_fake("pycompress::kd_kl_div_forward")
def _forward_fake(student, teacher, temperature, reverse):
    torch._check(student.dim() == 2, lambda: "kd_kl_div_forward: student must be 2-D")
    n = student.shape[0]
    acc = _acc_dtype(student)
    return student.new_empty((n,), dtype=acc), student.new_empty((n, _STATS), dtype=acc)


@torch.library.register_fake("pycompress::kd_kl_div_backward")
def _backward_fake(grad_loss, student, teacher, stats, temperature, reverse):
    torch._check(student.dim() == 2, lambda: "kd_kl_div_backward: student must be 2-D")
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.register_fake("pycompress::kd_kl_div_fused")
def _fused_fake(student, teacher, coef, temperature, reverse):
    torch._check(student.dim() == 2, lambda: "kd_kl_div_fused: student must be 2-D")
    n = student.shape[0]
    acc = _acc_dtype(student)
    return (student.new_empty((n,), dtype=acc), student.new_empty((n, _STATS), dtype=acc),
            torch.empty_like(student, memory_format=torch.contiguous_format))


def _forward_setup_context(ctx, inputs, output):
    student, teacher, temperature, reverse = inputs
    _, stats = output
    ctx.save_for_backward(student, teacher, stats)
    ctx.temperature = temperature
    ctx.reverse = reverse


def _forward_backward(ctx, grad_loss, grad_stats):
    student, teacher, stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        if grad_loss is None:
            grad_loss = stats.new_zeros(stats.shape[0])
        grad_student = torch.ops.pycompress.kd_kl_div_backward(
            grad_loss, student, teacher, stats, ctx.temperature, ctx.reverse)
    # the teacher is a constant target: no gradient flows to it
    return grad_student, None, None, None


torch.library.register_autograd("pycompress::kd_kl_div_forward", _forward_backward,
                                setup_context=_forward_setup_context)


def _fused_setup_context(ctx, inputs, output):
    student, teacher, coef, temperature, reverse = inputs
    _, stats, grad = output
    ctx.save_for_backward(student, teacher, stats, coef, grad)
    ctx.temperature = temperature
    ctx.reverse = reverse


def _fused_backward(ctx, grad_loss, grad_stats, grad_grad):
    # Exact for any grad_loss: the precomputed gradient belongs to `coef`, so a different
    # upstream gradient is recomputed with the backward kernel.
    student, teacher, stats, coef, _ = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        if grad_loss is None:
            grad_loss = stats.new_zeros(stats.shape[0])
        grad_student = torch.ops.pycompress.kd_kl_div_backward(
            grad_loss, student, teacher, stats, ctx.temperature, ctx.reverse)
    return grad_student, None, None, None, None


torch.library.register_autograd("pycompress::kd_kl_div_fused", _fused_backward,
                                setup_context=_fused_setup_context)


class _FusedKD(torch.autograd.Function):
    """Eager path when the student needs a gradient: ``sum_i coef_i * loss_i`` with the
    gradient computed in the same pass over the logits and handed to autograd as is."""

    @staticmethod
    def forward(ctx, student, teacher, coef, temperature, reverse):
        loss_rows, stats, grad = torch.ops.pycompress.kd_kl_div_fused(
            student, teacher, coef, temperature, reverse)
        ctx.save_for_backward(student, teacher, stats, coef)
        ctx.grad = grad
        ctx.temperature = temperature
        ctx.reverse = reverse
        # rows with coef 0 (masked) may hold anything, even NaN: they must contribute 0
        return torch.where(coef != 0, loss_rows * coef, torch.zeros_like(loss_rows)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # backward run a second time (retain_graph=True): recompute
            student, teacher, stats, coef = ctx.saved_tensors
            grad = torch.ops.pycompress.kd_kl_div_backward(
                coef * grad_out, student, teacher, stats, ctx.temperature, ctx.reverse)
        elif grad_out.item() != 1.0:  # the usual loss.backward() passes exactly 1
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None


# ------------------------------------------------------------------------------ validation
def _check_args(student, teacher, temperature, reduction, direction, row_mask):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _KD_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or "
                            f"float64); got {str(x.dtype).replace('torch.', '')}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension [..., V], got a scalar")
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward' (KL(teacher || student)) or 'reverse' "
                         f"(KL(student || teacher)); got {direction!r}")
    if student.shape[-1] == 0 and student.numel() == 0 and math.prod(student.shape[:-1]) > 0:
        raise ValueError(f"the class (last) dimension of student_logits must not be empty, got "
                         f"shape {tuple(student.shape)}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise TypeError("row_mask must be a bool tensor")
        if row_mask.shape != student.shape[:-1]:
            raise ValueError(f"row_mask must have shape {tuple(student.shape[:-1])} (the leading "
                             f"dimensions of the logits), got {tuple(row_mask.shape)}")
    device = check_same_device(student_logits=student, teacher_logits=teacher, row_mask=row_mask)
    check_device_supported(device, "kd_kl_div")
    if device.type == "cuda" and student.dtype == torch.float64:
        raise TypeError("float64 logits are supported on CPU only (the CUDA kernels take "
                        "float32, float16 or bfloat16)")


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, reduction: str = "batchmean",
              direction: str = "forward", *, row_mask: torch.Tensor | None = None,
              fused: bool = False) -> torch.Tensor:
    """Temperature-scaled softmax KL divergence between student and teacher logits.

    With ``a = student_logits / T``, ``b = teacher_logits / T`` and the softmax over the last
    dimension, the loss of one row is ``T² · KL``, where

    * ``direction="forward"`` (default): ``KL(p_teacher || p_student)``, the Hinton / DistilBERT
      loss: ``F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True) * T**2``;
    * ``direction="reverse"``: ``KL(p_student || p_teacher)``.

    The ``T²`` factor keeps the gradient size independent of ``T`` (Hinton et al. 2015).

    Args:
        student_logits: ``[..., V]`` float32/float16/bfloat16 (or float64, CPU only) logits;
            every position of the leading dimensions is one row. Receives the gradient. Rows
            need a unit stride along V (otherwise they are copied first).
        teacher_logits: same shape; treated as a constant target (no gradient flows to it).
            Cast to the student's dtype when the dtypes differ. Entries of ``-inf`` mark
            vocabulary the teacher excludes: in the forward direction they contribute 0
            (``p_t = 0``), giving finite loss and gradients. (In the reverse direction they make
            the loss infinite wherever the student gives them mass, as the math says.)
        temperature: softmax temperature ``T > 0``.
        reduction: ``"batchmean"`` (sum over rows / number of rows — of *all* leading positions,
            so ``[B, L, V]`` logits are averaged per token; ``F.kl_div`` would divide by ``B``),
            ``"sum"``, ``"mean"`` (sum / (rows · V), like ``F.kl_div``) or ``"none"`` (one value
            per row, shape ``student_logits.shape[:-1]``; ``F.kl_div`` would return ``[..., V]``).
        direction: ``"forward"`` or ``"reverse"`` (see above).
        row_mask: optional bool tensor of shape ``student_logits.shape[:-1]``; rows where it is
            False are excluded: they contribute 0 (also to ``"none"``), receive a zero gradient
            without being read, and are not counted by ``"batchmean"``/``"mean"``. With no kept
            row, every reduction returns 0.
        fused: compute the gradient already in the forward pass (``sum_i coef_i * loss_i`` with
            the logits read once for loss and gradient; autograd hands the stored gradient back,
            scaled only when the upstream gradient is not exactly 1, which costs one host sync).
            Default ``False``: the forward saves 5 floats per row and the backward re-reads the
            logits. On this project's 2-core CPU both take the same time (the kernels are
            bound by the exponentials, not by memory), so the simpler two-pass path is the
            default; ``True`` is ignored for ``"none"``, when no gradient is needed, and under
            ``torch.compile``. Both give the same values.

    Returns:
        A float32 tensor (float64 for float64 inputs): a scalar, or per-row values for ``"none"``.
        Statistics are accumulated in fp32 (row partials in fp64) whatever the input dtype.
        Empty inputs give 0 for every reduction (empty per-row tensor for ``"none"``).

    Example:
        >>> import torch, pycompress.ops as ops
        >>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, -1.0]])
        >>> round(ops.kd_kl_div(s, t, temperature=2.0).item(), 4)
        0.4095
    """
    _check_args(student_logits, teacher_logits, temperature, reduction, direction, row_mask)
    reverse = direction == "reverse"
    temperature = float(temperature)
    if teacher_logits.dtype != student_logits.dtype:
        teacher_logits = teacher_logits.to(student_logits.dtype)
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s2 = student_logits.reshape(-1, V)
    t2 = teacher_logits.reshape(-1, V)
    n_rows = s2.shape[0]
    acc = _acc_dtype(student_logits)
    mask = row_mask.reshape(-1) if row_mask is not None else None

    wants_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if fused and wants_grad and reduction != "none" and not torch.compiler.is_compiling():
        if mask is None:
            kept = float(max(n_rows, 1))
            weight = torch.ones(n_rows, dtype=acc, device=s2.device)
        else:
            weight = mask.to(acc)
            kept = weight.sum().clamp_min(1.0)
        if reduction == "batchmean":
            coef = weight / kept
        elif reduction == "mean":
            coef = weight / (kept * V)
        else:
            coef = weight
        return _FusedKD.apply(s2, t2, coef, temperature, reverse)

    rows, _ = torch.ops.pycompress.kd_kl_div_forward(s2, t2, temperature, reverse)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    kept = mask.sum().clamp_min(1).to(acc) if mask is not None else float(max(n_rows, 1))
    return total / kept if reduction == "batchmean" else total / (kept * V)
