"""Small models and a pure-PyTorch stand-in layer for the workflow tests.

``RefInt8Linear`` follows the pycompress layer contract (``from_float``, ``config``,
``from_config``, ``to_float``) with plain torch arithmetic. The workflow tests use the compiled
``pycompress.nn.Int8Linear`` when the build has it and this stand-in otherwise, so that the
generic machinery (selection, reports, save/load, fallback) is tested either way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pycompress


class RefInt8Linear(nn.Module):
    """int8 per-channel weights; w8a8 adds per-token activation quantization (torch only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8"):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8") -> "RefInt8Linear":
        if mode not in ("w8a8", "w8a16"):
            raise ValueError(f"mode {mode!r}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode)
        w = linear.weight.detach().float()
        s = (w.abs().amax(1) / 127).clamp_min(1e-12)
        m.weight.copy_(torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8))
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    def forward(self, x):
        w = self.weight.float() * self.weight_scale[:, None]
        xf = x.float()
        if self.mode == "w8a8":
            s = (xf.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
            xf = torch.round(xf / s).clamp(-127, 127) * s
        return torch.nn.functional.linear(xf, w, self.bias).to(x.dtype)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "mode": self.mode}

    @classmethod
    def from_config(cls, cfg: dict) -> "RefInt8Linear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["mode"])

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.float() * self.weight_scale[:, None])
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


HAS_INT8 = hasattr(pycompress.nn, "Int8Linear")
needs_int8 = pytest.mark.skipif(not HAS_INT8, reason="this build has no pycompress.nn.Int8Linear")


@pytest.fixture
def int8_cls(monkeypatch):
    """The compiled Int8Linear when present, else RefInt8Linear installed in its place."""
    if HAS_INT8:
        return pycompress.nn.Int8Linear
    monkeypatch.setattr(pycompress.nn, "Int8Linear", RefInt8Linear, raising=False)
    return RefInt8Linear


def tiny_bert(seed: int = 0, vocab_size: int = 64, intermediate_size: int = 64) -> nn.Module:
    """A 2-layer ``transformers.BertModel`` (hidden 32, 4 heads) in eval mode; skips the test
    without transformers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=intermediate_size,
                                  max_position_embeddings=16)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


USER_MODEL_PY = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

not_a_model = 3
'''


def user_model_module(tmp_path, monkeypatch, name: str) -> nn.Module:
    """Writes USER_MODEL_PY as ``<tmp_path>/<name>.py`` (factory ``<name>:make``), makes tmp_path
    the working directory and importable, and returns a seeded model of that architecture."""
    (tmp_path / f"{name}.py").write_text(USER_MODEL_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def mlp(d_in: int = 32, hidden: int = 64, d_out: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out)
    )


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.features(x))


class KwargsNet(nn.Module):
    """Takes keyword arguments and returns a dict (like Hugging Face models)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, x, scale=None):
        h = torch.relu(self.proj(x))
        if scale is not None:
            h = h * scale
        return {"logits": self.out(h), "hidden": h}


def teacher_dataset(model: nn.Module, n_batches: int = 4, batch: int = 64, d_in: int = 32, seed: int = 1):
    """(inputs, labels) pairs labelled by ``model`` itself, so its accuracy is 1.0."""
    g = torch.Generator().manual_seed(seed)
    data = []
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.randn(batch, d_in, generator=g)
            data.append((x, model(x).argmax(-1)))
    return data
