"""Co-register stage: sub-pixel shift of each reference (optical or SAR) to the target, estimated and applied.

Conventions. A *shift* here is what :func:`scipy.ndimage.shift` must be given to move the reference onto the target:
``aligned = ndimage.shift(reference, shift)``. The reference's *misregistration* (how far its content sits from the
target's, rows then columns, in output-grid pixels) is ``-shift``; the demo catalog's ``misregistration_px`` uses
that sign.

Estimation (pure numpy, :func:`estimate_shift`):

1. phase correlation (:func:`skimage.registration.phase_cross_correlation` with ``upsample_factor``) on both images
   with the pixels not clear in both replaced by the mean of the clear ones and a Hann window against edge effects;
   skimage's masked correlation (``reference_mask``/``moving_mask``) only gives whole-pixel shifts, so it is not
   used for the sub-pixel estimate;
2. a masked Lucas-Kanade refinement on the pixels clear in both: least squares of
   ``target ~ a * shift(reference, s) + b - grad . d`` (gain/offset absorb seasonal change), iterated until the
   update is below 1e-3 px. This reaches a few hundredths of a pixel where phase correlation alone is biased
   towards whole pixels by masks and windows.

Cross-modal (Sentinel-1 to Sentinel-2, :func:`estimate_shift_cross_modal`): both images become gradient magnitudes
(log-SAR after a Gaussian speckle filter, NIR reflectance) normalised to zero mean and unit variance; the same two
steps then run on them. Accuracy is lower than optical-optical (edges differ between the modalities).

Scale (:func:`estimate_reference_shifts`): estimation reads one band of a central window (``coregister.window``
pixels, default 512) of each image, computed eagerly once per target while the graph is built (like the model's
scene context): a few MB whatever the AOI size. The shift is assumed constant over the scene (true for the
sub-pixel misregistration between Sentinel-2 acquisitions; a terrain-dependent warp is not modelled).
Application stays lazy. The runner re-reads each reference on a grid shifted by its estimate
(:func:`load_aligned_references`): one bilinear resampling of the source pixels, no overlap layer, the same memory
per chunk as a plain load. :func:`apply_shifts` (``map_overlap`` per chunk, halo ``ceil(max_shift) + 3``) shifts
arrays that have no STAC source; on the 16x benchmark it cost 650 MB / 160 s against 440 MB / 41 s.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import dask
import dask.array as dsa
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from scipy import ndimage

from cloudfree.pipeline.config import CoregisterConfig
from cloudfree.pipeline.errors import InputDataError

log = logging.getLogger(__name__)


# -- pure numpy kernels ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShiftEstimate:
    """One estimated shift. ``shift`` = ``(dy, dx)`` to pass to ``ndimage.shift(reference, shift)``."""

    shift: tuple[float, float]
    #: shift from phase correlation alone, before the masked refinement.
    phase_shift: tuple[float, float]
    #: pixels clear in both images that the refinement used.
    n_pixels: int
    #: RMS residual of the refinement fit (image units), NaN when not refined.
    residual: float
    #: True when the refinement converged (update < 1e-3 px).
    converged: bool

    @property
    def misregistration(self) -> tuple[float, float]:
        """How far the reference content sits from the target's (= -shift)."""
        return (-self.shift[0], -self.shift[1])


def _filled(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Zero-mean image with invalid pixels at the mean of the valid ones (i.e. 0)."""
    out = np.where(valid, img, np.nan).astype(np.float64)
    mu = np.nanmean(out)
    return np.nan_to_num(out - mu, nan=0.0)


def hann_window(shape: tuple[int, int]) -> np.ndarray:
    """``skimage.filters.window("hann", shape)``, the same float64 values (tests/test_coregister.py compares them),
    without importing ``scipy.signal`` and ``skimage.transform`` for it: that import cost ~1 s of the first
    co-registration in every process (a one-scene ``make`` target pays it per scene; issue 22).

    As skimage builds it: the symmetric 1-D Hann window of the longest side (scipy's ``general_cosine``: 0.5 +
    0.5 cos over ``linspace(-pi, pi)``), sampled at each pixel's distance from the centre (axes scaled to the
    longest side; float64 scale factors as skimage's numpy-integer shape gives them), linear interpolation with
    zero outside (skimage's ``warp``: ``map_coordinates``, order 1, ``grid-constant``)."""
    n = max(shape)
    fac = np.linspace(-np.pi, np.pi, n)
    w = np.zeros(n)
    w += 0.5 * np.cos(0 * fac)  # scipy's two sums in its order: the same float64 bits
    w += 0.5 * np.cos(fac)
    if n == 1:  # scipy returns [1.] for one sample (the formula gives 0 at -pi)
        w = np.ones(1)
    axes = [np.arange(s, dtype=np.float32) * np.float64(n / s) for s in shape]
    center = n / 2 - 0.5
    dist = 0
    for g in np.meshgrid(*axes, sparse=True, indexing="ij"):
        g -= center
        dist = dist + g * g
    coords = np.zeros((len(shape),) + np.shape(dist), dtype=np.float32)
    coords[0] = np.sqrt(dist) + center
    return ndimage.map_coordinates(w.reshape((-1,) + (1,) * (len(shape) - 1)), coords, order=1,
                                   mode="grid-constant", cval=0.0, prefilter=False)


def phase_shift_kernel(target: np.ndarray, moving: np.ndarray, valid: np.ndarray, upsample: int) -> np.ndarray:
    """Sub-pixel phase correlation on the mean-filled, Hann-windowed images; returns ``(dy, dx)``."""
    from skimage.registration import phase_cross_correlation

    w = hann_window(target.shape)
    shift, _, _ = phase_cross_correlation(_filled(target, valid) * w, _filled(moving, valid) * w,
                                          upsample_factor=upsample, normalization=None)
    return np.asarray(shift, float)


def refine_shift_kernel(target: np.ndarray, moving: np.ndarray, valid_t: np.ndarray, valid_m: np.ndarray,
                        shift0: Sequence[float], max_iter: int = 20, tol: float = 1e-3) -> tuple[np.ndarray, int, float, bool]:
    """Masked Lucas-Kanade refinement with a gain/offset: returns ``(shift, n_pixels, rms_residual, converged)``."""
    s = np.asarray(shift0, float).copy()
    t = target.astype(np.float64)
    m_fill = np.where(valid_m, moving, np.nanmean(np.where(valid_m, moving, np.nan))).astype(np.float64)
    vm = valid_m.astype(np.float64)
    ny, nx = t.shape
    n, rms, converged = 0, float("nan"), False
    for _ in range(max_iter):
        ms = ndimage.shift(m_fill, s, order=3, mode="nearest")
        vs = ndimage.shift(vm, s, order=1, mode="constant", cval=0.0) > 0.999
        b = int(math.ceil(np.abs(s).max())) + 2
        ok = valid_t & vs & np.isfinite(t)
        ok[:b], ok[-b:], ok[:, :b], ok[:, -b:] = False, False, False, False
        n = int(ok.sum())
        if n < 100:
            break
        gy, gx = np.gradient(ms)
        a_mat = np.stack([ms[ok], np.ones(n), gy[ok], gx[ok]], axis=1)
        coef, *_ = np.linalg.lstsq(a_mat, t[ok], rcond=None)
        gain = coef[0]
        if abs(gain) < 1e-6:
            break
        d = np.array([-coef[2] / gain, -coef[3] / gain])
        # T(x) ~ a M(x - s - d) + b with M(x - s - d) ~ Ms(x) - grad Ms . d
        s += d
        rms = float(np.sqrt(np.mean((a_mat @ coef - t[ok]) ** 2)))
        if np.abs(d).max() < tol:
            converged = True
            break
    return s, n, rms, converged


def check_overlap(both: np.ndarray) -> None:
    """Raise :class:`InputDataError` when fewer than 100 pixels are clear in both images (no estimate possible)."""
    if both.sum() < 100:
        raise InputDataError(f"only {int(both.sum())} pixels are clear in both images; co-registration needs >= 100 "
                             "(use a larger coregister.window or disable coregister)")


def estimate_shift(target: np.ndarray, moving: np.ndarray, valid_t: np.ndarray | None = None,
                   valid_m: np.ndarray | None = None, *, upsample: int = 100, refine: bool = True) -> ShiftEstimate:
    """Shift that aligns ``moving`` to ``target`` (2-D arrays, same shape), on pixels valid in both."""
    if target.shape != moving.shape or target.ndim != 2:
        raise InputDataError(f"co-registration needs two 2-D images of one shape, got {target.shape} and "
                             f"{moving.shape}")
    valid_t = np.isfinite(target) if valid_t is None else valid_t & np.isfinite(target)
    valid_m = np.isfinite(moving) if valid_m is None else valid_m & np.isfinite(moving)
    both = valid_t & valid_m
    check_overlap(both)
    ps = phase_shift_kernel(target, moving, both, upsample)
    if not refine:
        return ShiftEstimate((float(ps[0]), float(ps[1])), (float(ps[0]), float(ps[1])), int(both.sum()),
                             float("nan"), False)
    s, n, rms, conv = refine_shift_kernel(target, moving, valid_t, valid_m, ps)
    if not np.isfinite(s).all() or np.abs(s - ps).max() > 1.0:
        # the linearisation only holds near the phase-correlation estimate: a jump > 1 px is a failed refinement
        log.debug("refinement went from %s to %s; keeping the phase-correlation shift", ps, s)
        s, conv = ps, False
    return ShiftEstimate((float(s[0]), float(s[1])), (float(ps[0]), float(ps[1])), n, rms, conv)


def gradient_magnitude(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed gradient magnitude, NaN kept where the input is NaN."""
    ok = np.isfinite(img)
    fill = np.where(ok, img, np.nanmean(np.where(ok, img, np.nan)))
    g = ndimage.gaussian_gradient_magnitude(fill.astype(np.float64), sigma)
    return np.where(ok, g, np.nan)


def _standardise(img: np.ndarray) -> np.ndarray:
    return (img - np.nanmean(img)) / (np.nanstd(img) + 1e-12)


def estimate_shift_cross_modal(optical: np.ndarray, sar_linear: np.ndarray, valid_optical: np.ndarray | None = None,
                               *, upsample: int = 100, sigma_optical: float = 1.0,
                               sigma_sar: float = 2.0) -> ShiftEstimate:
    """Shift aligning a SAR image (linear power) to an optical band (e.g. NIR) via gradient-magnitude images."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sar = np.where(sar_linear > 0, 10 * np.log10(sar_linear), np.nan)
    g_o = _standardise(gradient_magnitude(optical, sigma_optical))
    g_s = _standardise(gradient_magnitude(log_sar, sigma_sar))
    vo = np.isfinite(g_o) if valid_optical is None else valid_optical & np.isfinite(g_o)
    return estimate_shift(g_o, g_s, vo, np.isfinite(g_s), upsample=upsample)


def shift_block(block: np.ndarray, shift: Sequence[float], order: int = 1) -> np.ndarray:
    """Shift every ``(y, x)`` plane of ``block`` by ``shift``; NaN pixels stay NaN at their shifted position.

    NaN is filled with the nearest valid value before the spline, and output pixels more than half covered by NaN input are
    NaN again (same rule as :func:`shift_mask_block`)."""
    out = np.empty(block.shape, np.float32)
    for idx in np.ndindex(block.shape[:-2]):
        plane = block[idx].astype(np.float32)
        bad = ~np.isfinite(plane)
        if bad.all():
            out[idx] = plane
            continue
        filled = plane
        if bad.any():  # nearest valid value: local, so the result does not depend on chunk borders
            near = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
            filled = plane[tuple(near)]
        res = ndimage.shift(filled, shift, order=order, mode="nearest")
        if bad.any():
            bad_s = ndimage.shift(bad.astype(np.float32), shift, order=1, mode="nearest") > 0.5
            res[bad_s] = np.nan
        out[idx] = res
    return out


def shift_mask_block(block: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """Shift a boolean mask: a pixel is masked when more than half of its bilinear footprint was masked.

    (A stricter "touched by any masked pixel" rule dilates every reference mask by one pixel and, on the demo,
    pushed more pixels onto the worse reference: PSNR dropped instead of rising.)"""
    out = np.empty(block.shape, bool)
    for idx in np.ndindex(block.shape[:-2]):
        out[idx] = ndimage.shift(block[idx].astype(np.float32), shift, order=1, mode="nearest") > 0.5
    return out


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """A context in which numpy's BLAS/LAPACK run on one thread, for the estimate's small eager kernels (a 512 px
    window at most): OpenBLAS's thread pool costs more than it gains on them and spins against the dask workers;
    on the 2-core bench machine under load, the upsampled DFT of a 104 px window took 70 ms with the default
    threads and 7 ms with one (issue 22). The results do not depend on the number of threads (each output element
    of a matrix product is summed in the same order); outputs were compared byte for byte. The limit is process-wide
    while the block runs (threadpoolctl): other threads' BLAS calls then run on one thread too."""
    return _blas_controller().limit(limits=1, user_api="blas")


# -- scene level (xarray / dask) -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coregistration:
    """What was estimated and done for one reference; ``as_properties`` is the STAC record."""

    id: str
    kind: str  #: "optical" | "sar"
    #: "applied" | "rejected" (exceeds max_shift_px) | "negligible" (below min_shift_px, not applied) |
    #: "failed" (too few clear pixels) | "unreliable" (a mostly cloudy target: recorded, not estimated, not applied)
    #: | "estimated"
    status: str
    shift_px: tuple[float, float] = (0.0, 0.0)
    phase_shift_px: tuple[float, float] = (0.0, 0.0)
    n_pixels: int = 0
    residual: float = float("nan")
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  #: y0, y1, x0, x1 of the estimation window
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def as_properties(self) -> dict:
        d = asdict(self)
        d["shift_px"] = [round(v, 4) for v in self.shift_px]
        d["misregistration_px"] = [round(-v, 4) for v in self.shift_px]
        d["phase_shift_px"] = [round(v, 4) for v in self.phase_shift_px]
        d["residual"] = None if math.isnan(self.residual) else round(self.residual, 6)
        d["window"] = list(self.window)
        return d


def central_window(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    """The central ``size x size`` window of a grid (clipped to it)."""
    ny, nx = shape
    hy, hx = min(size, ny), min(size, nx)
    y0, x0 = (ny - hy) // 2, (nx - hx) // 2
    return slice(y0, y0 + hy), slice(x0, x0 + hx)


#: on a target with less of its window clear than this, no shift is estimated: it is recorded as unreliable, not applied.
UNRELIABLE_TARGET_CLEAR = 0.25


def estimate_reference_shifts(target: xr.DataArray, target_mask: xr.DataArray, references: xr.DataArray,
                              reference_masks: xr.DataArray, ids: Sequence[str],
                              cfg: CoregisterConfig) -> list[Coregistration]:
    """Estimate one shift per reference on a central window of ``cfg.band`` (one small eager compute).

    ``target`` ``(band, y, x)``, ``target_mask`` ``(y, x)`` True = cloudy, ``references`` ``(time, band, y, x)``,
    ``reference_masks`` ``(time, y, x)`` True = cloudy or nodata.
    """
    have = [str(b) for b in target.band.values]
    band = cfg.band
    if band not in have:
        band = next((b for b in ("B08", "B04", "B03", "B02") if b in have), have[0])
        log.warning("coregister.band %r is not loaded (bands %s); estimating on %s instead", cfg.band, have, band)
    wy, wx = central_window(target.shape[-2:], cfg.window)
    t, tm, r, rm = dask.compute(target.sel(band=band)[wy, wx].data, target_mask[wy, wx].data,
                                references.sel(band=band)[:, wy, wx].data, reference_masks[:, wy, wx].data)
    t, tm, r, rm = (np.asarray(a) for a in (t, tm, r, rm))
    win = (wy.start, wy.stop, wx.start, wx.stop)
    out = []
    for i, rid in enumerate(ids):
        vt, vr = ~tm & np.isfinite(t), ~rm[i] & np.isfinite(r[i])
        frac = float((vt & vr).mean())
        if frac < cfg.min_clear_fraction:
            out.append(Coregistration(rid, "optical", "failed", window=win, reason=(
                f"{frac:.1%} of the {t.shape[0]}x{t.shape[1]} window is clear in both (< "
                f"coregister.min_clear_fraction {cfg.min_clear_fraction:.0%})")))
            log.warning("coregister %s: %s; not shifted", rid, out[-1].reason)
            continue
        target_clear = float(vt.mean())
        try:
            if target_clear < UNRELIABLE_TARGET_CLEAR:
                check_overlap(vt & vr)  # the same "failed" as an estimate would give
            else:
                with one_blas_thread():
                    est = estimate_shift(t, r[i], vt, vr, upsample=cfg.upsample)
        except InputDataError as exc:
            out.append(Coregistration(rid, "optical", "failed", window=win, reason=str(exc)))
            log.warning("coregister %s: %s; not shifted", rid, exc)
            continue
        if target_clear < UNRELIABLE_TARGET_CLEAR:
            # a cloudy target cannot anchor a shift (its few clear pixels are cloud edges, haze, missed cloud):
            # recorded as unreliable, never applied, and not a grid problem to "raise the bound" for. Not estimated
            # either: the estimate (phase correlation + refinement) would be thrown away (issue 22: most small
            # cloudy targets of a batch)
            reason = (f"the target is mostly cloudy ({target_clear:.0%} of the window clear, < "
                      f"{UNRELIABLE_TARGET_CLEAR:.0%}): a shift estimated there is unreliable; not estimated, "
                      "not applied")
            log.warning("coregister %s: %s", rid, reason)
            out.append(Coregistration(rid, "optical", "unreliable", n_pixels=int((vt & vr).sum()), window=win,
                                      reason=reason))
            continue
        out.append(_decide(rid, "optical", est, cfg, win))
    return out


def estimate_sar_shift(optical_band: xr.DataArray, optical_mask: xr.DataArray, sar: xr.DataArray, sar_id: str,
                       cfg: CoregisterConfig) -> Coregistration:
    """Estimate (and record) the shift of one SAR image ``(y, x)`` linear power to an optical band ``(y, x)``."""
    wy, wx = central_window(optical_band.shape[-2:], cfg.window)
    o, om, s = (np.asarray(a) for a in dask.compute(optical_band[wy, wx].data, optical_mask[wy, wx].data,
                                                     sar[wy, wx].data))
    win = (wy.start, wy.stop, wx.start, wx.stop)
    vo = ~om & np.isfinite(o)
    if vo.mean() < cfg.min_clear_fraction:
        return Coregistration(sar_id, "sar", "failed", window=win,
                              reason=f"{vo.mean():.1%} of the window is clear in the optical image")
    with one_blas_thread():
        est = estimate_shift_cross_modal(o, s, vo, upsample=cfg.upsample)
    return _decide(sar_id, "sar", est, cfg, win)


def _decide(rid: str, kind: str, est: ShiftEstimate, cfg: CoregisterConfig, win) -> Coregistration:
    mag = float(np.hypot(*est.shift))
    status, reason = "applied", ""
    if mag > cfg.max_shift_px:
        status = "rejected"
        reason = (f"estimated shift {mag:.2f} px exceeds coregister.max_shift_px {cfg.max_shift_px}; not applied "
                  "(check the grids or raise the bound)")
        log.warning("coregister %s: %s", rid, reason)
    elif mag < cfg.min_shift_px:
        status = "negligible"
        reason = f"estimated shift {mag:.3f} px is below coregister.min_shift_px {cfg.min_shift_px}; not applied"
        log.info("coregister %s (%s): %s", rid, kind, reason)
    else:
        log.info("coregister %s (%s): shift (%.3f, %.3f) px on %d clear pixels", rid, kind, *est.shift,
                 est.n_pixels)
    return Coregistration(rid, kind, status, est.shift, est.phase_shift, est.n_pixels, est.residual, win, reason)


def _lazy_shift(data: dsa.Array, shift: Sequence[float], depth: int, kernel, dtype, **kw) -> dsa.Array:
    depths = {i: 0 for i in range(data.ndim - 2)} | {data.ndim - 2: depth, data.ndim - 1: depth}
    return dsa.map_overlap(kernel, data, depth=depths, boundary="none", dtype=dtype, trim=True,
                           shift=tuple(shift), **kw)


def apply_shifts(references: xr.DataArray, reference_masks: xr.DataArray | None, shifts: Sequence[Coregistration],
                 cfg: CoregisterConfig) -> tuple[xr.DataArray, xr.DataArray | None]:
    """Lazily shift each reference (and its mask) by its applied shift; others pass through unchanged."""
    depth = int(math.ceil(cfg.max_shift_px)) + 3
    if len(shifts) != references.sizes["time"]:
        raise InputDataError(f"{len(shifts)} shifts for {references.sizes['time']} references")
    if not any(c.applied for c in shifts):
        return references, reference_masks
    refs, masks = [], []
    for i, c in enumerate(shifts):
        r = references.data[i]
        m = reference_masks.data[i] if reference_masks is not None else None
        if not isinstance(r, dsa.Array):
            r = dsa.from_array(r, chunks=(1,) + (512,) * (r.ndim - 1))
        if m is not None and not isinstance(m, dsa.Array):
            m = dsa.from_array(m, chunks=512)
        if c.applied:
            r = _lazy_shift(r, c.shift_px, depth, shift_block, np.float32, order=cfg.order)
            if m is not None:
                m = _lazy_shift(m, c.shift_px, depth, shift_mask_block, bool)
        refs.append(r)
        masks.append(m)
    out = xr.DataArray(dsa.stack(refs), dims=references.dims, coords=references.coords, name=references.name,
                       attrs=references.attrs)
    if references.rio.crs is not None:
        out = out.rio.write_crs(references.rio.crs)
    mout = None
    if reference_masks is not None:
        mout = xr.DataArray(dsa.stack(masks), dims=reference_masks.dims, coords=reference_masks.coords,
                            name=reference_masks.name)
    return out, mout


def shifted_geobox(geobox, shift: Sequence[float]):
    """The grid whose pixel ``(i, j)`` lies at target pixel ``(i - dy, j - dx)``.

    Loading a reference onto it and relabelling it with the target's coordinates is ``ndimage.shift(ref, shift)``
    done by the reader itself: one resampling of the source pixels instead of two, and no extra dask layer.
    """
    from affine import Affine
    from odc.geo.geobox import GeoBox

    dy, dx = shift
    return GeoBox(geobox.shape, geobox.transform * Affine.translation(-dx, -dy), geobox.crs)


def load_aligned_references(refs, shifts: Sequence[Coregistration], geobox, bands: Sequence[str], mask_cfg,
                            chunk: int, target: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """References ``(time, band, y, x)`` and their masks ``(time, y, x)`` (cloud | nodata | failed read) loaded
    on grids shifted by each applied shift, relabelled with the target's coordinates. Lazy; per-chunk cost and
    memory are those of a plain load (the reason this, not :func:`apply_shifts`, is what the runner uses)."""
    from cloudfree.stages.load import load_reflectance_checked
    from cloudfree.stages.masks import build_mask_layers

    stacks, masks = [], []
    for item, c in zip(refs, shifts):
        gb = shifted_geobox(geobox, c.shift_px) if c.applied else geobox
        s, failed, _ = load_reflectance_checked([item], bands, gb, chunk, name=item.id)
        layers = build_mask_layers([item], gb, mask_cfg, chunk)  # opened specks are not clear either
        rm = layers.cloudy | s.isnull().any("band") | failed
        stacks.append(s.assign_coords(y=target.y.values, x=target.x.values))
        masks.append(rm.assign_coords(y=target.y.values, x=target.x.values))
    stack = xr.concat(stacks, dim="time").rio.write_crs(geobox.crs.to_wkt())
    return stack, xr.concat(masks, dim="time")
