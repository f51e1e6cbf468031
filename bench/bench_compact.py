"""Benchmark: a BERT-base-sized encoder made smaller by structured pruning + ``pycompress.compact``.

transformers ``BertModel`` with random weights (fixed seed): 12 layers, hidden 768, 12 heads,
intermediate 3072 (4 layers and a smaller batch with ``--quick``). Variants, timed in the same run
on the same input (batch 8 x 128 tokens; 2 x 64 with ``--quick``):

* dense: the unpruned model;
* FFN 50%: half of every layer's intermediate neurons pruned (``pattern="channel"``,
  ``scope="layer"``, magnitude) and removed by ``compact``;
* FFN 50% + heads 50%: additionally half of every layer's attention heads
  (``pattern="head"``) removed.

Columns: ``GFLOP`` (multiply-adds x 2 of all linear layers and of the attention products
``QK^T`` and ``PV`` for this input, counted from the layer shapes) and ``FLOP ratio`` (variant /
dense), next to the measured latency.
"""

from __future__ import annotations

import copy

import torch

from common import rows_by_case, time_fn

import pycompress

KERNEL = "compact"


def _flops(model, batch: int, seq: int) -> float:
    tokens = batch * seq
    macs = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "in_features") and hasattr(m, "out_features") \
                and type(m).__name__ in ("MaskedLinear", "Int8Linear"):
            macs += tokens * m.in_features * m.out_features
        if hasattr(m, "all_head_size") and hasattr(m, "query"):
            macs += 2 * batch * seq * seq * m.all_head_size  # QK^T and PV
    pooler = getattr(model, "pooler", None)
    if pooler is not None:  # the pooler sees the first token only
        macs -= (tokens - batch) * pooler.dense.in_features * pooler.dense.out_features
    return 2.0 * macs


def run(device: str, quick: bool = False) -> list[dict]:
    from transformers import BertConfig, BertModel

    layers, batch, seq = (4, 2, 64) if quick else (12, 8, 128)
    repeats = 3 if quick else 5
    cfg = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=30522, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    dense = BertModel(cfg).eval().to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)

    ffn = pycompress.prune(copy.deepcopy(dense), 0.5, pattern="channel", scope="layer",
                           include="*intermediate.dense")
    ffn_heads = pycompress.prune(copy.deepcopy(ffn), 0.5, pattern="head", scope="layer")
    ffn = pycompress.compact(ffn)
    ffn_heads = pycompress.compact(ffn_heads)

    variants = [("dense", dense), ("FFN 50% compact", ffn), ("FFN 50% + heads 50% compact", ffn_heads)]
    base_flops = _flops(dense, batch, seq)
    base_params = sum(p.numel() for p in dense.parameters())
    case = f"BERT L={layers} H=768 heads=12 I=3072 B={batch} T={seq}"
    rows = []
    with torch.no_grad():
        for impl, model in variants:
            t = time_fn(lambda: model(input_ids=ids), device, warmup=1, repeats=repeats)
            fl = _flops(model, batch, seq)
            params = sum(p.numel() for p in model.parameters())
            rows.append({"kernel": KERNEL, "case": case, "impl": impl, **t,
                         "GFLOP": fl / 1e9, "FLOP ratio": fl / base_flops,
                         "params (M)": params / 1e6, "param ratio": params / base_params,
                         "threads": torch.get_num_threads()})
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Latency and FLOP ratios of each compacted variant against dense, per case."""
    lines = []
    for case, d in rows_by_case(rows).items():
        base = d.get("dense")
        if base is None:
            continue
        for impl, r in d.items():
            if impl == "dense":
                continue
            lines.append(f"{case}: {impl}: {r['ms']:.1f} ms vs dense {base['ms']:.1f} ms = "
                         f"{base['ms'] / r['ms']:.2f}x faster; FLOP ratio {r['FLOP ratio']:.3f} "
                         f"(ideal speed-up {1 / r['FLOP ratio']:.2f}x); params x{r['param ratio']:.3f}")
    return lines
