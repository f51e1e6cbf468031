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

import torch
from torch.utils.data import Dataset

from pycompress._utils import (TEACHER_LOGITS_KEY, is_token_sample, model_inputs,  # noqa: F401
                               next_token_targets)

__all__ = ["next_token_targets", "CausalLMDataset", "is_token_sample", "looks_causal_lm",
           "model_inputs", "TEACHER_LOGITS_KEY"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def looks_causal_lm(model) -> bool:
    """A transformers causal LM by its class name (``*ForCausalLM``, ``*LMHeadModel``)."""
    model = getattr(model, "_orig_mod", model)
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)


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
