"""Masks stage: cloud/shadow masks from the items' cloud layers, each method a separate function.

Pure numpy kernels (``*_kernel``) are separate from the lazy xarray wrappers; wrappers use ``map_overlap`` with a
depth equal to the morphology radius, so a tile's mask does not depend on where the chunk borders fall.

Every method yields a binary mask and a continuous cloud probability in [0, 1] (thin vs thick is kept, not only a
binary decision). Methods are combined with OR (mask) and max (probability).
"""

from __future__ import annotations

import logging
from functools import partial

import dask.array as dsa
import numpy as np
import xarray as xr
from scipy import ndimage

from pipeline.config import MaskConfig

log = logging.getLogger(__name__)


def disk(radius: int) -> np.ndarray:
    """A disk structuring element of the given radius (pixels)."""
    if radius <= 0:
        return np.ones((1, 1), bool)
    y, x = np.ogrid[-radius: radius + 1, -radius: radius + 1]
    return x * x + y * y <= radius * radius


def refine_kernel(mask: np.ndarray, closing: int, opening: int, dilation: int = 0) -> np.ndarray:
    """Morphological closing then opening (PhyVLM-CR paper, Fig. 3b), then optional dilation.

    Closing consolidates cloud regions, opening removes scattered pixels.
    """
    m = mask.astype(bool)
    if closing > 0:
        m = ndimage.binary_closing(m, disk(closing), border_value=0)
    if opening > 0:
        m = ndimage.binary_opening(m, disk(opening), border_value=0)
    if dilation > 0:
        m = ndimage.binary_dilation(m, disk(dilation))
    return m


def cldprb_kernel(prob_percent: np.ndarray, threshold: float, closing: int, opening: int, dilation: int) -> np.ndarray:
    """Sen2Cor MSK_CLDPRB (percent) -> refined binary mask. NaN (nodata) counts as not cloudy here."""
    raw = np.nan_to_num(prob_percent, nan=0.0) >= threshold
    return refine_kernel(raw, closing, opening, dilation)


def scl_kernel(scl: np.ndarray, classes: list[int], dilation: int) -> np.ndarray:
    """Sen2Cor SCL classes (default 3 shadow, 8/9 cloud, 10 cirrus) -> binary mask, dilated."""
    m = np.isin(np.nan_to_num(scl, nan=0).astype(np.int16), classes)
    return refine_kernel(m, 0, 0, dilation)


def scl_mask(scl: xr.DataArray, cfg: MaskConfig) -> tuple[xr.DataArray, xr.DataArray]:
    """Binary mask and a coarse probability from SCL ``(time, y, x)``: 1 for 8/9, 0.5 for 10 (thin), 0 otherwise."""
    mask = _lazy_2d(scl_kernel, scl, cfg.dilation + 1, bool, classes=list(cfg.scl_classes), dilation=cfg.dilation)
    prob = xr.where(scl.isin([8, 9]), 1.0, xr.where(scl == 10, 0.5, 0.0)).astype(np.float32)
    return mask.rename("cloud_mask"), prob.rename("cloud_prob")


def _per_plane(b: np.ndarray, *, func, dtype, kw: dict) -> np.ndarray:
    """Apply ``func`` to each trailing (y, x) plane of block ``b`` (module level: picklable for distributed)."""
    out = np.empty(b.shape, dtype)
    for idx in np.ndindex(b.shape[:-2]):
        out[idx] = func(b[idx], **kw)
    return out


def _lazy_2d(func, da: xr.DataArray, depth: int, dtype, **kw) -> xr.DataArray:
    """Apply a 2-D kernel to every (y, x) plane of ``da`` lazily, with a halo of ``depth`` pixels."""
    data = da.data
    if not isinstance(data, dsa.Array):
        data = dsa.from_array(data, chunks=(1,) * (data.ndim - 2) + (512, 512))
    depths = {i: 0 for i in range(data.ndim - 2)} | {data.ndim - 2: depth, data.ndim - 1: depth}

    res = dsa.map_overlap(partial(_per_plane, func=func, dtype=dtype, kw=kw), data, depth=depths, boundary="none",
                          dtype=dtype, trim=True)
    return xr.DataArray(res, dims=da.dims, coords=da.coords, name=da.name)


def cldprb_mask(prob_percent: xr.DataArray, cfg: MaskConfig) -> tuple[xr.DataArray, xr.DataArray]:
    """Binary mask and continuous probability (0-1) from a MSK_CLDPRB layer ``(time, y, x)`` in percent."""
    depth = cfg.closing_radius + cfg.opening_radius + cfg.dilation + 1
    mask = _lazy_2d(cldprb_kernel, prob_percent, depth, bool, threshold=cfg.cldprb_threshold,
                    closing=cfg.closing_radius, opening=cfg.opening_radius, dilation=cfg.dilation)
    prob = (prob_percent / 100.0).clip(0, 1).astype(np.float32)
    return mask.rename("cloud_mask"), prob.rename("cloud_prob")


def combine(masks: list[tuple[xr.DataArray, xr.DataArray]]) -> tuple[xr.DataArray, xr.DataArray]:
    """OR of binary masks, max of probabilities."""
    if not masks:
        raise ValueError("combine() needs at least one (mask, probability) pair")
    m, p = masks[0]
    for m2, p2 in masks[1:]:
        m = m | m2
        p = np.fmax(p, p2)
    return m, p


#: Asset keys that hold a Sen2Cor-like cloud probability (percent), in order of preference.
CLDPRB_ASSETS = ("CLDPRB", "MSK_CLDPRB", "CLD")


def build_masks(items, geobox, cfg: MaskConfig, chunk: int = 512) -> tuple[xr.DataArray, xr.DataArray]:
    """Cloud mask ``(time, y, x)`` bool and probability ``(time, y, x)`` 0-1 for ``items`` on ``geobox``.

    Raises :class:`pipeline.errors.InputDataError` naming the item and the fix when a method's layer is missing.
    """
    from pipeline.errors import InputDataError
    from stages.load import load_layer

    parts = []
    for method in cfg.methods:
        if method == "cldprb":
            key = next((k for k in CLDPRB_ASSETS if all(k in it.assets for it in items)), None)
            if key is None:
                lacking = [it.id for it in items if not any(k in it.assets for k in CLDPRB_ASSETS)]
                raise InputDataError(
                    f"items {lacking} carry no cloud-probability asset ({'/'.join(CLDPRB_ASSETS)}); "
                    "choose another mask.methods entry (e.g. 'scl' or 'spectral')"
                )
            parts.append(cldprb_mask(load_layer(items, key, geobox, chunk), cfg))
        elif method == "scl":
            scl = load_layer(items, "SCL", geobox, chunk)
            if scl is None:
                raise InputDataError(
                    f"items {[it.id for it in items]} carry no 'SCL' asset; drop 'scl' from mask.methods "
                    "or use 'cldprb' / 'spectral'"
                )
            parts.append(scl_mask(scl, cfg))
        else:
            extra = _EXTRA_METHODS.get(method)
            if extra is None:
                raise InputDataError(f"mask method {method!r} is not available in this build; use 'cldprb'")
            parts.append(extra(items, geobox, cfg, chunk))
    return combine(parts)


#: Other mask methods (scl, spectral, s2cloudless) register here: name -> f(items, geobox, cfg, chunk).
_EXTRA_METHODS: dict = {}


#: Bit of each mask method in the per-pixel mask-provenance layer (``<id>_mask_provenance.tif``); methods not
#: listed here get the next free bit (32, 64, 128) in the order of ``mask.methods``.
METHOD_BITS = {"cldprb": 1, "scl": 2, "spectral": 4, "s2cloudless": 8}
#: no valid target pixel (nodata, or an input read that failed).
NODATA_BIT = 16


def method_bits(methods) -> dict[str, int]:
    """``{method: bit}`` for the configured methods (see :data:`METHOD_BITS`)."""
    out, spare = {}, iter((32, 64, 128))
    for m in methods:
        out[m] = METHOD_BITS.get(m) or next(spare)
    return out


def build_mask_provenance(items, geobox, cfg: MaskConfig, chunk: int = 512) -> xr.DataArray:
    """Which method flagged each pixel: ``(time, y, x)`` uint8, OR of :func:`method_bits` per method.

    Each method's mask is built alone with :func:`build_masks` (same refinement as in the combined mask), so the
    OR of the bits equals the combined mask. Lazy.
    """
    bits = None
    for method, bit in method_bits(cfg.methods).items():
        m, _ = build_masks(items, geobox, cfg.model_copy(update={"methods": [method]}), chunk)
        b = m.astype(np.uint8) * np.uint8(bit)
        bits = b if bits is None else bits | b
    return bits.rename("mask_provenance")
