"""Causal language models in :func:`pycompress.distill`: token samples, next-token targets.

A sample is a dict of tensors ``[T]`` (Hugging Face style): ``input_ids``, optionally
``attention_mask`` (1 = token, 0 = padding) and ``labels`` (``ignore_index`` = not predicted;
when absent, ``input_ids`` with the padding ignored), plus any other model keyword argument.
The model returns logits ``[B, T, V]`` where position ``t`` predicts token ``t + 1``.

The targets are shifted once, on the labels: position ``t`` gets ``labels[t + 1]``, and
``ignore_index`` where that label is ignored, where ``t`` or ``t + 1`` is padding, and at the
last position (nothing follows it). Logits are never sliced: the student's and the teacher's
logits ``[B, T, V]`` stay aligned with these targets, and every position whose target is
``ignore_index`` is left out of the loss, of the token counts and of the accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import Dataset

__all__ = ["next_token_targets", "CausalLMDataset", "is_token_sample", "looks_causal_lm",
           "model_inputs", "TEACHER_LOGITS_KEY"]

# the key under which TeacherLogitsDataset adds precomputed logits to a dict sample
TEACHER_LOGITS_KEY = "teacher_logits"
_NOT_MODEL_INPUTS = ("labels", TEACHER_LOGITS_KEY)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def model_inputs(batch: Mapping) -> dict:
    """A dict sample or batch without the keys that are not model arguments."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def is_token_sample(sample) -> bool:
    """A dict sample holding ``input_ids``."""
    return isinstance(sample, Mapping) and "input_ids" in sample


def looks_causal_lm(model) -> bool:
    """A transformers causal LM by its class name (``*ForCausalLM``, ``*LMHeadModel``)."""
    model = getattr(model, "_orig_mod", model)
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)


def next_token_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None,
                       ignore_index: int = -100) -> torch.Tensor:
    """Targets aligned with the logits ``[..., T, V]``: ``out[..., t] = labels[..., t + 1]``, or
    ``ignore_index`` where that label is ignored, where position ``t`` or ``t + 1`` is padding
    (``attention_mask == 0``) and at the last position. ``labels=None``: ``input_ids``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() < 1:
        raise TypeError("input_ids must be a tensor [..., T]")
    target = input_ids if labels is None else labels
    if not isinstance(target, torch.Tensor) or target.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {target.dtype}")
    out = torch.full_like(target, ignore_index, dtype=torch.long)
    out[..., :-1] = target[..., 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask != 0
        both = torch.zeros_like(real)
        both[..., :-1] = real[..., :-1] & real[..., 1:]
        out = out.masked_fill(~both, ignore_index)
    return out


class CausalLMDataset(Dataset):
    """Token samples as ``(inputs, next-token targets[, teacher logits])`` for the training loop.

    ``inputs`` is the sample without ``labels`` / ``teacher_logits`` (the model computes no loss
    of its own); the targets come from :func:`next_token_targets`. Samples must have one length
    within a batch (pad them: the default collation stacks them).
    """

    def __init__(self, dataset: Dataset, ignore_index: int = -100, shift: bool = True):
        self.dataset = dataset
        self.ignore_index = ignore_index
        self.shift = shift

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        if not is_token_sample(sample):
            raise TypeError(f"sample {i} is a {type(sample).__name__}, not a dict with input_ids "
                            "(every sample of a token data set must be one)")
        inputs = model_inputs(sample)
        ids = torch.as_tensor(sample["input_ids"])
        labels = sample.get("labels")
        labels = None if labels is None else torch.as_tensor(labels)
        if self.shift:
            mask = sample.get("attention_mask")
            mask = None if mask is None else torch.as_tensor(mask)
            target = next_token_targets(ids, labels, mask, self.ignore_index)
        else:
            if labels is None:
                raise ValueError(f"sample {i} has no labels (needed with causal_lm=False)")
            target = labels
        t_logits = sample.get(TEACHER_LOGITS_KEY)
        return (inputs, target) if t_logits is None else (inputs, target, t_logits)
