"""Image grids of the evaluation (matplotlib, Agg): cloudy, reference, each model, truth, PhyVLM-CR diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cloudfree.pipeline.contract import TileResult
from cloudfree.pipeline.evaluation.cases import EvalCase


def _rgb(image: np.ndarray, bands: Sequence[str], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    idx = [list(bands).index(b) for b in ("B04", "B03", "B02")]
    x = (image[idx] - lo[:, None, None]) / (hi - lo)[:, None, None]
    return np.clip(np.nan_to_num(np.moveaxis(x, 0, -1)), 0, 1)


def figure(case: EvalCase, results: Mapping[str, TileResult], path: str | Path,
           diagnostics_of: str = "phyvlm-cr") -> None:
    """Image grid as in the paper's Figs. 2-3: cloudy, reference, each model, truth; then A, t, U, omega."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cloudfree.stages.write import QUICKLOOK_STRETCH

    # the fixed true-colour stretch of the run's quicklooks, the same for every case, panel and model
    lo, hi = np.full(3, QUICKLOOK_STRETCH[0], np.float32), np.full(3, QUICKLOOK_STRETCH[1], np.float32)
    panels: list[tuple[str, np.ndarray, dict]] = [("cloudy", _rgb(case.target, case.bands, lo, hi), {})]
    if case.references.shape[0]:
        panels.append(("reference 0", _rgb(case.references[0], case.bands, lo, hi), {}))
    for name, res in results.items():
        panels.append((name, _rgb(res.reflectance, case.bands, lo, hi), {}))
    panels.append(("truth", _rgb(case.truth, case.bands, lo, hi), {}))
    diag = results.get(diagnostics_of)
    if diag is not None:
        d = diag.diagnostics
        if "A" in d:
            panels.append(("A (PhyVLM)", _rgb(d["A"], case.bands, lo, hi), {}))
        for k in ("t", "U", "omega"):
            if k in d:
                panels.append((f"{k} (PhyVLM)", d[k], {"cmap": "viridis", "vmin": 0, "vmax": 1}))
        if case.transmission is not None:
            panels.append(("true t (simulated)", case.transmission, {"cmap": "viridis", "vmin": 0, "vmax": 1}))
    ncol = 5
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3.1 * nrow))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (title, img, kw) in zip(np.ravel(axes), panels):
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{case.name}: {case.notes}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
