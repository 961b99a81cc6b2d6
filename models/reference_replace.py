"""Baseline: replace masked pixels with the best clear reference after a per-band linear radiometric alignment.

The simplest honest model, and what most operational gap-filling does. For each cloudy target pixel, the first
reference (best ranked) that is clear there supplies the value, aligned to the target by a per-band gain/offset
fitted on pixels clear in both (:mod:`models._align`). Pixels no reference covers keep the target value and get
confidence 0. Clear target pixels are passed through untouched (confidence 1).
"""

from __future__ import annotations

import numpy as np

from models._align import apply_linear, fit_linear
from models.base import ModelParams, ModelSpec, RemovalModelBase
from models.registry import register
from pipeline.contract import SOURCE_NODATA, SOURCE_REFERENCE_BASE, SOURCE_TARGET, TileInputs, TileResult


class ReferenceReplaceParams(ModelParams):
    #: confidence given to a pixel filled from a reference (it is another date, not the target's surface).
    reference_confidence: float = 0.8


@register
class ReferenceReplace(RemovalModelBase):
    name = "reference-replace"
    spec = ModelSpec(
        bands=(),
        level="any",
        needs_reference=True,
        max_references=4,
        halo=0,
        description="mask-based replacement from the best clear reference, per-band linear radiometric alignment",
    )
    Params = ReferenceReplaceParams

    def predict(self, tile: TileInputs) -> TileResult:
        out = tile.target.copy()
        ny, nx = tile.shape
        source = np.full((ny, nx), SOURCE_TARGET, np.uint8)
        conf = np.ones((ny, nx), np.float32)
        target_valid = np.isfinite(tile.target).all(axis=0)
        todo = tile.cloud_mask | ~target_valid
        source[~target_valid] = SOURCE_NODATA
        conf[todo] = 0.0
        fit_region = ~tile.cloud_mask & target_valid
        for i in range(tile.references.shape[0]):
            if not todo.any():
                break
            ref = tile.references[i]
            ref_ok = ~tile.reference_masks[i] & np.isfinite(ref).all(axis=0)
            gain, offset = fit_linear(tile.target, ref, fit_region & ref_ok)
            fill = todo & ref_ok
            if fill.any():
                aligned = apply_linear(ref, gain, offset)
                out[:, fill] = aligned[:, fill]
                source[fill] = SOURCE_REFERENCE_BASE + i
                conf[fill] = self.params.reference_confidence
                todo &= ~fill
        return TileResult(reflectance=out, confidence=conf, source=source).validate(tile, self.name)
