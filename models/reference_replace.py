"""Baseline: replace masked pixels with the best clear reference after a per-band linear radiometric alignment.

The simplest honest model, and what most operational gap-filling does. For each cloudy target pixel, the first
reference (best ranked) that is clear there supplies the value, aligned to the target by a per-band gain/offset
fitted on pixels clear in both (:mod:`models._align`). The fit is done once per scene on a coarse sample
(``fit_scene``), so every tile uses the same gains and the mosaic has no seams; a tile without scene context
fits on its own pixels.

Where no reference is clear, a thick-cloud target pixel (``cloud_prob >= fallback_prob``) is still taken from the
best-ranked reference that has data (best available pixel: a reference's thin cloud or shadow is closer to the
surface than the target's thick cloud), with low confidence; thin-cloud target pixels are kept. Pixels no reference covers keep the target value and get
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
        out = tile.target.copy()
        ny, nx = tile.shape
        source = np.full((ny, nx), SOURCE_TARGET, np.uint8)
        conf = np.ones((ny, nx), np.float32)
        target_valid = np.isfinite(tile.target).all(axis=0)
        todo = tile.cloud_mask | ~target_valid
        source[~target_valid] = SOURCE_NODATA
        conf[todo] = 0.0
        fit_region = ~tile.cloud_mask & target_valid
        aligned_params = []
        for i in range(tile.references.shape[0]):
            ref = tile.references[i]
            ref_ok = ~tile.reference_masks[i] & np.isfinite(ref).all(axis=0)
            if "alignment" in tile.context and i < len(tile.context["alignment"]):
                gain, offset = tile.context["alignment"][i]
            else:
                gain, offset = fit_linear(tile.target, ref, fit_region & ref_ok)
            aligned_params.append((gain, offset))
            fill = todo & ref_ok
            if fill.any():
                aligned = apply_linear(ref, gain, offset)
                out[:, fill] = aligned[:, fill]
                source[fill] = SOURCE_REFERENCE_BASE + i
                conf[fill] = self.params.reference_confidence
                todo &= ~fill
        thick = todo & (np.nan_to_num(tile.cloud_prob, nan=1.0) >= self.params.fallback_prob)
        for i in range(tile.references.shape[0]):
            if not thick.any():
                break
            ref = tile.references[i]
            fill = thick & np.isfinite(ref).all(axis=0)
            if fill.any():
                gain, offset = aligned_params[i]
                out[:, fill] = apply_linear(ref, gain, offset)[:, fill]
                source[fill] = SOURCE_REFERENCE_BASE + i
                conf[fill] = self.params.fallback_confidence
                thick &= ~fill
        return TileResult(reflectance=out, confidence=conf, source=source).validate(tile, self.name)


def scene_alignment(sample: TileInputs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-reference (gain, offset) fitted on pixels clear in both target and reference of a scene sample."""
    target_ok = ~sample.cloud_mask & np.isfinite(sample.target).all(axis=0)
    out = []
    for i in range(sample.references.shape[0]):
        ref = sample.references[i]
        ok = target_ok & ~sample.reference_masks[i] & np.isfinite(ref).all(axis=0)
        out.append(fit_linear(sample.target, ref, ok))
    return out
