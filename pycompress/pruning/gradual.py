"""``GradualPruning``: a cubic sparsity schedule that re-prunes the model from any training loop."""

from __future__ import annotations

import torch
from torch import nn

from pycompress.nn import conv1d
from pycompress.nn.masked_linear import _clear_pruned_state
from pycompress.pruning.prune import (
    _check_activation_score, _check_method, _check_scope, _check_sparsity, _parse_pattern, prune,
)

__all__ = ["GradualPruning"]


@torch.no_grad()
def _adopt_conv1d_weights(model: nn.Module, before: dict, optimizer: torch.optim.Optimizer) -> None:
    """Puts the weights of the MaskedLinear layers that replaced Conv1D layers (new Parameters
    holding the transpose) into ``optimizer`` in place of the Conv1D weights, with their state
    (momentum, Adam moments) transposed along."""
    for name, old in before.items():
        new = getattr(model.get_submodule(name), "weight", None)
        if new is None or new is old:
            continue
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state is not None:
            optimizer.state[new] = {k: (v.t().contiguous() if isinstance(v, torch.Tensor)
                                        and v.shape == old.shape and v.dim() == 2 else v)
                                    for k, v in state.items()}


class GradualPruning:
    """Cubic gradual pruning schedule (Zhu & Gupta 2017), usable from any training loop.

    At step ``t`` (counted by :meth:`step`) between ``start_step`` and
    ``start_step + total_steps``, every ``frequency`` steps the target is
    ``s_t = s_f + (s_i - s_f) * (1 - (t - start_step) / total_steps) ** 3`` and the selected layers
    are re-pruned (by magnitude unless ``method`` says otherwise; pruned weights are exactly zero,
    so with magnitude masks only grow, except for live weights that are exactly zero).

    Args:
        model: model whose ``nn.Linear`` / ``nn.Conv2d`` layers are swapped to MaskedLinear /
            MaskedConv2d at construction (transformers' ``Conv1D`` layers too: their new, transposed
            weights take the place of the old ones in ``optimizer``).
        final_sparsity, total_steps, start_step, frequency, initial_sparsity: the schedule
            (``final_sparsity >= initial_sparsity``).
        pattern: ``"unstructured"`` or ``"channel"``.
        scope, include, exclude: as in :func:`prune`.
        method, calibration_data, mix, activation_score: as in :func:`prune`. With ``"activation"`` / ``"mixed"``
            the statistics are collected again at every pruning step (one pass of the model over
            ``calibration_data``, which is kept: a one-shot iterator is read into a list once), so
            they follow the weights as they train. Every rank must pass the same data to get the
            same masks.
        example_inputs: a batch the model runs on; ``pattern="channel"`` on a CNN traces its
            channel groups with it (default: the first batch of ``calibration_data``).
        optimizer: optional; after each step that changes masks its state (momentum, Adam
            moments) of pruned weights is cleared, and a step hook re-applies the masks.

    Example:
        >>> import torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> sched = pycompress.GradualPruning(model, final_sparsity=0.8, total_steps=10)
        >>> for _ in range(10):
        ...     _ = sched.step()
        >>> round(sched.current_sparsity, 2)
        0.8
    """

    def __init__(self, model: nn.Module, final_sparsity: float, total_steps: int, start_step: int = 0,
                 frequency: int = 1, initial_sparsity: float = 0.0, pattern: str = "unstructured",
                 scope: str = "global", include=None, exclude=None, optimizer=None, method: str = "magnitude",
                 calibration_data=None, mix: float = 0.5, activation_score: str = "mean_abs",
                 example_inputs=None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final_sparsity ({final_sparsity}) must be >= initial_sparsity ({initial_sparsity}): "
                             "the schedule only prunes more over time")
        for name, v, lo in (("total_steps", total_steps, 1), ("start_step", start_step, 0), ("frequency", frequency, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        kind, _ = _parse_pattern(pattern)
        if kind == "nm":
            raise ValueError("N:M patterns have a fixed sparsity; use prune(model, None, pattern='N:M') once")
        _check_scope(scope)
        mix = _check_method(method, mix)
        activation_score = _check_activation_score(activation_score)
        if method != "magnitude":
            if calibration_data is None:
                raise ValueError(f"method={method!r} ranks by activations and needs calibration_data "
                                 "(a batch or an iterable of batches); use method='magnitude' without data")
            if hasattr(calibration_data, "__next__") and not isinstance(calibration_data, torch.Tensor):
                calibration_data = list(calibration_data)  # a one-shot iterator: read again at every step
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.total_steps, self.start_step, self.frequency = model, total_steps, start_step, frequency
        self.pattern, self.scope, self.include, self.exclude = pattern, scope, include, exclude
        self.optimizer = optimizer
        self.method, self.calibration_data, self.mix = method, calibration_data, mix
        self.activation_score = activation_score
        self.example_inputs = example_inputs
        self.step_count = 0
        self.current_sparsity = self.initial_sparsity
        self._hook = None
        convs = {n: m.weight for n, m in model.named_modules() if conv1d.is_conv1d(m)}
        self._prune(self.initial_sparsity)
        if optimizer is not None and convs:
            _adopt_conv1d_weights(model, convs, optimizer)
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(lambda opt, a, k: _clear_pruned_state(model, opt))

    def _prune(self, sparsity: float) -> None:
        data = self.method != "magnitude"
        prune(self.model, sparsity, pattern=self.pattern, scope=self.scope, include=self.include,
              exclude=self.exclude, method=self.method, mix=self.mix,
              activation_score=self.activation_score, calibration_data=self.calibration_data if data else None,
              example_inputs=self.example_inputs)

    def sparsity_at(self, t: int) -> float:
        """Target sparsity of the schedule at step ``t``."""
        if t <= self.start_step:
            return self.initial_sparsity
        frac = min(1.0, (t - self.start_step) / self.total_steps)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def step(self) -> float:
        """Advances one step; re-prunes when the schedule says so. Returns the current target."""
        self.step_count += 1
        t = self.step_count
        end = self.start_step + self.total_steps
        if t < self.start_step:
            return self.current_sparsity
        due = (t - self.start_step) % self.frequency == 0 or t == end
        if t <= end and due:
            target = self.sparsity_at(t)
            self._prune(target)
            self.current_sparsity = target
            if self.optimizer is not None:
                _clear_pruned_state(self.model, self.optimizer)
        return self.current_sparsity

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "current_sparsity": self.current_sparsity}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (checked first: nothing changes when it is refused)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradualPruning.state_dict(), got {type(state).__name__}")
        missing = sorted({"step_count", "current_sparsity"} - set(state))
        if missing:
            raise ValueError("GradualPruning.load_state_dict: missing key(s) "
                             + ", ".join(repr(k) for k in missing)
                             + " (expected the dict returned by GradualPruning.state_dict())")
        step, cur = state["step_count"], state["current_sparsity"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"GradualPruning.load_state_dict: step_count must be an int >= 0, got {step!r}")
        if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not 0.0 <= float(cur) < 1.0:
            raise ValueError(f"GradualPruning.load_state_dict: current_sparsity must be in [0, 1), got {cur!r}")
        self.step_count = step
        self.current_sparsity = float(cur)
