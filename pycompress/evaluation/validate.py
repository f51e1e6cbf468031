"""``pycompress.validate``: how close is a compressed model to its reference?

Output agreement is measured on the models' primary output (a tensor, the first tensor of a
tuple, or ``logits`` / ``last_hidden_state`` of a dict-like output), one row per vector along
the last dimension. Per-layer error is measured on the *same* inputs: while the reference model
runs, a forward hook on every reference layer that the candidate replaced feeds that layer's
input to the candidate's layer and compares both outputs, so a layer's error is its own and not
the accumulated error of the layers before it. A layer whose shape differs from its reference
(``pycompress.compact`` removed neurons or heads) cannot be fed the reference's input or compared
with the reference's output: it is skipped and listed in ``ValidationReport.skipped`` with the
reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pycompress import _utils
from pycompress.nn import registry
from pycompress.nn.int8_conv import pad_module_padding

__all__ = ["validate", "ValidationReport", "LayerError", "DEFAULT_TOLERANCE", "TOLERANCE_KEYS"]

# key -> (direction, description); "min": value must be >= bound, "max": value must be <= bound
TOLERANCE_KEYS = {
    "cosine": ("min", "mean cosine similarity of output rows"),
    "min_cosine": ("min", "worst cosine similarity of an output row"),
    "top1_agreement": ("min", "fraction of rows whose argmax agrees"),
    "max_abs_error": ("max", "largest absolute output difference"),
    "mean_abs_error": ("max", "mean absolute output difference"),
    "relative_error": ("max", "||candidate - reference|| / ||reference|| of the outputs"),
    "kl_div": ("max", "mean KL(softmax(reference) || softmax(candidate)) per row"),
    "layer_cosine": ("min", "worst per-layer mean cosine"),
    "layer_relative_error": ("max", "worst per-layer relative error"),
}
DEFAULT_TOLERANCE = {"cosine": 0.99}


@dataclass
class LayerError:
    """Error of one replaced layer against its reference layer on the same inputs."""

    name: str
    reference_type: str
    candidate_type: str
    calls: int = 0
    cosine: float = float("nan")
    relative_error: float = float("nan")
    max_abs_error: float = float("nan")
    mean_abs_error: float = float("nan")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _nanmax(a: float, b: float) -> float:
    """``max`` that keeps NaN (Python's ``max(0.0, nan)`` is 0.0)."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)


class _Acc:
    """Streaming accumulator of output-agreement statistics (float64). NaN anywhere propagates
    to the statistics it touches; a row holding NaN/inf never counts as a top-1 agreement."""

    def __init__(self):
        self.rows = 0
        self.elems = 0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.kl_sum = 0.0
        self.top1 = 0
        self.nonfinite = 0
        self.ref_nonfinite = 0

    def add(self, ref: torch.Tensor, cand: torch.Tensor, logits: bool) -> None:
        r = ref.detach().to(torch.float64).reshape(-1, ref.shape[-1] if ref.dim() else 1).cpu()
        c = cand.detach().to(torch.float64).reshape(r.shape).cpu()
        r_fin, c_fin = torch.isfinite(r), torch.isfinite(c)
        self.ref_nonfinite += int((~r_fin).sum())
        self.nonfinite += int((~c_fin & r_fin).sum())
        d = (c - r).abs()
        self.rows += r.shape[0]
        self.elems += r.numel()
        cos = torch.nn.functional.cosine_similarity(r, c, dim=-1, eps=1e-12)
        # two all-zero rows agree perfectly
        both_zero = (r.abs().sum(-1) == 0) & (c.abs().sum(-1) == 0)
        cos = torch.where(both_zero, torch.ones_like(cos), cos)
        self.cos_sum += float(cos.sum())
        self.cos_min = _nanmin(self.cos_min, float(cos.min())) if cos.numel() else self.cos_min
        self.abs_sum += float(d.sum())
        self.abs_max = _nanmax(self.abs_max, float(d.max())) if d.numel() else self.abs_max
        self.diff_sq += float((d * d).sum())
        self.ref_sq += float((r * r).sum())
        if logits and r.shape[-1] > 1:
            lp_r = torch.log_softmax(r, -1)
            lp_c = torch.log_softmax(c, -1)
            kl = (lp_r.exp() * (lp_r - lp_c)).sum(-1)
            self.kl_sum += float(kl.sum())
            finite_rows = r_fin.all(-1) & c_fin.all(-1)
            self.top1 += int(((r.argmax(-1) == c.argmax(-1)) & finite_rows).sum())

    def result(self, logits: bool) -> dict:
        rows = max(self.rows, 1)
        out = {
            "cosine": self.cos_sum / rows,
            "min_cosine": self.cos_min if self.rows else float("nan"),
            "max_abs_error": self.abs_max,
            "mean_abs_error": self.abs_sum / max(self.elems, 1),
            "relative_error": math.sqrt(self.diff_sq) / math.sqrt(self.ref_sq) if self.ref_sq > 0 else (
                0.0 if self.diff_sq == 0 else float("inf")),
            "kl_div": self.kl_sum / rows if logits else None,
            "top1_agreement": self.top1 / rows if logits else None,
        }
        if self.nonfinite:
            for k in ("cosine", "min_cosine", "max_abs_error", "mean_abs_error", "relative_error"):
                if not math.isfinite(out[k]):
                    out[k] = float("nan")
        if self.ref_nonfinite:  # a non-finite reference gives no meaningful number at all
            for k, v in out.items():
                if v is not None:
                    out[k] = float("nan")
        return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.5f}"
    return str(v)


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    Attributes:
        output: which output was compared (``"output"``, ``"logits"``, ``"last_hidden_state"``...).
        logits: whether logits metrics (top-1 agreement, KL) were computed.
        metrics: output agreement (``cosine``, ``min_cosine``, ``max_abs_error``,
            ``mean_abs_error``, ``relative_error``, ``kl_div``, ``top1_agreement``).
        layers: per-layer errors of every replaced layer, by qualified name.
        skipped: layers that could not be compared (a different width, e.g. after
            :func:`pycompress.compact`), by qualified name → reason.
        tolerance: the bounds checked; ``failures``: the bounds that were not met.
        batches / rows: how much data was compared.
        nonfinite / reference_nonfinite: NaN/inf values in the candidate's output where the
            reference's is finite / in the reference's output (then every metric is NaN and the
            report fails).
    """

    output: str
    logits: bool
    metrics: dict
    layers: dict[str, LayerError]
    tolerance: dict
    failures: list[str] = field(default_factory=list)
    batches: int = 0
    rows: int = 0
    nonfinite: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    reference_nonfinite: int = 0

    @property
    def passed(self) -> bool:
        """True when every tolerance bound is met."""
        return not self.failures

    def __getattr__(self, name: str):  # report.cosine, report.top1_agreement, ...
        metrics = self.__dict__.get("metrics")
        if metrics is not None and name in metrics:
            return metrics[name]
        raise AttributeError(name)

    def worst_layers(self, n: int = 5) -> list[LayerError]:
        """The ``n`` replaced layers with the largest relative error."""
        key = lambda e: -e.relative_error if not math.isnan(e.relative_error) else -math.inf
        return sorted(self.layers.values(), key=key)[:n]

    def to_dict(self) -> dict:
        """Plain JSON-serializable dict of the whole report."""
        return {
            "passed": self.passed,
            "output": self.output,
            "logits": self.logits,
            "metrics": dict(self.metrics),
            "tolerance": dict(self.tolerance),
            "failures": list(self.failures),
            "batches": self.batches,
            "rows": self.rows,
            "nonfinite": self.nonfinite,
            "reference_nonfinite": self.reference_nonfinite,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "skipped": dict(self.skipped),
        }

    def to_markdown(self, max_layers: int | None = None) -> str:
        """Markdown: verdict, output agreement table, per-layer table (worst first)."""
        lines = [
            f"**Validation {'PASSED' if self.passed else 'FAILED'}** "
            f"({self.batches} batches, {self.rows} rows of `{self.output}`)",
            "",
            "| metric | value | bound |",
            "|---|---|---|",
        ]
        for k, v in self.metrics.items():
            if v is None:
                continue
            bound = ""
            if k in self.tolerance:
                bound = (">= " if TOLERANCE_KEYS[k][0] == "min" else "<= ") + _fmt(float(self.tolerance[k]))
            lines.append(f"| {k} | {_fmt(v)} | {bound} |")
        if self.failures:
            lines += ["", "Failures:"] + [f"- {f}" for f in self.failures]
        if self.layers:
            lines += [
                "",
                "| layer | reference → candidate | cosine | relative error | max abs error |",
                "|---|---|---|---|---|",
            ]
            layers = self.worst_layers(len(self.layers) if max_layers is None else max_layers)
            for e in layers:
                lines.append(
                    f"| {e.name} | {e.reference_type} → {e.candidate_type} | {_fmt(e.cosine)} | "
                    f"{_fmt(e.relative_error)} | {_fmt(e.max_abs_error)} |"
                )
        if self.skipped:
            lines += ["", "Layers not compared:"] + [f"- {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.metrics
        parts = [f"cosine={_fmt(m['cosine'])}"]
        if m.get("top1_agreement") is not None:
            parts.append(f"top1={_fmt(m['top1_agreement'])}")
            parts.append(f"kl={_fmt(m['kl_div'])}")
        parts.append(f"max_abs_error={_fmt(m['max_abs_error'])}")
        parts.append(f"layers={len(self.layers)}")
        if self.skipped:
            parts.append(f"skipped={len(self.skipped)}")
        worst = self.worst_layers(1)
        if worst:
            parts.append(f"worst_layer={worst[0].name!r} (rel {_fmt(worst[0].relative_error)})")
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)
        return f"ValidationReport({verdict}; " + ", ".join(parts) + ")"


def _parse_tolerance(tolerance: Any) -> dict:
    if tolerance is None:
        return dict(DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, dict)):
        raise TypeError(
            f"tolerance must be None, a number (minimum cosine) or a dict, got {type(tolerance).__name__}"
        )
    if isinstance(tolerance, (int, float)):
        tolerance = {"cosine": float(tolerance)}
    out = {}
    for k, v in tolerance.items():
        if k not in TOLERANCE_KEYS:
            raise ValueError(f"tolerance: unknown key {k!r}; known keys: {', '.join(TOLERANCE_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"tolerance[{k!r}] must be a number, got {v!r}")
        out[k] = float(v)
    return out


_WIDTHS = ("in_features", "out_features", "num_attention_heads", "all_head_size")


def _widths(m: nn.Module) -> dict:
    return {k: getattr(m, k) for k in _WIDTHS if isinstance(getattr(m, k, None), int)}


def _width_change(rmod: nn.Module, cmod: nn.Module) -> str | None:
    """``"in_features 512 -> 148, ..."`` when the layer's widths differ, else None."""
    rw, cw = _widths(rmod), _widths(cmod)
    diff = [f"{k} {rw[k]} -> {cw[k]}" for k in _WIDTHS if k in rw and k in cw and rw[k] != cw[k]]
    return ", ".join(diff) or None


def _fused_into(candidate: nn.Module) -> set[str]:
    """Names of the modules a converted layer computes itself (a BatchNorm folded into an int8
    conv, its fused activation): the candidate holds an ``nn.Identity`` (or the unchanged shared
    module) there, and the converted layer is compared against the reference's whole chain."""
    return {n for m in candidate.modules() for n in getattr(m, "fused_modules", ())}


def _replaced_layers(reference: nn.Module, candidate: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    ref_modules = dict(reference.named_modules())
    fused = _fused_into(candidate)
    out = []
    for name, cmod in candidate.named_modules():
        if not name or name not in ref_modules or name in fused:
            continue
        if isinstance(cmod, torch.fx.GraphModule) and not registry.is_pycompress_layer(cmod):
            continue  # a block rebuilt around its converted layers (same submodules): compared layer by layer
        rmod = ref_modules[name]
        if type(rmod) is not type(cmod) or (registry.is_pycompress_layer(cmod) and rmod is not cmod) \
                or _width_change(rmod, cmod) is not None:
            if any(name.startswith(o + ".") for o, _, _ in out):
                continue  # inside an already replaced subtree
            out.append((name, rmod, cmod))
    return out


class _LayerProbe:
    def __init__(self, name: str, rmod: nn.Module, cmod: nn.Module, ref_modules: dict[str, nn.Module] | None = None):
        self.err = LayerError(name, type(rmod).__name__, type(cmod).__name__)
        self.cmod = cmod
        # the reference modules a converted layer absorbed: a zero-padding module before it (the
        # converted layer takes that module's input, captured by a pre-hook), and a folded
        # BatchNorm and fused activation applied to the reference layer's output, so that both
        # sides compute the same function (pad -> conv -> BN -> activation)
        fused = getattr(cmod, "fused_modules", ())
        chain = [ref_modules[n] for n in fused if ref_modules is not None and n in ref_modules]
        self.pads = [ref_modules[n] for n in fused if ref_modules is not None and n in ref_modules
                     and pad_module_padding(ref_modules[n]) is not None]
        self.ref_chain = [m for m in chain if not any(m is p for p in self.pads)]
        if len(chain) != len(fused) or any(m is not p for m, p in zip(chain, self.pads)) or len(self.pads) > 1:
            self.ref_chain = None
        self.pad_inputs: list[tuple] = []  # the inputs of the padding module, one per call
        self.acc = _Acc()
        self.failure: str | None = None
        change = _width_change(rmod, cmod)
        # a narrower layer (compact) cannot take the reference's input: nothing to compare
        self.skipped: str | None = None
        if change is not None and "in_features" in change:
            self.skipped = f"shape differs from the reference ({change}): not compared"
        self.change = change

    def capture_pad_input(self, module, args):
        self.pad_inputs.append(tuple(args))

    def __call__(self, module, args, kwargs, output):
        if self.failure is not None or self.skipped is not None:
            self.pad_inputs.clear()
            return
        ref_out = output
        try:
            if self.ref_chain is None:
                raise ValueError(f"its fused modules {list(self.cmod.fused_modules)} are not all in the reference "
                                 "(or not as a padding module before it and modules after it)")
            if self.pads:
                if not self.pad_inputs:
                    raise ValueError("the padding module it computes did not run before it")
                args = self.pad_inputs.pop()
                self.pad_inputs.clear()
            for m in self.ref_chain:
                ref_out = m(ref_out)
            dev = _utils.model_device(self.cmod)
            cargs = _utils.batch_to(tuple(args), dev)
            ckw = _utils.batch_to(dict(kwargs), dev)
            # a conv that also computes the residual addition after it (and the activation after
            # that) is compared before them: the reference layer's output is the conv's alone
            residual = getattr(self.cmod, "residual", False) is True and hasattr(self.cmod, "conv_output")
            cand_out = self.cmod.conv_output(*cargs, **ckw) if residual else self.cmod(*cargs, **ckw)
            r, _ = _utils.output_tensor(ref_out)
            c, _ = _utils.output_tensor(cand_out)
            if hasattr(self.cmod, "dequantize_output") and not residual:  # an int8 output: its real values
                c = self.cmod.dequantize_output(c)
            if r.shape != c.shape:
                if self.change is not None:  # a compacted layer: its output is narrower by design
                    self.skipped = (f"output shape {tuple(c.shape)} differs from the reference's "
                                    f"{tuple(r.shape)} ({self.change}): not compared")
                    return
                raise ValueError(f"output shape {tuple(c.shape)} != reference {tuple(r.shape)}")
            self.acc.add(r, c, logits=False)
            self.err.calls += 1
        except Exception as e:  # recorded, reported as a failure (never silently ignored)
            self.failure = f"layer {self.err.name}: could not compare ({type(e).__name__}: {e})"

    def finish(self) -> LayerError:
        res = self.acc.result(logits=False)
        self.err.cosine = res["cosine"]
        self.err.relative_error = res["relative_error"]
        self.err.max_abs_error = res["max_abs_error"]
        self.err.mean_abs_error = res["mean_abs_error"]
        return self.err


def _is_logits(where: str, t: torch.Tensor, logits: bool | None) -> bool:
    if logits is not None:
        return bool(logits)
    if where == "logits":
        return True
    if where == "last_hidden_state":
        return False
    return t.dim() == 2 and t.shape[-1] > 1


def validate(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    tolerance: Any = None,
    *,
    logits: bool | None = None,
    layers: bool = True,
    progress: bool | None = None,
) -> ValidationReport:
    """Compares ``candidate`` (a compressed model) with ``reference`` (the original) on ``inputs``.

    Both models run in eval mode without gradients (their training flags are restored
    afterwards). Reports output agreement — mean and worst cosine similarity of output rows,
    max/mean absolute error, relative error, and for logits the top-1 agreement and the KL
    divergence of the softmax outputs — and the per-layer error of every layer the candidate
    replaced, measured by forward hooks on the same inputs. Layers whose widths differ from the
    reference's (after :func:`pycompress.compact`) are skipped and listed in ``.skipped`` with the
    reason; the model outputs are still compared.

    Args:
        reference: the original model (keep a ``copy.deepcopy`` before compressing in place).
        candidate: the compressed model, same architecture and module names.
        inputs: a batch (tensor / tuple of args / dict of kwargs) or an iterable of batches.
        tolerance: ``None`` (default: ``{"cosine": 0.99}``), a float (minimum mean cosine) or a dict
            of bounds keyed by :data:`TOLERANCE_KEYS` (e.g. ``{"top1_agreement": 0.99,
            "layer_cosine": 0.98}``).
        logits: whether the output is logits (adds top-1 agreement and KL); ``None`` = guess
            (``logits`` key or a 2-D output → yes, ``last_hidden_state`` → no).
        layers: measure per-layer errors (forward hooks); ``False`` skips that work.
        progress: tqdm bar over the batches; ``None`` = only on a terminal.

    Returns:
        A :class:`ValidationReport` (``.passed``, ``.metrics``, ``.layers``, ``.to_dict()``,
        ``.to_markdown()``).

    Raises:
        ValueError: outputs of different shapes, a model that fails on the inputs (the message
            names the input shapes), no batches, a batch with 0 rows (nothing to compare), NaN in
            the inputs, unknown tolerance keys. A reference output holding NaN/inf is not an
            error but a failed report (every metric NaN, named in ``failures``).

    Example:
        >>> import copy, torch, pycompress
        >>> ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        >>> cand = pycompress.quantize(copy.deepcopy(ref))
        >>> report = pycompress.validate(ref, cand, torch.randn(16, 32))
        >>> report.passed, sorted(report.layers)
        (True, ['0', '2'])
    """
    for argname, m in (("reference", reference), ("candidate", candidate)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{argname} must be an nn.Module, got {type(m).__name__}")
    if reference is candidate:
        raise ValueError(
            "reference and candidate are the same module object; keep a copy of the original "
            "(copy.deepcopy(model)) before compressing in place"
        )
    tol = _parse_tolerance(tolerance)
    batches = _utils.iter_batches(inputs)

    probes: list[_LayerProbe] = []
    handles = []
    if layers:
        ref_root = _utils.unwrap_compiled(reference)
        pairs = _replaced_layers(ref_root, _utils.unwrap_compiled(candidate))
        ref_modules = dict(ref_root.named_modules())
        for name, rmod, cmod in pairs:
            probe = _LayerProbe(name, rmod, cmod, ref_modules)
            probes.append(probe)
            handles.append(rmod.register_forward_hook(probe, with_kwargs=True))
            for pad in probe.pads:
                handles.append(pad.register_forward_pre_hook(probe.capture_pad_input))

    acc = _Acc()
    where = None
    is_logits = False
    n_batches = 0
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(_utils.progress_bar(batches, "validate", progress)):
                _check_inputs(batch, i)
                ref_out = _utils.call_model(reference, batch, "reference model", i)
                cand_out = _utils.call_model(candidate, batch, "candidate model", i)
                r, w = _utils.output_tensor(ref_out)
                c, _ = _utils.output_tensor(cand_out)
                if r.shape != c.shape:
                    raise ValueError(
                        f"batch {i}: candidate output `{w}` has shape {tuple(c.shape)} but the "
                        f"reference's has {tuple(r.shape)}"
                    )
                if r.numel() == 0:
                    raise ValueError(f"batch {i} has 0 rows: nothing to compare (the reference output `{w}` "
                                     f"has shape {tuple(r.shape)})")
                if where is None:
                    where = w
                    is_logits = _is_logits(w, r, logits)
                acc.add(r, c, is_logits)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        reference.train(modes[0])
        candidate.train(modes[1])
    if n_batches == 0:
        raise ValueError("inputs holds no batch")

    metrics = acc.result(is_logits)
    skipped = {p.err.name: p.skipped for p in probes if p.skipped is not None}
    probes = [p for p in probes if p.skipped is None]
    layer_errors = {p.err.name: p.finish() for p in probes}
    failures = [p.failure for p in probes if p.failure]
    failures += [f"layer {p.err.name}: never called on these inputs" for p in probes
                 if p.failure is None and p.err.calls == 0 and tol.keys() & {"layer_cosine", "layer_relative_error"}]
    if acc.ref_nonfinite:
        failures.append(f"reference output holds {acc.ref_nonfinite} NaN/inf values: nothing meaningful to "
                        "compare (every metric is NaN)")
    if acc.nonfinite:
        failures.append(f"candidate output holds {acc.nonfinite} NaN/inf values")
    values = dict(metrics)
    called = [e for e in layer_errors.values() if e.calls]
    values["layer_cosine"] = min((e.cosine for e in called), default=None)
    values["layer_relative_error"] = max((e.relative_error for e in called), default=None)
    for k, bound in tol.items():
        v = values.get(k)
        direction, desc = TOLERANCE_KEYS[k]
        if v is None:
            if k in ("top1_agreement", "kl_div"):
                failures.append(f"{k}: not measured (output `{where}` is not logits; pass logits=True)")
            continue
        ok = (v >= bound) if direction == "min" else (v <= bound)
        if not ok or (isinstance(v, float) and math.isnan(v)):
            op = ">=" if direction == "min" else "<="
            failures.append(f"{k} = {_fmt(v)} violates {op} {_fmt(bound)} ({desc})")
    return ValidationReport(
        output=where or "output",
        logits=is_logits,
        metrics=metrics,
        layers=layer_errors,
        tolerance=tol,
        failures=failures,
        batches=n_batches,
        rows=acc.rows,
        nonfinite=acc.nonfinite,
        skipped=skipped,
        reference_nonfinite=acc.ref_nonfinite,
    )


def _check_inputs(batch: Any, index: int) -> None:
    """Refuses NaN inputs (no output computed from them means anything) and empty batches.
    Infinite values are allowed: additive attention masks hold ``-inf``."""
    _utils.check_batch(batch)
    tensors = list(_utils._tensors(batch))
    for j, t in enumerate(tensors):
        if t.dim() >= 1 and t.shape[0] == 0:
            raise ValueError(f"batch {index} has 0 rows: nothing to compare (input {j} has shape {tuple(t.shape)})")
        if t.is_floating_point() or t.is_complex():
            n = int(torch.isnan(t).sum())
            if n:
                raise ValueError(f"inputs: batch {index} holds {n} NaN value{'s' if n > 1 else ''} in input {j} "
                                 f"(shape {tuple(t.shape)}); validate needs finite inputs")
