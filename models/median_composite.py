"""Baseline: per-pixel compositing of the clear observations among the target and its references.

``method: median``: the per-band median of every clear observation (target where ``cloud_mask`` is False,
references where ``reference_masks`` is False; non-finite values never count). ``method: best``: the
best-available-pixel variant, the clear observation nearest in time (the target itself has ``dt = 0``; ties go to
the better-ranked reference). No radiometric alignment: a composite is built from the observations as they are.

With ``keep_clear_target`` (default) clear target pixels are passed through unchanged and only cloudy pixels are
composited (what the product needs); set it False for a classic composite of the whole tile.

Provenance: ``SOURCE_TARGET`` where the target supplies the pixel; otherwise ``SOURCE_REFERENCE_BASE + i`` with
``i`` the reference whose spectrum is closest (L2 over bands) to the composite value (for ``best`` the reference
used). Pixels with no clear observation keep the (cloudy) target, code ``SOURCE_TARGET``, confidence 0.
Confidence: 1 for the target's own clear pixels, ``reference_confidence`` for composited reference pixels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cloudfree.models._filters import median_of_valid
from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_REFERENCE_BASE, SOURCE_TARGET, TileInputs, TileResult
from cloudfree.pipeline.errors import ModelError


def composite(
    stack: np.ndarray, clear: np.ndarray, key: np.ndarray | None, method: str, *, chosen: bool = True,
    n_clear: np.ndarray | None = None, clear_is_finite: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Composite ``stack`` ``(obs, band, y, x)`` over observations where ``clear`` ``(obs, y, x)``; the one
    implementation of median / best-pixel compositing (this model and ``cloudfree composite`` use it).

    ``method="median"``: per-band median of the clear observations; ``"best"``: the clear observation with the
    smallest ``key`` (``(obs,)`` e.g. ``|dt|``, or ``(obs, y, x)`` e.g. cloud probability; ties go to the first,
    i.e. best-ranked, observation). Returns ``value`` ``(band, y, x)`` (NaN where nothing is clear), ``chosen``
    ``(y, x)`` int (the observation used, for the median the one closest to the value; -1 = none) and ``n_clear``.
    With ``chosen=False`` the median's ``chosen`` is not computed (None; it costs as much as the median). ``n_clear``
    (``clear.sum(0)``) may be passed when the caller has it; ``clear_is_finite`` says every band of a clear
    observation is finite (else non-finite values are skipped band by band).
    """
    if n_clear is None:
        n_clear = clear.sum(axis=0)
    if method == "median":
        if clear_is_finite:  # every band of a clear observation is finite: one count for all bands
            value = median_of_valid(stack, clear[:, None], n_clear[None])
        else:
            valid = clear[:, None] & np.isfinite(stack)
            value = median_of_valid(stack, valid, valid.sum(axis=0))
        if not chosen:
            return value, None, n_clear
        masked = np.where(clear[:, None], stack, np.nan)
        dist = np.where(clear, np.nansum((masked - value[None]) ** 2, axis=1), np.inf)
        chosen = np.where(n_clear > 0, np.argmin(dist, axis=0), -1)
    elif method == "best":
        k = np.asarray(key, np.float64)
        k = k.reshape(k.shape + (1,) * (clear.ndim - k.ndim))
        ranked = np.where(clear, k, np.inf)
        chosen = np.where(n_clear > 0, np.argmin(ranked, axis=0), -1)
        value = np.take_along_axis(stack, np.maximum(chosen, 0)[None, None], axis=0)[0].astype(np.float32)
        value[:, chosen < 0] = np.nan
    else:
        raise ModelError(f"median-composite: unknown method {method!r}; use 'median' or 'best'")
    return value, chosen, n_clear


class MedianCompositeParams(ModelParams):
    method: Literal["median", "best"] = "median"
    keep_clear_target: bool = True
    reference_confidence: float = Field(0.8, ge=0, le=1)


@register
class MedianComposite(RemovalModelBase):
    name = "median-composite"
    spec = ModelSpec(
        bands=(),
        level="any",
        needs_reference=True,
        max_references=8,
        halo=0,
        description="per-pixel median (or nearest-in-time clear) of the clear observations, no alignment",
    )
    Params = MedianCompositeParams

    def predict(self, tile: TileInputs) -> TileResult:
        p = self.params
        target_ok = np.isfinite(tile.target).all(axis=0)
        stack = np.concatenate([tile.target[None], tile.references], axis=0).astype(np.float32)
        clear = np.concatenate([(~tile.cloud_mask & target_ok)[None], ~tile.reference_masks], axis=0)
        clear &= np.isfinite(stack).all(axis=1)
        nref = tile.references.shape[0]
        dts = np.array(list(tile.reference_dt_days) or [0.0] * nref, np.float64)
        if dts.size != nref:
            dts = np.arange(1, nref + 1, dtype=np.float64)  # unknown dates: rank order stands in for time
        dt = np.concatenate([[0.0], dts])
        if p.keep_clear_target:
            clear[0] = False
        value, chosen, n_clear = composite(stack, clear, np.abs(dt), p.method)
        out = tile.target.copy()
        conf = np.zeros(tile.shape, np.float32)
        source = np.where(target_ok, SOURCE_TARGET, SOURCE_NODATA).astype(np.uint8)
        fill = n_clear > 0
        if p.keep_clear_target:
            fill &= tile.cloud_mask | ~target_ok
            keep = ~tile.cloud_mask & target_ok
            conf[keep] = 1.0
        out[:, fill] = value[:, fill]
        from_ref = fill & (chosen >= 1)
        source[from_ref] = (SOURCE_REFERENCE_BASE + chosen[from_ref] - 1).astype(np.uint8)
        source[fill & (chosen == 0)] = SOURCE_TARGET
        conf[fill] = np.where(chosen[fill] == 0, 1.0, p.reference_confidence)
        return TileResult(out, conf, source).validate(tile, self.name)
