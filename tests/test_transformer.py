"""The workflow on a BERT-style encoder built from a transformers config (random weights, no
download): quantize → validate → save/load → torch.compile, and int8 accuracy against
torch.ao's quantize_dynamic."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pycompress
from _pylayer_models import HAS_INT8, int8_cls  # noqa: F401

transformers = pytest.importorskip("transformers")

VOCAB = 256


def _config():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertModel(_config()).eval()


def _batches(n: int = 3, batch: int = 4, seq: int = 24, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0  # one padded sequence
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hidden(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state for b in batches])


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LINEARS = 6 * 2 + 1  # q, k, v, attention output, intermediate, output per layer + pooler


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_bert_quantize_then_validate(int8_cls, mode):
    ref = _bert()
    model, result = pycompress.quantize(copy.deepcopy(ref), mode=mode, return_result=True)
    assert len(result.converted) == LINEARS and result.skipped == {}
    report = pycompress.validate(ref, model, _batches(), tolerance={"cosine": 0.99, "min_cosine": 0.98})
    print(f"\nBERT {mode}: {report!r}")
    assert report.output == "last_hidden_state"
    assert report.passed, report.to_markdown()
    assert report.cosine >= 0.99
    assert len(report.layers) == LINEARS
    assert all(e.calls == 3 and e.cosine > 0.99 for e in report.layers.values())


def test_bert_save_load_round_trip_is_bit_exact(int8_cls, tmp_path):
    model = pycompress.quantize(_bert(), mode="w8a8", exclude="pooler")
    pycompress.save(model, tmp_path / "bert-int8")
    fresh = pycompress.load(tmp_path / "bert-int8", _bert(seed=1))
    batches = _batches(2)
    assert torch.equal(_hidden(fresh, batches), _hidden(model, batches))
    assert type(fresh.pooler.dense) is torch.nn.Linear
    assert isinstance(fresh.encoder.layer[1].intermediate.dense, int8_cls)
    # the same file does not load into another architecture
    other = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64))
    with pytest.raises(ValueError, match="architecture mismatch|do not fit"):
        pycompress.load(tmp_path / "bert-int8", other)


def test_bert_torch_compile(int8_cls):
    model = pycompress.quantize(_bert(), mode="w8a8")
    batches = _batches(1)
    eager = _hidden(model, batches)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _hidden(compiled, batches)
    assert out.shape == eager.shape
    assert _rel_err(out, eager) < 1e-3


def test_int8_per_channel_per_token_beats_quantize_dynamic(int8_cls):
    ref = _bert()
    batches = _batches(3)
    expected = _hidden(ref, batches)
    ours = pycompress.quantize(copy.deepcopy(ref), mode="w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref), {torch.nn.Linear}, dtype=torch.qint8)
    err_ours = _rel_err(_hidden(ours, batches), expected)
    err_theirs = _rel_err(_hidden(theirs, batches), expected)
    rep_ours = pycompress.validate(ref, ours, batches, layers=False)
    rep_theirs = pycompress.validate(ref, theirs, batches, layers=False)
    print(
        f"\nBERT hidden states vs fp32 ({int8_cls.__name__}):\n"
        f"  pycompress w8a8 (per-channel weights, per-token activations): "
        f"relative error {err_ours:.5f}, cosine {rep_ours.cosine:.6f}\n"
        f"  torch.ao quantize_dynamic (per-tensor):                       "
        f"relative error {err_theirs:.5f}, cosine {rep_theirs.cosine:.6f}"
    )
    assert err_ours < err_theirs, (err_ours, err_theirs)
    assert rep_ours.cosine > rep_theirs.cosine


@pytest.mark.skipif(not HAS_INT8, reason="this build has no pycompress.nn.Int8Linear")
def test_compiled_int8_layer_is_used():
    model = pycompress.quantize(_bert(), mode="w8a8")
    layer = model.encoder.layer[0].attention.self.query
    assert type(layer).__module__.startswith("pycompress.")


def test_validate_a_compiled_candidate(int8_cls):
    ref = _bert()
    compiled = torch.compile(pycompress.quantize(copy.deepcopy(ref), mode="w8a16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = pycompress.validate(ref, compiled, _batches(1))
    assert report.passed and len(report.layers) == LINEARS
