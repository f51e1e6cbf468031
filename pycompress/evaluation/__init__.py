"""Evaluation: ``validate`` (agreement with the float reference, per layer), ``evaluate`` and
``compare`` (accuracy, size, latency, compression ratio)."""
