"""What the demos share: measuring with :func:`pycompress.evaluate`, table rows, the text table,
the plot and atomic writes."""

from __future__ import annotations

import dataclasses
import os
import platform

import torch
import torch.nn as nn

import pycompress

__all__ = ["BATCH", "COLUMNS", "row_from_report", "report_from_dict", "render_table", "markdown_table",
           "write_plot", "slug", "write_atomic", "environment", "fmt"]

BATCH = 64  # the second timed batch size (besides 1) unless a demo says otherwise


def row_from_report(report, note: str = "", batch: int = BATCH) -> dict:
    """A flat table row (the demos' columns) from a :class:`pycompress.EvaluationReport`;
    ``batch``: the larger timed batch size (the ``latency_ms_batch`` column)."""
    lat = {int(k): v for k, v in report.latency.items()}
    speed = {int(k): v for k, v in (report.speedup or {}).items()}
    return {
        "model": report.name,
        "accuracy": report.metric,
        "delta": report.metric_delta,
        "parameters": report.parameters,
        "nonzeros": report.nonzeros,
        "bytes": report.size_bytes,
        "latency_ms_b1": lat.get(1, {}).get("p50_ms"),
        "latency_ms_batch": lat.get(batch, {}).get("p50_ms"),
        "batch": batch,
        "compression": report.compression_ratio,
        "speedup_b1": speed.get(1),
        "speedup_batch": speed.get(batch),
        "note": note,
    }


def report_from_dict(d: dict):
    """Rebuilds an :class:`pycompress.EvaluationReport` from its ``to_dict()``."""
    fields = {f.name for f in dataclasses.fields(pycompress.EvaluationReport)}
    kw = {k: v for k, v in d.items() if k in fields}
    kw["latency"] = {int(k): dict(v) for k, v in d.get("latency", {}).items()}
    if d.get("speedup") is not None:
        kw["speedup"] = {int(k): v for k, v in d["speedup"].items()}
    return pycompress.EvaluationReport(**kw)


def _columns(batch: int) -> list[tuple[str, str]]:
    return [("model", "model"), ("accuracy", "accuracy"), ("delta", "Δ acc (pts)"),
            ("parameters", "params"), ("nonzeros", "non-zeros"), ("bytes", "bytes"),
            ("latency_ms_b1", "ms b=1"), ("latency_ms_batch", f"ms b={batch}"),
            ("compression", "compression"), ("speedup_b1", "speed-up b=1"),
            ("speedup_batch", f"speed-up b={batch}")]


COLUMNS = _columns(BATCH)


def _batch_of(rows: list[dict]) -> int:
    return int(next((r["batch"] for r in rows if r.get("batch")), BATCH))


def fmt(key: str, value) -> str:
    if value is None:
        return ""
    if key == "accuracy":
        return f"{100 * value:.2f}%"
    if key == "delta":
        return f"{round(100 * value, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"
    if key in ("compression", "speedup_b1", "speedup_batch"):
        return f"{value:.2f}x"
    if key.startswith("latency"):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_table(rows: list[dict]) -> str:
    """A fixed-width text table of the report rows (columns no row has are left out)."""
    cols = [(k, t) for k, t in _columns(_batch_of(rows)) if any(r.get(k) is not None for r in rows)]
    table = [[title for _, title in cols]]
    table += [[fmt(k, r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> list[str]:
    """The rows as the lines of a Markdown table."""
    cols = _columns(_batch_of(rows))
    md = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        md.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |")
    return md


def notes_and_plot(rows: list[dict]) -> list[str]:
    """The report's closing markdown lines: each row's note, then the plot."""
    return [f"- **{r['model']}**: {r['note']}" for r in rows if r.get("note")] + [
        "", "![accuracy vs size and latency](compare.png)"]


def write_plot(rows: list[dict], out: str) -> str:
    """The accuracy vs size / latency plot of :func:`pycompress.compare` (``compare.png`` in
    ``out``), from the rows' stored evaluation reports. Returns the file name."""
    pycompress.compare([report_from_dict(r["evaluation"]) for r in rows], out_dir=out)
    return "compare.png"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.replace("%", "pct")).strip("_")


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def environment() -> dict:
    return {"torch": torch.__version__, "pycompress": pycompress.__version__,
            "machine": f"{platform.machine()} {pycompress.active_cpu_isa()}, "
                       f"{torch.get_num_threads()} thread(s)",
            "python": platform.python_version()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
