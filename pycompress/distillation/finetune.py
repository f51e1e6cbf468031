"""Transfer learning: give a trained model a new head, freeze what is asked, train on new data."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from pycompress.distillation import training

__all__ = ["finetune", "find_head"]


def find_head(model: nn.Module, head_name: str | None = None) -> tuple[str, nn.Module]:
    """The classification head of ``model``: the module named ``head_name`` or, by default, the
    last ``nn.Linear`` in module order (``fc``, ``classifier``, ``head``, ... in common models)."""
    if head_name is not None:
        try:
            return head_name, model.get_submodule(head_name)
        except AttributeError:
            raise ValueError(f"head_name={head_name!r}: the model has no such module") from None
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name:
            last = (name, module)
    if last is None:
        raise ValueError("cannot find a head: the model has no nn.Linear layer; pass head_name=")
    return last


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _freeze_names(model: nn.Module, head: str, freeze) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    if freeze is None or freeze is False:
        return set()
    if isinstance(freeze, str) and freeze == "backbone":
        return {n for n in names if not (n == head or n.startswith(head + "."))}
    patterns: Sequence[str]
    if isinstance(freeze, str):
        patterns = [freeze]
    elif isinstance(freeze, (list, tuple)) and all(isinstance(p, str) for p in freeze):
        patterns = list(freeze)
    else:
        raise TypeError(f"freeze must be 'backbone', None or a list of name globs, got {freeze!r}")
    out = set()
    for pat in patterns:
        hits = {n for n in names
                if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.rpartition(".")[0], pat)
                or fnmatch.fnmatchcase(n, pat + ".*")}
        if not hits:
            raise ValueError(f"freeze pattern {pat!r} matches no parameter or module of the model")
        out |= hits
    return out


def finetune(
    model: nn.Module,
    train_data: Dataset | Sequence,
    num_classes: int | None = None,
    head: nn.Module | None = None,
    freeze="backbone",
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    *,
    optimizer=None,
    weight_decay: float = 0.0,
    head_name: str | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    pruning_schedule=None,
    device=None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tunes ``model`` on ``train_data`` (a Dataset of ``(inputs, labels)`` or a list of
    such pairs), in place. Labels are class indices; one outside ``0 .. C-1`` (other than
    ``ignore_index``) raises ValueError naming it before the step that would use it.

    * ``head``: a module that replaces the model's head (found by :func:`find_head` or
      ``head_name``); or ``num_classes``: a new ``nn.Linear`` head with that many outputs (drawn
      from ``seed``) when the current head has another size.
    * ``freeze``: ``"backbone"`` (train the head only), ``None`` (train everything) or a list of
      globs of parameter/module names to keep fixed. Parameters are frozen for the run only:
      their ``requires_grad`` flags are restored afterwards.
    * ``pruning_schedule``: gradual pruning during fine-tuning (as in :func:`pycompress.distill`).
    * Loss: cross-entropy (``ignore_index``, ``label_smoothing``), mean over the global batch.
    * ``batch_size`` is the global batch under ``torchrun`` (see :mod:`pycompress.distributed`);
      ``checkpoint_dir``/``resume`` save after every epoch and continue from the last one.

    Returns ``(model, history)``; ``history`` has one dict per epoch (``epoch``, ``loss``,
    ``accuracy``, ``samples``, ``seconds``). The model is returned in ``eval()`` mode.

    Example::

        model, history = pycompress.finetune(backbone_and_head, target_ds, num_classes=5,
                                             freeze="backbone", epochs=5, lr=1e-2)
        print(history[-1]["accuracy"])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}")

    needs_head = head is not None or num_classes is not None or freeze == "backbone"
    name = None
    if needs_head:
        name, old = find_head(model, head_name)
        if head is None and num_classes is not None and getattr(old, "out_features", None) != num_classes:
            if not isinstance(old, nn.Linear):
                raise ValueError(f"num_classes: the head {name!r} is not an nn.Linear; pass head=")
            ref = old.weight
            with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
                torch.manual_seed(seed)
                head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                                 device=ref.device, dtype=ref.dtype)
        if head is not None:
            _set_module(model, name, head)
    frozen = _freeze_names(model, name or "", freeze)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen and flags[n])
    if not any(p.requires_grad for p in model.parameters()):
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise ValueError("freeze leaves no trainable parameter")

    def loss_fn(logits, labels, _teacher_logits, _inputs):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=ignore_index, label_smoothing=label_smoothing)

    try:
        model, history = training.fit(
            model, train_data, loss_fn=loss_fn, epochs=epochs, batch_size=batch_size,
            shuffle=shuffle, seed=seed, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
            device=device, pruning=pruning_schedule, checkpoint_dir=checkpoint_dir, resume=resume,
            progress=progress, desc="finetune", weight_by="labels", ignore_index=ignore_index,
            class_labels=True,
        )
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
    model.eval()
    return model, history
