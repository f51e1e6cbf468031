"""Benchmark: BERT-style encoders exported to ONNX and run in ONNX Runtime (CPU).

Models: ``transformers.BertModel`` with random weights (seed 0) — a small sentence encoder
(6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522) and BERT-base (12 layers, 768,
12 heads, 3072; skipped with ``--quick``) on a batch of 64 sequences of 16 tokens.

Implementations measured in one run, timed interleaved (round after round, so that load from
other processes hits all of them alike):

* ``torch fp32``: the float model in eager PyTorch.
* ``pycompress int8 eager`` / ``pycompress int8 compile``: ``pycompress.quantize(model, "w8a8")``
  in eager PyTorch and under ``torch.compile``; without ``--quick`` also
  ``pycompress int8 eager [act_bits=7, weight_bits=7]`` (7-bit activations and weights).
* ``pycompress int8 -> ORT``: ``pycompress.export_onnx`` of that model (default form: per-token
  u8 activations x u8 weights with zero point 128, standard ``MatMulInteger``), run in ONNX
  Runtime; the alternative forms (``s8s8``, saturating ``u8s8``, ``contrib`` =
  ``com.microsoft.MatMulIntegerToFloat``, 7-bit activations ``act_bits=7``, and 7-bit activations
  and weights) follow as
  ``pycompress int8 -> ORT [form]`` rows on the small encoder.
* ``ORT fp32``: the float model exported by ``export_onnx`` (plain ``torch.onnx.export``).
* ``ORT int8 per-tensor`` / ``ORT int8 per-channel``: ONNX Runtime's own
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights) of the fp32 file.

Columns: ``ms`` (median of the interleaved runs), ``cos_last`` / ``cos_pooled``: cosine
similarity of the last hidden state / pooled output with ``torch fp32`` on the same inputs,
``file_mb``: size of the ONNX file. ORT sessions use ``intra_op_num_threads`` = torch's threads,
without spinning thread pools (the sessions are timed one after the other).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

KERNEL = "onnx"
SEQ = 16
BATCH = 64
CASES = {
    "encoder-6x384": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
OURS = "pycompress int8 -> ORT"
ORT_PC = "ORT int8 per-channel"
EAGER_77 = "pycompress int8 eager [act_bits=7, weight_bits=7]"


def _bert(cfg_kw: dict):
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **cfg_kw)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


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


def _interleaved(fns: dict, rounds: int, per_round: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"ms": statistics.median(v), "ms_min": min(v), "repeats": len(v)} for k, v in times.items()}


def _case(name: str, cfg_kw: dict, quick: bool, tmp: str) -> list[dict]:
    import pycompress
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pycompress.export.onnx import OnnxVerificationError

    threads = torch.get_num_threads()
    model = _bert(cfg_kw)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30522, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ * 3 // 4:] = 0  # half of the sequences padded
    inputs = {"input_ids": ids, "attention_mask": mask}
    feed_np = {k: v.numpy() for k, v in inputs.items()}

    def last_pooled(out):
        return out.last_hidden_state.detach().numpy(), out.pooler_output.detach().numpy()

    runs: dict = {}   # impl -> (callable, outputs(last, pooled), file path or None)
    with torch.no_grad():
        runs["torch fp32"] = (lambda: model(**inputs), last_pooled(model(**inputs)), None)
        q = pycompress.quantize(copy.deepcopy(model), "w8a8", warn=False)
        runs["pycompress int8 eager"] = (lambda: q(**inputs), last_pooled(q(**inputs)), None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qc = torch.compile(q)
            qc(**inputs)
        runs["pycompress int8 compile"] = (lambda: qc(**inputs), last_pooled(qc(**inputs)), None)
        if not quick:  # 7-bit activations and weights: torch.ao's accuracy, the fastest AVX2 kernel
            q77 = pycompress.quantize(copy.deepcopy(model), "w8a8", act_bits=7, weight_bits=7, warn=False)
            runs[EAGER_77] = (lambda: q77(**inputs), last_pooled(q77(**inputs)), None)

    verified: dict = {}  # file -> "passed" / the verification error / "not run"

    def export(m, path, **kw):
        # export_onnx's own check against the exported PyTorch model (verify=True): a failure is
        # recorded in the row (the file is written again without the check) instead of ending
        # the benchmark
        if kw.get("verify", True) is False:
            pycompress.export_onnx(m, inputs, path, **kw)
            verified[path] = "not run"
            return
        try:
            pycompress.export_onnx(m, inputs, path, **kw)
            verified[path] = "passed"
        except OnnxVerificationError as e:
            verified[path] = "failed: " + str(e).split(": ", 1)[-1]
            pycompress.export_onnx(m, inputs, path, **{**kw, "verify": False})

    def add_onnx(impl, path):
        sess = _ort_session(path, threads)
        names = [i.name for i in sess.get_inputs()]
        feed = {n: feed_np[n] for n in names}
        out = sess.run(None, feed)
        runs[impl] = (lambda: sess.run(None, feed), (out[0], out[1]), path)

    fp32_path = os.path.join(tmp, f"{name}-fp32.onnx")
    export(model, fp32_path, output_names=["last_hidden_state", "pooler_output"])
    ours_path = os.path.join(tmp, f"{name}-pycompress-int8.onnx")
    export(q, ours_path, output_names=["last_hidden_state", "pooler_output"])
    add_onnx(OURS, ours_path)
    if not quick and name == "encoder-6x384":
        for fmt in ("s8s8", "u8s8", "contrib"):
            p = os.path.join(tmp, f"{name}-pycompress-int8-{fmt}.onnx")
            # u8s8 with 8-bit activations may saturate in ORT's AVX2 kernel: no verification
            export(q, p, int8_format=fmt, verify=(fmt != "u8s8"))
            add_onnx(f"{OURS} [{fmt}]", p)
        q7 = pycompress.quantize(copy.deepcopy(model), "w8a8", act_bits=7, warn=False)
        p = os.path.join(tmp, f"{name}-pycompress-int8-a7.onnx")
        export(q7, p)
        add_onnx(f"{OURS} [act_bits=7]", p)
        p = os.path.join(tmp, f"{name}-pycompress-int8-a7w7.onnx")
        export(q77, p)
        add_onnx(f"{OURS} [act_bits=7, weight_bits=7]", p)
    add_onnx("ORT fp32", fp32_path)
    for per_channel, impl in ((False, "ORT int8 per-tensor"), (True, ORT_PC)):
        p = os.path.join(tmp, f"{name}-ort-int8-{'pc' if per_channel else 'pt'}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32_path, p, per_channel=per_channel, weight_type=QuantType.QInt8)
        add_onnx(impl, p)

    big = name == "bert-base"
    rounds, per_round = ((3, 1) if quick else (5, 2)) if big else ((3, 2) if quick else (6, 3))
    with torch.no_grad():
        timings = _interleaved({k: v[0] for k, v in runs.items()}, rounds, per_round)
    ref_last, ref_pooled = runs["torch fp32"][1]
    rows = []
    for impl, (_, (last, pooled), path) in runs.items():
        rows.append({
            "kernel": KERNEL, "case": f"{name} b{BATCH}x{SEQ}", "impl": impl, **timings[impl],
            "cos_last": _cos(last, ref_last), "cos_pooled": _cos(pooled, ref_pooled),
            "file_mb": os.path.getsize(path) / 1e6 if path else None,
            "verify": verified.get(path) if path else None,
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
        for name, cfg_kw in CASES.items():
            if quick and name == "bert-base":
                continue
            rows += _case(name, cfg_kw, quick, tmp)
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Targets per case: latency <= 1.1x ORT's own int8 per-channel model; cosine vs fp32 >= 0.99
    and >= ORT per-channel's; file <= 0.7x the fp32 file (embeddings stay fp32)."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by.items():
        ours, pc, fp = impls.get(OURS), impls.get(ORT_PC), impls.get("ORT fp32")
        if not (ours and pc and fp):
            continue
        lat = ours["ms"] / pc["ms"]
        lat_min = ours["ms_min"] / pc["ms_min"]
        cos_ok = ours["cos_last"] >= 0.99 and ours["cos_last"] >= pc["cos_last"]
        size = ours["file_mb"] / fp["file_mb"]
        out.append(
            f"{case}: {OURS} {ours['ms']:.1f} ms = {lat:.2f}x {ORT_PC} [{lat_min:.2f}x fastest runs] "
            f"(target <= 1.1x: {'met' if lat <= 1.1 else 'NOT met'}); cosine vs fp32 "
            f"{ours['cos_last']:.5f} vs ORT per-channel {pc['cos_last']:.5f} (target >= 0.99 and >= "
            f"ORT's: {'met' if cos_ok else 'NOT met'}); file {ours['file_mb']:.1f} MB = {size:.2f}x fp32 "
            f"(target <= 0.7x: {'met' if size <= 0.7 else 'NOT met'}); "
            f"vs ORT fp32 {fp['ms'] / ours['ms']:.2f}x faster, vs torch fp32 "
            f"{impls['torch fp32']['ms'] / ours['ms']:.2f}x faster; export_onnx verification "
            f"{ours.get('verify')}")
        alts = [(k, r) for k, r in impls.items() if k.startswith(OURS + " [")]
        if alts:
            out.append("    other forms vs " + ORT_PC + ": " + ", ".join(
                f"{k[len(OURS) + 1:]} {r['ms'] / pc['ms']:.2f}x (cos {r['cos_last']:.5f})" for k, r in alts))
    return out
