"""``pycompress.compress``: apply a recipe of compression steps, with an accuracy budget.

A recipe is a list of steps, each a one-key mapping from the step name to its arguments::

    steps:
      - prune: {sparsity: 0.5, pattern: "2:4", exclude: "classifier"}
      - quantize: {mode: w8a8, exclude: ["classifier", "*.attention.*"]}

given as a dict (``{"steps": [...]}``), a bare list of steps, or a path to a ``.yaml`` / ``.yml``
/ ``.json`` file holding either. Steps: ``prune`` (arguments of :func:`pycompress.prune`;
``method: activation`` or ``mixed`` ranks by activations on the calibration inputs, which are
passed as ``calibration_data``; for ``pattern: channel`` ``activation_score: mean_abs`` (default)
or ``std_weighted`` picks the statistic), ``quantize`` (of :func:`pycompress.quantize`), ``deploy`` (of
:func:`pycompress.deploy_pruned`), ``compact`` (of :func:`pycompress.compact`: removes the
neurons and heads that ``prune`` with ``pattern: channel`` / ``head`` cut; the first calibration
batch is its ``example_inputs``, checking that the outputs did not change).
The whole recipe is checked before the model is touched: an unknown step or argument raises
``ValueError`` naming it and listing what is allowed.

Accuracy-aware fallback (when ``max_drop`` is given): the metric of the original model is
measured, the recipe applied, and while the metric dropped by more than ``max_drop`` the most
sensitive compressed layer is put back to its original
form, one layer at a time, re-measuring after each. A layer's sensitivity is the relative error of
the model's output when only that layer is compressed (measured on the calibration inputs).
A conv that ``quantize`` converted goes back together with the BatchNorm and activation modules
folded into it, and the int8 convs feeding it then hand it float activations.

``quantize`` steps get the calibration inputs as ``calibration_data``: the convs of a CNN get
static activation ranges, int8 outputs between consecutive convs and bias correction.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pycompress import _utils
from pycompress.nn import registry
from pycompress.evaluation.evaluate import _split_item, compute_metric, resolve_metric
from pycompress.evaluation.validate import validate
from pycompress.pruning.compact import compact
from pycompress.pruning.deploy import deploy_pruned
from pycompress.pruning.prune import prune
from pycompress.quantization.quantize import quantize

__all__ = ["compress", "load_recipe", "CompressionReport", "STEPS"]

# step name -> (the public function it calls, summary)
STEPS = {
    "prune": ("prune", "pycompress.prune: MaskedLinear with a sparsity pattern"),
    "quantize": ("quantize", "pycompress.quantize: Int8Linear, Int8Conv2d"),
    "deploy": ("deploy_pruned", "pycompress.deploy_pruned: MaskedLinear → SparseLinear / Linear"),
    "compact": ("compact", "pycompress.compact: pruned neurons / heads removed, smaller dense layers"),
}
_STEP_FUNCTIONS: dict[str, Callable] = {"prune": prune, "quantize": quantize, "deploy_pruned": deploy_pruned,
                                        "compact": compact}
# arguments that compress() fills from its own inputs (never written in a recipe)
_INJECTED = {"calibration_data": "the calibration inputs of compress()",
             "example_inputs": "the first calibration batch",
             "return_report": "compress()", "return_result": "compress()", "warn": "compress()"}
_DATA_METHODS = ("activation", "mixed")


def _step_function(step: str) -> Callable:
    return _STEP_FUNCTIONS[STEPS[step][0]]


def _step_arguments(fn: Callable) -> tuple[list[str], list[str]]:
    """(allowed argument names, required ones) of a step function, model excluded."""
    sig = inspect.signature(fn)
    allowed, required = [], []
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0 or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in _INJECTED:
            continue
        allowed.append(name)
        if p.default is p.empty:
            required.append(name)
    return allowed, required


def load_recipe(recipe: Any) -> list[tuple[str, dict]]:
    """Parses and checks a recipe; returns ``[(step, kwargs), ...]``.

    Args:
        recipe: ``{"steps": [...]}``, a list of steps, or a path to a YAML/JSON file.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: unreadable file, unknown step,
        unknown or missing argument. RuntimeError: a step whose function this build lacks.

    Example:
        >>> from pycompress.recipe import load_recipe
        >>> load_recipe({"steps": [{"quantize": {"mode": "w8a16", "exclude": "head"}}]})
        [('quantize', {'mode': 'w8a16', 'exclude': 'head'})]
    """
    source = "recipe"
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"recipe file {path}: unknown extension {suffix!r} (use .yaml, .yml or .json)")
        try:
            if suffix == ".json":
                recipe = json.loads(text)
            else:
                import yaml

                recipe = yaml.safe_load(text)  # safe_load: plain data only, never objects
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            raise ValueError(f"recipe file {path} could not be parsed: {e}") from None
    if isinstance(recipe, dict):
        unknown = set(recipe) - {"steps", "name", "description"}
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'steps'")
        if "steps" not in recipe:
            raise ValueError(f"{source}: no 'steps' list")
        steps = recipe["steps"]
    else:
        steps = recipe
    if not isinstance(steps, list):
        raise ValueError(f"{source}: steps must be a list, got {type(steps).__name__}")
    if not steps:
        raise ValueError(f"{source}: the recipe has no steps")
    out = []
    for i, step in enumerate(steps):
        where = f"{source}: step {i}"
        if isinstance(step, str):
            step = {step: {}}
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"{where} must be a mapping with exactly one step name, got {step!r}")
        (name, kwargs), = step.items()
        if name not in STEPS:
            raise ValueError(f"{where}: unknown step {name!r}; known steps: {', '.join(STEPS)}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{where} ({name}): arguments must be a mapping, got {type(kwargs).__name__}")
        allowed, required = _step_arguments(_step_function(name))
        for k in kwargs:
            if k in _INJECTED and k in inspect.signature(_step_function(name)).parameters:
                raise ValueError(f"{where} ({name}): argument {k!r} cannot be given in a recipe; "
                                 f"compress() passes {_INJECTED[k]}")
            if k not in allowed:
                raise ValueError(f"{where} ({name}): unknown argument {k!r}; allowed: {', '.join(allowed)}")
        missing = [r for r in required if r not in kwargs]
        if missing:
            raise ValueError(f"{where} ({name}): missing required argument(s) {', '.join(missing)}")
        for k in ("include", "exclude"):
            if k in kwargs:
                pats = _utils.parse_patterns(kwargs[k], f"{where} ({name}) {k}")
                if name != "quantize" and any(p.text.startswith("re:") for p in pats or ()):
                    raise ValueError(
                        f"{where} ({name}) {k}: 're:' regular expressions are understood by quantize "
                        "steps only; use globs"
                    )
        out.append((name, dict(kwargs)))
    return out


@dataclass
class CompressionReport:
    """Result of :func:`compress`.

    Attributes:
        steps: per step, its name, arguments and the layers it changed (and, for ``quantize``,
            the layers it left alone with the reason).
        baseline_metric / final_metric: metric of the original and of the returned model.
        max_drop: the budget; ``drop``: baseline − final (for lower-is-better metrics, the rise).
        reverted: layers put back to their original form, most sensitive first, with their
            sensitivity (relative error of the model output when only that layer is compressed)
            and the metric after reverting.
        compressed_layers: layers that remain compressed, with their layer class.
        sensitivity: when the fallback ran, every compressed layer's sensitivity (relative error
            of the model output with only that layer compressed).
        validation: :class:`~pycompress.validate.ValidationReport` of the returned model against
            the original on the calibration inputs.
    """

    steps: list[dict] = field(default_factory=list)
    metric_name: str | None = None
    higher_is_better: bool = True
    baseline_metric: float | None = None
    compressed_metric: float | None = None
    final_metric: float | None = None
    max_drop: float | None = None
    reverted: list[dict] = field(default_factory=list)
    compressed_layers: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    validation: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        if self.baseline_metric is None or self.final_metric is None:
            return None
        d = self.baseline_metric - self.final_metric
        return d if self.higher_is_better else -d

    @property
    def within_budget(self) -> bool | None:
        if self.max_drop is None or self.drop is None:
            return None
        return self.drop <= self.max_drop + 1e-12

    def to_dict(self) -> dict:
        return {
            "steps": copy.deepcopy(self.steps),
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "baseline_metric": self.baseline_metric,
            "compressed_metric": self.compressed_metric,
            "final_metric": self.final_metric,
            "drop": self.drop,
            "max_drop": self.max_drop,
            "within_budget": self.within_budget,
            "reverted": copy.deepcopy(self.reverted),
            "compressed_layers": dict(self.compressed_layers),
            "sensitivity": dict(self.sensitivity),
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        lines = ["**Compression report**", "", "| step | arguments | layers changed | left alone |", "|---|---|---|---|"]
        for s in self.steps:
            args = ", ".join(f"{k}={v!r}" for k, v in s["arguments"].items()) or "–"
            lines.append(f"| {s['step']} | {args} | {len(s['changed'])} | {len(s.get('skipped', {}))} |")
        if self.metric_name is not None:
            lines += [
                "",
                f"{self.metric_name}: original {_f(self.baseline_metric)}, after the recipe "
                f"{_f(self.compressed_metric)}, returned model {_f(self.final_metric)}"
                + (f" (budget: drop <= {self.max_drop}, {'met' if self.within_budget else 'NOT met'})"
                   if self.max_drop is not None else ""),
            ]
        if self.reverted:
            lines += ["", "| reverted layer | was | sensitivity (output rel. error) | metric after |", "|---|---|---|---|"]
            for r in self.reverted:
                lines.append(f"| {r['layer']} | {r['was']} | {_f(r['sensitivity'])} | {_f(r['metric_after'])} |")
        lines += ["", f"{len(self.compressed_layers)} layer(s) compressed."]
        lines += [f"- {n}" for n in self.notes]
        if self.validation is not None:
            lines += ["", self.validation.to_markdown(max_layers=10)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        parts = [f"steps={[s['step'] for s in self.steps]}", f"compressed_layers={len(self.compressed_layers)}"]
        if self.metric_name is not None:
            parts.append(f"{self.metric_name}: {_f(self.baseline_metric)} -> {_f(self.final_metric)}")
        if self.max_drop is not None:
            parts.append(f"max_drop={self.max_drop} ({'met' if self.within_budget else 'NOT met'})")
        parts.append(f"reverted={[r['layer'] for r in self.reverted]}")
        return "CompressionReport(" + ", ".join(parts) + ")"


def _f(v: Any) -> str:
    return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _changed_layers(reference: nn.Module, model: nn.Module) -> dict[str, str]:
    """Layers of ``model`` that differ from ``reference`` (other class or other tensors)."""
    ref = dict(reference.named_modules())
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or name not in ref or any(name.startswith(o + ".") for o in out):
            continue
        r = ref[name]
        if type(r) is not type(m) or _reshaped(r, m):
            # (a block rebuilt by quantize is an fx.GraphModule of a class of its own)
            out[name] = "GraphModule" if isinstance(m, torch.fx.GraphModule) else type(m).__name__
        elif registry.is_pycompress_layer(m):
            rs, ms = r.state_dict(), m.state_dict()
            if rs.keys() != ms.keys() or any(
                rs[k].shape != ms[k].shape or not torch.equal(rs[k].to(ms[k].device), ms[k]) for k in rs
            ):
                out[name] = type(m).__name__
    return out


def _reshaped(r: nn.Module, m: nn.Module) -> bool:
    """True when a layer's widths changed (``compact`` made it narrower): ``in_features``,
    ``out_features``, ``in_channels``, ``out_channels``, ``num_features``, ``num_attention_heads``
    (whatever the layer class)."""
    for k in ("in_features", "out_features", "in_channels", "out_channels", "num_features", "num_attention_heads"):
        a, b = getattr(r, k, None), getattr(m, k, None)
        if isinstance(a, int) and isinstance(b, int) and a != b:
            return True
    return False


def _make_metric(metric: Any, calibration: list, progress: bool | None) -> tuple[Callable[[nn.Module], float], str, bool]:
    if callable(metric) and not isinstance(metric, str):
        try:
            n_params = len(inspect.signature(metric).parameters)
        except (TypeError, ValueError):
            n_params = 1
        if n_params == 1:
            name = getattr(metric, "__name__", "metric")
            return metric, name, bool(getattr(metric, "higher_is_better", True))
    name, _, hib = resolve_metric(metric)
    return (lambda m: compute_metric(m, calibration, metric, progress=progress)), name, hib


def compress(
    model: nn.Module,
    recipe: Any,
    calibration_inputs: Any,
    metric: Any = None,
    max_drop: float | None = None,
    *,
    progress: bool | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Applies a compression recipe to ``model`` in place, within an accuracy budget.

    Args:
        model: the trained model (modified in place).
        recipe: ``{"steps": [...]}``, a list of steps, or a YAML/JSON file path (see
            :func:`load_recipe`).
        calibration_inputs: a batch or iterable of batches used to validate the result and rank
            layer sensitivity. When ``metric`` is a name (``"accuracy"``...), it must be an
            iterable of ``(inputs, targets)`` pairs and the metric is measured on it.
        metric: ``None``; a callable ``fn(model) -> float`` (higher is better unless it has
            ``higher_is_better = False``); or a metric name / ``fn(outputs, targets)`` as in
            :func:`pycompress.evaluate`, measured on ``calibration_inputs``.
        max_drop: largest allowed metric drop (absolute, in metric units; for lower-is-better
            metrics, the largest allowed rise). Needs ``metric``.
        progress: tqdm bars; ``None`` = only on a terminal.

    Returns:
        ``(model, CompressionReport)``; the report lists the steps, the metric before/after,
        the layers that were reverted to their original form and a validation report.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> calib = [torch.randn(8, 16) for _ in range(4)]
        >>> recipe = {"steps": [{"quantize": {"mode": "w8a8", "exclude": "2"}}]}
        >>> model, report = pycompress.compress(model, recipe, calib)
        >>> sorted(report.compressed_layers.items())
        [('0', 'Int8Linear')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    steps = load_recipe(recipe)
    for i, (name, kwargs) in enumerate(steps):
        method = kwargs.get("method", "magnitude")
        if name == "prune" and method in _DATA_METHODS and (
                calibration_inputs is None or (isinstance(calibration_inputs, (list, tuple)) and not calibration_inputs)):
            raise ValueError(f"recipe step {i} (prune): method={method!r} ranks by activations and needs "
                             "calibration_inputs (a batch or an iterable of batches); use method: magnitude "
                             "without data")
    if max_drop is not None:
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
            raise ValueError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
        if metric is None:
            raise ValueError("max_drop needs a metric (a name or a callable) to measure the drop")

    named_metric = metric is not None and (isinstance(metric, str) or _takes_two(metric))
    calibration = list(_utils.iter_batches(calibration_inputs, "calibration_inputs"))
    if not calibration:
        raise ValueError("calibration_inputs holds no batch")
    if named_metric:
        val_inputs = [_split_item(it, i)[0] for i, it in enumerate(calibration)]
    else:
        val_inputs = calibration
    for b in val_inputs:
        _utils.check_batch(b, "calibration_inputs")

    for i, (name, kwargs) in enumerate(steps):  # every pattern must match a module: checked up front
        if "include" in kwargs or "exclude" in kwargs:
            try:
                _utils.select_modules(model, kwargs.get("include"), kwargs.get("exclude"))
            except ValueError as e:
                raise ValueError(f"recipe step {i} ({name}): {e}") from None

    original = copy.deepcopy(model)
    report = CompressionReport(max_drop=float(max_drop) if max_drop is not None else None)
    measure = None
    if metric is not None:
        measure, report.metric_name, report.higher_is_better = _make_metric(metric, calibration, progress)
        report.baseline_metric = float(measure(original))

    convs = _ConvGroups()
    for name, kwargs in steps:
        fn = _step_function(name)
        before = copy.deepcopy(model) if len(steps) > 1 else original
        if name == "quantize":
            # the calibration inputs set the static activation ranges of the convs
            _, qres = fn(model, **kwargs, calibration_data=val_inputs, return_result=True, warn=False)
            convs.add(qres)
            skipped = dict(qres.skipped)
        elif name == "compact":
            _, creport = fn(model, val_inputs[0], **kwargs, return_report=True)
            skipped = dict(creport.refused)
        else:
            if name == "prune" and kwargs.get("method", "magnitude") in _DATA_METHODS:
                kwargs = {**kwargs, "calibration_data": val_inputs}
            if name == "prune":  # traces the channel groups of a CNN (pattern: channel)
                kwargs = {**kwargs, "example_inputs": val_inputs[0]}
            res = fn(model, **kwargs)
            if isinstance(res, nn.Module) and res is not model:
                raise RuntimeError(f"step {name} returned a different model object; steps must work in place")
            skipped = {}
        changed = _changed_layers(before, model)
        shown = {k: v for k, v in kwargs.items() if k not in _INJECTED}
        report.steps.append({"step": name, "arguments": shown, "changed": sorted(changed), "skipped": skipped})

    report.compressed_layers = _changed_layers(original, model)
    if measure is not None:
        report.compressed_metric = report.final_metric = float(measure(model))

    validation = validate(original, model, val_inputs, tolerance=None, progress=progress)
    if max_drop is not None and not report.within_budget:
        # a layer that compact made narrower cannot go back alone (its neighbours' widths changed too)
        fixed = [n for n in report.compressed_layers if _width_changed(original, model, n)]
        if fixed:
            report.notes.append(f"layers whose width changed (compact) cannot be reverted one at a time and "
                                f"stay compressed: {', '.join(fixed)}")
        # a BatchNorm or activation folded into a conv goes back together with that conv
        candidates = [n for n in report.compressed_layers if n not in fixed and n not in convs.members_of]
        sensitivity = _sensitivity(original, model, candidates, val_inputs, progress, convs)
        report.sensitivity = dict(sensitivity)
        order = sorted(candidates, key=lambda n: -sensitivity.get(n, math.inf))
        for layer in order:
            was = report.compressed_layers.pop(layer)
            for member in convs.revert(model, original, layer):
                report.compressed_layers.pop(member, None)
            report.final_metric = float(measure(model))
            report.reverted.append({
                "layer": layer,
                "was": was,
                "sensitivity": sensitivity.get(layer, math.inf),
                "metric_after": report.final_metric,
            })
            if report.within_budget:
                break
        validation = validate(original, model, val_inputs, tolerance=None, progress=progress)
    report.validation = validation
    return model, report


def _width_changed(original: nn.Module, model: nn.Module, name: str) -> bool:
    """Whether ``name`` or a module inside it has other tensor shapes than in ``original``."""
    ref = dict(original.named_modules())
    sub = model.get_submodule(name)
    for rel, m in sub.named_modules():
        full = f"{name}.{rel}" if rel else name
        if full in ref and _reshaped(ref[full], m):
            return True
    return False


class _ConvGroups:
    """What the quantize steps did to convs, so that a conv goes back to float as a unit: the
    modules folded / fused into it (replaced by ``nn.Identity``), the uint8 edges between convs
    and which convs each conv's output reaches (a channels-last output relies on them). A block
    rebuilt so that its convs compute its residual additions goes back as a whole (the original
    block, every conv in it float)."""

    def __init__(self):
        self.members: dict[str, list[str]] = {}
        self.edges: list[tuple[str, str]] = []
        self.feeds: dict[str, list[str]] = {}
        self.blocks: dict[str, list[str]] = {}  # rebuilt block -> the convs in it

    def add(self, qres) -> None:
        for conv in getattr(qres, "convs", []):
            self.members[conv] = qres.members(conv)
        for block in getattr(qres, "residual_blocks", {}):
            self.blocks[block] = [c for c in getattr(qres, "convs", []) if c.startswith(block + ".")]
        self.edges += list(getattr(qres, "uint8_edges", []))
        for k, v in getattr(qres, "feeds", {}).items():
            self.feeds[k] = sorted(set(self.feeds.get(k, [])) | set(v))

    @property
    def members_of(self) -> set[str]:
        return {m for ms in self.members.values() for m in ms}

    def _producers(self, layer: str) -> tuple[list[str], list[str]]:
        uint8 = [p for p, c in self.edges if c == layer]
        reaching = [p for p, cs in self.feeds.items() if layer in cs]
        return uint8, reaching

    def standalone(self, model: nn.Module, layer: str) -> nn.Module:
        """A copy of the compressed ``layer`` that takes and returns what a float layer would
        (float output in torch's memory format)."""
        from pycompress.nn import Int8Conv2d

        m = copy.deepcopy(model.get_submodule(layer))
        if isinstance(m, Int8Conv2d):
            m.set_output_quantization(None, None)
            m.channels_last_output = False
        elif layer in self.blocks and isinstance(m, torch.fx.GraphModule):
            # the block's outputs come from its convs: float there
            out = next(n for n in m.graph.nodes if n.op == "output")
            for node in out.all_input_nodes:
                conv = m.get_submodule(node.target) if node.op == "call_module" else None
                if isinstance(conv, Int8Conv2d):
                    conv.set_output_quantization(None, None)
                    conv.channels_last_output = False
        return m

    def revert(self, model: nn.Module, original: nn.Module, layer: str) -> list[str]:
        """Puts ``layer`` and the modules folded into it back to their original form; the convs
        feeding it switch to float (contiguous) outputs. Returns the members restored."""
        from pycompress.nn import Int8Conv2d

        _utils.set_module(model, layer, copy.deepcopy(original.get_submodule(layer)))
        inside = self.blocks.get(layer, [layer])
        members = [m for c in inside for m in self.members.get(c, []) if not m.startswith(layer + ".")]
        for m in members:
            _utils.set_module(model, m, copy.deepcopy(original.get_submodule(m)))
        producers: set[str] = set()
        for c in inside:
            uint8, reaching = self._producers(c)
            producers |= {p for p in (*uint8, *reaching) if not p.startswith(layer + ".")}
        uint8 = {p for c in inside for p in self._producers(c)[0]}
        for p in producers:
            mod = model.get_submodule(p)
            if isinstance(mod, Int8Conv2d):
                if p in uint8:
                    mod.set_output_quantization(None, None)
                mod.channels_last_output = False
        return members


def _sensitivity(original: nn.Module, model: nn.Module, layers: list[str], inputs: list,
                 progress: bool | None, convs: _ConvGroups | None = None) -> dict[str, float]:
    """Per compressed layer: relative error of the *model output* when only that layer is
    compressed (the original model with that one layer swapped in, and the modules folded into
    it replaced by ``nn.Identity``), on the calibration inputs."""
    convs = convs or _ConvGroups()
    out: dict[str, float] = {}
    training = original.training
    original.eval()
    try:
        with torch.no_grad():
            expected = [_utils.output_tensor(_utils.call_model(original, b))[0].double() for b in inputs]
            for name in _utils.progress_bar(layers, "sensitivity", progress):
                swapped = {name: convs.standalone(model, name)}
                swapped.update({m: nn.Identity() for m in convs.members.get(name, [])})
                keep = {n: original.get_submodule(n) for n in swapped}
                for n, mod in swapped.items():
                    _utils.set_module(original, n, mod)
                try:
                    diff = ref = 0.0
                    for b, e in zip(inputs, expected):
                        got = _utils.output_tensor(_utils.call_model(original, b))[0].double().to(e.device)
                        diff += float(((got - e) ** 2).sum())
                        ref += float((e * e).sum())
                finally:
                    for n, mod in keep.items():
                        _utils.set_module(original, n, mod)
                err = math.sqrt(diff / ref) if ref > 0 else math.sqrt(diff)
                out[name] = err if math.isfinite(err) else math.inf
    finally:
        original.train(training)
    return out


def _takes_two(fn: Any) -> bool:
    if not callable(fn):
        return False
    try:
        return len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        return False
