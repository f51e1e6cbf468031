"""Benchmark: CNN channel pruning + ``pycompress.compact`` against dense and against Torch-Pruning.

ResNet-18, MobileNetV2 and VGG-16 built by ``tests/cnn_models.py`` (torchvision's architectures
layer for layer, random weights, seed 0), batch 8 x 3x224x224 (2 x 3x64x64 with ``--quick``),
eval mode, no gradients. Variants, timed in the same run on the same input, interleaved (one
call of each variant per round, median over the rounds):

* ``dense``: the unpruned model;
* ``pycompress 50% compact``: ``prune(model, 0.5, pattern="channel", scope="layer",
  method="magnitude_l2")`` (half of the prunable channels of every dependency group, the
  classifier's outputs kept) and ``compact``;
* ``Torch-Pruning 50%`` (when ``torch-pruning`` is installed): ``MagnitudePruner`` with
  ``MagnitudeImportance(p=2)``, ``pruning_ratio=0.5``, the classifier in ``ignored_layers``.

Every variant also gets a ``[1 thread, CPU time]`` row: the best CPU time of one forward pass on
one thread (``common.per_core_ms``), which other load on a shared machine barely moves, unlike
the wall-clock medians of the 2-thread rows.

Columns: ``GFLOP`` (multiply-adds x 2 of every conv and linear layer on this input, counted with
forward hooks from the layer shapes), ``FLOP ratio``, ``params (M)``, ``param ratio`` (variant /
dense) and, for pycompress, ``rel err``: the relative max difference between the compacted and the
masked model's outputs, and ``same shapes as Torch-Pruning``: whether every conv, linear and
BatchNorm layer has the shape of Torch-Pruning's result (then their latencies differ by noise only).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

import pycompress
from common import PER_CORE, per_core_ms, rows_by_case

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import cnn_models  # noqa: E402

KERNEL = "cnn_prune"


def _flops(model, x) -> float:
    macs = 0

    def hook(m, args, out):
        nonlocal macs
        if isinstance(m, torch.nn.Conv2d):
            macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 2.0 * macs


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _torch_pruning(model, x):
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[_classifier(model)])
    pruner.step()
    return model


def _shapes(model) -> list[tuple]:
    """The weight shapes of the conv, linear and BatchNorm layers, in module order."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, kinds)]


def _interleaved(fns: dict, rounds: int) -> dict:
    with torch.no_grad():
        for fn in fns.values():
            fn()
        times = {k: [] for k in fns}
        order = list(fns)
        for i in range(rounds):
            # each variant is timed in every position of the round in turn (caches, allocator)
            for k in order[i % len(order):] + order[:i % len(order)]:
                fn = fns[k]
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"ms": statistics.median(v), "ms_min": min(v), "repeats": len(v)} for k, v in times.items()}


def run(device: str, quick: bool = False) -> list[dict]:
    batch, side = (2, 64) if quick else (8, 224)
    rounds = 3 if quick else 7
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for name, make in cnn_models.IMAGENET_MODELS.items():
        dense = make().to(device)
        masked = pycompress.prune(copy.deepcopy(dense), 0.5, pattern="channel", scope="layer",
                                  method="magnitude_l2", example_inputs=x)
        with torch.no_grad():
            ref = masked(x)
        small = pycompress.compact(masked, x)
        with torch.no_grad():
            rel = float((small(x) - ref).abs().max() / ref.abs().max())
        variants = {"dense": dense, "pycompress 50% compact": small}
        tp_model = _torch_pruning(dense, x)
        if tp_model is not None:
            variants["Torch-Pruning 50%"] = tp_model
        timed = _interleaved({k: (lambda m=m: m(x)) for k, m in variants.items()}, rounds)
        per_core = per_core_ms([(k, lambda m=m: m(x)) for k, m in variants.items()], repeats=2 if quick else 3)
        base_flops, base_params = _flops(dense, x), sum(p.numel() for p in dense.parameters())
        case = f"{name} B={batch} {side}x{side}"
        for impl, model in variants.items():
            fl = _flops(model, x)
            params = sum(p.numel() for p in model.parameters())
            row = {"kernel": KERNEL, "case": case, "impl": impl, **timed[impl], "GFLOP": fl / 1e9,
                   "FLOP ratio": fl / base_flops, "params (M)": params / 1e6, "param ratio": params / base_params,
                   "threads": torch.get_num_threads()}
            if impl.startswith("pycompress"):
                row["rel err"] = rel
                if tp_model is not None:
                    row["same shapes as Torch-Pruning"] = _shapes(small) == _shapes(tp_model)
            rows.append(row)
            rows.append({**row, "impl": f"{impl} {PER_CORE}", "ms": per_core[impl], "ms_min": per_core[impl],
                         "repeats": 2 if quick else 3, "threads": 1})
        del dense, masked, small, tp_model, variants
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Speed-up and parameter ratio of each pruned variant against dense, per model."""
    lines = []
    for case, d in rows_by_case(rows).items():
        for suffix in ("", f" {PER_CORE}"):
            lines += _summary_lines(case, d, suffix)
    return lines


def _summary_lines(case: str, d: dict, suffix: str) -> list[str]:
    lines = []
    base = d.get("dense" + suffix)
    if base is None:
        return lines
    for impl, r in d.items():
        if impl == "dense" + suffix or not impl.endswith(suffix) or (not suffix and impl.endswith(PER_CORE)):
            continue
        extra = f"; compacted vs masked rel err {r['rel err']:.1e}" if "rel err" in r else ""
        lines.append(f"{case}: {impl}: {r['ms']:.1f} ms vs dense {base['ms']:.1f} ms = "
                     f"{base['ms'] / r['ms']:.2f}x faster; params x{r['param ratio']:.3f}, "
                     f"FLOP ratio {r['FLOP ratio']:.3f}{extra}")
    return lines
