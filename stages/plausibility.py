"""Plausibility of input reflectance: catch a wrong scale, offset or band order before it becomes an output.

Each asset of the target and its references is read once at a coarse overview (``SAMPLE`` x ``SAMPLE`` px, cheap
with COG overviews), converted with the item's own harmonisation (:mod:`cloudfree.catalogs.harmonise`) and summarised by
its median and 10th percentile over valid pixels. Checks, per band:

* **unscaled** (error): median reflectance above ``MAX_MEDIAN`` (1.5): the DN were not scaled (e.g. a
  ``raster:bands`` scale of 1 instead of 1e-4);
* **darker than its references** (error below ``1 / FAIL_RATIO`` = 1/4, warning below ``1 / WARN_RATIO`` = 1/2):
  clouds only brighten a scene and shadows darken a small part of it, so the darker pixels of a target (its 10th
  percentile: its clear ones) are not 4x darker than every reference's 10th percentile of the same band unless
  the band has a scale/offset error (a target 10x too small) or is a swapped band (only swaps between bands whose
  levels differ that much are caught: in a winter scene B02 and B08 are alike). Cloud shadows darken part of a
  scene by as much: where the target has a scene classification (``SCL``), its cloud-shadow pixels (class
  3) are left out of its percentile, and (SCL misses shadows as it misses cloud) the target's median must
  be ``MEDIAN_RATIO`` (1.5) times below every reference's median as well (a shadow darkens part of a scene, a
  scale error all of it), so a scene with large cloud shadows raises no false alarm; a snowy target (>= 10 % of
  its sample with NDSI >= 0.4) is not checked in B11/B12, where snow is dark;
* **implausibly dark** without references (warning): the 99th percentile of every band below ``MIN_P99``;
* **B02 and B08 swapped** (error), whatever their levels (in a winter scene they are alike, so the ratio test
  above cannot see that swap): vegetation reflects near-infrared several times more than green and red, and
  nothing on land reflects blue that way. A pixel is "NIR-like" for a band when that band exceeds
  ``max(SWAP_MIN, 1.5 x B03, 2 x B04)``. When the asset called B02 is NIR-like on at least ``SWAP_MIN_SHARE`` of
  an item's valid pixels and on ``SWAP_FACTOR`` times more pixels than the asset called B08, the two are swapped
  (:func:`band_swap`). Measured (128 px overviews; ``tests/test_faults_input.py`` runs the demo, the numbers below
  come from the same function over the shared data): demo items healthy 0.0-0.1 % B02-NIR-like, swapped 2.3-3.7 %;
  Romania L2A stack (140 dates) 0 false alarms, 124 of 140 swaps caught (the missed ones are fully cloudy or
  without vegetation); the Moroccan desert tile 29RKH: no false alarm, no detection. What it cannot catch: a
  scene without vegetation (desert, snow, water, full cloud), swaps between two visible bands (B02/B03) or B04/B08
  (red soil can be NIR-like in this sense, so it is not tested), swaps within SWIR (B11/B12).

Errors raise :class:`~cloudfree.pipeline.errors.InputDataError` naming the item, the band and the fix; warnings are logged
and returned (the runner records them in the output item's ``cloudfree:plausibility``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import pystac

from cloudfree.pipeline.errors import InputDataError

log = logging.getLogger(__name__)

SAMPLE = 128
MAX_MEDIAN = 1.5
FAIL_RATIO = 4.0
WARN_RATIO = 2.0
#: B02/B08 swap test (band_swap): a band is "NIR-like" on a pixel above max(SWAP_MIN, 1.5 x B03, 2 x B04).
SWAP_MIN = 0.12
SWAP_MIN_SHARE = 0.01
SWAP_FACTOR = 5.0
#: percentile compared between target and references: the darker pixels of a cloudy target are its clear ones.
LOW_PERCENTILE = 10
#: a target is "darker than its references" only if its median is this many times below every reference's too.
MEDIAN_RATIO = 1.5
MIN_P99 = 0.01


def _read_sample(item: pystac.Item, band: str, size: int = SAMPLE) -> tuple[np.ndarray, tuple] | None:
    """``(reflectance (size, size) float32 with NaN nodata, footprint key (crs, bounds))`` of one asset, read from
    the overviews (every asset resampled to the same shape, so assets with one footprint line up)."""
    import rasterio
    from rasterio.enums import Resampling

    from cloudfree.stages.load import GDAL_RETRY_ENV, item_harmonisation, memo_read

    from cloudfree.catalogs.access import readable_href
    from cloudfree.catalogs.sentinel_hub import is_virtual

    asset = item.assets.get(band)
    if asset is None or is_virtual(asset.href):  # not fetched yet (Sentinel Hub): nothing to sample
        return None
    href = readable_href(item, band)  # href policy + signing, as the loader

    def read():
        with rasterio.Env(**GDAL_RETRY_ENV), rasterio.open(href) as ds:
            dn = ds.read(1, out_shape=(size, size), resampling=Resampling.nearest, masked=True)
            raw = dn.filled(0)
            raw.setflags(write=False)
            return raw, (str(ds.crs), tuple(round(v, 3) for v in ds.bounds))

    try:  # once per file and process (memo_read: items sharing a file, or a reference of several targets)
        raw, key = memo_read(href, ("plausibility-sample", size), read)
    except (rasterio.errors.RasterioError, OSError) as exc:  # read failures are reported by load's probe
        log.debug("plausibility: %s %s unreadable: %s", item.id, band, exc)
        return None
    scale, offset = item_harmonisation(item, band)
    vals = raw.astype(np.float32)
    return np.where(vals != 0, vals * np.float32(scale) + np.float32(offset), np.nan), key  # DN 0 = nodata


#: SCL classes left out of the target's low percentile: 3 cloud shadow (not 2, dark area: in winter it is most of a snowy scene).
SCL_SHADOW = (3,)


def _shadow_sample(item: pystac.Item, size: int = SAMPLE) -> np.ndarray | None:
    """``(size, size)`` bool, the item's SCL shadow/dark pixels at the sample's grid; None without a readable SCL."""
    import rasterio
    from rasterio.enums import Resampling

    from cloudfree.catalogs.access import readable_href
    from cloudfree.catalogs.sentinel_hub import is_virtual
    from cloudfree.stages.load import GDAL_RETRY_ENV, memo_read

    asset = item.assets.get("SCL")
    if asset is None or is_virtual(asset.href):  # not fetched yet (Sentinel Hub): nothing to sample
        return None
    href = readable_href(item, "SCL")  # href policy + signing, as the loader and _read_sample

    def read():
        with rasterio.Env(**GDAL_RETRY_ENV), rasterio.open(href) as ds:
            scl = ds.read(1, out_shape=(size, size), resampling=Resampling.nearest)
            scl.setflags(write=False)
            return scl

    try:  # once per file and process (memo_read)
        scl = memo_read(href, ("scl-sample", size), read)
    except (rasterio.errors.RasterioError, OSError):
        return None
    return np.isin(scl, SCL_SHADOW)


def _median(v: np.ndarray | None) -> float | None:
    return float(np.median(v)) if v is not None and v.size >= 16 else None


#: a target with at least this share of snow-like pixels (NDSI >= 0.4) is not checked for darkness in SWIR.
SNOW_SHARE = 0.1
SWIR_BANDS = ("B11", "B12")


def _snow_share(grids: dict, item_id: str) -> float:
    """Share of the item's sample that is snow-like (NDSI = (B03 - B11) / (B03 + B11) >= 0.4); 0 without both."""
    g, s = grids.get((item_id, "B03")), grids.get((item_id, "B11"))
    if g is None or s is None or g[0].shape != s[0].shape:
        return 0.0
    with np.errstate(all="ignore"):
        ndsi = (g[0] - s[0]) / (g[0] + s[0])
    ok = np.isfinite(ndsi)
    return float((ndsi[ok] >= 0.4).mean()) if ok.any() else 0.0


def _low(v: np.ndarray | None) -> float | None:
    return float(np.percentile(v, LOW_PERCENTILE)) if v is not None and v.size >= 16 else None


#: most check results kept by :func:`check_reflectance` (a tuple of warnings each).
CHECK_MEMO_MAX = 256
_CHECK_MEMO: "OrderedDict[tuple, tuple[str, ...]]" = OrderedDict()
_CHECK_LOCK = threading.Lock()


def _memo_key(target: pystac.Item, references: Sequence[pystac.Item], bands: Sequence[str],
              skip: set) -> tuple | None:
    """What :func:`check_reflectance`'s result depends on: the item ids and their order, the bands, and per
    checked asset (and the target's SCL) the file it reads (:func:`~cloudfree.stages.load.file_validator`: path,
    mtime, size) and the scale/offset applied to it. None (not memoised) when an asset is not a local file."""
    from cloudfree.catalogs.access import readable_href
    from cloudfree.catalogs.sentinel_hub import is_virtual
    from cloudfree.stages.load import file_validator, item_harmonisation

    parts = []
    for it in [target, *references]:
        for b in bands:
            if (it.id, b) in skip or b not in it.assets:
                parts.append((it.id, b, None))
                continue
            if is_virtual(it.assets[b].href):
                return None
            v = file_validator(readable_href(it, b))
            if v is None:
                return None
            parts.append((it.id, b, v, tuple(float(x) for x in item_harmonisation(it, b))))
    scl = None
    if "SCL" in target.assets:
        if is_virtual(target.assets["SCL"].href):
            return None
        scl = file_validator(readable_href(target, "SCL"))
        if scl is None:
            return None
    return target.id, tuple(r.id for r in references), tuple(bands), tuple(sorted(skip)), tuple(parts), scl


def check_reflectance(target: pystac.Item, references: Sequence[pystac.Item], bands: Sequence[str],
                      skip: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Check ``target`` (and the references' scale) as described in the module docstring; return the warnings,
    raise :class:`InputDataError` on a clear error. ``skip``: ``(item id, band)`` pairs whose read failed.

    The check looks at whole-item overview samples, not at the target's grid: a batch of targets of the same items
    (issue 22: ~10 ms of numpy statistics per small target) gets the result of its first target, kept by
    :func:`_memo_key` (local files only; a file rewritten in place is checked again). Only a check whose every
    sample was read is kept, and never an error (the next target checks again and raises again)."""
    skip = set(skip)
    try:
        key = _memo_key(target, references, bands, skip)
    except Exception:  # noqa: BLE001 - the check itself raises it, naming the item (e.g. a refused href)
        key = None
    if key is not None:
        with _CHECK_LOCK:
            hit = _CHECK_MEMO.get(key)
            if hit is not None:
                _CHECK_MEMO.move_to_end(key)
        if hit is not None:
            for msg in hit:
                log.warning("%s", msg)
            return list(hit)
    warnings, complete = _check_reflectance(target, references, bands, skip)
    if key is not None and complete:
        with _CHECK_LOCK:
            _CHECK_MEMO[key] = tuple(warnings)
            while len(_CHECK_MEMO) > CHECK_MEMO_MAX:
                _CHECK_MEMO.popitem(last=False)
    return warnings


def _check_reflectance(target: pystac.Item, references: Sequence[pystac.Item], bands: Sequence[str],
                       skip: set) -> tuple[list[str], bool]:
    """:func:`check_reflectance` without the memo: ``(warnings, complete)``, ``complete`` when every sample (each
    asset's, the target's SCL if it has one) was read."""
    warnings: list[str] = []
    keys = [(it, b) for it in [target, *references] for b in bands if (it.id, b) not in skip]
    # one small overview read per asset; GDAL releases the GIL while it reads, so the reads overlap (remote assets
    # wait on the network, local ones on decompression): 12 reads took 0.2 s one after the other
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(keys)))) as ex:
        got = list(ex.map(lambda k: _read_sample(*k), keys))
    grids = {(it.id, b): g for (it, b), g in zip(keys, got)}
    shadow = _shadow_sample(target)
    complete = all(g is not None for (it, b), g in zip(keys, got) if b in it.assets) and (
        shadow is not None or "SCL" not in target.assets)
    if shadow is not None:  # the target's cloud shadows are not a scale error (module docstring)
        grids = {k: (None if g is None else
                     ((np.where(shadow, np.nan, g[0]), g[1]) if k[0] == target.id and g[0].shape == shadow.shape
                      else g)) for k, g in grids.items()}
    samples = {k: (None if g is None else g[0][np.isfinite(g[0])].astype(np.float64)) for k, g in grids.items()}
    for it in [target, *references]:
        swap = band_swap({b: grids[(it.id, b)][0] for b in bands if grids.get((it.id, b)) is not None})
        if swap is not None:
            blue, nir = swap
            raise InputDataError(
                f"item {it.id} bands B02 and B08: they look swapped: the asset called B02 reflects like vegetation "
                f"in near-infrared (above 1.5x B03 and 2x B04) on {100 * blue:.1f} % of the pixels, the asset "
                f"called B08 on {100 * nir:.1f} %; fix the asset keys (eo:bands) of the item in the catalog, or "
                "drop it")
    for (iid, b), v in samples.items():
        med = _median(v)
        if med is not None and med > MAX_MEDIAN:
            raise InputDataError(
                f"item {iid} band {b}: median reflectance {med:.3g} is above {MAX_MEDIAN}: the DN look unscaled; "
                "fix the item's raster:bands scale/offset (Sentinel-2 L2A: scale 1e-4, offset -0.1 from baseline "
                "04.00) in the catalog, or drop the item")
    dark = []
    snowy = _snow_share(grids, target.id) >= SNOW_SHARE
    for b in bands:
        if snowy and b in SWIR_BANDS:  # snow is dark in the short-wave infrared: not a scale error
            continue
        t = _low(samples.get((target.id, b)))
        refs = [m for m in (_low(samples.get((r.id, b))) for r in references) if m is not None and m > 0]
        if t is None or not refs:
            continue
        ratio = min(refs) / max(t, 1e-6)
        # a shadow darkens part of the scene, a scale error all of it: the target's median must be darker than
        # every reference's median too (by MEDIAN_RATIO)
        t_mid = _median(samples.get((target.id, b)))
        ref_mid = [m for m in (_median(samples.get((r.id, b))) for r in references) if m is not None and m > 0]
        if t_mid is not None and ref_mid and min(ref_mid) / max(t_mid, 1e-6) < MEDIAN_RATIO:
            continue
        if ratio >= WARN_RATIO:
            dark.append((b, ratio, t, min(refs)))
    fails = [d for d in dark if d[1] >= FAIL_RATIO]
    for b, ratio, t, r in dark:
        msg = (f"target {target.id} band {b}: {LOW_PERCENTILE}th percentile reflectance {t:.4f} is {ratio:.1f}x below "
               f"its references' "
               f"({r:.4f}); clouds only brighten a scene, so check the item's scale/offset (raster:bands, processing "
               "baseline) and the band order of its assets")
        if (b, ratio, t, r) not in fails:
            log.warning("%s", msg)
            warnings.append(msg)
    if fails:
        b, ratio, t, r = max(fails, key=lambda d: d[1])
        raise InputDataError(
            f"target {target.id} band {b}: {LOW_PERCENTILE}th percentile reflectance {t:.4f} is {ratio:.1f}x below its "
            f"references' ({r:.4f}) (bands {[d[0] for d in fails]} affected): a wrong scale/offset (e.g. 10x too small) or band "
            "order; fix the item's raster:bands scale/offset or asset keys in the catalog, or drop it")
    if not references:
        p99 = [float(np.percentile(v, 99)) for b in bands if (v := samples.get((target.id, b))) is not None
               and v.size >= 16]
        if p99 and max(p99) < MIN_P99:
            msg = (f"target {target.id}: every band's 99th percentile reflectance is below {MIN_P99} "
                   f"(max {max(p99):.4f}): implausibly dark, check the item's scale/offset")
            log.warning("%s", msg)
            warnings.append(msg)
    return warnings, complete


def band_swap(grids: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """``(share of pixels where the asset called B02 is NIR-like, same for B08)`` when B02 and B08 look swapped
    (module docstring), else None. ``grids``: band -> the item's reflectance sample (same shape, NaN nodata)."""
    if not all(b in grids for b in ("B02", "B03", "B04", "B08")):
        return None
    b2, b3, b4, b8 = (np.asarray(grids[b], np.float64) for b in ("B02", "B03", "B04", "B08"))
    ok = np.isfinite(b2) & np.isfinite(b3) & np.isfinite(b4) & np.isfinite(b8)
    if ok.sum() < 256:
        return None
    floor = np.maximum(SWAP_MIN, np.maximum(1.5 * b3, 2.0 * b4))
    blue = float((b2 > floor)[ok].mean())
    nir = float((b8 > floor)[ok].mean())
    if blue >= SWAP_MIN_SHARE and blue > SWAP_FACTOR * nir:
        return blue, nir
    return None
