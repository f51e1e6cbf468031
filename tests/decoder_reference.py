"""The nn.Linear form of a decoder with transformers ``Conv1D`` layers (GPT-2 family): the
reference the decoder tests compare against, and the model torch.ao's dynamic quantization
converts in the decoder benchmark (``quantize_dynamic`` handles ``nn.Linear`` only)."""

from __future__ import annotations

import copy

from torch import nn

from pycompress.nn import conv1d


def linearized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv1D replaced by the equal nn.Linear (its own bias copy)."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if conv1d.is_conv1d(m):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, conv1d.to_linear(m, share_bias=False))
    return out
