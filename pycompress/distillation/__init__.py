"""Distillation and training: ``distill`` (fused KD loss), ``finetune``, the shared training loop and
data-parallel helpers (``distributed``)."""
