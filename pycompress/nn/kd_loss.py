"""``KDLoss``: knowledge-distillation loss (soft teacher targets + hard labels)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.ops.kd import DIRECTIONS, REDUCTIONS, kd_kl_div

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """``alpha · T² · KL + (1 − alpha) · cross_entropy(student, labels)``.

    The KD term is :func:`pycompress.ops.kd_kl_div` (fused softmax-KL over the logits, one pass,
    no ``[..., V]`` temporaries). ``direction="forward"`` is ``KL(p_teacher || p_student)`` (Hinton
    / DistilBERT); ``direction="reverse"`` is ``KL(p_student || p_teacher)``.

    Args:
        temperature: softmax temperature ``T > 0`` of the KD term (which is scaled by ``T²``).
        alpha: weight of the KD term in ``[0, 1]``; ``1 − alpha`` weights the cross-entropy.
        reduction: ``"batchmean"`` (default; both terms averaged over the kept rows — for the
            KD term the per-row KL sum divided by the number of rows whose label is not
            ``ignore_index``; for the hard term ``cross_entropy(reduction="mean")``), ``"sum"``,
            ``"mean"`` (KD term divided by kept rows · V, as ``F.kl_div``) or ``"none"`` (per row,
            ignored rows are 0).
        ignore_index: label value whose rows are excluded from *both* terms.
        direction: ``"forward"`` or ``"reverse"``.

    ``forward(student_logits, teacher_logits, labels=None)``: logits ``[..., V]`` (every leading
    position is a row, e.g. ``[B, L, V]`` tokens), ``labels`` integer ``[...]``. Without labels
    the KD term alone is returned (not multiplied by ``alpha``). The teacher receives no
    gradient (compute it under ``torch.no_grad()`` or detach it). The module holds no state, so
    it works unchanged under DistributedDataParallel (each rank reduces over its own rows).

    Example:
        >>> import torch
        >>> from pycompress.nn import KDLoss
        >>> s = torch.randn(4, 10, requires_grad=True)
        >>> loss = KDLoss(temperature=2.0, alpha=0.5)(s, torch.randn(4, 10), torch.tensor([1, 2, -100, 3]))
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, reduction: str = "batchmean",
                 ignore_index: int = -100, direction: str = "forward"):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'forward' or 'reverse'; got {direction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.direction = direction

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, direction={self.direction!r}")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return kd_kl_div(student_logits, teacher_logits, self.temperature, self.reduction,
                             self.direction)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1:
            raise TypeError("student_logits must be a tensor [..., V]")
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} (the "
                             f"leading dimensions of the logits), got {tuple(labels.shape)}")
        keep = labels != self.ignore_index
        kd = None
        if self.alpha > 0.0:
            kd = kd_kl_div(student_logits, teacher_logits, self.temperature, self.reduction,
                           self.direction, row_mask=keep)
        if self.alpha == 1.0:
            return kd
        V = student_logits.shape[-1]
        ce_red = "mean" if self.reduction in ("batchmean", "mean") else self.reduction
        ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1),
                             ignore_index=self.ignore_index, reduction=ce_red)
        if ce_red == "none":
            ce = ce.reshape(labels.shape)
        elif ce_red == "mean":
            # cross_entropy gives NaN when every label is ignored; keep 0 like the KD term
            ce = torch.where(keep.any(), ce, torch.zeros_like(ce))
        ce = ce.float() if ce.dtype in (torch.float16, torch.bfloat16) else ce
        if kd is None:
            return (1.0 - self.alpha) * ce
        return self.alpha * kd + (1.0 - self.alpha) * ce
