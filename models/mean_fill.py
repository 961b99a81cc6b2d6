"""Floor ``mean-fill``: every cloudy pixel takes the per-band mean of the target's clear pixels.

A constant fill knows nothing about the surface under the cloud: it is the trivial floor a model that claims to
*restore* pixels has to beat (``none`` is the floor for not removing at all). On a low-texture scene it scores far
above the cloudy input (e.g. a forest whose bands barely vary), so a model that merely beats the cloudy input has
not shown that it uses its inputs; tests/test_floors.py holds every shipped weight to this floor.

The mean is fitted once per scene on the runner's coarse sample (``fit_scene``: clear, finite pixels, cloud
probability below 0.5), so every tile fills with the same constant; a tile without scene context uses its own clear
pixels, and a tile with none keeps its values (confidence 0). Nodata (non-finite) pixels stay nodata. Filled pixels get ``SOURCE_MODEL`` and confidence
``confidence`` (0.1 by default: a constant is not an estimate of the surface). Clear pixels pass through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase, keep_target_and_mark_nodata
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import SOURCE_MODEL, SOURCE_TARGET, TileInputs, TileResult


class MeanFillParams(ModelParams):
    #: confidence written for a filled pixel.
    confidence: float = Field(0.1, ge=0, le=1)


def clear_mean(tile: TileInputs) -> np.ndarray | None:
    """Per-band mean of the clear, finite target pixels (``cloud_prob < 0.5``, NaN counts as cloud); None if none."""
    ok = ~tile.cloud_mask & np.isfinite(tile.target).all(axis=0)
    ok &= np.nan_to_num(np.asarray(tile.cloud_prob, np.float32), nan=1.0) < 0.5
    if not ok.any():
        return None
    return tile.target[:, ok].mean(axis=1).astype(np.float32)


@register
class MeanFill(RemovalModelBase):
    name = "mean-fill"
    spec = ModelSpec(bands=(), level="any", halo=0, scene_context=True,
                     description="floor: cloudy pixels take the per-band mean of the clear pixels (a constant)")
    Params = MeanFillParams

    def fit_scene(self, sample: TileInputs) -> dict[str, Any]:
        mean = clear_mean(sample)
        return {"clear_mean": None if mean is None else mean.tolist()}

    def predict(self, tile: TileInputs) -> TileResult:
        mean = tile.context.get("clear_mean")
        mean = clear_mean(tile) if mean is None else np.asarray(mean, np.float32)
        valid = np.isfinite(tile.target).all(axis=0)
        out = tile.target.copy()
        source = np.full(tile.shape, SOURCE_TARGET, np.uint8)
        conf = np.where(tile.cloud_mask, 0.0, 1.0).astype(np.float32)
        if mean is not None and len(mean) == tile.target.shape[0]:
            todo = tile.cloud_mask & valid
            out[:, todo] = mean[:, None]
            source[todo] = SOURCE_MODEL
            conf[todo] = self.params.confidence
        keep_target_and_mark_nodata(out, source, conf, tile.target, None, valid)
        return TileResult(out, conf, source).validate(tile, self.name)
