"""Baseline: replace masked pixels with the best clear reference after a per-band linear radiometric alignment.

The simplest honest model, and what most operational gap-filling does. For each cloudy target pixel, the first
reference (best ranked) that is clear there supplies the value, aligned to the target by a per-band gain/offset
fitted on pixels clear in both (:mod:`cloudfree.models._align`). The fit is done once per scene on a coarse sample
(``fit_scene``), so every tile uses the same gains and the mosaic has no seams; a tile without scene context
fits on its own pixels.

Where no reference is clear, a thick-cloud target pixel (``cloud_prob >= fallback_prob``) is still taken from the
best-ranked reference that has data (best available pixel: a reference's thin cloud or shadow is closer to the
surface than the target's thick cloud), with low confidence; thin-cloud target pixels are kept. Pixels no reference covers keep the target value and get
confidence 0. Clear target pixels are passed through untouched (confidence 1).
"""

from __future__ import annotations

import numpy as np

from cloudfree.models._align import composite_reference, reference_validity, scene_alignment
from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_REFERENCE_BASE, SOURCE_TARGET, TileInputs, TileResult


class ReferenceReplaceParams(ModelParams):
    #: confidence given to a pixel filled from a reference (it is another date, not the target's surface).
    reference_confidence: float = 0.8
    #: target cloud probability from which a pixel is filled from a (cloudy) reference when no clear one exists.
    fallback_prob: float = 0.5
    fallback_confidence: float = 0.2


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
        scene_context=True,
    )
    Params = ReferenceReplaceParams

    def fit_scene(self, sample: TileInputs) -> dict:
        return {"alignment": scene_alignment(sample)}

    def predict(self, tile: TileInputs) -> TileResult:
        target_valid = np.isfinite(tile.target).all(axis=0)
        todo = tile.cloud_mask | ~target_valid
        ref_ok = reference_validity(tile)
        image, index = composite_reference(
            tile.target, tile.references, ref_ok, ~tile.cloud_mask & target_valid, "first",
            alignment=tile.context.get("alignment"),
            fallback=todo & (np.nan_to_num(tile.cloud_prob, nan=1.0) >= self.params.fallback_prob),
        )
        out = tile.target.copy()
        source = np.where(target_valid, SOURCE_TARGET, SOURCE_NODATA).astype(np.uint8)
        conf = np.where(todo, 0.0, 1.0).astype(np.float32)
        fill = todo & (index >= 0)
        out[:, fill] = image[:, fill]
        source[fill] = (SOURCE_REFERENCE_BASE + index[fill]).astype(np.uint8)
        clear_ref = ref_ok.any(axis=0) if ref_ok.shape[0] else np.zeros(tile.shape, bool)
        conf[fill & clear_ref] = self.params.reference_confidence
        conf[fill & ~clear_ref] = self.params.fallback_confidence
        return TileResult(reflectance=out, confidence=conf, source=source).validate(tile, self.name)
