"""Benchmark: a GPT-2-small-sized decoder in fp32, pycompress int8 (w8a8, w8a16) and torch.ao
dynamic int8, timed in the same run; and the causal-LM distillation loss at GPT-2's vocabulary.

Model: transformers ``GPT2LMHeadModel`` from a config (12 layers, 768 wide, 12 heads, V = 50257,
random weights, seed 0, SDPA attention; 2 layers with ``--quick``). Variants:

* ``fp32``: the model as built;
* ``pycompress w8a8`` / ``pycompress w8a16``: ``pycompress.quantize`` (every ``Conv1D`` and
  ``lm_head``, 49 layers);
* ``torch.ao dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` (per-tensor int8
  weights, per-tensor dynamic activations) on the same model with its ``Conv1D`` layers replaced
  by the equal ``nn.Linear`` (``quantize_dynamic`` converts ``nn.Linear`` only; as built it would
  convert ``lm_head`` alone).

Cases: ``decode-like``: batch 1, one token (``M = 1`` in every linear layer; no KV cache: at 128
tokens of context its attention would add about 2 % of the multiply-adds); ``prefill``: batch 1 x
128 tokens; ``batch 8 x 128`` (``--quick``: 2 x 64). Each row has the wall-clock median with the
process's threads (``ms``) and the best single-thread CPU time of a call (``cpu_ms_1t``, robust
to other load on a shared machine). ``ppl``: perplexity of the variant on 4 x 128 random tokens
(random weights, so about V; ``ppl change`` against fp32 is the quantization's effect on the
output distribution) and ``KL/token``: mean KL(fp32 || variant) of the next-token distributions.

KD loss: ``KDLoss``-style forward + backward over 4096 tokens x V = 50257 fp32 logits (T = 2,
batchmean): torch eager, ``torch.compile`` and ``pycompress.ops.kd_kl_div`` (``--quick``: 512
tokens).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from common import per_core_ms, rows_by_case, time_fn

import pycompress

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from decoder_reference import linearized  # noqa: E402

KERNEL = "decoder"
V = 50257


def _variants(model):
    yield "fp32", model
    for mode in ("w8a8", "w8a16"):
        q, res = pycompress.quantize(copy.deepcopy(model), mode=mode, return_result=True, warn=False)
        assert not res.skipped and len(res.converted) == 4 * model.config.n_layer + 1
        yield f"pycompress {mode}", q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(linearized(model), {torch.nn.Linear}, dtype=torch.qint8)
    yield "torch.ao dynamic int8", ao


def _model_rows(quick: bool) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers = 2 if quick else 12
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=V, n_positions=1024,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    big = (2, 64) if quick else (8, 128)
    cases = {
        "decode-like: batch 1 x 1 token": torch.randint(0, V, (1, 1), generator=g),
        "prefill: batch 1 x 128 tokens": torch.randint(0, V, (1, 128), generator=g),
        f"batch {big[0]} x {big[1]} tokens": torch.randint(0, V, big, generator=g),
    }
    ppl_ids = torch.randint(0, V, (2, 64) if quick else (4, 128), generator=g)
    repeats = 3 if quick else 5
    rows, ref_logp = [], None
    with torch.no_grad():
        for impl, m in _variants(model):
            logits = m(input_ids=ppl_ids).logits[:, :-1].float()
            logp = logits.log_softmax(-1)
            nll = -logp.gather(-1, ppl_ids[:, 1:, None]).mean()
            ppl = float(nll.exp())
            if ref_logp is None:
                ref_logp, ref_ppl = logp, ppl
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
            for case, ids in cases.items():
                t = time_fn(lambda: m(input_ids=ids), "cpu", warmup=1, repeats=repeats)
                cpu = per_core_ms([(impl, lambda: m(input_ids=ids))], repeats=3)[impl]
                tokens = ids.numel()
                rows.append({"kernel": KERNEL, "case": f"GPT-2 L={layers} 768 V={V}: {case}", "impl": impl,
                             **t, "cpu_ms_1t": cpu, "tokens/s": tokens / (t["ms"] * 1e-3),
                             "ppl": ppl, "ppl change %": 100.0 * (ppl / ref_ppl - 1.0), "KL/token": kl,
                             "threads": torch.get_num_threads()})
    return rows


def _kd_rows(quick: bool) -> list[dict]:
    from bench_kd import make_impl

    n = 512 if quick else 4096
    g = torch.Generator().manual_seed(2)
    s = torch.randn(n, V, generator=g)
    t = torch.randn(n, V, generator=g)
    rows = []
    for impl in ("torch eager", "torch.compile", "pycompress"):
        fn = make_impl(impl)
        leaf = s.clone().requires_grad_(True)

        def step():
            leaf.grad = None
            fn(leaf, t).backward()

        res = time_fn(step, "cpu", warmup=1, repeats=3 if quick else 5)
        rows.append({"kernel": KERNEL, "case": f"KD loss fwd+bwd {n} x {V} float32", "impl": impl, **res,
                     "threads": torch.get_num_threads()})
        del leaf
    return rows


def run(device: str, quick: bool = False) -> list[dict]:
    if device != "cpu":
        raise ValueError("the decoder benchmark runs on the CPU (torch.ao dynamic int8 is CPU only)")
    return _model_rows(quick) + _kd_rows(quick)


def summarize(rows: list[dict]) -> list[str]:
    """Speed-ups of every variant over fp32 (wall and single-thread CPU time) and KD speed-ups."""
    lines = []
    for case, d in rows_by_case(rows).items():
        base = d.get("fp32") or d.get("torch eager")
        if base is None:
            continue
        for impl, r in d.items():
            if r is base:
                continue
            line = f"{case}: {impl} {r['ms']:.1f} ms = {base['ms'] / r['ms']:.2f}x {base['impl']}"
            if "cpu_ms_1t" in r:
                line += (f" (1-thread CPU time {base['cpu_ms_1t'] / r['cpu_ms_1t']:.2f}x); "
                         f"ppl {r['ppl']:.1f} ({r['ppl change %']:+.3f} %), KL/token {r['KL/token']:.2e}")
            lines.append(line)
    return lines
