"""Benchmark: accuracy of channel pruning by activation, magnitude and mixed importance on a
pretrained CNN, without and with a short fine-tune.

The model is the vision demo's (``pycompress demo --task vision --quick``): EfficientNet-Lite0 with
its ImageNet weights (``pycompress[demo]``), transferred to scikit-learn's digits at 64x64 (60
training images per class; a third of every class is the held-out test set, 599 images) by a new
head on the frozen backbone and a fine-tune of the whole network. Then, for every ratio and
method, from the same transferred model:

* ``prune(model, ratio, pattern="channel", scope="layer", method=...)`` on the groups produced by
  the blocks' expansion convs and the head conv (``inner``: the inner channels of every block and
  the head's 1280; the residual stream keeps its channels) or on every group but the classifier's
  outputs (``all groups``), with the first 64 training images as calibration data, then
  ``compact``; ``accuracy``: top-1 on the test set;
* every method twice: as pruned (``compensate=False``: the pruned channels read as zero) and
  ``+comp`` (``compensate="mean"``: each pruned channel's mean over the calibration images folded
  into the biases / BatchNorm means of the layers reading it);
* ``pycompress.finetune`` of the whole compacted network for ``ft epochs`` (Adam, lr 1e-3, the
  same seed for every method); ``accuracy +ft``.

``mixed`` is ``0.5 * activation / mean + 0.5 * magnitude / mean`` within each group. ``params (M)``
and ``param ratio`` against the dense transferred model; ``MFLOP``: multiply-adds x 2 of the conv
and linear layers on one 64x64 image. Nothing is timed for speed (latencies of the same compacted
models are in the vision demo's table and in ``bench_cnn_prune``; ``seconds`` is the wall time of a
row's work), so the rows have no ``ms`` and one run (``--runs 1``) is what they mean. Training runs
on one thread (small convolutions on a shared 2-core machine). One seed (0).

The rows need the ``demo`` extra and run on the CPU only (on another device ``run`` returns no
rows). ``--quick``: ratio 0.5 of the inner channels only, one fine-tune epoch.
"""

from __future__ import annotations

import copy
import time

import torch

import pycompress
from pycompress.pruning.channels import prune_channels

KERNEL = "prune_accuracy"
METHODS = ("activation", "magnitude", "mixed")
COMPENSATE = (False, "mean")  # impl suffix " +comp": the pruned channels' mean folded into their readers


def _cases(quick: bool):
    from pycompress.demo import vision

    inner = vision.PRUNE_LAYERS
    if quick:
        return [("inner", inner, 0.5)], 1
    return [("inner", inner, r) for r in (0.1, 0.3, 0.5)] + [("all groups", None, 0.5)], 2


def _prune_and_compact(model, method, ratio, calib, include, compensate):
    """``vision.prune_and_compact`` with the compensation chosen (the calibration images serve the
    compensation of every method, also ``magnitude``, which does not use them for its scores)."""
    m = copy.deepcopy(model)
    example = calib[:4]
    prune_channels(m, ratio, scope="layer", method=method, include=list(include) if include is not None else None,
                   exclude="classifier" if include is None else None, calibration_data=[calib],
                   example_inputs=example, compensate=compensate)
    return pycompress.compact(m, example).eval()


@torch.no_grad()
def _mflop(model, x) -> float:
    macs = 0

    def hook(m, _args, out):
        nonlocal macs
        macs += out.numel() * m.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs / 1e6


def run(device: str, quick: bool = False) -> list[dict]:
    if not str(device).startswith("cpu"):
        print(f"prune_accuracy: runs on the CPU only; no rows on {device}")
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[dict]:
    from pycompress.demo import vision

    cfg = vision.config_for(quick=True)  # the quick demo's transfer: 64 px, 60 images per class
    torch.manual_seed(0)
    t0 = time.perf_counter()
    data = vision.digits_images(cfg.image_size, 0, train_per_class=cfg.train_per_class)
    model, info = vision.transfer(data, cfg, seed=0, progress=False, log=lambda _m: None)
    transfer_s = time.perf_counter() - t0
    calib = data["train"].tensors[0][:64]
    x = data["test"].tensors[0][:1]
    dense_params = sum(p.numel() for p in model.parameters())
    dense_acc = vision.accuracy(model, data["test"])
    case0 = f"EfficientNet-Lite0 ImageNet -> digits 64x64, {len(data['train'])} train / {len(data['test'])} test"
    dense_mflop = _mflop(model, x)
    rows = [{"kernel": KERNEL, "case": case0, "impl": "dense", "MFLOP": dense_mflop, "accuracy": dense_acc,
             "accuracy +ft": None, "params (M)": dense_params / 1e6, "param ratio": 1.0,
             "probe accuracy": info["probe"]["test_accuracy"], "transfer s": transfer_s}]
    cases, ft_epochs = _cases(quick)
    for label, include, ratio in cases:
        case = f"{label} {round(100 * ratio)}%"
        for method, compensate in [(m, c) for m in METHODS for c in COMPENSATE]:
            t = time.perf_counter()
            small = _prune_and_compact(model, method, ratio, calib, include, compensate)
            acc = vision.accuracy(small, data["test"])
            mflop = _mflop(small, x)
            tuned, _ = pycompress.finetune(copy.deepcopy(small), data["train"], freeze=None, epochs=ft_epochs,
                                           lr=1e-3, batch_size=cfg.train_batch, seed=2, progress=False)
            params = sum(p.numel() for p in small.parameters())
            impl = f"{method} +comp" if compensate else method
            rows.append({"kernel": KERNEL, "case": case, "impl": impl, "compensate": compensate, "MFLOP": mflop,
                         "FLOP ratio": mflop / dense_mflop, "accuracy": acc,
                         "accuracy +ft": vision.accuracy(tuned, data["test"]), "ft epochs": ft_epochs,
                         "dense accuracy": dense_acc, "params (M)": params / 1e6,
                         "param ratio": params / dense_params, "threads": torch.get_num_threads(),
                         "seconds": time.perf_counter() - t})
            print(f"  {case} {impl}: {100 * acc:.1f}% -> {100 * rows[-1]['accuracy +ft']:.1f}% after "
                  f"{ft_epochs} epoch(s)", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Per pruning case: the accuracy of each method without and with the fine-tune."""
    lines = []
    dense = next((r for r in rows if r["impl"] == "dense"), None)
    if dense:
        lines.append(f"dense transferred model: {100 * dense['accuracy']:.1f}% ({dense['params (M)']:.2f} M "
                     f"parameters, {dense['MFLOP']:.0f} MFLOP per image)")
    cases: dict[str, list[dict]] = {}
    for r in rows:
        if r["impl"] != "dense":
            cases.setdefault(r["case"], []).append(r)
    for case, rs in cases.items():
        no_ft = ", ".join(f"{r['impl']} {100 * r['accuracy']:.1f}%" for r in rs)
        ft = ", ".join(f"{r['impl']} {100 * r['accuracy +ft']:.1f}%" for r in rs)
        r0 = rs[0]
        lines.append(f"{case} (params x{r0['param ratio']:.2f}, FLOP x{r0['FLOP ratio']:.2f}): without fine-tune "
                     f"{no_ft}; after "
                     f"{r0['ft epochs']} epoch(s) {ft}")
    return lines
