"""The training loop shared by :func:`pycompress.finetune` and :func:`pycompress.distill`.

One loop, single-process or data-parallel (see :mod:`pycompress.distributed`): global batches,
DDP around the trainable model only, all-reduced metrics, a tqdm bar on rank 0, gradual pruning
with masks kept identical on every rank, atomic per-epoch checkpoints and exact resume.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from pycompress.distillation import distributed as pdist
from pycompress import _utils
from pycompress.export import serialization
from pycompress.pruning.gradual import GradualPruning

__all__ = ["fit", "build_optimizer", "model_outputs", "move_batch", "unpack_sample",
           "latest_checkpoint"]

_STATE_FILE = "state.pt"
_MODEL_NAME = "model"
_LATEST = "latest"


# --------------------------------------------------------------------------- batches


def move_batch(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Moves a tensor / tuple / list / dict of tensors to ``device`` (floats cast to ``dtype``)."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(move_batch(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: move_batch(v, device, dtype) for k, v in x.items()}
    return x


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Calls ``model`` on a batch: a tensor, a tuple of positional args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def model_outputs(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits`` (Hugging Face) or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def unpack_sample(batch: Any, need_teacher_logits: bool = False):
    """Splits a collated batch into (inputs, labels, teacher_logits or None)."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise TypeError(
            "train_data must yield (inputs, labels) pairs"
            + (" or (inputs, labels, teacher_logits) triples" if need_teacher_logits else "")
            + f"; got a batch of type {type(batch).__name__}"
            + (f" with {len(batch)} elements" if isinstance(batch, (list, tuple)) else "")
        )
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    if need_teacher_logits:
        raise TypeError("with teacher=None, train_data must yield (inputs, labels, teacher_logits)")
    return batch[0], batch[1], None


def is_indexable_dataset(data: Any) -> bool:
    """A ``Dataset`` with a length, or any sequence of samples (e.g. a list of ``(x, y)`` pairs)."""
    if isinstance(data, (str, bytes, torch.Tensor, dict)):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def out_of_range_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The integer labels that are neither ``ignore_index`` nor a class in ``0 .. num_classes-1``."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return labels.new_empty(0)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    return labels[bad]


def _label_error(bad: torch.Tensor, num_classes: int, ignore_index: int, epoch: int, step: int) -> str:
    where = f"(epoch {epoch + 1}, step {step + 1})"
    if bad.numel() == 0:
        return (f"a label on another rank is out of range for a model with {num_classes} classes {where}; "
                f"labels must be in 0..{num_classes - 1} or ignore_index={ignore_index}")
    values = sorted({int(v) for v in bad.reshape(-1).tolist()})
    more = f" (and {len(values) - 1} other bad value(s): {values[1:6]})" if len(values) > 1 else ""
    return (f"label {values[0]} is out of range for a model with {num_classes} classes {where}{more}; "
            f"labels must be in 0..{num_classes - 1}, or ignore_index={ignore_index} for a sample "
            "to skip")


# --------------------------------------------------------------------------- optimizer


def build_optimizer(optimizer, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0):
    """An optimizer from ``None``/"adam" (Adam), "adamw", "sgd" (momentum 0.9), a factory
    ``params -> Optimizer`` or an optimizer instance built over ``params``."""
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not own.issubset({id(p) for p in params}):
            raise ValueError("optimizer holds parameters that are not trainable parameters of "
                             "the model being trained")
        return optimizer
    if callable(optimizer) and not isinstance(optimizer, str):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("optimizer factory must return a torch.optim.Optimizer")
        return opt
    name = "adam" if optimizer is None else str(optimizer).lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be None, 'adam', 'adamw', 'sgd', a factory or a "
                     f"torch.optim.Optimizer, got {optimizer!r}")


# --------------------------------------------------------------------------- checkpoints


def _plain_state(obj: Any) -> dict:
    """Serializable attributes (numbers, strings, bools) of a pruning schedule."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return {"state_dict": obj.state_dict()}
    return {"attrs": {k: v for k, v in vars(obj).items()
                      if not k.startswith("__") and isinstance(v, (bool, int, float, str))}}


def _restore_plain_state(obj: Any, state: dict) -> None:
    if "state_dict" in state:
        obj.load_state_dict(state["state_dict"])
    else:
        for k, v in state.get("attrs", {}).items():
            setattr(obj, k, v)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The folder of the last complete checkpoint in ``checkpoint_dir`` (None if there is none)."""
    pointer = os.path.join(checkpoint_dir, _LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(checkpoint_dir, name)
    if not name or not os.path.isfile(os.path.join(path, _STATE_FILE)):
        raise RuntimeError(f"checkpoint pointer {pointer} names {name!r}, which is incomplete")
    return path


def _save_checkpoint(checkpoint_dir: str, epoch: int, model: nn.Module, state: dict) -> str:
    """Writes ``epoch-NNNN/`` (model via ``pycompress.save`` + ``state.pt``) then flips ``latest``.

    Everything goes to a temporary folder first; the rename and the pointer swap are atomic, so a
    crash at any point leaves the previous complete checkpoint in place.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = os.path.join(checkpoint_dir, name)
    tmp = os.path.join(checkpoint_dir, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    serialization.save(model, os.path.join(tmp, _MODEL_NAME))
    state_path = os.path.join(tmp, _STATE_FILE)
    with open(state_path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _utils.fsync_dir(tmp)
    if os.path.exists(final):
        # Only reachable when re-running an epoch after a resume: the pointer names an older
        # folder, so removing this one never leaves the pointer dangling.
        if latest_checkpoint(checkpoint_dir) == final:
            raise RuntimeError(f"refusing to overwrite the current checkpoint {final}")
        shutil.rmtree(final)
    os.rename(tmp, final)
    _utils.fsync_dir(checkpoint_dir)
    pointer_tmp = os.path.join(checkpoint_dir, f".{_LATEST}.tmp-{os.getpid()}")
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(checkpoint_dir, _LATEST))
    _utils.fsync_dir(checkpoint_dir)
    for entry in os.listdir(checkpoint_dir):
        if entry.startswith("epoch-") and entry != name:
            shutil.rmtree(os.path.join(checkpoint_dir, entry), ignore_errors=True)
    return final


def _load_checkpoint(path: str, model: nn.Module) -> dict:
    serialization.load(os.path.join(path, _MODEL_NAME), model)
    with open(os.path.join(path, _STATE_FILE), "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the loop

LossFn = Callable[[torch.Tensor, torch.Tensor, Any, Any], torch.Tensor]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 1009 + rank) % (2 ** 63)


def fit(
    model: nn.Module,
    train_data: Dataset,
    *,
    loss_fn: LossFn,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    lr: float,
    optimizer=None,
    weight_decay: float = 0.0,
    device=None,
    pruning=None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    need_teacher_logits: bool = False,
    before_wrap: Callable[[nn.Module, "pdist.DistContext"], None] | None = None,
    num_workers: int = 0,
    extra_state: dict | None = None,
    weight_by: str = "samples",
    ignore_index: int = -100,
    on_skip: Callable[[Any], None] | None = None,
    class_labels: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Trains ``model`` in place; returns it (never DDP-wrapped) and the per-epoch history.

    ``on_skip(inputs)`` runs instead of ``loss_fn`` on a rank left with nothing to learn in a
    step (so that, e.g., an FSDP-sharded teacher still takes part in its all-gathers).
    ``loss_fn(logits, labels, teacher_logits_or_None, inputs)`` returns the *mean* loss over the
    local batch: over its samples (``weight_by="samples"``) or over its labels that are not
    ``ignore_index`` (``weight_by="labels"``; the global count is all-reduced every step).
    ``pruning`` is ``None``, a :class:`pycompress.GradualPruning` built on ``model`` or a dict
    of its keywords (``total_steps`` defaults to every optimizer step of the run).
    ``class_labels``: integer labels are class indices of the logits' last dimension; a label
    outside ``0 .. C-1`` (other than ``ignore_index``) raises ValueError before the step that
    would use it (on every rank at once under data parallelism).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_indexable_dataset(train_data):
        raise TypeError("train_data must be a torch.utils.data.Dataset with a length or a list of "
                        f"(inputs, labels) pairs, got {type(train_data).__name__}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if resume and not checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir")

    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    ctx = pdist.setup(device)
    device = ctx.device
    world, rank = ctx.world_size, ctx.rank
    pdist.check_batching(len(train_data), batch_size, world)

    model.to(device)
    if before_wrap is not None:
        before_wrap(model, ctx)

    sampler = pdist.GlobalBatchSampler(train_data, batch_size, num_replicas=world, rank=rank,
                                       shuffle=shuffle, seed=seed)
    steps_per_epoch = len(sampler)
    loader = DataLoader(train_data, batch_sampler=sampler, num_workers=num_workers)

    if pruning is not None and not isinstance(pruning, dict) and not hasattr(pruning, "step"):
        raise TypeError("pruning_schedule must be None, a dict of GradualPruning keywords or a "
                        "GradualPruning object")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr, weight_decay)

    # The schedule swaps nn.Linear layers for MaskedLinear layers that keep the same Parameter
    # objects, so the optimizer stays valid; it is told the optimizer so that the moments of
    # pruned weights are cleared. All of this happens before the DDP wrapper is built.
    schedule = pruning
    if isinstance(pruning, dict):
        kwargs = dict(pruning)
        kwargs.setdefault("total_steps", max(1, epochs * steps_per_epoch))
        kwargs.setdefault("optimizer", opt)
        schedule = GradualPruning(model, **kwargs)
    elif schedule is not None and getattr(schedule, "optimizer", False) is None:
        schedule.optimizer = opt

    start_epoch, history = 0, []
    if resume:
        last = latest_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
        if last is not None:
            state = _load_checkpoint(last, model)
            model.to(device)
            owned = {id(p) for p in model.parameters()}
            if any(id(p) not in owned for g in opt.param_groups for p in g["params"]):
                raise RuntimeError(
                    f"the checkpoint {last} holds a model of another structure (e.g. pruned "
                    "layers) than the one being trained: pass the same pruning_schedule as the "
                    "interrupted run")
            opt.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
            history = list(state.get("history", []))
            if schedule is not None and "pruning" in state:
                _restore_plain_state(schedule, state["pruning"])
            pdist.barrier()

    net: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        pdist.broadcast_masks(model)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    show = ctx.is_main and progress
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(_epoch_seed(seed, epoch, rank))
            sampler.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            # this rank's sums: loss * weight, weight, correct predictions, labelled samples
            totals = torch.zeros(4, dtype=torch.float64)
            bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}",
                       disable=None if show else True, leave=False, dynamic_ncols=True)
            try:
                for step, batch in enumerate(loader):
                    n_local, n_global = sampler.shares(step)
                    inputs, labels, t_logits = unpack_sample(batch, need_teacher_logits)
                    inputs = move_batch(inputs, device)
                    labels = labels.to(device)
                    if t_logits is not None:
                        t_logits = t_logits.to(device)
                    valid = labels != ignore_index
                    opt.zero_grad(set_to_none=True)
                    logits = model_outputs(call_model(net, inputs))
                    bad = (out_of_range_labels(labels, logits.shape[-1], ignore_index)
                           if class_labels and n_local else labels.new_empty(0))
                    n_bad = int(bad.numel())
                    if weight_by == "labels":
                        w_local = int(valid.sum()) if n_local else 0
                        if ctx.enabled:  # one all-reduce for the label count and the check
                            red = pdist.all_reduce_sum(torch.tensor([w_local, n_bad]))
                            w_global, n_bad = int(red[0]), int(red[1])
                        else:
                            w_global = w_local
                    else:
                        w_local, w_global = n_local, n_global
                        if class_labels and ctx.enabled:
                            n_bad = int(pdist.all_reduce_sum(torch.tensor([n_bad]))[0])
                    if n_bad:
                        raise ValueError(_label_error(bad, logits.shape[-1], ignore_index, epoch, step))
                    if w_local == 0:
                        # nothing of this step's global batch to learn from on this rank: a zero
                        # loss through the model keeps DDP's gradient reduction in step, and
                        # on_skip runs what other collectives expect (a sharded teacher)
                        if on_skip is not None:
                            on_skip(inputs)
                        loss = logits.sum() * 0.0
                        loss.backward()
                    else:
                        loss = loss_fn(logits, labels, t_logits, inputs)
                        scale = w_local * world / w_global
                        (loss * scale if scale != 1.0 else loss).backward()
                    if w_global > 0:
                        opt.step()
                    if schedule is not None:
                        schedule.step()
                        pdist.broadcast_masks(model)
                    if w_local:
                        with torch.no_grad():
                            correct = int(((logits.argmax(-1) == labels) & valid).sum())
                        totals += torch.tensor([float(loss.detach()) * w_local, w_local,
                                                correct, int(valid.sum())], dtype=torch.float64)
                    bar.update(1)
                    if show and totals[1] > 0 and totals[3] > 0:
                        bar.set_postfix(loss=f"{float(totals[0] / totals[1]):.4f}",
                                        acc=f"{float(totals[2] / totals[3]):.3f}")
            finally:
                bar.close()
            g = pdist.all_reduce_sum(totals)
            record = {
                "epoch": epoch + 1,
                "loss": float(g[0] / g[1]) if g[1] > 0 else float("nan"),
                "accuracy": float(g[2] / g[3]) if g[3] > 0 else float("nan"),
                "samples": sum(sampler.shares(s)[1] for s in range(steps_per_epoch)),
                "seconds": time.perf_counter() - t0,
            }
            if schedule is not None and hasattr(schedule, "current_sparsity"):
                record["sparsity"] = float(schedule.current_sparsity)
            history.append(record)
            if checkpoint_dir:
                if ctx.is_main:
                    ckpt = {
                        "epoch": epoch + 1,
                        "optimizer": opt.state_dict(),
                        "history": history,
                        "rng": torch.get_rng_state(),
                        "seed": int(seed),
                        "world_size": int(world),
                        "batch_size": int(batch_size),
                    }
                    if schedule is not None:
                        ckpt["pruning"] = _plain_state(schedule)
                    if extra_state:
                        ckpt.update(extra_state)
                    _save_checkpoint(checkpoint_dir, epoch + 1, model, ckpt)
                pdist.barrier()
    opt.zero_grad(set_to_none=True)  # no stale gradients (or their memory) on the result
    return model, history
