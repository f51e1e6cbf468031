"""The end-to-end demo: transfer a model to a new task, compress it several ways, measure it all.

Data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside scikit-learn: no
download). A teacher MLP learns the source domain (digits 0-4). It is transferred to the target
domain (digits 5-9) from a few labelled samples per class by fine-tuning. The transferred model is
then compressed: int8 (w8a8); pruned to 50% / 90% / 2:4 with fine-tuning (gradual pruning while
distilling from the uncompressed model); a smaller student distilled from it on the unlabelled
target pool, next to the same student trained on the labelled samples only; the combination
distilled + pruned + int8; and half of the hidden neurons removed (activation importance by mean
absolute activation and by std times weight norm, magnitude, and mixed importance, then
``compact`` to smaller dense layers), with and without a short distillation. Every model is
evaluated on the held-out target test set against the uncompressed transferred model. Run it
with ``pycompress demo --task digits-mlp`` (``--quick`` for a fast pass).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import pycompress
from pycompress import _optional
from pycompress.demo._common import (BATCH as _BATCH, markdown_table, render_table, report_from_dict,
                                     row_from_report, slug, write_atomic, write_plot)
from pycompress.demo import _common
from pycompress.distillation import distributed as pdist

__all__ = ["run_demo", "build_model", "digits_splits", "target_test_data", "measure",
           "row_from_report", "report_from_dict", "render_markdown", "render_table",
           "write_plot"]

TEACHER_HIDDEN = (256, 256)
STUDENT_HIDDEN = (8,)
CLASSES = 5


def build_model(hidden=TEACHER_HIDDEN, classes: int = CLASSES, in_features: int = 64,
                seed: int | None = None) -> nn.Sequential:
    """An MLP ``64 -> hidden... -> classes``; layers ``fc1, fc2, ...`` and ``head``."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    width = in_features
    for i, h in enumerate(hidden, 1):
        layers[f"fc{i}"] = nn.Linear(width, int(h))
        layers[f"act{i}"] = nn.ReLU()
        width = int(h)
    layers["head"] = nn.Linear(width, classes)
    return nn.Sequential(layers)


def digits_splits(seed: int = 0, shots: int = 10) -> dict[str, TensorDataset]:
    """Source (digits 0-4) train/test and target (digits 5-9, relabelled 0-4) splits.

    Target: half of every class is the held-out test set; the other half is the pool, of which
    ``shots`` samples per class are labelled; the rest of the pool is unlabelled (label -100).
    """
    datasets = _optional.require("sklearn.datasets", "the demo (its digits data set)", extra="demo")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {k: [] for k in ("src_train", "src_test", "labelled", "pool", "test")}
    for cls in range(10):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        half = len(idx) // 2
        if cls < 5:
            cut = int(len(idx) * 0.8)
            out["src_train"].append((idx[:cut], cls))
            out["src_test"].append((idx[cut:], cls))
        else:
            out["test"].append((idx[:half], cls - 5))
            out["labelled"].append((idx[half:half + shots], cls - 5))
            pool_labels = torch.full((len(idx) - half,), -100, dtype=torch.long)
            pool_labels[:shots] = cls - 5
            out["pool"].append((idx[half:], pool_labels))
    result = {}
    for name, parts in out.items():
        xs = torch.cat([x[i] for i, _ in parts])
        ys = torch.cat([torch.full((len(i),), lab, dtype=torch.long) if isinstance(lab, int)
                        else lab for i, lab in parts])
        perm = torch.randperm(len(xs), generator=g)
        result[name] = TensorDataset(xs[perm], ys[perm])
    return result


def target_test_data(seed: int = 0) -> TensorDataset:
    """The held-out target test set of the demo (digits 5-9 labelled 0-4)."""
    return digits_splits(seed)["test"]


# --------------------------------------------------------------------------- measuring


BATCH = _BATCH  # the second timed batch size (besides 1)


def measure(model: nn.Module, data: TensorDataset, name: str = "model", reference=None,
            repeats: int = 50):
    """:func:`pycompress.evaluate` of ``model`` on ``data`` (accuracy, parameters, non-zeros,
    bytes written by ``pycompress.save``, p50/p95 latency at batch 1 and 64), relative to the
    ``reference`` report when given."""
    x, y = data.tensors[0], data.tensors[1]
    return pycompress.evaluate(model, [(x, y)], metric="accuracy", batch_sizes=(1, BATCH),
                               warmup=max(3, repeats // 10), repeats=repeats,
                               reference=reference, name=name, progress=False)


# --------------------------------------------------------------------------- rendering

def render_markdown(report: dict) -> str:
    """report.md from a report dict (as written to report.json)."""
    cfg = report["config"]
    rows = report["rows"]
    md = ["# pycompress demo: transfer, compress, evaluate", ""]
    md.append(f"Data: scikit-learn digits. Source: digits 0-4 ({cfg['source_train']} training "
              f"images). Target: digits 5-9 with {cfg['shots']} labelled images per class "
              f"({cfg['labelled']} in all) in a pool of {cfg['pool']} target images (the rest "
              f"unlabelled) used for distillation; held-out target test set: {cfg['test']} "
              "images.")
    md.append("")
    md.append(f"Teacher on the source test set: {100 * report['source_accuracy']:.2f}%. "
              f"Reference: the transferred fp32 model. Seed {cfg['seed']}, "
              f"{cfg['world_size']} training process(es), {'quick' if cfg['quick'] else 'full'} "
              f"run, {report['seconds']:.1f} s, torch {report['environment']['torch']} on "
              f"{report['environment']['machine']}.")
    md.append("")
    md += markdown_table(rows)
    md.append("")
    md.append("Columns (from `pycompress.evaluate`): accuracy on the held-out target test set; Δ "
              "in percentage points vs the reference; params = values of the dense equivalent; "
              "non-zeros among them; bytes = size written by `pycompress.save`; p50 latency in "
              f"ms at batch 1 and {BATCH}; compression = reference bytes / bytes; speed-up = "
              "reference latency / latency. The layers are small (at most 256 wide), so "
              "latency here is mostly per-call overhead; `pycompress bench` measures the "
              "kernels at realistic sizes.")
    md.append("")
    return "\n".join(md + _common.notes_and_plot(rows)) + "\n"


def _layer_kinds(model: nn.Module) -> str:
    """'2 SparseLinear + 1 Linear': the kinds of linear layers in ``model``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("Linear"):
            counts[name] = counts.get(name, 0) + 1
    return " + ".join(f"{n} {k}" for k, n in counts.items()) or "no linear layer"




# --------------------------------------------------------------------------- the scenario


def run_demo(out: str = "pycompress-demo", seed: int = 0, quick: bool = False,
             progress: bool = True, log: Callable[[str], None] = print,
             threads: int | None = 1) -> dict:
    """Runs the demo; on rank 0 prints the table and writes ``report.md``, ``report.json``,
    ``compare.png`` and the saved models into ``out``. Returns the report dict (on every rank;
    only rank 0 has measured rows, the others get an empty ``rows`` list).

    Example::

        report = pycompress.demo.run_demo("demo-out", quick=True)
        print(report["rows"][0]["accuracy"])

    ``threads``: intra-op threads while the demo runs (default 1: these models are tiny, and
    one thread per process avoids oversubscription under ``torchrun``); None keeps torch's.
    """
    for module in ("sklearn", "matplotlib"):  # before any work: the error names the extra at once
        _optional.require(module, "pycompress demo", extra="demo")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(out, seed, quick, progress, log)
    finally:
        torch.set_num_threads(previous)


def _run(out: str, seed: int, quick: bool, progress: bool, log: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    ctx = pdist.setup("cpu")
    main = ctx.is_main
    say = log if main else (lambda _msg: None)
    torch.manual_seed(seed)
    shots = 10
    data = digits_splits(seed, shots=shots)
    e = (lambda full, fast: fast if quick else full)
    common = dict(seed=seed, progress=progress)

    say(f"[1/8] teacher on source digits 0-4 ({len(data['src_train'])} images)")
    teacher = build_model(TEACHER_HIDDEN, seed=seed)
    teacher, _ = pycompress.finetune(teacher, data["src_train"], freeze=None, epochs=e(20, 4),
                                     lr=2e-3, batch_size=32, **common)
    src_x, src_y = data["src_test"].tensors
    with torch.no_grad():
        source_acc = float((teacher(src_x).argmax(-1) == src_y).float().mean())

    say(f"[2/8] transfer to digits 5-9 from {shots} labelled images per class")
    transferred = copy.deepcopy(teacher)
    transferred, _ = pycompress.finetune(transferred, data["labelled"], num_classes=CLASSES,
                                         freeze=None, epochs=e(80, 15), lr=3e-3,
                                         batch_size=10, **common)

    models: "OrderedDict[str, tuple[nn.Module, str]]" = OrderedDict()
    models["transferred fp32"] = (transferred, "uncompressed reference")

    say("[3/8] int8 w8a8")
    models["int8 w8a8"] = (pycompress.quantize(copy.deepcopy(transferred), mode="w8a8"),
                           "all Linear layers to Int8Linear (per-channel weights, per-token "
                           "activations), no retraining")

    kd = dict(temperature=4.0, alpha=1.0, batch_size=32, **common)
    for name, sched, mode in (("pruned 50%", {"final_sparsity": 0.5}, "auto"),
                              ("pruned 90%", {"final_sparsity": 0.9}, "sparse")):
        say(f"[4/8] {name} (gradual pruning while distilling from the reference)")
        m = copy.deepcopy(transferred)
        m, _ = pycompress.distill(transferred, m, data["pool"], epochs=e(30, 4), lr=1e-3,
                                  pruning_schedule={**sched, "exclude": "head"}, **kd)
        m = pycompress.deploy_pruned(m, mode=mode)
        models[name] = (m, "hidden layers pruned by magnitude (global) while distilling from "
                        f"the reference; deploy_pruned(mode={mode!r}) gave {_layer_kinds(m)}")
    say("[4/8] pruned 2:4")
    m = pycompress.prune(copy.deepcopy(transferred), 0.5, pattern="2:4", exclude="head")
    m, _ = pycompress.distill(transferred, m, data["pool"], epochs=e(20, 4), lr=1e-3, **kd)
    m = pycompress.deploy_pruned(m, mode="auto")
    models["pruned 2:4"] = (m, "2 of every 4 input weights kept in the hidden layers, "
                            f"fine-tuned by distillation; deploy_pruned(mode='auto') gave "
                            f"{_layer_kinds(m)}")

    say(f"[5/8] student {STUDENT_HIDDEN} distilled from the transferred model")
    student = build_model(STUDENT_HIDDEN, seed=seed + 1)
    student, _ = pycompress.distill(transferred, student, data["pool"], epochs=e(60, 15),
                                    lr=5e-3, **kd)
    models["student distilled"] = (student, f"MLP {STUDENT_HIDDEN} trained on the teacher's "
                                   "soft targets over the target pool")

    say("[6/8] same student without the teacher (labelled images only)")
    baseline = build_model(STUDENT_HIDDEN, seed=seed + 1)
    baseline, _ = pycompress.finetune(baseline, data["labelled"], freeze=None, epochs=e(80, 15),
                                      lr=5e-3, batch_size=10, **common)
    models["student w/o teacher"] = (baseline, "baseline: the same student trained on the "
                                     "labelled images only")

    say("[7/8] distilled + pruned + int8")
    combo = build_model(STUDENT_HIDDEN, seed=seed + 1)
    combo.load_state_dict(student.state_dict())
    combo, _ = pycompress.distill(transferred, combo, data["pool"], epochs=e(30, 4), lr=2e-3,
                                  pruning_schedule={"final_sparsity": 0.5, "exclude": "head"},
                                  **kd)
    combo = pycompress.quantize(pycompress.deploy_pruned(combo, mode="dense"), mode="w8a8")
    models["distilled+pruned+int8"] = (combo, "the distilled student pruned to 50% while "
                                       "distilling further, then int8 w8a8")

    say("[8/8] structured 50% (neurons) + compact, without and with a short fine-tune")
    calib = data["pool"].tensors[0][:256]
    criteria = (("activation mean_abs", "activation", "mean_abs",
                 "activation importance, mean absolute activation of each neuron as the next layer "
                 "sees it (activation_score='mean_abs', the default)"),
                ("activation std_weighted", "activation", "std_weighted",
                 "activation importance, standard deviation of each neuron's activation times the "
                 "norm of the next layer's weight column (activation_score='std_weighted')"),
                ("magnitude", "magnitude", "mean_abs", "magnitude importance (L1 norm of the row)"),
                ("mixed", "mixed", "mean_abs", "mixed importance (half mean absolute activation, "
                 "half magnitude)"))
    for label, method, act_score, what in criteria:
        m = pycompress.prune(copy.deepcopy(transferred), 0.5, pattern="channel", method=method,
                             calibration_data=calib if method != "magnitude" else None, exclude="head",
                             activation_score=act_score)
        m = pycompress.compact(m)
        widths = "-".join(str(getattr(m, f"fc{i}").out_features) for i in range(1, len(TEACHER_HIDDEN) + 1))
        models[f"structured 50% {label}"] = (m, f"50% of the hidden neurons removed by {what}, "
                                             f"ranked globally, no retraining; compact() to dense {widths}")
        tuned = copy.deepcopy(m)
        tuned, _ = pycompress.distill(transferred, tuned, data["pool"], epochs=e(6, 2), lr=2e-3, **kd)
        models[f"structured 50% {label} +ft"] = (tuned, "the same compacted model distilled from the "
                                                 "reference for a few epochs")

    report: dict = {"rows": []}
    if main:
        os.makedirs(out, exist_ok=True)
        repeats = 30 if quick else 100
        rows, reference = [], None
        for name, (model, note) in models.items():
            ev = measure(model, data["test"], name, reference, repeats)
            row = row_from_report(ev, note)
            if reference is None:  # the reference against itself
                reference = ev
                row.update(delta=0.0, compression=1.0, speedup_b1=1.0, speedup_batch=1.0)
            rows.append({**row, "evaluation": ev.to_dict()})
            folder = os.path.join(out, "models", slug(name))
            pycompress.save(model, os.path.join(folder, "model"))
            write_atomic(os.path.join(folder, "pycompress.json"), json.dumps({
                "factory": "pycompress.demo:build_model",
                "factory_kwargs": {"hidden": list(STUDENT_HIDDEN if "student" in name
                                                  or "distilled" in name else TEACHER_HIDDEN),
                                   "classes": CLASSES},
                "data": "pycompress.demo:target_test_data",
                "data_kwargs": {"seed": seed},
            }, indent=2))
        report = {
            "task": "digits-mlp",
            "rows": rows,
            "source_accuracy": source_acc,
            "seconds": time.perf_counter() - t_start,
            "config": {"seed": seed, "quick": quick, "shots": shots,
                       "world_size": ctx.world_size, "labelled": len(data["labelled"]),
                       "pool": len(data["pool"]), "test": len(data["test"]),
                       "source_train": len(data["src_train"]),
                       "teacher_hidden": list(TEACHER_HIDDEN),
                       "student_hidden": list(STUDENT_HIDDEN)},
            "environment": _common.environment(),
        }
        write_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=2))
        write_atomic(os.path.join(out, "report.md"), render_markdown(report))
        write_plot(rows, out)
        log("")
        log(render_table(rows))
        log("")
        log(f"wrote {os.path.join(out, 'report.md')}, report.json and compare.png "
            f"({report['seconds']:.1f} s)")
    pdist.barrier()
    return report
