"""The vision demo: a CNN pretrained on ImageNet, transferred to a new image task, compressed three
ways, every model measured.

1. Source: EfficientNet-Lite0 with its ImageNet weights (:mod:`pycompress.demo.efficientnet`).
2. Target: scikit-learn's handwritten digits (1,797 8x8 images shipped inside scikit-learn, no
   download), upsampled to ``image_size`` pixels and given three channels; a third of every class
   is the held-out test set. Transfer with :func:`pycompress.finetune`: a new 10-class head on the
   frozen backbone (its BatchNorm statistics frozen too), then a short fine-tune of the whole
   network.
3. Compress the transferred model:
   * int8: :func:`pycompress.quantize` with calibration data (static activation scales where the
     installed pycompress supports them); the report says which layers became int8 and what share
     of the multiply-adds they hold;
   * channel pruning: half of the inner (expanded) channels of every inverted-residual block and of
     the head conv's channels (``scope="layer"``; the residual stream keeps its channels) ranked by
     activation (mean ``|a|`` on calibration images, as the consumers see it), by magnitude (L1 of
     the filters) and mixed, then :func:`pycompress.compact` to a narrower dense network; each
     without and with a short fine-tune;
   * pruned + int8: the activation-pruned, fine-tuned network quantized;
   * distillation: a small CNN trained on the teacher's soft targets with the fused KD loss
     (:func:`pycompress.distill`, teacher logits computed once), next to the same student trained
     on the labels only for as many epochs.
4. Every model is measured by :func:`pycompress.evaluate` on the held-out test set against the
   transferred fp32 model: accuracy, Δ, parameters, bytes on disk, latency at batch 1 and
   ``batch``, compression and speed-up; ``report.md``, ``report.json`` and ``compare.png``.

Run it with ``pycompress demo --task vision`` (``--quick``: 60 training images per class, fewer
epochs and timing repeats). Under ``torchrun`` the training steps run data-parallel and
rank 0 measures and writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
import time
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import pycompress
from pycompress import _optional
from pycompress.demo import _common
from pycompress.demo import efficientnet as effnet
from pycompress.distillation import distributed as pdist

__all__ = ["VisionConfig", "config_for", "run_vision", "digits_images", "target_test_data",
           "build_transferred", "build_student", "transfer", "quantize_int8", "prune_and_compact",
           "int8_macs_share", "accuracy", "measure", "render_markdown", "REQUIRED", "CLASSES"]

CLASSES = 10
# (import name, what needs it): checked before any work so the error names the extra at once
REQUIRED = (("sklearn", "the vision demo (its digits data set)"),
            ("matplotlib", "the vision demo (its compare.png plot)"),
            ("skimage", "the vision demo (the sample photos that check the pretrained model)"),
            (effnet.WEIGHTS_PACKAGE, "the vision demo (the pretrained EfficientNet-Lite0 weights)"))
# the expanded (inner) channels of every inverted-residual block and the head conv's 1280: they
# hold most of the multiply-adds; the residual stream's channels stay
PRUNE_LAYERS = ("*expand_conv", "head_conv")
PRUNE_METHODS = (("activation", "activation (mean |a| of each channel on calibration images, as its "
                  "consumers see it)"),
                 ("magnitude", "magnitude (L1 norm of the channel's filters)"),
                 ("mixed", "mixed (half activation, half magnitude, each normalised by its group mean)"))


@dataclasses.dataclass
class VisionConfig:
    """Sizes and epochs of one run (see :func:`config_for`)."""

    image_size: int = 64            # sides of the upsampled digits (a multiple of 32)
    train_per_class: int | None = None  # cap on the training images per class (None: all)
    test_per_class: int | None = None   # cap on the test images per class (None: a third of the data)
    probe_epochs: int = 3           # frozen backbone, new head
    finetune_epochs: int = 2        # the whole network
    prune_ratio: float = 0.5        # of the prunable channels of every group
    prune_layers: tuple[str, ...] = PRUNE_LAYERS  # producers whose channels may go
    prune_finetune_epochs: int = 1  # the "+ft" rows
    student_epochs: int = 20
    student_widths: tuple[int, ...] = (16, 32, 64)
    calibration_images: int = 128   # for int8 and activation pruning
    batch: int = 32                 # the larger timed batch size
    repeats: int = 20               # timed calls per batch size
    pretrained: bool = True         # the ImageNet weights (False: random init, for tests)
    probe_lr: float = 1e-2
    finetune_lr: float = 1e-3
    student_lr: float = 3e-3
    kd_alpha: float = 0.9           # weight of the KD term (the rest: cross-entropy on the labels)
    kd_temperature: float = 4.0
    train_batch: int = 32


def config_for(quick: bool) -> VisionConfig:
    """The full run (every training image) or ``--quick`` (60 training images per class, fewer
    epochs and timing repeats); 64 x 64 inputs in both."""
    if quick:
        return VisionConfig(image_size=64, train_per_class=60, probe_epochs=2, finetune_epochs=3,
                            prune_finetune_epochs=2, student_epochs=12, calibration_images=64,
                            repeats=10)
    return VisionConfig(image_size=64, train_per_class=None, probe_epochs=3, finetune_epochs=5,
                        prune_finetune_epochs=3, student_epochs=30, calibration_images=128, repeats=30)


# --------------------------------------------------------------------------- data
def _to_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 64] digits in 0..16 -> [N, 3, size, size] network inputs."""
    img = (x.reshape(-1, 1, 8, 8) / 16.0).float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return effnet.normalize(img.expand(-1, 3, -1, -1).contiguous())


def digits_images(image_size: int = 64, seed: int = 0, test_fraction: float = 1 / 3,
                  train_per_class: int | None = None, test_per_class: int | None = None
                  ) -> dict[str, TensorDataset]:
    """scikit-learn's digits as ``image_size`` x ``image_size`` RGB network inputs: ``"train"``
    and ``"test"`` (``test_fraction`` of every class, drawn from ``seed``; the test set does not
    depend on ``train_per_class``, which caps the training images per class; ``test_per_class``
    caps the test images per class)."""
    if image_size % 32 or image_size < 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    datasets = _optional.require("sklearn.datasets", "the vision demo (its digits data set)", extra="demo")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for cls in range(CLASSES):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = round(len(idx) * test_fraction)
        test_idx.append(idx[:cut] if test_per_class is None else idx[:min(cut, test_per_class)])
        train_idx.append(idx[cut:] if train_per_class is None else idx[cut:cut + train_per_class])
    out = {}
    for name, parts in (("test", test_idx), ("train", train_idx)):  # test first: it ignores the caps
        idx = torch.cat(parts)
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[name] = TensorDataset(_to_images(x[idx], image_size), y[idx])
    return out


def target_test_data(seed: int = 0, image_size: int = 64, test_per_class: int | None = None) -> TensorDataset:
    """The held-out test set of the vision demo (for ``pycompress evaluate`` on its models)."""
    return digits_images(image_size, seed, test_per_class=test_per_class)["test"]


def _batches(data: TensorDataset, size: int = 200) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.tensors
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# --------------------------------------------------------------------------- models
def build_transferred(classes: int = CLASSES) -> effnet.EfficientNetLite0:
    """The architecture of the transferred model (random weights: ``pycompress.load`` fills them,
    narrowing the layers a compacted model has narrowed)."""
    return effnet.EfficientNetLite0(num_classes=classes)


def build_student(widths=(16, 32, 64), classes: int = CLASSES, seed: int | None = None,
                  pool: int = 2) -> nn.Sequential:
    """The small CNN student: per width a 3x3 stride-2 conv, BatchNorm and ReLU, then average
    pooling to ``pool x pool`` (digits need to know where their strokes are) and a linear
    classifier (``head``)."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    cin = 3
    for i, w in enumerate(widths, 1):
        layers[f"conv{i}"] = nn.Conv2d(cin, int(w), 3, 2, 1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(int(w))
        layers[f"relu{i}"] = nn.ReLU()
        cin = int(w)
    layers["pool"] = nn.AdaptiveAvgPool2d(pool)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(cin * pool * pool, classes)
    return nn.Sequential(layers)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch: int = 200) -> float:
    """Top-1 accuracy of ``model`` (in eval mode; its mode is restored) on ``data``."""
    was = model.training
    model.eval()
    try:
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in _batches(data, batch))
    finally:
        model.train(was)
    return hits / len(data)


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """Within the block, the BatchNorm layers of ``model`` stay in eval mode (they normalise with
    their stored statistics and do not update them) whatever ``model.train()`` says: a frozen
    backbone then computes the features it was trained to compute."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.train = functools.partial(_stay_eval, bn)
    try:
        yield model
    finally:
        for bn in bns:
            del bn.train


def _stay_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def transfer(data: dict[str, TensorDataset], cfg: VisionConfig, seed: int = 0, progress: bool = True,
             log: Callable[[str], None] = print, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """``model`` (default: EfficientNet-Lite0, ImageNet weights when ``cfg.pretrained``) with a new
    10-class head trained on the frozen backbone (its BatchNorm statistics frozen too), then the
    whole network fine-tuned, in place. Returns ``(model, info)`` with the test accuracy after each
    stage."""
    if model is None:
        model = effnet.efficientnet_lite0(pretrained=cfg.pretrained, seed=seed)
    info: dict = {}
    t = time.perf_counter()
    with frozen_batchnorm_statistics(model):
        model, hist = pycompress.finetune(model, data["train"], num_classes=CLASSES, freeze="backbone",
                                          epochs=cfg.probe_epochs, lr=cfg.probe_lr, batch_size=cfg.train_batch,
                                          seed=seed, progress=progress)
    info["probe"] = {"epochs": cfg.probe_epochs, "test_accuracy": accuracy(model, data["test"]),
                     "train_accuracy": hist[-1]["accuracy"] if hist else None,
                     "seconds": time.perf_counter() - t}
    log(f"      frozen backbone + new head: test accuracy {100 * info['probe']['test_accuracy']:.2f}%")
    t = time.perf_counter()
    model, hist = pycompress.finetune(model, data["train"], freeze=None, epochs=cfg.finetune_epochs,
                                      lr=cfg.finetune_lr, batch_size=cfg.train_batch, seed=seed + 1,
                                      progress=progress)
    info["finetune"] = {"epochs": cfg.finetune_epochs, "test_accuracy": accuracy(model, data["test"]),
                        "train_accuracy": hist[-1]["accuracy"] if hist else None,
                        "seconds": time.perf_counter() - t}
    log(f"      full fine-tune: test accuracy {100 * info['finetune']['test_accuracy']:.2f}%")
    return model.eval(), info


# --------------------------------------------------------------------------- compression
def _int8_module(m: nn.Module) -> bool:
    return any(t.dtype in (torch.int8, torch.uint8) for t in
               list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))


@torch.no_grad()
def _macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of every conv and linear layer of ``model`` on ``x``, by module name."""
    out: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, _args, y, name=name):
                out[name] = out.get(name, 0) + y.numel() * (mod.weight[0].numel())
            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out


def int8_macs_share(float_model: nn.Module, quantized: nn.Module, x: torch.Tensor) -> float:
    """Share of the float model's conv/linear multiply-adds (on ``x``) in layers that hold int8
    tensors in ``quantized`` (matched by module name)."""
    macs = _macs(float_model, x[:1])
    mods = dict(quantized.named_modules())
    total = sum(macs.values())
    return sum(v for k, v in macs.items() if k in mods and _int8_module(mods[k])) / total if total else 0.0


def quantize_int8(model: nn.Module, calibration: torch.Tensor) -> tuple[nn.Module, dict]:
    """:func:`pycompress.quantize` (w8a8) of a copy of ``model``, with ``calibration_data`` when the
    installed pycompress accepts it. Returns ``(quantized, info)``: converted and skipped layers,
    whether calibration was used, the kinds of the int8 layers and their share of the
    multiply-adds (``skipped`` maps each reason to its layers)."""
    static = "calibration_data" in inspect.signature(pycompress.quantize).parameters
    kw = {"calibration_data": [calibration]} if static else {}
    q, result = pycompress.quantize(copy.deepcopy(model), mode="w8a8", return_result=True, warn=False, **kw)
    kinds: dict[str, int] = {}
    for m in q.modules():
        if _int8_module(m):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    skipped: dict[str, list[str]] = {}
    for layer, why in result.skipped.items():
        skipped.setdefault(why, []).append(layer)
    info = {"calibrated": static, "converted": list(result.converted), "skipped": skipped,
            "int8_layers": kinds, "int8_macs_share": int8_macs_share(model, q, calibration),
            "float_convs": sum(1 for m in q.modules() if type(m) is nn.Conv2d)}
    return q.eval(), info


def _int8_note(info: dict) -> str:
    kinds = " + ".join(f"{n} {k}" for k, n in info["int8_layers"].items()) or "no layer"
    how = ("static activation scales from calibration images" if info["calibrated"] else
           "activations quantized at run time (this pycompress.quantize takes no calibration_data)")
    return (f"pycompress.quantize(mode='w8a8'): {kinds} in int8 ({100 * info['int8_macs_share']:.1f}% of the "
            f"multiply-adds), {info['float_convs']} Conv2d left in float; {how}")


def prune_and_compact(model: nn.Module, method: str, ratio: float, calibration: torch.Tensor,
                      include=PRUNE_LAYERS, scope: str = "layer") -> tuple[nn.Module, dict]:
    """A copy of ``model`` with ``ratio`` of the prunable channels of every dependency group whose
    producers match ``include`` (None: every group but the classifier's outputs) pruned by
    ``method``, then compacted to a narrower dense network. Returns ``(model, info)``."""
    m = copy.deepcopy(model)
    example = calibration[:4]
    m = pycompress.prune(m, ratio, pattern="channel", method=method, scope=scope,
                         include=list(include) if include is not None else None,
                         exclude="classifier" if include is None else None,
                         calibration_data=[calibration] if method != "magnitude" else None,
                         example_inputs=example)
    m, report = pycompress.compact(m, example, return_report=True)
    info = {"method": method, "ratio": ratio, "scope": scope, "include": list(include) if include else None,
            "parameters_before": report.parameters_before,
            "parameters_after": report.parameters_after, "layers_narrowed": len(report.compacted),
            "refused": dict(report.refused), "max_abs_diff": report.max_abs_diff}
    return m.eval(), info


def measure(model: nn.Module, data: TensorDataset, name: str, reference=None, repeats: int = 20,
            batch: int = 32, progress: bool = False):
    """:func:`pycompress.evaluate` on ``data``: accuracy, sizes, p50 latency at batch 1 and ``batch``."""
    return pycompress.evaluate(model, _batches(data), metric="accuracy", batch_sizes=(1, batch),
                               warmup=2, repeats=repeats, reference=reference, name=name,
                               progress=progress)


# --------------------------------------------------------------------------- rendering
def render_markdown(report: dict) -> str:
    """report.md of a vision demo run from its report dict (as written to report.json)."""
    cfg = report["config"]
    rows = report["rows"]
    tr = report["transfer"]
    md = ["# pycompress demo: a pretrained CNN transferred to a new task, compressed three ways", ""]
    src = ("EfficientNet-Lite0 with its ImageNet weights (package `"
           f"{effnet.WEIGHTS_DISTRIBUTION}`)" if cfg["pretrained"] else
           "EfficientNet-Lite0 from random weights (pretrained=False)")
    md.append(f"Source: {src}. Target: scikit-learn's 8x8 digits upsampled to {cfg['image_size']}x"
              f"{cfg['image_size']} RGB, 10 classes, {cfg['train']} training and {cfg['test']} held-out "
              f"test images.")
    md.append("")
    photos = tr.get("imagenet_check") or []
    if photos:
        md.append("The source model on scikit-image's sample photos (ImageNet classes, best-ranked class of the "
                  "expected family in the top 5): " + "; ".join(
                      f"{p['photo']} ({p['shows']}): " + (f"{p['label']} {100 * p['probability']:.1f}%, rank "
                                                         f"{p['rank']}" if p["rank"] else "not in the top 5")
                      for p in photos) + ".")
        md.append("")
    md.append(f"Transfer with `pycompress.finetune`: a new head on the frozen backbone, {tr['probe']['epochs']} "
              f"epoch(s) (test accuracy {100 * tr['probe']['test_accuracy']:.2f}%), then the whole network, "
              f"{tr['finetune']['epochs']} epoch(s) ({100 * tr['finetune']['test_accuracy']:.2f}%): the "
              "reference row.")
    md.append("")
    md.append(f"Seed {cfg['seed']}, {cfg['world_size']} training process(es), "
              f"{'quick' if cfg['quick'] else 'full'} run, {report['seconds']:.0f} s, torch "
              f"{report['environment']['torch']} on {report['environment']['machine']}.")
    md.append("")
    md += _common.markdown_table(rows)
    md.append("")
    md.append("Columns (from `pycompress.evaluate`): accuracy on the held-out test set; Δ in percentage "
              "points vs the reference; params = values of the dense equivalent; non-zeros among them; "
              "bytes = size written by `pycompress.save`; p50 latency in ms at batch 1 and "
              f"{cfg['batch']}; compression = reference bytes / bytes; speed-up = reference latency / "
              "latency.")
    md.append("")
    return "\n".join(md + _common.notes_and_plot(rows)) + "\n"


# --------------------------------------------------------------------------- the scenario
def run_vision(out: str = "pycompress-demo", seed: int = 0, quick: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, threads: int | None = None,
               config: VisionConfig | None = None) -> dict:
    """Runs the vision demo; on rank 0 prints the table and writes ``report.md``, ``report.json``,
    ``compare.png`` and the saved models into ``out``. Returns the report dict (on every rank;
    only rank 0 has measured rows). ``config`` overrides the sizes of ``quick`` / full;
    ``threads``: intra-op threads while it runs (None keeps torch's)."""
    for module, purpose in REQUIRED:  # before any work: the error names the extra at once
        effnet.require(module, purpose)
    cfg = config or config_for(quick)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(out, seed, quick, progress, log, cfg)
    finally:
        torch.set_num_threads(previous)


def _run(out: str, seed: int, quick: bool, progress: bool, log: Callable[[str], None],
         cfg: VisionConfig) -> dict:
    t_start = time.perf_counter()
    ctx = pdist.setup("cpu")
    say = log if ctx.is_main else (lambda _msg: None)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    stages: dict[str, float] = {}
    data = digits_images(cfg.image_size, seed, train_per_class=cfg.train_per_class,
                         test_per_class=cfg.test_per_class)
    calib = data["train"].tensors[0][:cfg.calibration_images]
    common = dict(batch_size=cfg.train_batch, progress=progress)
    steps = 6

    def stage(name: str, t0: float) -> None:
        stages[name] = time.perf_counter() - t0

    say(f"[1/{steps}] EfficientNet-Lite0 ({'ImageNet weights' if cfg.pretrained else 'random init'}) "
        f"transferred to digits at {cfg.image_size}x{cfg.image_size} ({len(data['train'])} training images)")
    t = time.perf_counter()
    source = effnet.efficientnet_lite0(pretrained=cfg.pretrained, seed=seed)
    photos = effnet.sample_photo_check(source) if cfg.pretrained else []
    for p in photos:
        say(f"      ImageNet check, {p['photo']} ({p['shows']}): " + (
            f"{p['label']} {100 * p['probability']:.1f}% (rank {p['rank']})" if p["rank"] else
            f"not recognised (top-5 classes {[c for c, _ in p['top5']]})"))
    transferred, transfer_info = transfer(data, cfg, seed, progress, say, model=source)
    transfer_info["imagenet_check"] = photos
    stage("transfer", t)
    models: "OrderedDict[str, tuple[nn.Module, str, dict]]" = OrderedDict()
    tf_kwargs = {"classes": CLASSES}
    models["transferred fp32"] = (transferred, "uncompressed reference: EfficientNet-Lite0, "
                                  f"{'ImageNet weights' if cfg.pretrained else 'random init'}, new head, fine-tuned",
                                  {"factory": "build_transferred", "kwargs": tf_kwargs})

    say(f"[2/{steps}] int8")
    t = time.perf_counter()
    q, qinfo = quantize_int8(transferred, calib)
    models["int8"] = (q, _int8_note(qinfo), {"factory": "build_transferred", "kwargs": tf_kwargs})
    stage("int8", t)

    pct = f"{round(100 * cfg.prune_ratio)}%"
    prune_info: dict = {}
    for method, what in PRUNE_METHODS:
        say(f"[3/{steps}] channel pruning {pct} by {method} + compact, then a {cfg.prune_finetune_epochs}-epoch "
            "fine-tune")
        t = time.perf_counter()
        m, info = prune_and_compact(transferred, method, cfg.prune_ratio, calib, cfg.prune_layers)
        info["accuracy_no_ft"] = accuracy(m, data["test"])
        which = (" (the inner channels of every block and the head's)"
                 if tuple(cfg.prune_layers) == PRUNE_LAYERS else "")
        narrowed = (f"{pct} of the channels of every group produced by {', '.join(cfg.prune_layers)}{which} "
                    f"by {what}; compact() to a dense "
                    f"network of {info['parameters_after'] / 1e6:.2f} M parameters "
                    f"({info['layers_narrowed']} layers narrowed)")
        models[f"pruned {pct} {method}"] = (m, narrowed + ", no retraining",
                                           {"factory": "build_transferred", "kwargs": tf_kwargs})
        tuned, _ = pycompress.finetune(copy.deepcopy(m), data["train"], freeze=None,
                                       epochs=cfg.prune_finetune_epochs, lr=cfg.finetune_lr, seed=seed + 2,
                                       **common)
        info["accuracy_ft"] = accuracy(tuned, data["test"])
        models[f"pruned {pct} {method} +ft"] = (tuned.eval(), f"the same, fine-tuned for "
                                               f"{cfg.prune_finetune_epochs} epoch(s)",
                                               {"factory": "build_transferred", "kwargs": tf_kwargs})
        prune_info[method] = info
        stage(f"pruning {method}", t)
        say(f"      {method}: {100 * info['accuracy_no_ft']:.2f}% without fine-tuning, "
            f"{100 * info['accuracy_ft']:.2f}% after")

    say(f"[4/{steps}] pruned + int8")
    t = time.perf_counter()
    pq, pqinfo = quantize_int8(models[f"pruned {pct} activation +ft"][0], calib)
    models[f"pruned {pct} activation +ft + int8"] = (pq, "the fine-tuned activation-pruned network, then "
                                                    + _int8_note(pqinfo),
                                                    {"factory": "build_transferred", "kwargs": tf_kwargs})
    stage("pruned + int8", t)

    say(f"[5/{steps}] student CNN {tuple(cfg.student_widths)} distilled from the transferred model")
    t = time.perf_counter()
    logits_path = os.path.join(out, "teacher_logits.npy")
    pycompress.precompute_teacher_logits(transferred, data["train"], logits_path)
    pdist.barrier()
    student = build_student(cfg.student_widths, seed=seed + 3)
    student, _ = pycompress.distill(None, student, pycompress.TeacherLogitsDataset(data["train"], logits_path),
                                    epochs=cfg.student_epochs, temperature=cfg.kd_temperature, alpha=cfg.kd_alpha,
                                    lr=cfg.student_lr, seed=seed + 3, **common)
    st_kwargs = {"widths": list(cfg.student_widths), "classes": CLASSES}
    models["student distilled"] = (student.eval(), f"CNN {'-'.join(map(str, cfg.student_widths))} (stride-2 "
                                   f"3x3 convs) trained with the fused KD loss (T={cfg.kd_temperature:g}, "
                                   f"{cfg.kd_alpha:g} KD + {1 - cfg.kd_alpha:.2g} cross-entropy) on the "
                                   f"teacher's logits, {cfg.student_epochs} epochs",
                                   {"factory": "build_student", "kwargs": st_kwargs})
    stage("student distilled", t)
    say(f"[6/{steps}] the same student without the teacher")
    t = time.perf_counter()
    baseline = build_student(cfg.student_widths, seed=seed + 3)
    baseline, _ = pycompress.finetune(baseline, data["train"], freeze=None, epochs=cfg.student_epochs,
                                      lr=cfg.student_lr, seed=seed + 3, **common)
    models["student w/o teacher"] = (baseline.eval(), "baseline: the same student, same initialisation and "
                                     "epochs, cross-entropy on the labels only",
                                     {"factory": "build_student", "kwargs": st_kwargs})
    stage("student w/o teacher", t)
    pdist.barrier()

    report: dict = {"rows": []}
    if ctx.is_main:
        if os.path.exists(logits_path):
            os.remove(logits_path)
        say("measuring every model on the held-out test set")
        t = time.perf_counter()
        rows, reference = [], None
        for name, (model, note, factory) in models.items():
            ev = measure(model, data["test"], name, reference, cfg.repeats, cfg.batch)
            row = _common.row_from_report(ev, note, batch=cfg.batch)
            if reference is None:  # the reference against itself
                reference = ev
                row.update(delta=0.0, compression=1.0, speedup_b1=1.0, speedup_batch=1.0)
            rows.append({**row, "evaluation": ev.to_dict()})
            folder = os.path.join(out, "models", _common.slug(name))
            pycompress.save(model, os.path.join(folder, "model"))
            _common.write_atomic(os.path.join(folder, "pycompress.json"), json.dumps({
                "factory": f"pycompress.demo.vision:{factory['factory']}",
                "factory_kwargs": factory["kwargs"],
                "data": "pycompress.demo.vision:target_test_data",
                "data_kwargs": {"seed": seed, "image_size": cfg.image_size,
                                "test_per_class": cfg.test_per_class},
            }, indent=2))
        stage("measuring", t)
        cfg_dict = dataclasses.asdict(cfg)
        cfg_dict["student_widths"] = list(cfg.student_widths)
        report = {
            "task": "vision",
            "rows": rows,
            "seconds": time.perf_counter() - t_start,
            "stages": stages,
            "transfer": transfer_info,
            "int8": qinfo,
            "pruned_int8": pqinfo,
            "pruning": prune_info,
            "config": {**cfg_dict, "seed": seed, "quick": quick, "world_size": ctx.world_size,
                       "train": len(data["train"]), "test": len(data["test"]), "model": "EfficientNet-Lite0",
                       "weights": effnet.WEIGHTS_DISTRIBUTION if cfg.pretrained else None},
            "environment": _common.environment(),
        }
        _common.write_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=2))
        _common.write_atomic(os.path.join(out, "report.md"), render_markdown(report))
        _common.write_plot(rows, out)
        log("")
        log(_common.render_table(rows))
        log("")
        log(f"wrote {os.path.join(out, 'report.md')}, report.json and compare.png "
            f"({report['seconds']:.1f} s)")
    pdist.barrier()
    return report
