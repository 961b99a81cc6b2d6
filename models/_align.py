"""Per-band linear radiometric alignment of a reference to a target (pure numpy).

Fits ``target ~= gain * reference + offset`` per band on pixels valid in both, by ordinary least squares with one
round of outlier rejection (residuals beyond 3 robust sigmas dropped: land-cover change between dates must not
drive the fit). Shared by reference replacement and PhyVLM-CR (which fits on high-visibility pixels).
"""

from __future__ import annotations

import numpy as np

#: fewer common valid pixels than this and the fit falls back to identity (gain 1, offset 0).
MIN_PIXELS = 64


def fit_linear(target: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band gain and offset mapping ``reference`` onto ``target``.

    Args:
        target, reference: ``(band, y, x)`` float arrays.
        valid: ``(y, x)`` bool, pixels usable for the fit (clear in both, finite).
    Returns:
        ``gain, offset`` each ``(band,)`` float32; identity for bands with fewer than ``MIN_PIXELS`` pixels or a
        degenerate reference.
    """
    nb = target.shape[0]
    gain = np.ones(nb, np.float32)
    offset = np.zeros(nb, np.float32)
    for b in range(nb):
        t, r = target[b][valid], reference[b][valid]
        ok = np.isfinite(t) & np.isfinite(r)
        t, r = t[ok].astype(np.float64), r[ok].astype(np.float64)
        if t.size < MIN_PIXELS or np.var(r) < 1e-12:
            continue
        g, o = _ols(r, t)
        res = t - (g * r + o)
        mad = np.median(np.abs(res - np.median(res))) * 1.4826
        if mad > 0:
            keep = np.abs(res) <= 3 * mad
            if keep.sum() >= MIN_PIXELS and np.var(r[keep]) > 1e-12:
                g, o = _ols(r[keep], t[keep])
        # a gain far from 1 means the fit latched onto change, not radiometry: clamp to a physical range
        gain[b], offset[b] = float(np.clip(g, 0.5, 2.0)), float(o)
    return gain, offset


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xm, ym = x.mean(), y.mean()
    g = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return float(g), float(ym - g * xm)


def apply_linear(reference: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (reference * gain[:, None, None] + offset[:, None, None]).astype(np.float32)
