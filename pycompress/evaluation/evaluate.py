"""``pycompress.evaluate`` / ``pycompress.compare``: metric, size and speed of a model.

Counting conventions
    ``parameters`` counts the weights of the model as a float model would have them: a
    pycompress layer counts the parameters of its float equivalent (``to_float()`` /
    ``to_dense()``), every other module its own parameters (buffers such as BatchNorm statistics
    are not parameters). ``nonzeros`` counts the non-zero ones among them, so sparsity shows as
    ``1 - nonzeros / parameters``. ``size_bytes`` is what :func:`pycompress.save` writes (weights
    + manifest), measured by saving to a temporary directory.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pycompress import _optional, _utils
from pycompress.export.serialization import save
from pycompress.nn import registry

__all__ = ["evaluate", "compare", "EvaluationReport", "METRICS"]


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    if outputs.dim() < 2:
        raise ValueError(f"accuracy needs logits of shape [batch, classes], got {tuple(outputs.shape)}")
    pred = outputs.argmax(-1)
    if pred.shape != targets.shape:
        raise ValueError(
            f"accuracy: predictions have shape {tuple(pred.shape)} but targets {tuple(targets.shape)}"
        )
    return float((pred == targets.to(pred.device)).float().mean())


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(
        outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1).to(outputs.device)))


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    if outputs.shape != targets.shape:
        raise ValueError(f"mse: outputs have shape {tuple(outputs.shape)} but targets {tuple(targets.shape)}")
    return float(torch.nn.functional.mse_loss(outputs.float(), targets.to(outputs.device).float()))


def _token_nll(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, count) of the targets that are not -100."""
    if outputs.dim() < 2 or outputs.shape[:-1] != targets.shape:
        raise ValueError(f"perplexity needs logits [..., V] with targets of their leading shape, got logits "
                         f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}")
    nll = torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(),
                                            targets.reshape(-1).to(outputs.device).long(),
                                            ignore_index=_IGNORE, reduction="sum")
    return float(nll), int((targets != _IGNORE).sum())


_IGNORE = -100
# metrics averaged over tokens, not over samples: name -> fn(outputs, targets) -> (sum, count)
_TOKEN_METRICS = {"perplexity": _token_nll}

# name -> (fn(outputs, targets) -> batch value, higher_is_better)
METRICS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], float], bool]] = {
    "accuracy": (_accuracy, True),
    "cross_entropy": (_cross_entropy, False),
    "mse": (_mse, False),
    "perplexity": (_token_nll, False),  # exp(mean NLL over the tokens): see compute_metric
}


def resolve_metric(metric: Any) -> tuple[str, Callable | None, bool]:
    """(name, fn(outputs, targets) -> float, higher_is_better); ``None`` → no metric."""
    if metric is None:
        return "none", None, True
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)} (or pass a callable)")
        fn, hib = METRICS[metric]
        return metric, fn, hib
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric, bool(getattr(metric, "higher_is_better", True))
    raise TypeError(f"metric must be None, a name or a callable, got {type(metric).__name__}")


def _split_item(item: Any, index: int) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if _utils.is_token_sample(item):  # a language model's batch: next-token targets
        ids = item["input_ids"]
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"data item {index}: input_ids must be a tensor [B, T]")
        return _utils.model_inputs(item), _utils.next_token_targets(
            ids, item.get("labels"), item.get("attention_mask"), _IGNORE)
    raise ValueError(
        f"data item {index} must be an (inputs, targets) pair or a token batch (a dict with input_ids) "
        f"when a metric is given, got {_utils.describe_batch(item)}"
    )


def compute_metric(model: nn.Module, data: Any, metric: Any, progress: bool | None = None) -> float:
    """Batch-size-weighted mean of ``metric(outputs, targets)`` over ``(inputs, targets)`` pairs;
    for ``"perplexity"``: ``exp`` of the mean negative log-likelihood over every target token that
    is not -100 (token batches get next-token targets, see :func:`evaluate`)."""
    name, fn, _ = resolve_metric(metric)
    if fn is None:
        raise ValueError("compute_metric needs a metric")
    per_token = isinstance(metric, str) and name in _TOKEN_METRICS
    total = 0.0
    n = 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, item in enumerate(_utils.progress_bar(data, "metric", progress)):
                x, y = _split_item(item, i)
                out, _ = _utils.output_tensor(_utils.call_model(model, x, "model", i))
                if per_token:
                    s, c = fn(out, y)
                    total += s
                    n += c
                    continue
                b = _utils.batch_size(x)
                total += float(fn(out, y)) * b
                n += b
    finally:
        model.train(training)
    if n == 0:
        raise ValueError("data holds no token to predict" if per_token else "data holds no batch")
    if per_token:
        try:
            return math.exp(total / n)
        except OverflowError:
            return float("inf")
    return total / n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), pycompress layers counted as their float equivalent."""
    params = 0
    nonzeros = 0
    stack = [model]
    while stack:
        m = stack.pop()
        if registry.is_pycompress_layer(m):
            dense = registry.dense_equivalent(m)
            tensors = list(dense.parameters())
        else:
            tensors = list(m.parameters(recurse=False))
            stack.extend(m.children())
        for t in tensors:
            params += t.numel()
            nonzeros += int(torch.count_nonzero(t.detach()))
    return params, nonzeros


def serialized_size(model: nn.Module) -> int:
    """Bytes written by :func:`pycompress.save` for ``model`` (weights + manifest)."""
    with tempfile.TemporaryDirectory(prefix="pycompress-size-") as d:
        out = save(model, Path(d) / "m")
        return sum(p.stat().st_size for p in out.iterdir())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, batch: Any, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``model(batch)`` after ``warmup`` calls."""
    dev = _utils.model_device(model)
    batch = _utils.batch_to(batch, dev)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            _utils.call_model(model, batch)
        _sync(dev)
        for _ in range(repeats):
            t0 = time.perf_counter()
            _utils.call_model(model, batch)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    return times


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`.

    ``latency`` maps batch size → ``{"p50_ms", "p95_ms", "mean_ms", "throughput"}``
    (throughput in samples per second; for token batches also ``"tokens_per_s"``: the batch's
    tokens, ``attention_mask`` ones, over the mean time of a forward pass). ``compression_ratio`` (reference size / this size),
    ``speedup`` (reference p50 / this p50, per batch size) and ``metric_delta`` (this − reference)
    are filled when a reference report is given.
    """

    name: str
    metric_name: str
    metric: float | None
    higher_is_better: bool
    parameters: int
    nonzeros: int
    size_bytes: int
    latency: dict[int, dict[str, float]] = field(default_factory=dict)
    device: str = "cpu"
    compression_ratio: float | None = None
    speedup: dict[int, float] | None = None
    metric_delta: float | None = None
    samples: int = 0
    threads: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["sparsity"] = self.sparsity
        d["latency"] = {str(k): dict(v) for k, v in self.latency.items()}
        if self.speedup is not None:
            d["speedup"] = {str(k): v for k, v in self.speedup.items()}
        return d

    def to_markdown(self) -> str:
        return compare([self])

    def __repr__(self) -> str:
        parts = [f"{self.name!r}"]
        if self.metric is not None:
            parts.append(f"{self.metric_name}={self.metric:.4f}")
        parts.append(f"size={_human_bytes(self.size_bytes)}")
        parts.append(f"params={self.parameters} (sparsity {self.sparsity:.1%})")
        for bs, lat in self.latency.items():
            parts.append(f"bs{bs}: p50 {lat['p50_ms']:.3f} ms")
        if self.compression_ratio is not None:
            parts.append(f"x{self.compression_ratio:.2f} smaller")
        return "EvaluationReport(" + ", ".join(parts) + ")"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def evaluate(
    model: nn.Module,
    data: Any,
    metric: Any = "accuracy",
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    repeats: int = 20,
    reference: EvaluationReport | None = None,
    *,
    name: str | None = None,
    progress: bool | None = None,
    num_threads: int | None = None,
) -> EvaluationReport:
    """Measures a model: metric, parameters, non-zeros, serialized size, latency and throughput.

    Args:
        model: the model (run in eval mode without gradients; its training flag is restored).
        data: with a metric, an iterable of ``(inputs, targets)`` pairs (e.g. a ``DataLoader``);
            without (``metric=None``), one batch or an iterable of batches. ``inputs`` is a batch
            (tensor / tuple of args / dict of kwargs).
        metric: ``"accuracy"`` (top-1, higher is better), ``"cross_entropy"``, ``"mse"`` (lower
            is better), ``"perplexity"`` (language models, lower is better: ``exp`` of the mean
            negative log-likelihood over all target tokens that are not -100), a callable
            ``fn(outputs, targets) -> float`` averaged over samples (higher is better unless it
            has ``higher_is_better = False``), or ``None``. Token batches (dicts with
            ``input_ids``, optionally ``attention_mask`` and ``labels``, e.g. held-out text) may
            stand in for ``(inputs, targets)`` pairs: the model gets the dict without ``labels``
            and the targets are the next tokens (position ``t`` predicts ``labels[t + 1]``;
            padded and ignored positions and the last one are left out, as in
            :func:`pycompress.distill`).
        batch_sizes: batch sizes to time; batches of that size are built from the data's inputs
            (repeating rows when the data has fewer). ``()`` skips timing.
        warmup, repeats: untimed and timed calls per batch size.
        reference: the report of the uncompressed model, for ``compression_ratio``, ``speedup``
            and ``metric_delta``.
        name: label in tables and plots (default: the model's class name).
        progress: tqdm bar over the metric loop; ``None`` = only on a terminal.
        num_threads: CPU threads for the timing (``torch.set_num_threads``, restored afterwards);
            ``None`` keeps the current setting. Fixing it makes CPU latencies comparable.

    Returns:
        An :class:`EvaluationReport`.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
        >>> data = [(torch.randn(32, 64), torch.randint(0, 3, (32,))) for _ in range(4)]
        >>> base = pycompress.evaluate(model, data, batch_sizes=(1, 32), repeats=5, name="fp32")
        >>> q = pycompress.evaluate(pycompress.quantize(model), data, repeats=5, reference=base, name="int8")
        >>> q.compression_ratio > 1
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    if not isinstance(batch_sizes, (tuple, list)) or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes
    ):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    for argname, v, lo in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{argname} must be an integer >= {lo}, got {v!r}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or an integer >= 1, got {num_threads!r}")
    if reference is not None and not isinstance(reference, EvaluationReport):
        raise TypeError(f"reference must be an EvaluationReport, got {type(reference).__name__}")
    metric_name, fn, hib = resolve_metric(metric)

    if fn is not None and _utils.is_token_sample(data):
        data = [data]  # one token batch
    items = list(data) if fn is not None else list(_utils.iter_batches(data, "data"))
    if not items:
        raise ValueError("data holds no batch")
    if fn is not None:
        inputs = [_split_item(it, i)[0] for i, it in enumerate(items)]
    else:  # token batches are timed without their labels (no loss inside the model)
        inputs = [_utils.model_inputs(b) if _utils.is_token_sample(b) else b for b in items]
    for b in inputs:
        _utils.check_batch(b, "data")

    training = model.training
    model.eval()
    try:
        value = compute_metric(model, items, metric, progress) if fn is not None else None
        samples = sum(_utils.batch_size(b) for b in inputs)
        params, nonzeros = count_parameters(model)
        size = serialized_size(model)
        latency: dict[int, dict[str, float]] = {}
        threads_before = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        threads_used = torch.get_num_threads()
        try:
            timings, tokens = {}, {}
            for bs in batch_sizes:
                batch = _utils.make_batch_of_size(inputs, bs)
                tokens[bs] = _utils.count_tokens(batch)
                timings[bs] = measure_latency(model, batch, warmup, repeats)
        finally:
            torch.set_num_threads(threads_before)
        for bs, times in timings.items():
            mean = statistics.fmean(times)
            latency[int(bs)] = {
                "p50_ms": _percentile(times, 0.5) * 1e3,
                "p95_ms": _percentile(times, 0.95) * 1e3,
                "mean_ms": mean * 1e3,
                "throughput": bs / mean if mean > 0 else float("inf"),
            }
            if tokens[bs] is not None:  # a language model's batch: its tokens per second
                latency[int(bs)]["tokens_per_s"] = tokens[bs] / mean if mean > 0 else float("inf")
    finally:
        model.train(training)

    report = EvaluationReport(
        name=name or type(model).__name__,
        metric_name=metric_name,
        metric=value,
        higher_is_better=hib,
        parameters=params,
        nonzeros=nonzeros,
        size_bytes=size,
        latency=latency,
        device=str(_utils.model_device(model)),
        samples=samples,
        threads=threads_used,
    )
    if reference is not None:
        report.compression_ratio = reference.size_bytes / size if size else None
        report.speedup = {
            bs: reference.latency[bs]["p50_ms"] / lat["p50_ms"]
            for bs, lat in latency.items()
            if bs in reference.latency and lat["p50_ms"] > 0
        }
        if value is not None and reference.metric is not None:
            report.metric_delta = value - reference.metric
    return report


def compare(reports: list[EvaluationReport], out_dir: str | os.PathLike | None = None) -> str:
    """A markdown table of evaluation reports; with ``out_dir``, also ``compare.png``.

    The plot has two panels: metric vs serialized size and metric vs p50 latency (at the
    largest batch size every report measured). Written with matplotlib's Agg backend (no display
    needed).

    Args:
        reports: :class:`EvaluationReport` objects (e.g. fp32, pruned, int8).
        out_dir: directory for ``compare.png`` (created when missing); ``None`` = no plot.

    Returns:
        The markdown table (with an image link when a plot was written).

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> data = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]
        >>> r = pycompress.evaluate(model, data, batch_sizes=(1,), repeats=3, name="fp32")
        >>> print(pycompress.compare([r]).splitlines()[0])  # doctest: +ELLIPSIS
        | model | accuracy | params | sparsity | size | ratio | bs1 p50 ms | bs1 p95 ms | bs1 samples/s |
    """
    if isinstance(reports, EvaluationReport):
        reports = [reports]
    if not isinstance(reports, (list, tuple)) or not reports:
        raise ValueError("compare needs a non-empty list of EvaluationReport")
    for r in reports:
        if not isinstance(r, EvaluationReport):
            raise TypeError(f"compare: expected EvaluationReport objects, got {type(r).__name__}")
    metric_names = {r.metric_name for r in reports}
    metric_name = metric_names.pop() if len(metric_names) == 1 else "metric"
    common_bs = sorted(set.intersection(*[set(r.latency) for r in reports])) if reports else []
    # language models: tokens per second where every report measured them
    with_tokens = {bs for bs in common_bs if all("tokens_per_s" in r.latency[bs] for r in reports)}
    header = ["model", metric_name, "params", "sparsity", "size", "ratio"]
    for bs in common_bs:
        header += [f"bs{bs} p50 ms", f"bs{bs} p95 ms", f"bs{bs} samples/s"]
        if bs in with_tokens:
            header.append(f"bs{bs} tokens/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in reports:
        row = [
            r.name,
            "–" if r.metric is None else f"{r.metric:.4f}",
            str(r.parameters),
            f"{r.sparsity:.1%}",
            _human_bytes(r.size_bytes),
            "–" if r.compression_ratio is None else f"{r.compression_ratio:.2f}x",
        ]
        for bs in common_bs:
            lat = r.latency[bs]
            row += [f"{lat['p50_ms']:.3f}", f"{lat['p95_ms']:.3f}", f"{lat['throughput']:.1f}"]
            if bs in with_tokens:
                row.append(f"{lat['tokens_per_s']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines)
    if out_dir is not None:
        path = _plot(reports, Path(out_dir), metric_name, common_bs[-1] if common_bs else None)
        md += f"\n\n![metric vs size and latency]({path.name})"
    return md


def _plot(reports: list[EvaluationReport], out_dir: Path, metric_name: str, bs: int | None) -> Path:
    # Figure + the Agg canvas directly: no pyplot, no global backend change, no display needed
    Figure = _optional.require("matplotlib.figure", "compare(out_dir=...) (the plot)").Figure
    FigureCanvasAgg = _optional.require("matplotlib.backends.backend_agg",
                                        "compare(out_dir=...) (the plot)").FigureCanvasAgg

    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ys = [r.metric if r.metric is not None else float("nan") for r in reports]
    for r, y in zip(reports, ys):
        ax1.scatter(r.size_bytes / 2**20, y)
        ax1.annotate(r.name, (r.size_bytes / 2**20, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if bs is not None:
            x = r.latency[bs]["p50_ms"]
            ax2.scatter(x, y)
            ax2.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel("serialized size (MiB)")
    ax1.set_ylabel(metric_name)
    ax1.set_title(f"{metric_name} vs size")
    ax2.set_xlabel(f"p50 latency (ms, batch {bs})" if bs is not None else "latency (not measured)")
    ax2.set_ylabel(metric_name)
    ax2.set_title(f"{metric_name} vs latency")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out_dir / "compare.png"
    tmp = out_dir / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
