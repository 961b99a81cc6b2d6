"""Masks stage: cloud/shadow masks from the items' cloud layers, each method a separate function.

Pure numpy kernels (``*_kernel``) are separate from the lazy xarray wrappers; wrappers use ``map_overlap`` with a
depth equal to the morphology radius, so a tile's mask does not depend on where the chunk borders fall.

Every method yields a binary mask and a continuous cloud probability in [0, 1] (thin vs thick is kept, not only a
binary decision). Methods are combined with OR (mask) and max (probability).

Refinement of a thresholded mask (``cldprb``, ``spectral``; :func:`refine_kernel`), ``mask.refinement``:

* ``paper``: closing then opening (PhyVLM-CR, Fig. 3b), then dilation. The opening deletes every flagged blob
  smaller than its disk, however certain: isolated cumulus and cloud edges broken by the threshold leave the mask,
  and the dilation cannot bring back a blob that no longer exists (issue 24: on 16 real Romania targets with an
  exact binary layer, 37.3 dB under thick cloud instead of 42.2 dB with the exact mask);
* ``weak-opening`` (deviation from the paper): the opening removes only flagged pixels whose probability is below
  ``mask.opening_keep_prob`` (0.65: Sen2Cor's boundary between medium and high cloud probability), so a
  confidently flagged speck stays cloud; weak isolated specks (bright soil, noise) are still removed;
* ``closing-only``: no opening (closing and dilation only).

A flagged pixel that the opening removed is never passed on as clear: every mask builder also returns the
``opened`` layer (flagged by the threshold, not in the refined mask); the runner writes such target pixels with
their own source code (``SOURCE_OPENED``, confidence ``1 - probability``) and records their share in the item
(``cloudfree:mask_refinement``); composites never take them as clear observations. See docs/masks.md for the
measured precision and recall of each refinement and the computed default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import dask.array as dsa
import numpy as np
import xarray as xr
from scipy import ndimage

from cloudfree.pipeline.config import MaskConfig

log = logging.getLogger(__name__)


def disk(radius: int) -> np.ndarray:
    """A disk structuring element of the given radius (pixels)."""
    if radius <= 0:
        return np.ones((1, 1), bool)
    y, x = np.ogrid[-radius: radius + 1, -radius: radius + 1]
    return x * x + y * y <= radius * radius


#: :func:`mask_codes` values: not flagged, in the refined mask, flagged by the threshold but removed by the opening.
CODE_CLEAR, CODE_CLOUD, CODE_OPENED = 0, 1, 2
#: ``mask.refinement`` values (module docstring).
REFINEMENTS = ("weak-opening", "paper", "closing-only")


def refine_kernel(mask: np.ndarray, closing: int, opening: int, dilation: int = 0,
                  keep: np.ndarray | None = None) -> np.ndarray:
    """Morphological closing then opening (PhyVLM-CR paper, Fig. 3b), then optional dilation.

    Closing consolidates cloud regions, opening removes scattered pixels. ``keep`` (bool, same shape): flagged
    pixels the opening must not remove (``weak-opening``: the confidently flagged ones); None = the paper's
    opening of every pixel.
    """
    m = mask.astype(bool)
    if closing > 0:  # | m: a closing never removes a pixel (scipy's erosion step would at the image border)
        m = ndimage.binary_closing(m, disk(closing), border_value=0) | m
    if opening > 0:
        opened = ndimage.binary_opening(m, disk(opening), border_value=0)
        m = opened | (m & keep) if keep is not None else opened
    if dilation > 0:
        m = ndimage.binary_dilation(m, disk(dilation))
    return m


def refinement_params(cfg: MaskConfig) -> dict:
    """``closing``/``opening``/``dilation`` radii and ``keep_prob`` (probability 0-1 that the opening never removes;
    None: it removes any) of ``cfg.refinement`` for :func:`mask_codes`."""
    opening = 0 if cfg.refinement == "closing-only" else cfg.opening_radius
    keep = cfg.opening_keep_prob if cfg.refinement == "weak-opening" else None
    return {"closing": cfg.closing_radius, "opening": opening, "dilation": cfg.dilation, "keep_prob": keep}


def mask_codes(raw: np.ndarray, prob: np.ndarray | None, closing: int, opening: int, dilation: int,
               keep_prob: float | None = None) -> np.ndarray:
    """Thresholded ``raw`` mask -> uint8 :data:`CODE_CLEAR` / :data:`CODE_CLOUD` (refined mask) /
    :data:`CODE_OPENED` (flagged by the threshold, removed by the opening). With ``keep_prob``, flagged pixels
    whose probability ``prob`` (0-1) is at least ``keep_prob`` are never opened away."""
    keep = None
    if keep_prob is not None and opening > 0:
        keep = raw & (np.nan_to_num(prob, nan=0.0) >= keep_prob) if prob is not None else raw
    m = refine_kernel(raw, closing, opening, dilation, keep)
    return np.where(m, np.uint8(CODE_CLOUD), np.where(raw, np.uint8(CODE_OPENED), np.uint8(CODE_CLEAR)))


def cldprb_codes(prob_percent: np.ndarray, threshold: float, closing: int, opening: int, dilation: int,
                 keep_prob: float | None = None) -> np.ndarray:
    """Sen2Cor MSK_CLDPRB (percent) -> :func:`mask_codes`. NaN (nodata) counts as not cloudy here."""
    p = np.nan_to_num(prob_percent, nan=0.0)
    return mask_codes(p >= threshold, p / 100.0, closing, opening, dilation, keep_prob)


def cldprb_kernel(prob_percent: np.ndarray, threshold: float, closing: int, opening: int, dilation: int,
                  keep_prob: float | None = None) -> np.ndarray:
    """Sen2Cor MSK_CLDPRB (percent) -> refined binary mask (:func:`cldprb_codes` == cloud)."""
    return cldprb_codes(prob_percent, threshold, closing, opening, dilation, keep_prob) == CODE_CLOUD


def scl_kernel(scl: np.ndarray, classes: list[int], dilation: int) -> np.ndarray:
    """Sen2Cor SCL classes (default 3 shadow, 8/9 cloud, 10 cirrus) -> binary mask, dilated."""
    m = np.isin(np.nan_to_num(scl, nan=0).astype(np.int16), classes)
    return refine_kernel(m, 0, 0, dilation)


def scl_mask(scl: xr.DataArray, cfg: MaskConfig) -> tuple[xr.DataArray, xr.DataArray]:
    """Binary mask and a coarse probability from SCL ``(time, y, x)``: 1 for 8/9, 0.5 for 10 (thin), 0 otherwise."""
    mask = _lazy_2d(scl_kernel, scl, cfg.dilation + 1, bool, classes=list(cfg.scl_classes), dilation=cfg.dilation)
    if isinstance(scl.data, np.ndarray):  # eager loads (a small target): element-wise, the same values at once
        return mask.rename("cloud_mask"), scl.copy(data=scl_prob_kernel(scl.data)).rename("cloud_prob")
    data = scl.data if isinstance(scl.data, dsa.Array) else dsa.from_array(scl.data)
    prob = scl.copy(data=data.map_blocks(scl_prob_kernel, dtype=np.float32))  # one task per block
    return mask.rename("cloud_mask"), prob.rename("cloud_prob")


def scl_prob_kernel(scl: np.ndarray) -> np.ndarray:
    """SCL classes -> cloud probability: 1 for 8/9 (medium/high cloud), 0.5 for 10 (thin cirrus), else 0 (NaN
    nodata too)."""
    return np.where(np.isin(scl, (8, 9)), np.float32(1.0), np.where(scl == 10, np.float32(0.5), np.float32(0.0)))


def _per_plane(b: np.ndarray, *, func, dtype, kw: dict) -> np.ndarray:
    """Apply ``func`` to each trailing (y, x) plane of block ``b`` (module level: picklable for distributed)."""
    out = np.empty(b.shape, dtype)
    for idx in np.ndindex(b.shape[:-2]):
        out[idx] = func(b[idx], **kw)
    return out


def _lazy_2d(func, da: xr.DataArray, depth: int, dtype, **kw) -> xr.DataArray:
    """Apply a 2-D kernel to every (y, x) plane of ``da`` lazily, with a halo of ``depth`` pixels.

    A numpy ``da`` (eager loads of a small target) whose planes fit in one 512 x 512 block: the kernel on each whole
    plane now, as ``map_overlap`` would run it on that one block (boundary none: no padding, nothing trimmed)."""
    data = da.data
    if isinstance(data, np.ndarray) and data.shape[-2] <= 512 and data.shape[-1] <= 512:
        return xr.DataArray(_per_plane(data, func=func, dtype=dtype, kw=kw), dims=da.dims, coords=da.coords,
                            name=da.name)
    if not isinstance(data, dsa.Array):
        data = dsa.from_array(data, chunks=(1,) * (data.ndim - 2) + (512, 512))
    depths = {i: 0 for i in range(data.ndim - 2)} | {data.ndim - 2: depth, data.ndim - 1: depth}

    res = dsa.map_overlap(partial(_per_plane, func=func, dtype=dtype, kw=kw), data, depth=depths, boundary="none",
                          dtype=dtype, trim=True)
    return xr.DataArray(res, dims=da.dims, coords=da.coords, name=da.name)


def refine_halo(cfg: MaskConfig) -> int:
    """Pixels of context the refinement of one pixel depends on (closing + opening + dilation radii, + 1)."""
    return cfg.closing_radius + cfg.opening_radius + cfg.dilation + 1


def _split_codes(codes: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    return (codes == CODE_CLOUD).rename("cloud_mask"), (codes == CODE_OPENED).rename("opened")


def cldprb_mask(prob_percent: xr.DataArray, cfg: MaskConfig, with_opened: bool = False):
    """Binary mask and continuous probability (0-1) from a MSK_CLDPRB layer ``(time, y, x)`` in percent (and,
    with ``with_opened``, the pixels the refinement's opening removed)."""
    codes = _lazy_2d(cldprb_codes, prob_percent, refine_halo(cfg), np.uint8, threshold=cfg.cldprb_threshold,
                     **refinement_params(cfg))
    mask, opened = _split_codes(codes)
    prob = (prob_percent / 100.0).clip(0, 1).astype(np.float32).rename("cloud_prob")
    return (mask, prob, opened) if with_opened else (mask, prob)


def combine(masks: list[tuple]) -> tuple:
    """OR of binary masks, max of probabilities (lazy DataArrays, or numpy arrays inside a task): the one
    combination of the lazy mask stage and the in-task masks (:class:`LayerMask`, pipeline.composite).

    Entries are ``(mask, prob)`` or ``(mask, prob, opened)`` (``opened`` may be None: the method has no
    opening). With any triple the result is ``(mask, prob, opened)``, ``opened`` = OR of the methods' opened
    pixels that no method kept in its mask (None when no method opened anything)."""
    if not masks:
        raise ValueError("combine() needs at least one (mask, probability) pair")
    triples = any(len(x) == 3 for x in masks)
    m, p = masks[0][:2]
    o = masks[0][2] if len(masks[0]) == 3 else None
    for entry in masks[1:]:
        m2, p2 = entry[:2]
        o2 = entry[2] if len(entry) == 3 else None
        m = m | m2
        p = np.fmax(p, p2)
        if o2 is not None:
            o = o2 if o is None else o | o2
    if not triples:
        return m, p
    return m, p, (None if o is None else o & ~m)


#: Asset keys that hold a Sen2Cor-like cloud probability (percent), in order of preference.
CLDPRB_ASSETS = ("CLDPRB", "MSK_CLDPRB", "CLD")


def build_masks(items, geobox, cfg: MaskConfig, chunk: int = 512) -> tuple[xr.DataArray, xr.DataArray]:
    """Cloud mask ``(time, y, x)`` bool and probability ``(time, y, x)`` 0-1 for ``items`` on ``geobox``.

    Raises :class:`cloudfree.pipeline.errors.InputDataError` naming the item and the fix when a method's layer is missing.
    """
    mask, prob, _ = build_masks_by_method(items, geobox, cfg, chunk)
    return mask, prob


def auto_method(items) -> str:
    """The mask method ``auto`` stands for with these items: ``scl`` when every item carries an SCL asset, else
    ``cldprb`` when every item carries a Sen2Cor-like cloud probability (:data:`CLDPRB_ASSETS`: CLD, MSK_CLDPRB),
    else ``spectral`` (needs only the reflectance bands). Planetary Computer and Earth Search items carry SCL;
    Sentinel Hub serves SCL and CLD; other catalogs may carry neither."""
    if items and all("SCL" in it.assets for it in items):
        return "scl"
    if items and any(all(k in it.assets for it in items) for k in CLDPRB_ASSETS):
        return "cldprb"
    return "spectral"


def resolve_methods(items, methods) -> list[str]:
    """``methods`` with ``auto`` replaced by :func:`auto_method` of ``items`` (duplicates dropped, order kept)."""
    out = [auto_method(items) if m == "auto" else m for m in methods]
    return list(dict.fromkeys(out))


def resolved(items, cfg: MaskConfig) -> MaskConfig:
    """``cfg`` with its methods resolved for ``items`` (itself when nothing is ``auto``)."""
    if "auto" not in cfg.methods:
        return cfg
    return cfg.model_copy(update={"methods": resolve_methods(items, cfg.methods)})


def mask_inputs(items, cfg: MaskConfig) -> list[str]:
    """The asset keys the (resolved) mask methods read from ``items`` (what a backend that fetches assets on
    demand, Sentinel Hub, must fetch besides the output bands)."""
    keys: list[str] = []
    for method in resolved(items, cfg).methods:
        if method == "scl":
            keys.append("SCL")
        elif method == "cldprb":
            keys += [next((k for k in CLDPRB_ASSETS if all(k in it.assets for it in items)), "CLD")]
        elif method == "spectral":
            keys += [*SPECTRAL_REQUIRED, *SPECTRAL_OPTIONAL]
        elif method == "s2cloudless":
            keys += list(S2CLOUDLESS_BANDS)
    return list(dict.fromkeys(keys))


def build_masks_by_method(items, geobox, cfg: MaskConfig, chunk: int = 512):
    """:func:`build_masks` plus each method's own binary mask ``{method: (time, y, x)}`` (for mask provenance),
    all from one read of each layer."""
    layers = build_mask_layers(items, geobox, cfg, chunk)
    return layers.mask, layers.prob, layers.by_method


@dataclass
class MaskLayers:
    """Everything the mask stage yields for ``(time, y, x)``: the combined mask and probability, each method's own
    mask, and ``opened``: flagged pixels the refinement's opening removed from the mask (never a clear
    observation; all False when no method opens)."""

    mask: xr.DataArray
    prob: xr.DataArray
    by_method: dict
    opened: xr.DataArray

    @property
    def cloudy(self) -> xr.DataArray:
        """Not a clear observation: masked, or opened by the refinement (the in-task path, :func:`in_task_masks`,
        returns the same combination)."""
        return self.mask | self.opened


def build_mask_layers(items, geobox, cfg: MaskConfig, chunk: int = 512) -> MaskLayers:
    """:func:`build_masks_by_method` with the ``opened`` layer (:class:`MaskLayers`). ``auto`` is resolved for
    ``items`` (:func:`auto_method`)."""
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages.load import load_layer

    cfg = resolved(items, cfg)
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
            parts.append(cldprb_mask(load_layer(items, key, geobox, chunk), cfg, with_opened=True))
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
    mask, prob, opened = combine([(*part[:2], part[2] if len(part) == 3 else None) for part in parts])
    if opened is None:
        opened = xr.zeros_like(mask, dtype=bool)
    return MaskLayers(mask, prob, {m: part[0] for m, part in zip(cfg.methods, parts)}, opened.rename("opened"))


# -- masks computed inside the consumer task -------------------------------------------------------------------
@dataclass(frozen=True)
class LayerMask:
    """A mask method that is a kernel of one class/probability layer plus morphology (``scl``, ``cldprb``): the
    task that needs the mask of a block can compute it itself from a window of the layer ``halo`` pixels wider
    than the block (what ``map_overlap`` would give the kernel), so no per-block mask, probability or overlap
    piece waits in memory for its consumer (``cloudfree.pipeline.composite``: the composite's memory stays flat)."""

    method: str
    asset: str
    halo: int
    #: odc-stac read dtype: uint8 for SCL (class 0 is its nodata, as NaN was), float32 (NaN nodata) for CLDPRB.
    dtype: str
    params: tuple

    def __call__(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``window`` ``(..., y, x)`` of the layer -> ``(mask bool, prob float32, opened bool or None)`` over the
        same window (exact ``halo`` pixels inside its edges, unless the edge is the grid's)."""
        kw = dict(self.params)
        if self.method == "scl":
            mask = _per_plane(window, func=scl_kernel, dtype=bool, kw=kw)
            return mask, scl_prob_kernel(window), None
        codes = _per_plane(window, func=cldprb_codes, dtype=np.uint8, kw=kw)
        return codes == CODE_CLOUD, np.clip(window / np.float32(100.0), 0, 1).astype(np.float32), codes == CODE_OPENED


def in_task_masks(specs, windows, core: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masks stage inside a consumer task: each :class:`LayerMask` of ``specs`` on its layer window (``windows``,
    in the same order, each ``halo`` pixels wider than the block), cut to the block (``core``: its slices inside
    the window), combined by :func:`combine` like the lazy path. Returns ``(cloudy, prob, opened)`` with
    ``cloudy`` = mask OR opened (an opened speck is never a clear observation)."""
    ys, xs = core
    results = []
    for spec, window in zip(specs, windows):
        m, p, o = spec(window)
        results.append((m[..., ys, xs], p[..., ys, xs], None if o is None else o[..., ys, xs]))
    mask, prob, opened = combine(results)
    return (mask if opened is None else mask | opened), prob, opened


def layer_masks(items, cfg: MaskConfig) -> list[LayerMask] | None:
    """``cfg.methods`` as :class:`LayerMask` (same kernels, halos and combination as :func:`build_masks`), or None
    when a method is not a per-layer kernel (``spectral``, ``s2cloudless``) or an item lacks the layer: the caller
    then uses :func:`build_masks`."""
    cfg = resolved(items, cfg)
    out = []
    for method in cfg.methods:
        if method == "scl":
            if not all("SCL" in it.assets for it in items):
                return None
            out.append(LayerMask("scl", "SCL", cfg.dilation + 1, "uint8",
                                 (("classes", tuple(cfg.scl_classes)), ("dilation", cfg.dilation))))
        elif method == "cldprb":
            key = next((k for k in CLDPRB_ASSETS if all(k in it.assets for it in items)), None)
            if key is None:
                return None
            out.append(cldprb_layer_mask(key, cfg))
        else:
            return None
    return out or None


def cldprb_layer_mask(asset: str, cfg: MaskConfig) -> LayerMask:
    """The ``cldprb`` method of ``cfg`` as a :class:`LayerMask` of the layer ``asset`` (also what the evaluation's
    mask-induced loss puts an exact layer through)."""
    params = {"threshold": cfg.cldprb_threshold, **refinement_params(cfg)}
    return LayerMask("cldprb", asset, refine_halo(cfg), "float32", tuple(params.items()))


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


def mask_provenance(by_method: dict[str, xr.DataArray], methods) -> xr.DataArray:
    """Which method flagged each pixel: uint8, OR of :func:`method_bits` over ``by_method`` (lazy)."""
    bits = None
    if all(isinstance(v.data, np.ndarray) for v in by_method.values()):  # in memory: numpy, then one DataArray
        first = None
        for method, bit in method_bits(methods).items():
            first = by_method[method] if first is None else first
            b = by_method[method].data.astype(np.uint8) * np.uint8(bit)
            bits = b if bits is None else bits | b
        return first.copy(data=bits).rename("mask_provenance")
    for method, bit in method_bits(methods).items():
        b = by_method[method].astype(np.uint8) * np.uint8(bit)
        bits = b if bits is None else bits | b
    return bits.rename("mask_provenance")


# -- spectral cloud score (Sen2Cor-style, cloud-attentive SAR-optical fusion paper, eqs. 13-16) ----------------------
#: ``(bands, lo, hi)`` of the score terms: each term is ``rescale(sum of bands, lo, hi)``, the score is their min.
#: Clouds are bright in blue (B02), in coastal aerosol (B01) and cirrus (B01 + B10), and in all visible bands.
SPECTRAL_TERMS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("B02",), 0.1, 0.5),
    (("B01",), 0.1, 0.3),
    (("B01", "B10"), 0.15, 0.2),
    (("B04", "B03", "B02"), 0.2, 0.8),
)
#: bands the score cannot do without (the NDSI snow test needs B03 and B11).
SPECTRAL_REQUIRED = ("B02", "B03", "B04", "B11")
SPECTRAL_OPTIONAL = ("B01", "B10")


def rescale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear ramp: 0 at ``lo``, 1 at ``hi``, clipped (``hi < lo`` gives a decreasing ramp)."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def ndsi_kernel(green: np.ndarray, swir: np.ndarray) -> np.ndarray:
    """Normalised Difference Snow Index ``(B03 - B11) / (B03 + B11)`` (eq. 15); NaN where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (green - swir) / (green + swir)


def spectral_score_kernel(refl: dict[str, np.ndarray], snow_ndsi: float = 0.6) -> np.ndarray:
    """Continuous cloud score ``S_c`` in [0, 1] (eq. 13) with snow (NDSI >= ``snow_ndsi``, eq. 16) set to 0.

    ``refl`` maps band names to TOA (or BOA) reflectance arrays of one shape. Terms whose bands are missing are
    skipped (B01/B10: L2A has no B10, some sensors no B01), so the score degrades to the blue and visible tests.
    NaN input gives NaN.
    """
    missing = [b for b in SPECTRAL_REQUIRED if b not in refl]
    if missing:
        raise KeyError(f"spectral cloud score needs bands {missing}")
    score = np.ones_like(refl["B02"], dtype=np.float32)
    for bands, lo, hi in SPECTRAL_TERMS:
        if all(b in refl for b in bands):
            score = np.minimum(score, rescale(sum(refl[b] for b in bands), lo, hi))
    snow = ndsi_kernel(refl["B03"], refl["B11"]) >= snow_ndsi
    score = np.where(snow, 0.0, score).astype(np.float32)
    nan = ~np.isfinite(refl["B02"]) | ~np.isfinite(refl["B11"])
    return np.where(nan, np.nan, score).astype(np.float32)


def spectral_codes(score: np.ndarray, threshold: float, closing: int, opening: int, dilation: int,
                   keep_prob: float | None = None) -> np.ndarray:
    """``S_c > T_cloud`` (eq. 14; snow already removed, eq. 16), then the refinement -> :func:`mask_codes`."""
    s = np.nan_to_num(score, nan=0.0)
    return mask_codes(s > threshold, s, closing, opening, dilation, keep_prob)


def spectral_mask_kernel(score: np.ndarray, threshold: float, closing: int, opening: int,
                         dilation: int, keep_prob: float | None = None) -> np.ndarray:
    """``S_c > T_cloud`` (eq. 14; snow already removed, eq. 16), then closing/opening/dilation (binary)."""
    return spectral_codes(score, threshold, closing, opening, dilation, keep_prob) == CODE_CLOUD


def _score_block(block: np.ndarray, bands: tuple[str, ...], snow_ndsi: float) -> np.ndarray:
    """``(time, band, y, x)`` block -> ``(time, y, x)`` score."""
    return np.stack([spectral_score_kernel({b: block[t, i] for i, b in enumerate(bands)}, snow_ndsi)
                     for t in range(block.shape[0])])


def spectral_mask(items, geobox, cfg: MaskConfig, chunk: int = 512) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mask method ``spectral``: for items without any cloud layer; needs B02/B03/B04/B11, uses B01/B10 if present.
    Returns mask, probability and the pixels the refinement's opening removed."""
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages.load import load_reflectance

    lacking = {it.id: [b for b in SPECTRAL_REQUIRED if b not in it.assets] for it in items}
    lacking = {k: v for k, v in lacking.items() if v}
    if lacking:
        raise InputDataError(f"mask method 'spectral' needs bands {list(SPECTRAL_REQUIRED)}; items lack {lacking}; "
                             "use 'scl'/'cldprb' for them")
    bands = SPECTRAL_REQUIRED + tuple(b for b in SPECTRAL_OPTIONAL if all(b in it.assets for it in items))
    stack = load_reflectance(items, bands, geobox, chunk, name="spectral-mask-input")
    data = stack.data.rechunk({1: -1})
    score = dsa.map_blocks(_score_block, data, bands=bands, snow_ndsi=cfg.snow_ndsi, drop_axis=1, dtype=np.float32)
    prob = xr.DataArray(score, dims=("time", "y", "x"), coords={k: stack.coords[k] for k in ("time", "y", "x")})
    codes = _lazy_2d(spectral_codes, prob, refine_halo(cfg), np.uint8, threshold=cfg.spectral_threshold,
                     **refinement_params(cfg))
    mask, opened = _split_codes(codes)
    return mask, prob.rename("cloud_prob"), opened


# -- s2cloudless (LightGBM, trained on L1C TOA with B10) --------------------------------------------------------------
#: the 10 bands s2cloudless's model takes, in its order.
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")


def s2cloudless_kernel(refl: np.ndarray, threshold: float = 0.4, average_over: int = 4,
                       dilation_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x, 10)`` L1C TOA reflectance in :data:`S2CLOUDLESS_BANDS` order -> ``(probability, mask)``.

    NaN pixels get probability NaN and mask False.
    """
    from s2cloudless import S2PixelCloudDetector

    det = S2PixelCloudDetector(threshold=threshold, all_bands=False, average_over=average_over,
                               dilation_size=dilation_size)
    bad = ~np.isfinite(refl).all(axis=-1)
    x = np.nan_to_num(refl, nan=0.0).astype(np.float32)[None]
    prob = det.get_cloud_probability_maps(x)[0].astype(np.float32)
    mask = det.get_mask_from_prob(prob[None])[0].astype(bool)
    prob[bad] = np.nan
    mask[bad] = False
    return prob, mask


def _s2cloudless_block(block: np.ndarray, threshold: float, average_over: int, dilation_size: int) -> np.ndarray:
    """``(time, band, y, x)`` -> ``(time, 2, y, x)``: probability and mask (as 0/1)."""
    out = np.empty((block.shape[0], 2) + block.shape[2:], np.float32)
    for t in range(block.shape[0]):
        p, m = s2cloudless_kernel(np.moveaxis(block[t], 0, -1), threshold, average_over, dilation_size)
        out[t, 0], out[t, 1] = p, m
    return out


def s2cloudless_mask(items, geobox, cfg: MaskConfig, chunk: int = 512) -> tuple[xr.DataArray, xr.DataArray]:
    """Mask method ``s2cloudless``: L1C items only (the model needs TOA reflectance including B10).

    L2A items are refused with :class:`InputDataError` naming them: L2A has no B10 and BOA reflectance is not what
    the model was trained on; use 'cldprb'/'scl' (Sen2Cor's own layers) or 'spectral' for L2A.
    """
    from cloudfree.catalogs.harmonise import processing_level
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages.load import load_reflectance

    bad = [it.id for it in items
           if processing_level(it) not in (None, "L1C") or any(b not in it.assets for b in S2CLOUDLESS_BANDS)]
    if bad:
        raise InputDataError(
            f"mask method 's2cloudless' needs L1C items with bands {list(S2CLOUDLESS_BANDS)} (incl. B10); items "
            f"{bad} are L2A or lack them; use 'cldprb', 'scl' or 'spectral' for L2A items")
    stack = load_reflectance(items, S2CLOUDLESS_BANDS, geobox, chunk, name="s2cloudless-input")
    data = stack.data.rechunk({1: -1})
    depth = cfg.s2cloudless_average_over + cfg.s2cloudless_dilation + 2
    res = dsa.map_overlap(_s2cloudless_block, data, depth={0: 0, 1: 0, 2: depth, 3: depth}, boundary="none",
                          trim=True, dtype=np.float32, chunks=(data.chunks[0], (2,), data.chunks[2], data.chunks[3]),
                          threshold=cfg.s2cloudless_threshold, average_over=cfg.s2cloudless_average_over,
                          dilation_size=cfg.s2cloudless_dilation)
    coords = {k: stack.coords[k] for k in ("time", "y", "x")}
    prob = xr.DataArray(res[:, 0], dims=("time", "y", "x"), coords=coords)
    raw = xr.DataArray(res[:, 1] > 0.5, dims=("time", "y", "x"), coords=coords)
    mask = _lazy_2d(refine_kernel, raw, cfg.dilation + 1, bool, closing=0, opening=0, dilation=cfg.dilation)
    return mask.rename("cloud_mask"), prob.rename("cloud_prob")


_EXTRA_METHODS["spectral"] = spectral_mask
_EXTRA_METHODS["s2cloudless"] = s2cloudless_mask


def replace_vars(ds, **data):
    """``ds`` with the named variables' arrays replaced by numpy arrays of the same shape (dims and attrs kept; no
    alignment: the arrays are on ``ds``'s grid)."""
    out = ds.copy()
    for name, arr in data.items():
        out[name] = ds[name].variable.copy(data=arr)
    return out


def mark_opened(ds, opened, cloud_prob):
    """Target pixels that the cloud layer flagged but the mask refinement's opening removed from the mask
    (:class:`cloudfree.stages.masks.MaskLayers` ``opened``) and that the model kept as observed (``SOURCE_TARGET``)
    become ``SOURCE_OPENED`` with confidence at most ``1 - probability``: never "target observation (clear)"."""
    from cloudfree.pipeline.contract import SOURCE_OPENED, SOURCE_TARGET

    if all(isinstance(a.data, np.ndarray) for a in (opened, cloud_prob, ds.source, ds.confidence)):
        # in memory (a small target): the same element-wise steps in numpy, without xarray's alignment
        src, conf = ds.source.data, ds.confidence.data
        hit = opened.data & (src == float(SOURCE_TARGET))
        p = cloud_prob.data
        cap = np.clip(1.0 - np.where(np.isnan(p), 1.0, p), 0, 1).astype(np.float32)
        return replace_vars(ds, source=np.where(~hit, src, float(SOURCE_OPENED)),
                            confidence=np.where(~hit, conf, np.minimum(conf, cap)))
    hit = opened & (ds.source == float(SOURCE_TARGET))
    cap = (1.0 - cloud_prob.fillna(1.0)).clip(0, 1).astype(np.float32)
    return ds.assign(source=ds.source.where(~hit, float(SOURCE_OPENED)),
                     confidence=ds.confidence.where(~hit, np.minimum(ds.confidence, cap)))


def mask_refinement_property(mask_cfg, stats: dict) -> dict:
    """``cloudfree:mask_refinement`` of an output item: the refinement applied to thresholded cloud layers and the
    share of output pixels that it removed from the mask (written as ``SOURCE_OPENED``, never as clear)."""
    p = refinement_params(mask_cfg)
    return {"mode": mask_cfg.refinement, "closing_radius": p["closing"], "opening_radius": p["opening"],
            "opening_keep_prob": p["keep_prob"], "dilation": p["dilation"],
            "opened_fraction": stats.get("opened_after", 0.0)}
