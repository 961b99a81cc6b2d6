"""Remove stage: run the selected model per tile, lazily, one dask task per output tile.

Each task reads the halo-padded window of the target, masks and a bounded reference stack, calls the model on
plain numpy (the tile contract, :class:`pipeline.contract.TileInputs`) and keeps the core. The graph has a fixed
number of tasks per tile, so its size and the per-worker memory stay flat as the AOI grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import dask.array as dsa
import numpy as np
import xarray as xr

from pipeline.contract import TileInputs, TileResult, TileWindow
from stages.tile import grid_of_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneInputs:
    """Lazy inputs of one target on the output grid (the scene contract, split by role)."""

    target: xr.DataArray  #: (band, y, x)
    cloud_mask: xr.DataArray  #: (y, x) bool
    cloud_prob: xr.DataArray  #: (y, x) float32 0-1
    references: xr.DataArray | None  #: (time, band, y, x)
    reference_masks: xr.DataArray | None  #: (time, y, x) bool
    reference_ids: tuple[str, ...] = ()
    reference_dt_days: tuple[float, ...] = ()
    target_id: str = ""


def run_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, *, bands, core_in_read,
             halo, reference_ids, reference_dt_days, target_id, context=None) -> np.ndarray:
    """One task: numpy in, ``(band + 2, y, x)`` float32 core out (reflectance, confidence, source)."""
    nb = target.shape[0]
    if references is None:
        references = np.zeros((0, nb) + target.shape[1:], np.float32)
        reference_masks = np.zeros((0,) + target.shape[1:], bool)
    tile = TileInputs(
        bands=tuple(bands), target=np.asarray(target, np.float32), cloud_prob=np.asarray(cloud_prob, np.float32),
        cloud_mask=np.asarray(cloud_mask, bool), references=np.asarray(references, np.float32),
        reference_masks=np.asarray(reference_masks, bool), reference_ids=reference_ids,
        reference_dt_days=reference_dt_days, halo=halo, target_id=target_id, context=context or {},
    )
    res: TileResult = model.predict(tile).validate(tile, getattr(model, "name", "model"))
    ys, xs = core_in_read
    out = np.concatenate([res.reflectance, res.confidence[None], res.source[None].astype(np.float32)])
    return out[:, ys, xs]


def to_tile_inputs(inputs: "SceneInputs", halo: int = 0, context=None) -> TileInputs:
    """Materialise a whole (small) scene as one TileInputs, e.g. the coarse sample for ``fit_scene``."""
    import dask as _dask

    t, m, p = inputs.target.data, inputs.cloud_mask.data, inputs.cloud_prob.data
    r = inputs.references.data if inputs.references is not None else None
    rm = inputs.reference_masks.data if inputs.reference_masks is not None else None
    t, m, p, r, rm = _dask.compute(t, m, p, r, rm)
    nb = t.shape[0]
    if r is None:
        r, rm = np.zeros((0, nb) + t.shape[1:], np.float32), np.zeros((0,) + t.shape[1:], bool)
    return TileInputs(tuple(str(b) for b in inputs.target.band.values), t.astype(np.float32), p.astype(np.float32),
                      m.astype(bool), r.astype(np.float32), rm.astype(bool), inputs.reference_ids,
                      inputs.reference_dt_days, halo=halo, target_id=inputs.target_id, context=context or {})


def remove_clouds(inputs: SceneInputs, model, tiles: list[TileWindow], halo: int, context=None) -> xr.Dataset:
    """Lazy Dataset with ``reflectance (band, y, x)``, ``confidence (y, x)`` and ``source (y, x)``.

    ``context`` (from ``model.fit_scene``) is passed to every tile.
    """
    bands = tuple(str(b) for b in inputs.target.band.values)
    nb = len(bands)
    model_d = dask.delayed(model, pure=True)
    context_d = dask.delayed(dict(context or {}), pure=True)
    rows = []
    for row in grid_of_tiles(tiles):
        blocks = []
        for t in row:
            ry, rx = t.read
            refs = inputs.references.data[:, :, ry, rx] if inputs.references is not None else None
            rmask = inputs.reference_masks.data[:, ry, rx] if inputs.reference_masks is not None else None
            d = dask.delayed(run_tile, pure=True)(
                model_d, inputs.target.data[:, ry, rx], inputs.cloud_mask.data[ry, rx],
                inputs.cloud_prob.data[ry, rx], refs, rmask, bands=bands, core_in_read=t.core_in_read, halo=halo,
                reference_ids=inputs.reference_ids, reference_dt_days=inputs.reference_dt_days,
                target_id=inputs.target_id, context=context_d,
                dask_key_name=f"cloudfree-tile-{inputs.target_id}-{t.index[0]}-{t.index[1]}-{dask.base.tokenize(model, t, context)}",
            )
            cy, cx = t.core
            blocks.append(dsa.from_delayed(d, shape=(nb + 2, cy.stop - cy.start, cx.stop - cx.start), dtype=np.float32))
        rows.append(blocks)
    stacked = dsa.concatenate([dsa.concatenate(r, axis=2) for r in rows], axis=1)
    y, x = inputs.target.y, inputs.target.x
    refl = xr.DataArray(stacked[:nb], dims=("band", "y", "x"), coords={"band": list(bands), "y": y, "x": x})
    conf = xr.DataArray(stacked[nb], dims=("y", "x"), coords={"y": y, "x": x})
    src = xr.DataArray(stacked[nb + 1], dims=("y", "x"), coords={"y": y, "x": x})
    ds = xr.Dataset({"reflectance": refl, "confidence": conf, "source": src})
    if inputs.target.rio.crs is not None:
        ds = ds.rio.write_crs(inputs.target.rio.crs)
    return ds
