"""Tables and the Markdown/JSON report of the evaluation (every number computed from the rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.evaluation.metrics import REGIONS


def to_markdown(summary: Sequence[Mapping[str, Any]], group: str, models: Sequence[str]) -> str:
    """A Markdown table (rows: model x region) of one group of the summary."""
    lines = ["| model | region | PSNR (dB) | SSIM | SAM (deg) | MAE |", "|---|---|---:|---:|---:|---:|"]
    for model in models:
        for region in REGIONS:
            r = next((s for s in summary if s["group"] == group and s["model"] == model and s["region"] == region),
                     None)
            if r is None:
                continue
            lines.append(f"| {model} | {region} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['sam']:.2f} | "
                         f"{r['mae']:.4f} |")
    return "\n".join(lines)


def per_case_markdown(rows: Sequence[Mapping[str, Any]], models: Sequence[str], region: str = "cloudy") -> str:
    """A Markdown table with one line per case: ``region`` PSNR / SAM of every model (the best PSNR in bold)."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    head = "| case | " + " | ".join(f"{m} PSNR / SAM" for m in models) + " |"
    lines = [head, "|---|" + "---:|" * len(models)]
    for case in cases:
        vals = {r["model"]: r for r in rows if r["case"] == case and r["region"] == region}
        best = max((vals[m]["psnr"] for m in models if m in vals), default=float("nan"))
        cells = []
        for m in models:
            if m not in vals:
                cells.append("")
                continue
            p = f"{vals[m]['psnr']:.2f}"
            cells.append(f"{'**' + p + '**' if vals[m]['psnr'] == best else p} / {vals[m]['sam']:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, payload: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(type(o).__name__)

    Path(path).write_text(json.dumps(payload, indent=1, default=default, allow_nan=True))
