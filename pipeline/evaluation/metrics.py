"""Metrics of the evaluation (all on reflectance, 0-1 scale), pure numpy + scikit-image.

* **PSNR** ``10 log10(R^2 / MSE)``, ``R = data_range`` = 1.0 reflectance by default (the dynamic range of
  surface reflectance, not the image's max, so scores are comparable between scenes), MSE over bands and pixels.
* **SSIM** ``skimage.metrics.structural_similarity`` per band (Gaussian-free 7x7 window, ``data_range`` given),
  the per-pixel SSIM map averaged over the region's pixels (image borders included, so the ``overall`` value
  differs slightly from skimage's border-cropped mean), then over bands.
* **SAM** the spectral angle ``arccos(<p, g> / (|p| |g|))`` per pixel, in degrees, mean over the region.
* **MAE** mean absolute error over bands and pixels.

Non-finite predictions are excluded from every metric (the caller counts them in ``valid_fraction``).
"""

from __future__ import annotations

import numpy as np

REGIONS = ("overall", "cloudy", "thin", "thick")
METRICS = ("psnr", "ssim", "sam", "mae")


def _region(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    return np.ones(shape, bool) if mask is None else np.asarray(mask, bool)


def _valid(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return _region(mask, truth.shape[-2:]) & np.isfinite(pred).all(axis=0) & np.isfinite(truth).all(axis=0)


def psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """PSNR in dB over ``(band, y, x)`` arrays on ``mask`` pixels; ``inf`` for a perfect match, NaN if empty."""
    m = _valid(pred, truth, mask)
    if not m.any():
        return float("nan")
    mse = float(np.mean((pred[:, m].astype(np.float64) - truth[:, m]) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def mae(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    m = _valid(pred, truth, mask)
    return float(np.mean(np.abs(pred[:, m].astype(np.float64) - truth[:, m]))) if m.any() else float("nan")


def sam(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean spectral angle in degrees (pixels where either spectrum has zero norm are skipped)."""
    m = _valid(pred, truth, mask)
    p, g = pred[:, m].astype(np.float64), truth[:, m].astype(np.float64)
    norm = np.linalg.norm(p, axis=0) * np.linalg.norm(g, axis=0)
    ok = norm > 0
    if not ok.any():
        return float("nan")
    cos = np.clip((p[:, ok] * g[:, ok]).sum(axis=0) / norm[ok], -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Mean SSIM: per band ``structural_similarity(full=True)``, map averaged over ``mask``, then over bands."""
    from skimage.metrics import structural_similarity

    m = _valid(pred, truth, mask)
    if not m.any():
        return float("nan")
    vals = []
    for b in range(truth.shape[0]):
        p = np.where(np.isfinite(pred[b]), pred[b], truth[b]).astype(np.float64)
        _, smap = structural_similarity(truth[b].astype(np.float64), p, data_range=data_range, full=True)
        vals.append(float(smap[m].mean()))
    return float(np.mean(vals))


def all_metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
                data_range: float = 1.0) -> dict[str, float]:
    return {
        "psnr": psnr(pred, truth, mask, data_range),
        "ssim": ssim(pred, truth, mask, data_range),
        "sam": sam(pred, truth, mask),
        "mae": mae(pred, truth, mask),
    }
