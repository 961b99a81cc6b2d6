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

**Bounded and robust** (issue 18: a fit on cloud the mask missed mapped clear references onto cloud-level
reflectance). Every fit is bounded against scene-level statistics: the gain to :data:`GAIN_BOUNDS` (the mapping is
kept at the reference's median level when the gain is clamped) and the offset to ``OFFSET_ABS + OFFSET_REL x``
the reference's median level of the band (two L2A dates of one place differ by BRDF, phenology and residual
haze, not by a cloud's brightness). The scene fit (:func:`scene_alignment`) uses only *trustworthy* target pixels
(:func:`trusted_clear`: clear by the mask, finite, and not brighter in blue than the clear references' median by
:data:`HAZE_MARGIN`, i.e. not haze the mask let through; the median, not the maximum, so that a reference with
haze the mask missed at the pixel does not shield a hazy target).

**Graded fallback** (issues 18 and 24). How far the fit to the target is trusted grows with the share ``f`` of
the target's valid pixels that are trustworthy (:func:`alignment_weight`): weight 0 at or below
:data:`MIN_TRUSTED_FRACTION_LOW` (a target that is nearly all cloud, e.g. Romania 2019-06-21), 1 at or above
:data:`MIN_TRUSTED_FRACTION`, linear between. Below full weight the target fit is blended with the scene-level
fit of each reference onto the *consensus of the references* (their per-pixel median where at least
:data:`CONSENSUS_MIN_REFERENCES` are clear; :func:`consensus_alignment`): when the target cannot tell the date's
radiometric level, a reference whose whole scene is darker or hazier than the others (a scene-wide shadow, haze
the mask missed) is mapped onto the others instead of being used as it is. There is no cliff: the mask stage's
dilation (which takes clear pixels next to the cloud away) changed the old all-or-nothing decision on several
evaluation cases (the mask-induced loss of ``cloudfree evaluate``). The local field (:func:`local_alignment`)
takes the same trusted pixels as its only input, and its correction can be bounded (``max_change``). Measured on
the Romania evaluation (docs/evaluation.md; /work/notes/issue-18-truth.md).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from cloudfree.models._filters import block_mean, box_mean, nanmedian_axis0, upsample_bilinear
from cloudfree.pipeline.contract import TileInputs
from cloudfree.pipeline.errors import ModelError

#: fewer common valid pixels than this and the fit falls back to identity (gain 1, offset 0).
MIN_PIXELS = 64
#: below this correlation only an offset is fitted (gain 1).
MIN_CORRELATION = 0.7
#: alignment fits use at most this many pixels (a regular sub-sample of the fit region), for speed.
MAX_FIT_PIXELS = 16384
#: a fitted gain is clamped to this range (the mapping is kept at the reference's median level).
GAIN_BOUNDS = (0.8, 1.25)
#: a fitted offset is clipped to +-(OFFSET_ABS + OFFSET_REL * the reference's median level of the band).
OFFSET_ABS = 0.01
OFFSET_REL = 0.1
#: the fit to the target gets full weight from this share of the target's valid pixels trustworthy
#: (:func:`trusted_clear`) up, ...
MIN_TRUSTED_FRACTION = 0.3
#: ... and none at or below this share (linear between; :func:`alignment_weight`).
MIN_TRUSTED_FRACTION_LOW = 0.05
#: the references' consensus (per-pixel median) is used where at least this many references are clear.
CONSENSUS_MIN_REFERENCES = 3
#: a mask-clear target pixel brighter in blue than every clear reference by this much is haze, not a fit pixel.
HAZE_MARGIN = 0.01


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
        gain[b], offset[b] = g, o
    for b in range(nb):  # bounded against the scene-level statistics of the reference (module docstring)
        r = reference[b][valid]
        r = r[np.isfinite(r)]
        if r.size >= MIN_PIXELS:
            gain[b], offset[b] = bound_fit(float(gain[b]), float(offset[b]), float(np.median(r)))
    return gain, offset


def bound_fit(gain: float, offset: float, level: float) -> tuple[float, float]:
    """``(gain, offset)`` within :data:`GAIN_BOUNDS` and the offset bound at the reference's median ``level``: a
    clamped gain keeps the fitted mapping at ``level``, then the offset is clipped."""
    g = float(np.clip(gain, *GAIN_BOUNDS))
    o = gain * level + offset - g * level
    lim = OFFSET_ABS + OFFSET_REL * abs(level)
    return g, float(np.clip(o, -lim, lim))


def trusted_clear(tile: TileInputs) -> np.ndarray:
    """Target pixels an alignment may be fitted on: clear by the mask, finite, and not brighter in blue (B02) than
    the median of the clear references at the pixel by :data:`HAZE_MARGIN` (haze or cloud the mask let through;
    the median, so one reference with missed haze there does not shield the target). Without B02 or references:
    the mask-clear finite pixels."""
    ok = ~np.asarray(tile.cloud_mask, bool) & np.isfinite(tile.target).all(axis=0)
    if "B02" not in tile.bands or tile.references.shape[0] == 0:
        return ok
    ib = tile.bands.index("B02")
    rv = reference_validity(tile)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN where no reference is clear
        level = nanmedian_axis0(np.where(rv, tile.references[:, ib], np.nan)[:, None])[0]
    return ok & ~(tile.target[ib] > level + HAZE_MARGIN)


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Reduced-major-axis line ``y ~ g x + o`` (name kept for callers)."""
    xm, ym = x.mean(), y.mean()
    cov = ((x - xm) * (y - ym)).mean()
    g = np.sign(cov) * np.sqrt(((y - ym) ** 2).mean() / ((x - xm) ** 2).mean())
    return float(g), float(ym - g * xm)


def apply_linear(reference: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (reference * gain[:, None, None] + offset[:, None, None]).astype(np.float32)


def scene_alignment(sample: TileInputs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-reference ``(gain, offset)`` of a scene sample (the one scene-level alignment every reference-based
    model uses; PhyVLM-CR refits on high-visibility pixels): the fit onto the trustworthy target pixels
    (:func:`trusted_clear`) clear in the reference too, bounded (:func:`fit_linear`), with the weight
    :func:`alignment_weight`; the rest of the weight goes to the fit onto the references' consensus
    (:func:`consensus_alignment`), or to identity when there is no consensus (fewer than two references)."""
    nb = sample.target.shape[0]
    nref = sample.references.shape[0]
    identity = (np.ones(nb, np.float32), np.zeros(nb, np.float32))
    target_ok = trusted_clear(sample)
    w = alignment_weight(sample, target_ok)
    ref_ok = reference_validity(sample)
    fits = [fit_linear(sample.target, sample.references[i], thin_mask(target_ok & ref_ok[i])) if w > 0 else identity
            for i in range(nref)]
    if w >= 1:
        return fits
    fallback = consensus_alignment(sample, ref_ok) if nref >= 2 else [identity] * nref
    return [blend_fit(fits[i], fallback[i], w) for i in range(nref)]


def blend_fit(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], weight: float,
              ) -> tuple[np.ndarray, np.ndarray]:
    """``weight * a + (1 - weight) * b`` of two ``(gain, offset)`` fits (each within the bounds, so the blend is)."""
    w = np.float32(weight)
    return (w * a[0] + (1 - w) * b[0]).astype(np.float32), (w * a[1] + (1 - w) * b[1]).astype(np.float32)


def consensus_alignment(sample: TileInputs, ref_ok: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-reference bounded fit (:func:`fit_linear`) onto the references' consensus: their per-pixel median over
    the clear ones, on the pixels where at least :data:`CONSENSUS_MIN_REFERENCES` are clear (identity for a
    reference with fewer than :data:`MIN_PIXELS` such pixels). The scene-level alignment when the target itself
    is not trustworthy (:func:`scene_alignment`)."""
    refs = sample.references
    ref_ok = reference_validity(sample) if ref_ok is None else ref_ok
    nb = refs.shape[1]
    identity = (np.ones(nb, np.float32), np.zeros(nb, np.float32))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        consensus = nanmedian_axis0(np.where(ref_ok[:, None], refs, np.nan))
    enough = ref_ok.sum(axis=0) >= CONSENSUS_MIN_REFERENCES
    out = []
    for i in range(refs.shape[0]):
        region = enough & ref_ok[i]
        out.append(fit_linear(consensus, refs[i], thin_mask(region)) if region.sum() >= MIN_PIXELS else identity)
    return out


def alignment_weight(sample: TileInputs, trusted: np.ndarray | None = None) -> float:
    """How far a fit onto the target is trusted, 0-1: 0 with fewer than :data:`MIN_PIXELS` trustworthy pixels
    (:func:`trusted_clear`) or a trustworthy share ``f`` of the valid pixels at or below
    :data:`MIN_TRUSTED_FRACTION_LOW`, 1 from :data:`MIN_TRUSTED_FRACTION` up, linear between (no cliff)."""
    trusted = trusted_clear(sample) if trusted is None else trusted
    valid = int(np.isfinite(sample.target).all(axis=0).sum())
    n = int(trusted.sum())
    if n < MIN_PIXELS:
        return 0.0
    f = n / max(valid, 1)
    lo, hi = MIN_TRUSTED_FRACTION_LOW, MIN_TRUSTED_FRACTION
    return float(np.clip((f - lo) / (hi - lo), 0.0, 1.0))


def alignment_trusted(sample: TileInputs, trusted: np.ndarray | None = None) -> bool:
    """Whether a fit onto the target gets any weight (:func:`alignment_weight` > 0)."""
    return alignment_weight(sample, trusted) > 0


def local_alignment(target: np.ndarray, pred: np.ndarray, fit: np.ndarray, radius: int, eps: float = 1e-3,
                    min_fraction: float = 0.2, subsample: int = 4,
                    max_change: tuple[float, float] | None = None) -> np.ndarray:
    """Map ``pred`` ``(band, y, x)`` onto ``target`` by a smooth per-window gain/offset field (per band).

    A weighted guided filter (He et al.) with ``pred`` as guide and ``target`` as source, weights = ``fit`` (the
    target's clear pixels): in each ``(2 radius + 1)^2`` window, ``gain = (cov + eps) / (var + eps)`` (shrunk
    towards 1, so a flat window only shifts the offset) and ``offset = mean(target) - gain mean(pred)``. Where a
    window holds less than ``min_fraction`` clear pixels, its coefficients blend towards those of a 4x wider
    window, and where that is empty too, towards identity (the global alignment already applied). The
    coefficients are box-averaged (radius ``radius``) before ``gain * pred + offset``. NaN in ``pred`` stay NaN.
    ``subsample`` (4): the moments and coefficients are computed on the 4x4 block-mean grid and the field is
    upsampled bilinearly (the Fast Guided Filter's trick; the field is smooth at these radii).
    ``max_change`` ``(abs, rel)``: the correction is clipped to ``abs + rel |pred|`` per pixel and band (a field
    fitted on haze next to a cloud must not carry it into the gap). ``fit`` must hold only trustworthy clear target
    pixels (the caller's :func:`trusted_clear`): no cloudy target pixel is an input of the fit.
    """
    fit = np.asarray(fit, bool) & np.isfinite(pred).all(axis=0) & np.isfinite(target).all(axis=0)
    if radius <= 0 or not fit.any():
        return pred.astype(np.float32, copy=True)
    ny, nx = fit.shape
    k = subsample if subsample > 1 and min(ny, nx) >= 4 * subsample and radius >= subsample else 1
    w = fit.astype(np.float32)
    p = np.where(fit[None], pred, 0.0).astype(np.float32, copy=False)
    t = np.where(fit[None], target, 0.0).astype(np.float32, copy=False)
    # the five weighted moments, on the k x k block-mean grid (the field is smooth at this radius; Fast Guided
    # Filter, He & Sun 2015): block means of products are exact window sums at the coarse scale. The weights are
    # 0/1 and p, t are already +0 where w is 0, so p * w == p (and so on) to the bit: the products by w are not
    # taken (issue 22: they were a fifth of this function's time)
    moments = [w, p, t, p * p, p * t]
    if k > 1:
        moments = [block_mean(m, k) for m in moments]
    rk = max(1, int(round(radius / k)))

    def coefficients(r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sw, swp, swt, swpp, swpt = (box_mean(m, r) for m in moments)
        den = np.maximum(sw, 1e-6)[None]
        mp, mt = swp / den, swt / den
        cov = swpt / den - mp * mt
        var = np.maximum(swpp / den - mp * mp, 0.0)
        gain = np.clip((cov + eps) / (var + eps), 0.5, 2.0)
        return gain, mt - gain * mp, sw

    g1, o1, f1 = coefficients(rk)
    g4, o4, f4 = coefficients(4 * rk)
    c4 = np.clip(f4 / min_fraction, 0.0, 1.0)[None]
    g_wide, o_wide = c4 * g4 + (1 - c4), c4 * o4
    c1 = np.clip(f1 / min_fraction, 0.0, 1.0)[None]
    gain = box_mean(c1 * g1 + (1 - c1) * g_wide, rk)
    offset = box_mean(c1 * o1 + (1 - c1) * o_wide, rk)
    if k > 1:
        gain = upsample_bilinear(gain, (ny, nx))
        offset = upsample_bilinear(offset, (ny, nx))
    out = gain * pred + offset
    if max_change is not None:
        lim = max_change[0] + max_change[1] * np.abs(pred)
        out = np.clip(out, pred - lim, pred + lim, out=out)
    return out.astype(np.float32, copy=False)


def thin_mask(mask: np.ndarray, max_pixels: int = MAX_FIT_PIXELS) -> np.ndarray:
    """Keep a regular-grid subset of ``mask`` with at most about ``max_pixels`` True pixels."""
    n = int(mask.sum())
    if n <= max_pixels:
        return mask
    k = int(np.ceil(np.sqrt(n / max_pixels)))
    out = np.zeros_like(mask)
    out[::k, ::k] = mask[::k, ::k]
    return out


def composite_reference(
    target: np.ndarray,
    references: np.ndarray,
    reference_valid: np.ndarray,
    fit_region: np.ndarray | None,
    combine: str = "first",
    alignment: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    fallback: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned reference composite.

    Each reference ``i`` is mapped onto the target by a per-band gain/offset fitted on ``fit_region`` & its own
    valid pixels (:func:`cloudfree.models._align.fit_linear`). ``combine="first"``: each pixel takes the best-ranked
    reference valid there; ``"median"``: the per-band median of all aligned references valid there (``index``
    is then the best-ranked valid one).

    Args:
        target: ``(band, y, x)``; references: ``(time, band, y, x)``; reference_valid: ``(time, y, x)`` bool;
        fit_region: ``(y, x)`` bool, target pixels trusted for the fit (unused for references ``alignment`` covers).
        alignment: precomputed ``(gain, offset)`` per reference (e.g. the scene-level fit of ``fit_scene``); a
            reference beyond its length is fitted on ``fit_region``.
        fallback: ``(y, x)`` bool; where no reference is valid, these pixels take the best-ranked reference that
            has finite data (cloudy or not; "best available pixel"), with the same gains. The fits never see them.
    Returns:
        ``image`` ``(band, y, x)`` float32 (NaN where no reference is valid) and ``index`` ``(y, x)`` int16
        (reference index, -1 = none).
    """
    nb, ny, nx = target.shape
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def params(i: int, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if i not in cache:
            if alignment is not None and i < len(alignment):
                cache[i] = alignment[i]
            elif fit_region is None:
                raise ModelError(f"composite_reference: neither an alignment nor a fit region for reference {i}")
            else:
                cache[i] = fit_linear(target, references[i], thin_mask(fit_region & ok))
        return cache[i]

    image, index = _composite(references, reference_valid, combine, params)
    if fallback is not None and references.shape[0]:
        todo = fallback & (index < 0)
        for i in range(references.shape[0]):
            if not todo.any():
                break
            fill = todo & np.isfinite(references[i]).all(axis=0)
            if fill.any():
                gain, offset = params(i, reference_valid[i])
                image[:, fill] = apply_linear(references[i][:, fill][:, :, None], gain, offset)[:, :, 0]
                index[fill] = i
                todo &= ~fill
    return image, index


def _composite(
    references: np.ndarray,
    reference_valid: np.ndarray,
    combine: str,
    params: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    nt, nb, ny, nx = references.shape
    if combine == "median" and references.shape[0] > 1:
        aligned = np.full(references.shape, np.nan, np.float32)
        index = np.full((ny, nx), -1, np.int16)
        for i in range(references.shape[0]):
            ok = reference_valid[i]
            if not ok.any():
                continue
            gain, offset = params(i, ok)
            aligned[i] = np.where(ok[None], apply_linear(references[i], gain, offset), np.nan)
            index[(index < 0) & ok] = i
        return nanmedian_axis0(aligned), index
    if combine not in ("first", "median"):
        raise ModelError(f"unknown reference combination {combine!r}; use 'first' or 'median'")
    image = np.full((nb, ny, nx), np.nan, np.float32)
    index = np.full((ny, nx), -1, np.int16)
    for i in range(references.shape[0]):
        todo = index < 0
        if not todo.any():
            break
        ok = reference_valid[i]
        fill = todo & ok
        if not fill.any():
            continue
        gain, offset = params(i, ok)
        image[:, fill] = apply_linear(references[i][:, fill][:, :, None], gain, offset)[:, :, 0]
        index[fill] = i
    return image, index


def fallback_region(tile: TileInputs, fallback_prob: float | None) -> np.ndarray | None:
    """Thick-cloud target pixels (``cloud_prob >= fallback_prob``, NaN counts as cloud) that may take a cloudy
    reference when no clear one exists (as reference replacement does); None when ``fallback_prob`` is None."""
    if fallback_prob is None:
        return None
    return np.nan_to_num(np.asarray(tile.cloud_prob, np.float32), nan=1.0) >= fallback_prob


def reference_validity(tile: TileInputs) -> np.ndarray:
    """``(time, y, x)`` True where a reference pixel is clear and finite."""
    return ~tile.reference_masks & np.isfinite(tile.references).all(axis=1)


def fill_target(tile: TileInputs) -> np.ndarray:
    """The target with non-finite pixels replaced by the band median (filters must not spread NaN)."""
    img = tile.target.astype(np.float32, copy=True)
    bad = ~np.isfinite(img)
    if bad.any():
        med = np.nanmedian(np.where(bad, np.nan, img).reshape(img.shape[0], -1), axis=1)
        img = np.where(bad, np.nan_to_num(med, nan=0.0)[:, None, None], img)
    return img


