"""Clouds and shadows the mask missed: a multi-temporal test of the target against its clear references.

A mask from the product (SCL, MSK_CLDPRB) misses cloud: on the real Romania stack Sen2Cor calls the bright core of
the 2019-06-11 and 2019-06-21 clouds *snow* (SCL 11, B02 ~ 0.7-1.05 over a forest whose clear dates have B02 ~
0.02), and a model that trusts those pixels as "clear" passes them through and fits its alignment on them. The
multi-temporal cloud tests of MAJA (Hagolle et al. 2010: the blue reflectance increase against the latest
cloud-free composite), Fmask/Tmask (Zhu & Woodcock 2014: the change against a clear-sky time series) and FORCE's
use of both catch such pixels because a cloud is brighter than *every* clear observation of the same place, in the
cirrus-free visible bands, and a cloud shadow darker in the near and short-wave infrared.

This module applies that test to the pixels the mask calls clear (:func:`missed_cloud_kernel`, pure numpy):

* **cloud**: blue (B02) above every clear, finite reference by more than ``cloud_margin`` (reflectance) and more
  than ``cloud_ratio`` times that maximum, with a second visible band (B04, else B03) above its reference
  maximum by ``cloud_margin`` too, and the blue increase at least ``blue_red_balance`` times the red increase
  (cloud and haze are white or bluish; bare soil after a harvest brightens red more than blue); snow (NDSI >=
  ``snow_ndsi`` with B11 <= ``snow_swir``, and B03 >= ``snow_green`` or snow in a clear reference at the pixel:
  a real snowfall) is left alone;
* **shadow**: the near infrared (B08, else B8A) and B11 (when present) below ``shadow_ratio`` times, and by more
  than ``shadow_margin`` below, every clear reference, with blue not brighter than the references (a shadow
  darkens all bands), and within ``shadow_distance`` pixels of a cloud (the mask's or a missed one): a flooded
  field far from any cloud is land-cover change, not shadow;
* isolated flags are removed (opening, radius 1) and the rest dilated by ``dilation`` pixels, as the mask stage
  dilates its own mask.

Pixels with no clear reference are never flagged (the test has nothing to compare with). Deviation from MAJA: the
test compares with every clear reference of the tile (the ones the model will use), not with a composite
updated date by date, and there is no correlation (texture) test; the whiteness and snow conditions take its place
for the changes this pipeline meets (harvest, snow).

:func:`apply_to_tile` adds the flags to a :class:`~cloudfree.pipeline.contract.TileInputs` (the evaluation and the
scene-context sample use it); :func:`missed_cloud_lazy` is the lazy, chunk-independent form the runner uses.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

#: cirrus-free visible bands of the cloud test, in order of preference for the second band.
BLUE = "B02"
SECOND_VISIBLE = ("B04", "B03")
NIR = ("B08", "B8A")
SWIR = "B11"
GREEN = "B03"


@dataclass(frozen=True)
class MissedCloudParams:
    """Thresholds of the multi-temporal test (reflectance 0-1); see the module docstring."""

    cloud_margin: float = 0.04
    cloud_ratio: float = 1.5
    blue_red_balance: float = 0.7
    snow_ndsi: float = 0.4
    snow_swir: float = 0.12
    snow_green: float = 0.35
    shadow_ratio: float = 0.6
    shadow_margin: float = 0.04
    shadow_distance: int = 64
    opening: int = 1
    dilation: int = 2

    @property
    def halo(self) -> int:
        """Pixels of context a block needs for a result independent of where the blocks end."""
        return self.opening * 2 + self.dilation + self.shadow_distance + 1


def _band(bands: Sequence[str], names) -> int | None:
    names = (names,) if isinstance(names, str) else names
    for n in names:
        if n in bands:
            return list(bands).index(n)
    return None


def raw_flags(target: np.ndarray, cloud_mask: np.ndarray, references: np.ndarray, reference_valid: np.ndarray,
              bands: Sequence[str], p: MissedCloudParams = MissedCloudParams()) -> np.ndarray:
    """Per-pixel test, no morphology: ``(y, x)`` uint8, 1 = missed cloud, 2 = candidate shadow, 0 = neither.

    Args:
        target: ``(band, y, x)`` reflectance; cloud_mask: ``(y, x)`` the mask's cloud/shadow (never re-flagged);
        references: ``(time, band, y, x)``; reference_valid: ``(time, y, x)`` clear (by their own masks).
    """
    out = np.zeros(cloud_mask.shape, np.uint8)
    ib = _band(bands, BLUE)
    if ib is None or references.shape[0] == 0:
        return out
    ok = np.asarray(reference_valid, bool) & np.isfinite(references).all(axis=1)
    has_ref = ok.any(axis=0)
    cand = ~np.asarray(cloud_mask, bool) & np.isfinite(target).all(axis=0) & has_ref
    if not cand.any():
        return out

    def env(i: int, fn) -> np.ndarray:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN where no reference is clear
            return fn(np.where(ok, references[:, i], np.nan), axis=0)

    t_blue, ref_blue = target[ib], env(ib, np.nanmax)
    cloud = (t_blue > ref_blue + p.cloud_margin) & (t_blue > p.cloud_ratio * ref_blue)
    iv = _band(bands, SECOND_VISIBLE)
    if iv is not None:
        ref_v = env(iv, np.nanmax)
        d_v = target[iv] - ref_v
        cloud &= d_v > p.cloud_margin
        cloud &= (t_blue - ref_blue) >= p.blue_red_balance * d_v
    ig, isw = _band(bands, GREEN), _band(bands, SWIR)
    if ig is not None and isw is not None:
        with np.errstate(all="ignore"):
            ndsi = (target[ig] - target[isw]) / (target[ig] + target[isw])
            ref_ndsi = (references[:, ig] - references[:, isw]) / (references[:, ig] + references[:, isw])
        ref_snow = (ok & (ref_ndsi >= p.snow_ndsi) & (references[:, isw] <= p.snow_swir)).any(axis=0)
        # snow-like and either bright as snow is or snowy in a clear reference (thin ice cloud at a cloud's edge
        # is snow-like too: on 2019-06-21 in Romania, B02 0.2, NDSI 0.47)
        snow = (ndsi >= p.snow_ndsi) & (target[isw] <= p.snow_swir) & ((target[ig] >= p.snow_green) | ref_snow)
        cloud &= ~snow
    out[cand & cloud] = 1
    inir = _band(bands, NIR)
    if inir is not None:
        dark = t_blue <= env(ib, np.nanmax)
        for i in (inir, isw):
            if i is None:
                continue
            lo = env(i, np.nanmin)
            dark &= (target[i] < p.shadow_ratio * lo) & (target[i] < lo - p.shadow_margin)
        out[cand & dark & ~cloud] = 2
    return out


def refine_flags(flags: np.ndarray, cloud_mask: np.ndarray, p: MissedCloudParams = MissedCloudParams()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Raw flags -> ``(cloud, shadow)`` bool: isolated flags removed, shadows kept near a cloud, both dilated
    (the dilation never re-flags what the mask already has)."""
    from cloudfree.stages.masks import disk

    cloud, shadow = flags == 1, flags == 2
    if p.opening > 0:
        cloud = ndimage.binary_opening(cloud, disk(p.opening))
        shadow = ndimage.binary_opening(shadow, disk(p.opening))
    if shadow.any():
        clouds = np.asarray(cloud_mask, bool) | cloud
        if clouds.any():
            near = ndimage.distance_transform_edt(~clouds) <= p.shadow_distance
            shadow &= near
        else:
            shadow[:] = False
    if p.dilation > 0:
        free = ~np.asarray(cloud_mask, bool)
        cloud = ndimage.binary_dilation(cloud, disk(p.dilation)) & free
        shadow = ndimage.binary_dilation(shadow, disk(p.dilation)) & free & ~cloud
    return cloud, shadow


def missed_cloud_kernel(target: np.ndarray, cloud_mask: np.ndarray, references: np.ndarray,
                        reference_valid: np.ndarray, bands: Sequence[str],
                        p: MissedCloudParams = MissedCloudParams()) -> tuple[np.ndarray, np.ndarray]:
    """``(cloud, shadow)`` bool ``(y, x)``: pixels the mask calls clear that the multi-temporal test flags."""
    return refine_flags(raw_flags(target, cloud_mask, references, reference_valid, bands, p), cloud_mask, p)


def reference_flags(references: np.ndarray, reference_masks: np.ndarray, bands: Sequence[str],
                    p: MissedCloudParams = MissedCloudParams()) -> np.ndarray:
    """``(time, y, x)`` bool: pixels of each reference its own mask calls clear but that are cloud or shadow by the
    same test against the *other* references (leave one out; needs at least two references)."""
    n = references.shape[0]
    out = np.zeros(reference_masks.shape, bool)
    if n < 2:
        return out
    valid = ~np.asarray(reference_masks, bool)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        c, s = missed_cloud_kernel(references[i], reference_masks[i], references[others], valid[others], bands, p)
        out[i] = c | s
    return out


def apply_to_tile(tile, p: MissedCloudParams = MissedCloudParams()):
    """``tile`` (a :class:`~cloudfree.pipeline.contract.TileInputs`) with the missed cloud and shadow added to its
    masks: the target's cloud mask (cloud probability 1 for a missed cloud, as SCL 8/9), and each reference's mask
    (tested against the other references). Returns ``(tile, share)`` with ``share`` the share of the target's
    pixels added. What the runner does lazily (:func:`missed_cloud_lazy`), for the evaluation and for the
    scene-context sample."""
    refs, rmask = tile.references, tile.reference_masks
    if refs.shape[0] == 0:
        return tile, 0.0
    ref_extra = reference_flags(refs, rmask, tile.bands, p)
    rmask = rmask | ref_extra
    cloud, shadow = missed_cloud_kernel(tile.target, tile.cloud_mask, refs, ~rmask, tile.bands, p)
    added = cloud | shadow
    prob = np.where(cloud, np.float32(1.0), tile.cloud_prob).astype(np.float32)
    out = dataclasses.replace(tile, cloud_mask=tile.cloud_mask | added, cloud_prob=prob, reference_masks=rmask)
    return out, float(added.mean()) if added.size else 0.0


# -- lazy (the runner) ------------------------------------------------------------------------------------------------
def _raw_block(target, mask, refs, rmask, bands, params):
    """One spatial block -> ``(1 + time, y, x)`` uint8: raw codes of the target then of each reference (leave one
    out), plus 4 where that image's own mask is set (what :func:`_refine_block` needs)."""
    p = MissedCloudParams(**params)
    n = refs.shape[0]
    out = np.zeros((1 + n,) + mask.shape, np.uint8)
    valid = ~rmask
    ref_raw = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        raw = raw_flags(refs[i], rmask[i], refs[others], valid[others], bands, p) if n > 1 else \
            np.zeros(mask.shape, np.uint8)
        ref_raw.append(raw)
        out[1 + i] = raw | (rmask[i].astype(np.uint8) << 2)
    out[0] = raw_flags(target, mask, refs, valid, bands, p) | (mask.astype(np.uint8) << 2)
    return out


def _refine_block(block, params):
    """``(1 + time, y, x)`` codes (halo-padded) -> bits: 1 missed cloud, 2 missed shadow."""
    p = MissedCloudParams(**params)
    out = np.zeros(block.shape, np.uint8)
    for i in range(block.shape[0]):
        own = (block[i] & 4) > 0
        c, s = refine_flags(block[i] & 3, own, p)
        out[i] = c.astype(np.uint8) | (s.astype(np.uint8) << 1)
    return out


def missed_cloud_lazy(target, cloud_mask, references, reference_masks, p: MissedCloudParams = MissedCloudParams()):
    """Lazy missed cloud/shadow of the target and the references: ``(1 + time, y, x)`` uint8 DataArray, bits 1 =
    missed cloud, 2 = missed shadow; plane 0 the target, plane ``1 + i`` reference ``i``.

    Known limitation: the references are tested against each other before their own missed cloud is removed
    (one pass), and the target against the references' own masks only; :func:`apply_to_tile` removes the
    references' missed cloud first. Independent of where the chunks end (halo :attr:`MissedCloudParams.halo`)."""
    import dask.array as dsa
    import xarray as xr

    bands = tuple(str(b) for b in target.band.values)
    params = dataclasses.asdict(p)
    if all(isinstance(a.data, np.ndarray) for a in (target, cloud_mask, references, reference_masks)):
        # in memory (a small target): one block, as dask would run it on one chunk (no halo at the array's edges)
        raw = _raw_block(np.asarray(target.data), np.asarray(cloud_mask.data), np.asarray(references.data),
                         np.asarray(reference_masks.data).astype(bool), bands=bands, params=params)
        return xr.DataArray(_refine_block(raw, params=params), dims=("image", "y", "x"),
                            coords={"y": target.y, "x": target.x}, name="missed_cloud")
    t = target.data if isinstance(target.data, dsa.Array) else dsa.from_array(np.asarray(target.data))
    t = t.rechunk({0: -1})
    ys, xs = t.chunks[1], t.chunks[2]
    m = dsa.asarray(cloud_mask.data).rechunk((ys, xs))
    r = dsa.asarray(references.data).rechunk((-1, -1, ys, xs))
    rm = dsa.asarray(reference_masks.data).astype(bool).rechunk((-1, ys, xs))
    n = r.shape[0]
    raw = dsa.blockwise(_raw_block, "tyx", t, "byx", m, "yx", r, "sbyx", rm, "syx", new_axes={"t": 1 + n},
                        concatenate=True, dtype=np.uint8, bands=bands, params=params)
    d = p.halo
    flags = dsa.map_overlap(_refine_block, raw, depth={0: 0, 1: d, 2: d}, boundary="none", trim=True,
                            dtype=np.uint8, params=params)
    return xr.DataArray(flags, dims=("image", "y", "x"), coords={"y": target.y, "x": target.x},
                        name="missed_cloud")


#: bit of the missed cloud/shadow in the output's mask-provenance layer (the mask methods use 1/2/4/8, nodata 16).
MISSED_BIT = 32


def add_missed_cloud(target, cloud_mask, cloud_prob, references, reference_masks,
                     p: MissedCloudParams = MissedCloudParams()):
    """The runner's step: ``(cloud_mask, cloud_prob, reference_masks, missed)`` with the missed cloud and shadow
    added (lazy DataArrays; ``missed`` ``(y, x)`` bool, the target pixels the test added). Missed cloud gets cloud
    probability 1 (as SCL 8/9), a missed shadow keeps the mask's probability (as SCL 3)."""
    import dask.array as dsa

    flags = missed_cloud_lazy(target, cloud_mask, references, reference_masks, p)
    t = flags.data[0]
    if isinstance(flags.data, np.ndarray) and isinstance(cloud_prob.data, np.ndarray):  # a small target, eagerly
        missed = cloud_mask.copy(data=t > 0).rename("missed_cloud")
        mask = cloud_mask.copy(data=np.asarray(cloud_mask.data) | (t > 0))
        prob = cloud_prob.copy(data=np.where((t & 1) > 0, np.float32(1.0), cloud_prob.data).astype(np.float32))
        rmask = reference_masks.copy(data=np.asarray(reference_masks.data).astype(bool) | (flags.data[1:] > 0))
        return mask, prob, rmask, missed
    missed = cloud_mask.copy(data=t > 0).rename("missed_cloud")
    mask = cloud_mask.copy(data=dsa.asarray(cloud_mask.data) | (t > 0))
    prob = cloud_prob.copy(data=dsa.where((t & 1) > 0, np.float32(1.0), dsa.asarray(cloud_prob.data)).astype(np.float32))
    rmask = reference_masks.copy(data=dsa.asarray(reference_masks.data).astype(bool) | (flags.data[1:] > 0))
    return mask, prob, rmask, missed
