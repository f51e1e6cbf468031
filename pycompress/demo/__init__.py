"""The end-to-end demos: transfer a model to a new task, compress it several ways, measure it all.

* ``task="vision"`` (:mod:`pycompress.demo.vision`, ``make demo``): EfficientNet-Lite0 pretrained
  on ImageNet, transferred to upsampled digits, then int8, channel pruning by activation /
  magnitude / mixed + ``compact``, pruned + int8, and a distilled small CNN.
* ``task="digits-mlp"`` (:mod:`pycompress.demo.digits_mlp`): an MLP on 8x8 digits transferred
  from 0-4 to 5-9, then int8, pruning, distillation and structured pruning.

Both write ``report.md``, ``report.json``, ``compare.png`` and the saved models into ``out``.
Run them with ``pycompress demo --task vision|digits-mlp [--quick]``. The names of the digits
demo (``build_model``, ``digits_splits``, ``target_test_data``, ``measure``, ...) stay importable
from here.
"""

from __future__ import annotations

from typing import Callable

from pycompress import _optional  # noqa: F401  (the demos name the extra through it)
from pycompress.demo import digits_mlp
from pycompress.demo._common import render_table, report_from_dict, row_from_report, write_plot
from pycompress.demo.digits_mlp import (BATCH, CLASSES, STUDENT_HIDDEN, TEACHER_HIDDEN, build_model,
                                        digits_splits, measure, target_test_data)

__all__ = ["run_demo", "TASKS", "DEFAULT_TASK", "build_model", "digits_splits", "target_test_data", "measure",
           "row_from_report", "report_from_dict", "render_markdown", "render_table", "write_plot"]

TASKS = ("vision", "digits-mlp")
DEFAULT_TASK = "digits-mlp"


def run_demo(out: str = "pycompress-demo", seed: int = 0, quick: bool = False, progress: bool = True,
             log: Callable[[str], None] = print, threads: int | None = -1, task: str = DEFAULT_TASK,
             **kwargs) -> dict:
    """Runs one demo (``task``: ``"vision"`` or ``"digits-mlp"``) and returns its report dict; on
    rank 0 prints the table and writes ``report.md``, ``report.json``, ``compare.png`` and the
    saved models into ``out``.

    ``threads``: intra-op threads while the demo runs; the default is the task's own (1 for the
    small MLPs of ``digits-mlp``, torch's setting for ``vision``); None keeps torch's.
    ``kwargs`` go to the task (``config=`` of :func:`pycompress.demo.vision.run_vision`).

    Example::

        report = pycompress.demo.run_demo("demo-out", quick=True, task="vision")
        print(report["rows"][0]["accuracy"])
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "digits-mlp":
        if kwargs:
            raise TypeError(f"the digits-mlp demo takes no {', '.join(sorted(kwargs))}")
        return digits_mlp.run_demo(out, seed=seed, quick=quick, progress=progress, log=log,
                                   threads=1 if threads == -1 else threads)
    from pycompress.demo import vision

    return vision.run_vision(out, seed=seed, quick=quick, progress=progress, log=log,
                             threads=None if threads == -1 else threads, **kwargs)


def render_markdown(report: dict) -> str:
    """report.md from a report dict of either demo (as written to report.json)."""
    if report.get("task") == "vision":
        from pycompress.demo import vision

        return vision.render_markdown(report)
    return digits_mlp.render_markdown(report)
