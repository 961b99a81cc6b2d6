"""Remove stage: run the selected model per tile, lazily, one dask task per output tile.

Each task reads the halo-padded window of the target, masks and a bounded reference stack and calls the model on
plain numpy (the tile contract, :class:`pipeline.contract.TileInputs`). With ``blend="none"`` it keeps the core
(halo discard); otherwise one more task per output block blends the overlapping neighbour predictions with a
feathered or Hann window (:mod:`stages.mosaic`). The graph has a fixed number of tasks per tile, so its size and
the per-worker memory stay flat as the AOI grows. Each tile task also reports its wall time.
"""

from __future__ import annotations

import logging
import time
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
    sar: xr.DataArray | None = None  #: (time, pol, y, x) one S1 scene per optical date, model units (stages.sar)


def run_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, *, bands, core_in_read,
             halo, reference_ids, reference_dt_days, target_id, context=None) -> np.ndarray:
    """One task: numpy in, ``(band + 2, y, x)`` float32 core out (reflectance, confidence, source)."""
    out, _ = predict_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, bands=bands, halo=halo,
                          reference_ids=reference_ids, reference_dt_days=reference_dt_days, target_id=target_id,
                          context=context)
    ys, xs = core_in_read
    return out[:, ys, xs]


def predict_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, *, bands, halo,
                 reference_ids, reference_dt_days, target_id, context=None, sar=None,
                 sar_bands=()) -> tuple[np.ndarray, float]:
    """One task: numpy in, the whole read window ``(band + 2, y, x)`` float32 out, plus its wall time (s).

    The model is called through ``predict_batch`` (a batch of one tile per task; batching models get their
    several-tile path from callers that hold several tiles, e.g. the benchmarks)."""
    t0 = time.perf_counter()
    nb = target.shape[0]
    if references is None:
        references = np.zeros((0, nb) + target.shape[1:], np.float32)
        reference_masks = np.zeros((0,) + target.shape[1:], bool)
    tile = TileInputs(
        bands=tuple(bands), target=np.asarray(target, np.float32), cloud_prob=np.asarray(cloud_prob, np.float32),
        cloud_mask=np.asarray(cloud_mask, bool), references=np.asarray(references, np.float32),
        reference_masks=np.asarray(reference_masks, bool), reference_ids=reference_ids,
        reference_dt_days=reference_dt_days, halo=halo, target_id=target_id, context=context or {},
        sar=None if sar is None else np.asarray(sar, np.float32), sar_bands=tuple(sar_bands),
    )
    res: TileResult = model.predict_batch([tile])[0].validate(tile, getattr(model, "name", "model"))
    out = np.concatenate([res.reflectance, res.confidence[None], res.source[None].astype(np.float32)])
    return out, time.perf_counter() - t0


def _timing(index: tuple[int, int], seconds: float) -> tuple[tuple[int, int], float]:
    return index, seconds


def _core(pred: tuple[np.ndarray, float], ys: slice, xs: slice) -> np.ndarray:
    """Halo discard: the core of one tile's ``(prediction, seconds)``."""
    return pred[0][:, ys, xs]


def _blend_task(core, parts, axis_w, n_bands, kind):
    """One output block from its neighbours' ``(prediction, seconds)`` pairs; weights built here (small graph)."""
    from stages.mosaic import blend_block

    wy, wx = axis_w
    return blend_block(core, [(t, pred[0], np.outer(wy[t.index[0]], wx[t.index[1]])) for t, pred in parts],
                       n_bands, kind)


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


def remove_clouds(inputs: SceneInputs, model, tiles: list[TileWindow], halo: int, context=None,
                  blend: str = "feather", timings: list | None = None) -> xr.Dataset:
    """Lazy Dataset with ``reflectance (band, y, x)``, ``confidence (y, x)`` and ``source (y, x)``.

    ``context`` (from ``model.fit_scene``) is passed to every tile. ``blend`` (``feather`` | ``hann`` | ``none``)
    picks how overlapping tile predictions are merged (:mod:`stages.mosaic`); with ``halo == 0`` it makes no
    difference and the cheaper core crop is used. When ``timings`` is a list, one lazy ``(tile index, seconds)``
    pair per tile is appended to it (compute them in the same pass as the output).
    """
    from stages.mosaic import grid_axis_weights, neighbours

    bands = tuple(str(b) for b in inputs.target.band.values)
    nb = len(bands)
    kind = blend if halo > 0 else "none"
    model_d = dask.delayed(model, pure=True)
    context_d = dask.delayed(dict(context or {}), pure=True)
    preds = {}
    for t in tiles:
        ry, rx = t.read
        refs = inputs.references.data[:, :, ry, rx] if inputs.references is not None else None
        rmask = inputs.reference_masks.data[:, ry, rx] if inputs.reference_masks is not None else None
        token = dask.base.tokenize(model, t, context)
        sar_kw = {}
        if inputs.sar is not None:
            from stages.sar import sar_window

            sar_kw = {"sar": sar_window(inputs.sar, t.read),
                      "sar_bands": tuple(str(b) for b in inputs.sar.band.values)}
        d = dask.delayed(predict_tile, pure=True, nout=2)(
            model_d, inputs.target.data[:, ry, rx], inputs.cloud_mask.data[ry, rx],
            inputs.cloud_prob.data[ry, rx], refs, rmask, bands=bands, halo=halo,
            reference_ids=inputs.reference_ids, reference_dt_days=inputs.reference_dt_days,
            target_id=inputs.target_id, context=context_d, **sar_kw,
            dask_key_name=f"cloudfree-tile-{inputs.target_id}-{t.index[0]}-{t.index[1]}-{token}",
        )
        preds[t.index] = d
        if timings is not None:
            timings.append(dask.delayed(_timing, pure=True)(t.index, d[1]))
    axis_w = dask.delayed(grid_axis_weights(tiles, halo, kind), pure=True) if kind != "none" else None
    rows = []
    for row in grid_of_tiles(tiles):
        blocks = []
        for t in row:
            cy, cx = t.core
            if kind == "none":
                ys, xs = t.core_in_read
                block = dask.delayed(_core, pure=True)(preds[t.index], ys, xs)
            else:
                near = neighbours(t, tiles)
                block = dask.delayed(_blend_task, pure=True)(
                    t, [(n, preds[n.index]) for n in near], axis_w, nb, kind,
                    dask_key_name=f"cloudfree-blend-{inputs.target_id}-{t.index[0]}-{t.index[1]}-"
                                  f"{dask.base.tokenize(model, t, context, kind)}",
                )
            blocks.append(dsa.from_delayed(block, shape=(nb + 2, cy.stop - cy.start, cx.stop - cx.start),
                                           dtype=np.float32))
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
