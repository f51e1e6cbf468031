"""Knowledge distillation: train a student on a frozen teacher's soft targets (fused KD loss)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from pycompress.distillation import causal_lm as lm
from pycompress.distillation import distributed as pdist
from pycompress.distillation import training

__all__ = ["distill", "precompute_teacher_logits", "TeacherLogitsDataset"]


def _is_fsdp(module: nn.Module) -> bool:
    """True for a teacher sharded with FSDP (``FullyShardedDataParallel`` or ``fully_shard``)."""
    try:
        from torch.distributed import fsdp
    except Exception:  # pragma: no cover - torch without distributed
        return False
    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None),
                              getattr(fsdp, "FSDPModule", None)) if isinstance(k, type))
    return bool(kinds) and isinstance(module, kinds)


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _first_device(module: nn.Module) -> torch.device | None:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else None


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train_data: Dataset | Sequence,
    epochs: int = 3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    optimizer=None,
    pruning_schedule=None,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    ignore_index: int = -100,
    direction: str = "forward",
    device=None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    causal_lm: bool | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Distills ``teacher`` into ``student`` on ``train_data`` (a Dataset of ``(inputs, labels)``
    or a list of such pairs, or of token dicts for language models, see below).

    The loss is :class:`pycompress.nn.KDLoss` (the fused softmax-KL kernel):
    ``alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(student, labels)``
    with ``T = temperature``; with ``alpha=1`` labels are not used (pure distillation, so
    unlabelled samples can carry any label). Rows labelled ``ignore_index`` are left out; with
    ``alpha < 1`` any other label outside ``0 .. C-1`` raises ValueError naming it.
    The teacher runs in ``eval()`` under ``torch.no_grad()`` and is never wrapped by DDP; a
    teacher in bf16/fp16 gets its inputs cast to its dtype and its logits cast back. A teacher
    the caller sharded with FSDP (``torch.distributed.fsdp.fully_shard``) is used as it is: every
    rank runs its forward in every step, as the all-gathers of its shards require.
    ``teacher=None`` reads teacher logits from the data set instead: it must yield
    ``(inputs, labels, teacher_logits)``, e.g. a :class:`TeacherLogitsDataset` streaming logits
    computed once by :func:`precompute_teacher_logits`.

    ``optimizer``: ``None``/"adam", "adamw", "sgd", a factory ``params -> Optimizer`` or an
    optimizer over the student's parameters. ``pruning_schedule``: a
    :class:`pycompress.GradualPruning` built on the student, or a dict of its keywords
    (``total_steps`` defaults to all optimizer steps of the run; e.g. ``method``,
    ``calibration_data``, ``activation_score`` are passed through); masks are broadcast from rank 0
    after every step under ``torchrun``. ``batch_size`` is the global batch (see
    :mod:`pycompress.distributed`). A tqdm bar (loss, accuracy) shows on rank 0 when stderr is a
    terminal. Deterministic for a given ``seed``. ``checkpoint_dir`` saves after every epoch
    (model with :func:`pycompress.save`, optimizer/epoch/RNG in ``state.pt``); ``resume=True``
    continues from the last complete epoch and ends with the weights of an uninterrupted run.

    Causal language models (``causal_lm``): ``train_data`` yields dicts of tensors ``[T]``
    (``input_ids``, optionally ``attention_mask`` and ``labels`` with ``ignore_index`` for
    positions not to learn; padded to one length per batch) and the models return logits
    ``[B, T, V]``. Position ``t`` is trained to predict token ``t + 1``: the targets are the
    labels shifted by one (:mod:`pycompress.distillation.causal_lm`), and positions whose target
    is ignored, padded (``t`` or ``t + 1``) or past the end are left out of both terms, also with
    ``alpha=1``; the loss is the mean over the kept tokens of the global batch. The models get the
    dict without ``labels``. ``causal_lm=None`` (default) takes dict samples with ``input_ids`` as
    causal LM data when the student is a transformers ``*ForCausalLM`` / ``*LMHeadModel``, and
    asks otherwise; ``False`` uses dict samples' labels as they are (one per position or one per
    sample). ``history`` then counts tokens: ``accuracy`` is next-token accuracy.

    Returns ``(student, history)`` with one dict per epoch (``epoch``, ``loss``, ``accuracy`` on
    labelled samples, ``samples``, ``seconds`` and ``sparsity`` when pruning). The student is
    returned in ``eval()`` mode, never wrapped.

    Example::

        student, history = pycompress.distill(teacher, student, train_ds, epochs=10,
                                              temperature=4.0, alpha=0.9, lr=1e-3)
    """
    from pycompress.nn import KDLoss

    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if teacher is student:
        raise ValueError("teacher and student must be different modules")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")

    criterion = KDLoss(temperature=float(temperature), alpha=float(alpha), reduction="batchmean",
                       ignore_index=ignore_index, direction=direction)
    use_labels = alpha < 1.0
    causal_lm = _token_data(train_data, student, causal_lm)
    if causal_lm is not None:
        train_data = lm.CausalLMDataset(train_data, ignore_index, shift=causal_lm)
    # causal LM targets mark the tokens to learn from, also for the KD term alone
    mask_by_labels = use_labels or bool(causal_lm)
    teacher_dtype = None
    was_training = None

    def prepare(model: nn.Module, ctx: pdist.DistContext) -> None:
        nonlocal teacher_dtype, was_training
        if teacher is None:
            return
        was_training = teacher.training
        teacher.eval()
        if not _is_fsdp(teacher) and _first_device(teacher) not in (None, ctx.device):
            teacher.to(ctx.device)
        teacher_dtype = _float_dtype(teacher)

    def teacher_logits(inputs, like: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            t_in = inputs
            dtype = like.dtype if like is not None else torch.float32
            if teacher_dtype is not None and teacher_dtype != dtype:
                dev = like.device if like is not None else None
                t_in = training.move_batch(inputs, dev or _first_device(teacher), teacher_dtype)
            return training.model_outputs(training.call_model(teacher, t_in))

    def skip(inputs) -> None:
        if teacher is not None:
            teacher_logits(inputs)

    def loss_fn(logits, labels, t_logits, inputs):
        if t_logits is None:
            t_logits = teacher_logits(inputs, logits)
        t_logits = t_logits.detach().to(logits.dtype)
        if t_logits.shape != logits.shape:
            raise ValueError(f"teacher logits {tuple(t_logits.shape)} and student logits "
                             f"{tuple(logits.shape)} differ in shape")
        return criterion(logits, t_logits, labels if mask_by_labels else None)

    try:
        student, history = training.fit(
            student, train_data, loss_fn=loss_fn, epochs=epochs, batch_size=batch_size,
            shuffle=shuffle, seed=seed, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
            device=device, pruning=pruning_schedule, checkpoint_dir=checkpoint_dir, resume=resume,
            progress=progress, desc="distill", need_teacher_logits=teacher is None,
            before_wrap=prepare, weight_by="labels" if mask_by_labels else "samples",
            ignore_index=ignore_index, on_skip=skip, class_labels=use_labels,
        )
    finally:
        if teacher is not None and was_training is not None:
            teacher.train(was_training)
    student.eval()
    return student, history


def _token_data(train_data, student: nn.Module, causal_lm: bool | None) -> bool | None:
    """None for ``(inputs, labels)`` data; for token dict samples whether to shift the labels."""
    if causal_lm is not None and not isinstance(causal_lm, bool):
        raise TypeError(f"causal_lm must be None, True or False, got {causal_lm!r}")
    try:
        first = train_data[0] if len(train_data) else None
    except (TypeError, IndexError, KeyError, NotImplementedError):
        first = None
    if not lm.is_token_sample(first):
        if causal_lm:
            raise ValueError("causal_lm=True needs train_data of dict samples holding input_ids "
                             f"(got a sample of type {type(first).__name__})")
        return None
    if causal_lm is None:
        if not lm.looks_causal_lm(student):
            raise ValueError(
                f"train_data yields dicts with input_ids and the student ({type(student).__name__}) "
                "is not a transformers *ForCausalLM / *LMHeadModel: pass causal_lm=True to train "
                "next-token prediction (labels shifted by one) or causal_lm=False to use the labels "
                "as they are")
        return True
    return causal_lm


class TeacherLogitsDataset(Dataset):
    """``(inputs, labels, teacher_logits)`` samples: ``dataset`` joined with logits streamed from
    a ``.npy`` file (memory-mapped: only the rows of a batch are read). Token dict samples (causal
    LM data) get the logits ``[T, V]`` as one more key, ``teacher_logits``."""

    def __init__(self, dataset: Dataset, path: str | os.PathLike):
        self.dataset = dataset
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"teacher logits file not found: {self.path}")
        self._logits = np.load(self.path, mmap_mode="r")
        if self._logits.shape[0] != len(dataset):
            raise ValueError(f"{self.path} holds {self._logits.shape[0]} rows of logits for a "
                             f"data set of {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        logits = torch.from_numpy(np.array(self._logits[i], dtype=np.float32))
        if isinstance(sample, Mapping):  # a token sample: the logits join its keys
            return {**sample, lm.TEACHER_LOGITS_KEY: logits}
        return sample[0], sample[1], logits


def precompute_teacher_logits(teacher: nn.Module, dataset: Dataset, path: str | os.PathLike,
                              batch_size: int = 256, dtype: str = "float16",
                              device=None) -> str:
    """Runs ``teacher`` once over ``dataset`` and writes its logits to ``path`` (``.npy``).

    Under ``torchrun`` rank 0 computes and writes, the other ranks wait. ``dtype`` is
    ``"float16"`` (half the disk and read traffic) or ``"float32"``. The file is written to a
    temporary name and renamed, so a crash never leaves a truncated file. Returns the path.
    Token dict samples (causal LM data, see :func:`distill`) are passed to the teacher without
    their ``labels``; their logits ``[T, V]`` take ``N * T * V * 2`` bytes in float16 (written
    batch by batch, never held in memory at once).

    Example::

        path = pycompress.precompute_teacher_logits(big_teacher, train_ds, "teacher.npy")
        student, _ = pycompress.distill(None, student, TeacherLogitsDataset(train_ds, path))
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if _is_fsdp(teacher) and pdist.get_context().enabled:
        raise ValueError("precompute_teacher_logits runs the teacher on rank 0 only; a teacher "
                         "sharded with FSDP needs every rank: pass it to distill() instead")
    path = os.fspath(path)
    if pdist.is_main_process():
        dev = torch.device(device) if device is not None else (_first_device(teacher)
                                                              or torch.device("cpu"))
        t_dtype = _float_dtype(teacher)
        was_training = teacher.training
        teacher.eval()
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        arr, row = None, 0
        try:
            with torch.no_grad():
                for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                    if isinstance(batch, Mapping):  # token samples: the model arguments only
                        inputs = lm.model_inputs(batch)
                    else:
                        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
                    inputs = training.move_batch(inputs, dev, t_dtype)
                    out = training.model_outputs(training.call_model(teacher, inputs))
                    chunk = out.float().cpu().numpy().astype(dtype)
                    if arr is None:  # written batch by batch: [N, T, V] logits need not fit in memory
                        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                        shape=(len(dataset), *chunk.shape[1:]))
                    if chunk.shape[1:] != arr.shape[1:] or row + len(chunk) > len(arr):
                        raise ValueError(f"teacher logits of shape {chunk.shape[1:]} per sample after "
                                         f"{row} samples of shape {arr.shape[1:]} (pad every sample to "
                                         "one length)")
                    arr[row:row + len(chunk)] = chunk
                    row += len(chunk)
            if arr is None or row != len(arr):
                raise ValueError(f"the dataset yielded {row} samples for a length of {len(dataset)}")
            arr.flush()
            del arr
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            teacher.train(was_training)
        os.replace(tmp, path)
    pdist.barrier()
    return path
