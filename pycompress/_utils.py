"""Shared helpers of the workflow functions: module selection, batches, progress bars.

Module selection
    ``include`` / ``exclude`` are a pattern or a list of patterns matched against qualified
    module names (``"encoder.layer.0.attention.self.query"``). A pattern is a shell-style glob
    (``fnmatch``: ``*`` also crosses dots) unless it starts with ``re:``, in which case the rest is
    a regular expression that must match the whole name. A module is selected when its own name
    *or the name of one of its ancestors* matches, so ``include="encoder"`` selects everything
    inside the encoder. A pattern that matches no module at all is an error (it is almost always a
    typo), as is an invalid regular expression or an empty pattern.

Batches
    A *batch* is a tensor (``model(x)``), a tuple of positional arguments (``model(*batch)``) or a
    dict of keyword arguments (``model(**batch)``). Functions that take *inputs* accept one batch
    or a list / iterable (e.g. a ``DataLoader``) of batches; a tensor, a tuple or a dict is always
    read as a single batch.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import nn

__all__: list[str] = []

_REGEX_PREFIX = "re:"


# --------------------------------------------------------------------------- module selection
class _Pattern:
    __slots__ = ("text", "_regex")

    def __init__(self, text: str, argname: str):
        if not isinstance(text, str):
            raise TypeError(f"{argname}: patterns must be strings, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{argname}: empty pattern")
        self.text = text
        if text.startswith(_REGEX_PREFIX):
            body = text[len(_REGEX_PREFIX):]
            if not body:
                raise ValueError(f"{argname}: empty regular expression in pattern {text!r}")
            try:
                self._regex = re.compile(body)
            except re.error as e:
                raise ValueError(f"{argname}: invalid regular expression {body!r}: {e}") from None
        else:
            if text.count("[") != text.count("]"):
                raise ValueError(
                    f"{argname}: malformed glob {text!r} (unbalanced '[' / ']'); "
                    "use 're:<regex>' for regular expressions"
                )
            self._regex = re.compile(fnmatch.translate(text))

    def match(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None

    def __repr__(self) -> str:
        return repr(self.text)


def parse_patterns(patterns: Any, argname: str) -> list[_Pattern] | None:
    """``None`` → ``None``; a string or list/tuple of strings → compiled patterns (validated)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"{argname} must be None, a pattern string or a list of pattern strings, "
            f"got {type(patterns).__name__}"
        )
    if not patterns:
        raise ValueError(f"{argname} is an empty list (use None to select everything)")
    return [_Pattern(p, argname) for p in patterns]


def _ancestors_and_self(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _matches(name: str, patterns: list[_Pattern]) -> _Pattern | None:
    for candidate in _ancestors_and_self(name):
        for p in patterns:
            if p.match(candidate):
                return p
    return None


def select_modules(
    model: nn.Module,
    include: Any = None,
    exclude: Any = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Named submodules (root excluded) passing include/exclude and ``predicate``, in order.

    Raises ValueError when a pattern matches no module name of ``model``.
    """
    inc = parse_patterns(include, "include")
    exc = parse_patterns(exclude, "exclude")
    names = [n for n, _ in model.named_modules() if n]
    for argname, pats in (("include", inc), ("exclude", exc)):
        for p in pats or ():
            if not any(p.match(n) for n in names):
                sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"{argname} pattern {p.text!r} matches no module of {type(model).__name__} "
                    f"(module names look like: {sample})"
                )
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        if inc is not None and _matches(name, inc) is None:
            continue
        if exc is not None and _matches(name, exc) is not None:
            continue
        if predicate is not None and not predicate(name, module):
            continue
        out.append((name, module))
    return out


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (which prefixes every name with ``_orig_mod``)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule at qualified ``name`` by ``new``."""
    if not name:
        raise ValueError("cannot replace the root module in place")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def parent_of(model: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return None
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


# --------------------------------------------------------------------------- batches
def is_single_batch(inputs: Any) -> bool:
    return isinstance(inputs, (torch.Tensor, tuple, Mapping))


def iter_batches(inputs: Any, argname: str = "inputs") -> Iterable[Any]:
    """One batch → ``[batch]``; a list / iterable of batches is returned as is (checked lazily)."""
    if is_single_batch(inputs):
        return [inputs]
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(
            f"{argname} must be a batch (tensor, tuple of positional args, dict of keyword args) "
            f"or an iterable of batches, got {type(inputs).__name__}"
        )
    return inputs


def check_batch(batch: Any, argname: str = "inputs") -> None:
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, (torch.Tensor, tuple, Mapping)):
        raise TypeError(
            f"{argname}: a batch must be a tensor, a tuple of positional arguments or a dict of "
            f"keyword arguments, got {type(batch).__name__}"
        )


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def batch_to(batch: Any, device: torch.device | str) -> Any:
    return map_tensors(batch, lambda t: t.to(device))


def batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor of the batch (1 when it holds no tensor)."""
    for t in _tensors(batch):
        return int(t.shape[0]) if t.dim() > 0 else 1
    return 1


def _tensors(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            yield from _tensors(b)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)


def describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}:{str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe_batch(b) for b in batch) + ")"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    return type(batch).__name__


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def call_model(model: nn.Module, batch: Any, what: str = "model", index: int | None = None) -> Any:
    """Runs ``model`` on one batch; failures become ValueError naming the batch's shapes."""
    check_batch(batch)
    if isinstance(batch, list):
        batch = tuple(batch)
    batch = batch_to(batch, model_device(model))
    try:
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, tuple):
            return model(*batch)
        return model(**batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        where = f" on batch {index}" if index is not None else ""
        raise ValueError(
            f"{what} ({type(model).__name__}) failed{where} with inputs {describe_batch(batch)}: {e}"
        ) from e


def slice_batch(batch: Any, n: int) -> Any:
    return map_tensors(batch, lambda t: t[:n] if t.dim() > 0 else t)


def cat_batches(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches, 0) if first.dim() > 0 else first
    if isinstance(first, (tuple, list)):
        return type(first)(cat_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: cat_batches([b[k] for b in batches]) for k in first}
    return first


def make_batch_of_size(samples: list[Any], n: int) -> Any:
    """A batch of exactly ``n`` rows built from ``samples`` (repeated when there are fewer)."""
    have = sum(batch_size(b) for b in samples)
    if have == 0:
        raise ValueError("no input rows to build a batch from")
    pool = list(samples)
    while have < n:
        pool.extend(samples)
        have *= 2
    return slice_batch(cat_batches(pool), n)


def output_tensor(out: Any, prefer: tuple[str, ...] = ("logits", "last_hidden_state")) -> tuple[torch.Tensor, str]:
    """The primary tensor of a model output and where it came from.

    Tensor → itself; tuple/list → first tensor; dict-like (incl. Hugging Face ``ModelOutput``) →
    ``logits``, else ``last_hidden_state``, else the first tensor value.
    """
    if isinstance(out, torch.Tensor):
        return out, "output"
    if isinstance(out, Mapping):
        for key in prefer:
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                return v, key
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                return v, str(k)
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor):
                return v, f"output[{i}]"
            if isinstance(v, (tuple, list, Mapping)):
                t, where = output_tensor(v, prefer)
                return t, f"output[{i}].{where}"
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


# --------------------------------------------------------------------------- token batches
# the key under which TeacherLogitsDataset adds precomputed logits to a dict sample
TEACHER_LOGITS_KEY = "teacher_logits"
_NOT_MODEL_INPUTS = ("labels", TEACHER_LOGITS_KEY)


def model_inputs(batch: Mapping) -> dict:
    """A dict sample or batch without the keys that are not model arguments."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def is_token_sample(sample) -> bool:
    """A dict sample or batch holding ``input_ids`` (a language model's tokens)."""
    return isinstance(sample, Mapping) and "input_ids" in sample


def next_token_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None,
                       ignore_index: int = -100) -> torch.Tensor:
    """Targets aligned with the logits ``[..., T, V]``: ``out[..., t] = labels[..., t + 1]``, or
    ``ignore_index`` where that label is ignored, where position ``t`` or ``t + 1`` is padding
    (``attention_mask == 0``) and at the last position. ``labels=None``: ``input_ids``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() < 1:
        raise TypeError("input_ids must be a tensor [..., T]")
    target = input_ids if labels is None else labels
    if not isinstance(target, torch.Tensor) or target.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {target.dtype}")
    out = torch.full_like(target, ignore_index, dtype=torch.long)
    out[..., :-1] = target[..., 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask != 0
        both = torch.zeros_like(real)
        both[..., :-1] = real[..., :-1] & real[..., 1:]
        out = out.masked_fill(~both, ignore_index)
    return out


def count_tokens(batch: Any) -> int | None:
    """Tokens of a token batch (``attention_mask`` ones, else every ``input_ids`` entry); None
    for other batches."""
    if not is_token_sample(batch):
        return None
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int((mask != 0).sum())
    ids = batch["input_ids"]
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else None


# --------------------------------------------------------------------------- progress
def progress_enabled(progress: bool | None) -> bool:
    """``True``/``False`` force; ``None`` = only on an interactive terminal, and not when
    ``PYCOMPRESS_PROGRESS=0``."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("PYCOMPRESS_PROGRESS", "").strip() in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable: Iterable, desc: str, progress: bool | None = None, total: int | None = None):
    """A tqdm bar over ``iterable`` (silent when not on a TTY or when ``progress=False``)."""
    enabled = progress_enabled(progress)
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


_INT8_BITS_WHY = {"act_bits": "w8a16 keeps float activations",
                  "weight_bits": "the faster 7-bit kernel is a w8a8 kernel"}


def check_int8_bits(name: str, value: Any, mode: str) -> None:
    """Validates ``act_bits`` / ``weight_bits`` of an int8 layer: 8 or 7, and 7 only with w8a8."""
    if isinstance(value, bool) or value not in (7, 8):
        raise ValueError(f"{name} must be 8 or 7, got {value!r}")
    if value != 8 and mode != "w8a8":
        raise ValueError(f"{name}=7 applies to mode='w8a8' only ({_INT8_BITS_WHY[name]})")


def run_calibration(model: nn.Module, calibration_data: Any, handles: list) -> int:
    """Runs ``model`` in eval mode on every batch of ``calibration_data`` (hooks registered by the
    caller collect what they need), then removes ``handles`` and restores the training flag.
    Returns the number of batches; none at all is an error."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(iter_batches(calibration_data, "calibration_data")):
                call_model(model, batch, what="model", index=i)
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration_data holds no batch")
    return n


# --------------------------------------------------------------------------- files
def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory entry (after a rename into it); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
