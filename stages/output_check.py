"""Checks before an output is published: never a confident wrong answer.

* :func:`check_band_crs` (before any read): every band asset of the target must be on the CRS its item declares;
  a band on another CRS is an inconsistent item (odc-stac places it from the item's ``proj:*`` and the target's
  pixels end up empty, so the "restored" output would be almost all reference): the target fails with
  :class:`~cloudfree.pipeline.errors.InputDataError` naming the item, the band and the fix.
* :func:`check_output` (after the compute, on a decimated copy): each restored band is compared with the clear
  references' distribution **on the same pixels**. A restored pixel is *implausible* where a band leaves
  ``[min - tol, max + tol]`` of the clear references there (``tol = abs_tol + rel_tol * max``), e.g. cloud-level
  blue where every reference is clear forest. When more than ``max_share`` of the restored pixels that have a clear
  reference are implausible, the output is not ``done``: the runner publishes it as ``unrestored`` with the reason
  (so a rerun retries it and no search takes it as a clear reference).
* :func:`no_target_data`: an output whose target had no readable pixel (every pixel nodata or a failed read) is
  never ``done`` (it would be the references under the target's date).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: a band leaves the references' range by more than ``ABS_TOL + REL_TOL * max`` (reflectance 0-1).
ABS_TOL = 0.05
REL_TOL = 0.5
#: more than this share of the checkable restored pixels implausible -> not done.
MAX_SHARE = 0.05
#: fewer checkable restored pixels than this and the check abstains.
MIN_PIXELS = 50
#: the decimated copy the check runs on has at most this many pixels on a side.
CHECK_MAX_SIDE = 512


@dataclass
class OutputCheck:
    """What :func:`check_output` found; ``as_properties`` is the item's ``cloudfree:output_check``."""

    checked_pixels: int = 0
    implausible_share: float = 0.0
    per_band: dict = field(default_factory=dict)
    ok: bool = True
    reason: str = ""

    def as_properties(self) -> dict:
        return {"checked_pixels": self.checked_pixels, "implausible_share": round(self.implausible_share, 4),
                "per_band": self.per_band, "ok": self.ok, "reason": self.reason,
                "rule": f"restored band outside [min - tol, max + tol] of the clear references, tol = {ABS_TOL} + "
                        f"{REL_TOL} max; fails above {MAX_SHARE:.0%} of the restored pixels"}


def check_output(reflectance: np.ndarray, restored: np.ndarray, references: np.ndarray,
                 reference_valid: np.ndarray, bands: Sequence[str], *, abs_tol: float = ABS_TOL,
                 rel_tol: float = REL_TOL, max_share: float = MAX_SHARE, min_pixels: int = MIN_PIXELS) -> OutputCheck:
    """Compare the restored pixels of ``reflectance`` ``(band, y, x)`` with the clear references ``(time, band, y,
    x)`` (``reference_valid`` ``(time, y, x)``) on the same pixels; see the module docstring."""
    res = OutputCheck()
    if references.shape[0] == 0:
        res.reason = "no reference to compare with"
        return res
    ok = np.asarray(reference_valid, bool) & np.isfinite(references).all(axis=1)
    sel = np.asarray(restored, bool) & ok.any(axis=0) & np.isfinite(reflectance).all(axis=0)
    res.checked_pixels = int(sel.sum())
    if res.checked_pixels < min_pixels:
        res.reason = f"only {res.checked_pixels} restored pixel(s) with a clear reference: not checked"
        return res
    bad = np.zeros(int(sel.sum()), bool)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN where no reference is clear
        for i, b in enumerate(bands):
            v = np.where(ok, references[:, i], np.nan)[:, sel]
            hi, lo = np.nanmax(v, axis=0), np.nanmin(v, axis=0)
            tol = abs_tol + rel_tol * np.abs(hi)
            out = reflectance[i][sel]
            above, below = out > hi + tol, out < lo - tol
            bad |= above | below
            res.per_band[str(b)] = {"above": round(float(above.mean()), 4), "below": round(float(below.mean()), 4),
                                    "output_median": round(float(np.median(out)), 4),
                                    "reference_median": round(float(np.nanmedian(v)), 4)}
    res.implausible_share = float(bad.mean())
    if res.implausible_share > max_share:
        worst = max(res.per_band.items(), key=lambda kv: kv[1]["above"] + kv[1]["below"])
        b, st = worst
        res.ok = False
        res.reason = (f"{100 * res.implausible_share:.1f} % of the restored pixels are far outside the clear "
                      f"references on the same pixels (worst {b}: output median {st['output_median']:.3f}, "
                      f"references {st['reference_median']:.3f}); the output is not a plausible cloud-free estimate "
                      "(cloud the mask missed, or a bad alignment)")
    return res


def no_target_data(stats: dict) -> bool:
    """True when no target pixel was readable (every pixel nodata or a failed read; ``cover_stats`` shares)."""
    nb = stats.get("nodata_before")
    return nb is not None and nb >= 0.999


def check_band_crs(item, bands: Sequence[str]) -> None:
    """Raise :class:`InputDataError` when a band asset of ``item`` is on another CRS than the item declares
    (asset-level ``proj:code``/``proj:epsg`` win over the item's). Unreadable assets are left to the read probe;
    items that declare no CRS are not checked."""
    import rasterio
    from rasterio.crs import CRS

    from cloudfree.catalogs.access import readable_href
    from cloudfree.catalogs.sentinel_hub import is_virtual
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages.load import GDAL_RETRY_ENV, memo_read

    def declared(props: dict):
        code = props.get("proj:code") or (f"EPSG:{props['proj:epsg']}" if props.get("proj:epsg") else None)
        try:
            return CRS.from_user_input(code) if code else None
        except Exception:  # noqa: BLE001 - an unparseable code is the harmonisation's business
            return None

    item_crs = declared(item.properties)
    wrong = []
    for b in bands:
        asset = item.assets.get(b)
        if asset is None:
            continue
        want = declared(asset.extra_fields) or item_crs
        if want is None:
            continue
        if is_virtual(asset.href):  # fetched later on the output grid (Sentinel Hub): nothing to compare yet
            continue
        href = readable_href(item, b)  # the href policy and signing, as every read of an asset

        def read_crs():
            with rasterio.Env(**GDAL_RETRY_ENV), rasterio.open(href) as ds:
                return ds.crs

        try:  # once per file and process (memo_read: a batch's targets share their items)
            got = memo_read(href, ("crs",), read_crs)
        except (rasterio.errors.RasterioError, OSError):
            continue
        if got is None or got != want:
            wrong.append((b, got.to_string() if got else "no CRS", want.to_string()))
    if wrong:
        desc = "; ".join(f"{b} is on {g}" for b, g, _ in wrong)
        raise InputDataError(
            f"item {item.id}: {desc}, but the item declares {wrong[0][2]}: its pixels would not line up with the "
            "other bands (the output would be the references under this date); fix the asset's proj:code/proj:epsg "
            "or reproject the file in the catalog, or drop the item")


#: confidence below this counts as "still cloudy" in the cover statistics when no floor is configured.
LOW_CONFIDENCE = 0.5


def cover_stats(confidence_path: Path, provenance_path: Path | None, floor: float = 0.0,
                max_side: int = 1024, source_path: Path | None = None, arrays: dict | None = None) -> dict:
    """Cover statistics of an output, read decimated from its COGs. Shares are of all output pixels unless said:

    * ``masked_before``: share of the target's *valid* pixels any mask method flagged (None: no valid pixel);
    * ``nodata_before``: share of the target without valid data;
    * ``low_confidence_after``: share of the valid output pixels with confidence below ``floor`` (0.5 without
      a floor; None: no valid pixel); ``nodata_after``: share of output nodata;
    * with ``source_path``: ``unfilled_after`` (cloudy, not restored), ``failed_after`` (read failed),
      ``restored_after`` (model, fusion or a reference supplied the pixel), ``opened_after`` (flagged cloud the
      mask refinement's opening removed, kept as observed: ``SOURCE_OPENED``);
    * ``unusable_after``: share that is not a usable cloud-free estimate (nodata, low confidence, unfilled or
      failed), the value published as the output's ``eo:cloud_cover``.

    ``arrays``: the layers as they were written (``{"confidence": (1, y, x) uint8, ...}``, e.g.
    :class:`~cloudfree.stages.write.WrittenOutput` ``arrays`` of a small target): a layer whose file would be read
    whole (no side above ``max_side``) is taken from there instead of read back, the same pixels.
    """
    import rasterio

    from cloudfree.pipeline.contract import (SOURCE_FAILED, SOURCE_FUSED, SOURCE_MODEL, SOURCE_OPENED,
                                             SOURCE_REFERENCE_BASE, SOURCE_UNFILLED)
    from cloudfree.stages.masks import NODATA_BIT

    in_memory = {}
    for name, path in (("confidence", confidence_path), ("mask_provenance", provenance_path),
                       ("source", source_path)):
        a = (arrays or {}).get(name)
        if path is not None and a is not None and a.ndim == 3 and max(a.shape[1:]) <= max_side:
            in_memory[Path(path)] = a[0]

    def read(path, shape=None):
        a = in_memory.get(Path(path))
        if a is not None and (shape is None or tuple(shape) == a.shape):
            return a
        with rasterio.open(path) as ds:
            if shape is None:
                k = max(1, int(np.ceil(max(ds.shape) / max_side)))
                shape = (max(1, ds.height // k), max(1, ds.width // k))
            return ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)

    conf = read(confidence_path)
    shape = conf.shape
    # e.g. composites: no single target whose mask could be reported
    bits = np.zeros(shape, np.uint8) if provenance_path is None else read(provenance_path, shape)
    src = None if source_path is None else read(source_path, shape)
    valid_in = (bits & NODATA_BIT) == 0
    valid_out = conf != 255
    thr = 100 * (floor if floor > 0 else LOW_CONFIDENCE)
    low = conf < thr
    unusable = ~valid_out | low
    from cloudfree.stages.missed_cloud import MISSED_BIT

    stats = {
        "masked_before": float(((bits & ~np.uint8(NODATA_BIT)) > 0)[valid_in].mean()) if valid_in.any() else None,
        #: share of the valid target pixels only the multi-temporal test flagged (cloud/shadow the mask missed)
        "missed_cloud_before": (float(((bits & np.uint8(MISSED_BIT)) > 0)[valid_in].mean())
                                if valid_in.any() and provenance_path is not None else None),
        "nodata_before": float((~valid_in).mean()) if provenance_path is not None else None,
        "low_confidence_after": float(low[valid_out].mean()) if valid_out.any() else None,
        "low_confidence_threshold": thr / 100,
        "nodata_after": float((~valid_out).mean()),
    }
    if src is not None:
        unfilled, failed = src == SOURCE_UNFILLED, src == SOURCE_FAILED
        restored = np.isin(src, (SOURCE_MODEL, SOURCE_FUSED)) | (src >= SOURCE_REFERENCE_BASE)
        stats.update(unfilled_after=float(unfilled.mean()), failed_after=float(failed.mean()),
                     restored_after=float(restored.mean()), opened_after=float((src == SOURCE_OPENED).mean()))
        unusable |= unfilled | failed
    stats["unusable_after"] = float(unusable.mean())
    return stats


def restoration_status(stats: dict) -> tuple[str, str]:
    """``("done", "")`` or ``("unrestored", why)``: unrestored when the target had cloudy pixels and none of them was
    restored, or when no output pixel is a usable estimate."""
    if stats.get("unusable_after", 0.0) >= 1.0:
        return "unrestored", "no output pixel is a usable cloud-free estimate"
    if stats.get("unfilled_after", 0.0) > 0 and stats.get("restored_after", 0.0) == 0:
        return "unrestored", (f"none of the cloudy pixels could be restored ({100 * stats['unfilled_after']:.1f} % of "
                              "the output is cloudy and unfilled)")
    return "done", ""
