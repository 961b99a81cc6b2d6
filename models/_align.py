"""Per-band linear radiometric alignment of a reference to a target (pure numpy).

Fits ``target ~= gain * reference + offset`` per band on pixels valid in both, by reduced-major-axis regression
(``gain = sign(cov) sd(target) / sd(reference)``, symmetric in the two dates; ordinary least squares of target on
reference is biased towards gain 0 whenever the reference carries noise, misregistration or change, "regression
dilution", which made gains collapse onto the 0.5 clamp on low-texture scenes) with one round of outlier rejection (residuals beyond 3 robust sigmas dropped: land-cover change between dates must not
drive the fit). Shared by reference replacement and PhyVLM-CR (which fits on high-visibility pixels).

When reference and target are weakly correlated on the fit pixels (Pearson r < ``MIN_CORRELATION``, e.g. a flat
scene whose texture is below the noise, haze or change between the dates), the OLS gain is biased towards 0
(errors in the regressor, "regression dilution") and is not identifiable: the fit then keeps gain 1 and matches
only the offset (median difference), instead of clamping a meaningless gain.
"""

from __future__ import annotations

import numpy as np

#: fewer common valid pixels than this and the fit falls back to identity (gain 1, offset 0).
MIN_PIXELS = 64
#: below this correlation only an offset is fitted (gain 1).
MIN_CORRELATION = 0.7


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
        if np.corrcoef(r, t)[0, 1] < MIN_CORRELATION or not np.isfinite(np.var(t)) or np.var(t) < 1e-12:
            gain[b], offset[b] = 1.0, float(np.median(t - r))
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
    """Reduced-major-axis line ``y ~ g x + o`` (name kept for callers)."""
    xm, ym = x.mean(), y.mean()
    cov = ((x - xm) * (y - ym)).mean()
    g = np.sign(cov) * np.sqrt(((y - ym) ** 2).mean() / ((x - xm) ** 2).mean())
    return float(g), float(ym - g * xm)


def apply_linear(reference: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (reference * gain[:, None, None] + offset[:, None, None]).astype(np.float32)
