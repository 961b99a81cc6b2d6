"""Baseline: no removal. Returns the target unchanged, the floor every model must beat.

``confidence = 1 - cloud_mask`` (a flagged pixel is kept but is not a cloud-free estimate); ``source`` is
``SOURCE_TARGET`` everywhere the target is finite (the pixel *is* the target's observation; confidence says
whether it is clear), ``SOURCE_NODATA`` where it is not.
"""

from __future__ import annotations

import numpy as np

from cloudfree.models.base import ModelSpec, RemovalModelBase
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_TARGET, TileInputs, TileResult


@register
class NoRemoval(RemovalModelBase):
    name = "none"
    spec = ModelSpec(bands=(), level="any", halo=0, description="no removal: the target unchanged (baseline floor)")

    def predict(self, tile: TileInputs) -> TileResult:
        valid = np.isfinite(tile.target).all(axis=0)
        conf = (~tile.cloud_mask & valid).astype(np.float32)
        source = np.where(valid, SOURCE_TARGET, SOURCE_NODATA).astype(np.uint8)
        return TileResult(tile.target.copy(), conf, source).validate(tile, self.name)
