"""Baseline: Dark Channel Prior haze removal (He, Sun & Tang, CVPR 2009 / TPAMI 2011), applied to every band.

The pure kernel :func:`dcp_dehaze` follows the paper step by step:

1. dark channel ``D(x) = min_{y in patch(x)} min_c I_c(y)`` over the bands in ``dark_bands`` (default: all
   bands given), patch ``patch x patch`` (default 15);
2. atmospheric light ``A``: among the brightest 0.1 % (``top_fraction``) of dark-channel pixels, the one with the
   highest intensity (mean over bands) gives ``A`` per band (He et al. 2011, Sec. 4.4);
3. transmission ``t = 1 - omega * min_patch min_c (I_c / A_c)`` (omega = 0.95 keeps a little haze);
4. refinement of ``t`` by a guided filter steered by the intensity (the 2013 replacement of soft matting),
   radius ``gf_radius``, regularisation ``gf_eps``;
5. ``J = (I - A) / max(t, t0) + A`` with ``t0 = 0.1``.

It is a thin-cloud / haze method: no reference is used, and under thick cloud it only amplifies the cloud.
Clear target pixels (outside ``cloud_mask``) are passed through unchanged when ``keep_clear_target`` is set (the
product keeps the observation where it is clear); otherwise the whole tile is dehazed, as in the paper.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import Field
from scipy import ndimage

from cloudfree.models._align import fill_target
from cloudfree.models._filters import guided_filter
from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import SOURCE_MODEL, SOURCE_NODATA, SOURCE_TARGET, TileInputs, TileResult

log = logging.getLogger(__name__)


def dark_channel(image: np.ndarray, patch: int) -> np.ndarray:
    """``min`` over bands then over a ``patch x patch`` window (``(band, y, x)`` -> ``(y, x)``)."""
    return ndimage.minimum_filter(np.min(image, axis=0), size=patch, mode="nearest")


def dcp_dehaze(
    image: np.ndarray,
    *,
    patch: int = 15,
    omega: float = 0.95,
    top_fraction: float = 0.001,
    gf_radius: int = 20,
    gf_eps: float = 1e-3,
    t0: float = 0.1,
    dark_bands: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dehaze ``image`` ``(band, y, x)`` (finite reflectance). Returns ``J, t, A`` (``A`` is ``(band,)``)."""
    img = np.asarray(image, np.float32)
    sel = img if dark_bands is None else img[dark_bands]
    dark = dark_channel(sel, patch)
    n = max(1, int(round(top_fraction * dark.size)))
    cand = np.argpartition(dark.ravel(), -n)[-n:]
    intensity = img.reshape(img.shape[0], -1)[:, cand].mean(axis=0)
    a = img.reshape(img.shape[0], -1)[:, cand[np.argmax(intensity)]].astype(np.float32)
    a = np.maximum(a, np.float32(1e-3))
    a_sel = a if dark_bands is None else a[dark_bands]
    t_raw = 1.0 - omega * dark_channel(sel / a_sel[:, None, None], patch)
    guide = img.mean(axis=0)
    t = np.clip(guided_filter(guide, t_raw, gf_radius, gf_eps, subsample=4), 0.0, 1.0).astype(np.float32)
    j = (img - a[:, None, None]) / np.maximum(t, t0)[None] + a[:, None, None]
    return j.astype(np.float32), t, a


class DCPParams(ModelParams):
    patch: int = Field(15, ge=1)
    omega: float = Field(0.95, gt=0, le=1)
    top_fraction: float = Field(0.001, gt=0, le=1)
    gf_radius: int = Field(20, ge=1)
    gf_eps: float = Field(1e-3, gt=0)
    t0: float = Field(0.1, gt=0, le=1)
    #: bands whose minimum forms the dark channel (None = all bands of the tile).
    dark_bands: list[str] | None = None
    #: keep clear target pixels (outside cloud_mask) unchanged.
    keep_clear_target: bool = True


@register
class DCP(RemovalModelBase):
    name = "dcp"
    spec = ModelSpec(
        bands=(),
        level="any",
        needs_reference=False,
        max_references=0,
        # dark channel window (patch // 2) + guided filter (2 * gf_radius) with the default params
        halo=15 // 2 + 2 * 20,
        description="dark channel prior dehazing (He et al. 2009/2011) on all bands; thin cloud/haze only",
    )
    Params = DCPParams

    def predict(self, tile: TileInputs) -> TileResult:
        p = self.params
        valid = np.isfinite(tile.target).all(axis=0)
        img = fill_target(tile)
        idx = tile.band_index(*p.dark_bands) if p.dark_bands else None
        j, t, a = dcp_dehaze(
            img, patch=p.patch, omega=p.omega, top_fraction=p.top_fraction, gf_radius=p.gf_radius,
            gf_eps=p.gf_eps, t0=p.t0, dark_bands=idx,
        )
        j = np.maximum(j, 0)
        source = np.full(tile.shape, SOURCE_MODEL, np.uint8)
        conf = t.copy()
        if p.keep_clear_target:
            keep = ~tile.cloud_mask & valid
            j[:, keep] = tile.target[:, keep]
            source[keep] = SOURCE_TARGET
            conf[keep] = 1.0
        j[:, ~valid] = np.nan
        source[~valid] = SOURCE_NODATA
        conf[~valid] = 0.0
        diag = {"t": t, "A": np.broadcast_to(a[:, None, None], tile.target.shape).astype(np.float32)}
        return TileResult(j, conf, source, diag).validate(tile, self.name)
