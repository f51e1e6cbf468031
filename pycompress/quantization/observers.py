"""Calibration observers: the range of an activation tensor, turned into uint8 quantization
parameters (asymmetric, per tensor).

Every observer sees the calibration batches twice at most: a first pass records the exact minimum
and maximum (and refuses NaN / inf); observers that clip outliers (``"percentile"``, ``"mse"``)
then build a histogram of ``HISTOGRAM_BINS`` bins over that range in a second pass. The
quantization range always contains 0 (a real zero, e.g. the zero padding of a convolution, must
be exactly representable), so after a ReLU-family activation it starts at 0.

``qparams(lo, hi)`` is the same formula the int8 convolution uses for dynamic quantization:
``scale = (hi - lo) / 255`` (1 when ``hi == lo``), ``zero_point = clamp(round(-lo / scale), 0, 255)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["OBSERVERS", "HISTOGRAM_BINS", "DEFAULT_PERCENTILE", "Observer", "MinMaxObserver",
           "PercentileObserver", "MSEObserver", "make_observer", "qparams"]

HISTOGRAM_BINS = 2048
DEFAULT_PERCENTILE = 99.99


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` covering ``[min(0, lo), max(0, hi)]`` (scale rounded to fp32)."""
    lo32 = torch.tensor(min(0.0, float(lo)), dtype=torch.float32)
    hi32 = torch.tensor(max(0.0, float(hi)), dtype=torch.float32)
    scale = (hi32 - lo32) / 255.0
    if float(scale) == 0.0 or not math.isfinite(float(scale)):
        scale = torch.tensor(1.0, dtype=torch.float32)
    zp = int(torch.clamp(torch.round(-lo32 / scale), 0, 255))
    return float(scale), zp


class Observer:
    """Records ``min`` / ``max`` of every tensor it sees (pass 1)."""

    name = "minmax"
    needs_histogram = False

    def __init__(self, where: str = "activation"):
        self.where = where
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    @torch.no_grad()
    def observe(self, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        t = t.detach()
        lo, hi = torch.aminmax(t.float())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{self.where}: the calibration data produced NaN or inf values")
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += t.numel()

    @property
    def seen(self) -> bool:
        return self.count > 0

    def observe_histogram(self, t: torch.Tensor) -> None:  # pass 2 (only when needs_histogram)
        pass

    def range(self) -> tuple[float, float]:
        if not self.seen:
            raise ValueError(f"{self.where}: never ran on the calibration data, so it has no activation range")
        return self.min, self.max

    def qparams(self) -> tuple[float, int]:
        return qparams(*self.range())


MinMaxObserver = Observer


class _HistogramObserver(Observer):
    needs_histogram = True

    def __init__(self, where: str = "activation", bins: int = HISTOGRAM_BINS):
        super().__init__(where)
        self.bins = bins
        self.hist: torch.Tensor | None = None

    def _edges(self) -> tuple[float, float]:
        return min(0.0, self.min), max(0.0, self.max)

    @torch.no_grad()
    def observe_histogram(self, t: torch.Tensor) -> None:
        if t.numel() == 0 or not self.seen:
            return
        lo, hi = self._edges()
        if hi <= lo:
            return
        h = torch.histc(t.detach().float().reshape(-1), bins=self.bins, min=lo, max=hi).double().cpu()
        self.hist = h if self.hist is None else self.hist + h

    def _centers(self) -> torch.Tensor:
        lo, hi = self._edges()
        width = (hi - lo) / self.bins
        return lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width


class PercentileObserver(_HistogramObserver):
    """Clips the range to the ``percentile`` (and ``100 - percentile``) of the values seen,
    read from the histogram (linear inside a bin: within 1/2048 of the range)."""

    name = "percentile"

    def __init__(self, where: str = "activation", percentile: float = DEFAULT_PERCENTILE,
                 bins: int = HISTOGRAM_BINS):
        super().__init__(where, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _quantile(self, q: float) -> float:
        lo, hi = self._edges()
        cum = torch.cumsum(self.hist, 0)
        total = float(cum[-1])
        target = q * total
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0])
        i = min(i, self.bins - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.hist[i])
        frac = (target - before) / inside if inside > 0 else 0.0
        width = (hi - lo) / self.bins
        return lo + (i + min(max(frac, 0.0), 1.0)) * width

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.hist is None or self.percentile >= 100.0 or float(self.hist.sum()) == 0:
            return lo, hi
        p = self.percentile / 100.0
        return (max(lo, self._quantile(1.0 - p)) if lo < 0 else lo, min(hi, self._quantile(p)))


class MSEObserver(_HistogramObserver):
    """Chooses the clipping range (``[lo, hi]`` scaled by one factor) with the smallest expected
    squared quantization error over the histogram (rounding error inside, clipping error outside)."""

    name = "mse"
    _CANDIDATES = 100

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.hist is None or float(self.hist.sum()) == 0:
            return lo, hi
        lo0, hi0 = self._edges()
        centers, counts = self._centers(), self.hist
        best, best_err = (lo, hi), math.inf
        for k in range(self._CANDIDATES):
            alpha = 1.0 - 0.7 * k / self._CANDIDATES  # from the full range down to 30 % of it
            clo, chi = lo0 * alpha, hi0 * alpha
            scale, zp = qparams(clo, chi)
            q = torch.clamp(torch.round(centers / scale) + zp, 0, 255)
            err = float((((q - zp) * scale - centers) ** 2 * counts).sum())
            if err < best_err:
                best, best_err = (clo, chi), err
        return best


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(spec, where: str = "activation") -> Observer:
    """An observer from a name (``"minmax"``, ``"percentile"``, ``"mse"``) or
    ``("percentile", 99.9)``."""
    name, args = (spec, ()) if isinstance(spec, str) else (spec[0], tuple(spec[1:])) \
        if isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str) else (None, ())
    if name not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)} (or ('percentile', p)), got {spec!r}")
    if args and name != "percentile":
        raise ValueError(f"observer {name!r} takes no argument, got {spec!r}")
    return OBSERVERS[name](where, *args)
