"""Remove stage: run the selected model per tile, lazily, one dask task per output tile.

Each task reads the halo-padded window of the target, masks and a bounded reference stack and calls the model on
plain numpy (the tile contract, :class:`cloudfree.pipeline.contract.TileInputs`). With ``blend="none"`` it keeps the core
(halo discard); otherwise one more task per output block blends the overlapping neighbour predictions with a
feathered or Hann window (:mod:`cloudfree.stages.mosaic`). The graph has a fixed number of tasks per tile, so its size and
the per-worker memory stay flat as the AOI grows. Each tile task also reports its wall time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import dask
import dask.array as dsa
import numpy as np
import xarray as xr

from cloudfree.pipeline.contract import TileInputs, TileResult, TileWindow
from cloudfree.stages.tile import grid_of_tiles

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
    #: (time, pol, y, x) one S1 scene per optical date, model units (stages.sar); each tile gets its halo window
    #: as ``TileInputs.sar`` (``sar_bands`` = the ``band`` coordinate), cut from the same chunks (HaloWindows).
    sar: xr.DataArray | None = None


# -- per-worker model cache -----------------------------------------------------------------------------------------
_MODELS: dict[tuple[str, str], object] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelHandle:
    """A registered model by name and parameters: what travels in the task graph instead of the model object.

    :func:`resolve_model` builds the model once per process (per dask worker) and keeps it, so weights load once
    per worker, not once per task or per pickling.
    """

    name: str
    params_json: str

    @classmethod
    def of(cls, model) -> "ModelHandle | None":
        """A handle for ``model`` when it is a registered model built from its params, else None."""
        from cloudfree.models.registry import get_model_class

        name = getattr(model, "name", "")
        params = getattr(model, "params", None)
        try:
            if not name or params is None or type(model) is not get_model_class(name):
                return None
        except Exception:  # unknown name: not a registered model, ship the object itself
            return None
        return cls(name, params.model_dump_json() if hasattr(params, "model_dump_json") else json.dumps(params))


def resolve_model(model):
    """The model object for ``model`` (a :class:`ModelHandle` is built once per process and cached)."""
    if not isinstance(model, ModelHandle):
        return model
    key = (model.name, model.params_json)
    with _MODELS_LOCK:
        if key not in _MODELS:
            from cloudfree.models.registry import build_model

            _MODELS[key] = build_model(model.name, json.loads(model.params_json))
            log.info("model %s built in process %d", model.name, os.getpid())
        return _MODELS[key]


def predict_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, *, bands, halo,
                 reference_ids, reference_dt_days, target_id, context=None, sar=None,
                 sar_bands=(), origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, float]:
    """One task: numpy in, the whole read window ``(band + 2, y, x)`` float32 out, plus its wall time (s).

    ``model`` is a model object or a :class:`ModelHandle` (resolved once per process); ``sar`` an optional
    ``(time, pol, y, x)`` Sentinel-1 window with polarisation names ``sar_bands``. The model is called through
    ``predict_batch`` (a batch of one tile per task; batching models get their several-tile path from callers that
    hold several tiles, e.g. the benchmarks). ``origin`` is the read window's first pixel in the output grid
    (generative models derive their noise from global pixel coordinates)."""
    model = resolve_model(model)
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
        origin=(int(origin[0]), int(origin[1])),
    )
    res: TileResult = model.predict_batch([tile])[0].validate(tile, getattr(model, "name", "model"))
    out = np.concatenate([res.reflectance, res.confidence[None], res.source[None].astype(np.float32)])
    return out, time.perf_counter() - t0


def _timing_of(index: tuple[int, int], pred: tuple[np.ndarray, float]) -> tuple[tuple[int, int], float]:
    return index, pred[1]


def _core(pred: tuple[np.ndarray, float], ys: slice, xs: slice) -> np.ndarray:
    """Halo discard: the core of one tile's ``(prediction, seconds)``."""
    return pred[0][:, ys, xs]


def _blend_task(core, parts, axis_w, n_bands, kind):
    """One output block from its neighbours' ``(prediction, seconds)`` pairs; weights built here (small graph)."""
    from cloudfree.stages.mosaic import blend_block

    wy, wx = axis_w
    return blend_block(core, [(t, pred[0], np.outer(wy[t.index[0]], wx[t.index[1]])) for t, pred in parts],
                       n_bands, kind)


def _piece(pred: tuple[np.ndarray, float], sl: tuple[slice, slice]) -> np.ndarray:
    """The part of one tile's ``(prediction, seconds)`` that one output block blends (a copy: a view would keep the
    whole prediction in memory)."""
    return np.array(pred[0][(slice(None),) + tuple(sl)], copy=True)


def _blend_pieces(core, near, axis_w, n_bands, kind, *pieces):
    """:func:`_blend_task` of the neighbours' :func:`_piece` for this block."""
    from cloudfree.stages.mosaic import blend_block

    wy, wx = axis_w
    return blend_block(core, [(t, p, np.outer(wy[t.index[0]], wx[t.index[1]])) for t, p in zip(near, pieces)],
                       n_bands, kind, cropped=True)


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


class HaloWindows:
    """Halo-padded windows of a lazy array, cut from its own chunks (a tile-read cache in the task graph).

    Each chunk of ``arr`` stays one task, computed once per run however many tile windows overlap it; a window is
    assembled from its (up to 9) chunks by slicing strips off the neighbours (``map_overlap``-style, but with
    windows that follow the tile plan even where the chunks do not match it). The tasks are written straight into
    the caller's graph layer (:meth:`window` adds them to ``layer``): wrapping sliced arrays in ``dask.delayed``
    optimises each window's graph on its own, which fuses the reads into every window (3-8x the reads with a
    42 px halo on 512 px tiles) and costs O(tiles x graph) to build.
    """

    def __init__(self, arr: dsa.Array, name: str, layer: dict, cut_strips: bool = True):
        lead = arr.ndim - 2
        if any(len(c) > 1 for c in arr.chunks[:lead]):
            arr = arr.rechunk({i: -1 for i in range(lead)})
        self.arr, self.name, self.layer, self.lead = arr, name, layer, (0,) * lead
        #: False: a halo strip is sliced inside the consuming task (a nested task), not cut by a task of its own as
        #: soon as its chunk is read: strips cut eagerly for the tiles of the next rows held 1.2x a chunk each
        #: (8 neighbours' strips) until their tiles ran (the removal's column strips, stages.cog.spill_across).
        self.cut_strips = cut_strips
        self.yb = np.cumsum((0,) + arr.chunks[-2])
        self.xb = np.cumsum((0,) + arr.chunks[-1])

    def window(self, index: tuple[int, int], ry: slice, rx: slice):
        """``(layout, pieces)`` of ``arr[..., ry, rx]``: task references to whole chunks or halo strips (strip
        tasks added to the layer), assembled by :func:`assemble_windows` inside the consuming task."""
        from dask._task_spec import Task, TaskRef

        def span(b, s):
            idx = [i for i in range(len(b) - 1) if b[i] < s.stop and b[i + 1] > s.start]
            return [(i, slice(int(max(s.start, b[i]) - b[i]), int(min(s.stop, b[i + 1]) - b[i])), int(b[i + 1] - b[i]))
                    for i in idx]

        pieces, layout = [], []
        for i, ys, ny in span(self.yb, ry):
            layout.append(0)
            for j, xs, nx in span(self.xb, rx):
                src = (self.arr.name, *self.lead, i, j)
                if (ys.start, ys.stop, xs.start, xs.stop) == (0, ny, 0, nx):
                    pieces.append(TaskRef(src))
                elif not self.cut_strips:
                    pieces.append(Task(None, _strip, TaskRef(src), (Ellipsis, ys, xs)))
                else:
                    k = (f"{self.name}-strip", *index, i, j)
                    self.layer[k] = Task(k, _strip, TaskRef(src), (Ellipsis, ys, xs))
                    pieces.append(TaskRef(k))
                layout[-1] += 1
        return tuple(layout), pieces


def _strip(block: np.ndarray, index) -> np.ndarray:
    """A copy (not a view: a view would keep the whole neighbouring chunk in memory) of a halo strip."""
    return np.array(block[index], copy=True)


def _as_dask(a, size: int) -> dsa.Array:
    """``a`` as a dask array (in-memory inputs, e.g. in tests, are chunked by the tile size)."""
    if isinstance(a, dsa.Array):
        return a
    a = np.asarray(a)
    return dsa.from_array(a, chunks=tuple(a.shape[:-2]) + (size, size))


def _assemble(layout: tuple[int, ...], *pieces: np.ndarray) -> np.ndarray:
    """Pieces in row-major order, ``layout[r]`` of them in row ``r`` -> one array (last two axes)."""
    if len(pieces) == 1:
        return pieces[0]
    rows, k = [], 0
    for n in layout:
        rows.append(np.concatenate(pieces[k:k + n], axis=-1))
        k += n
    return np.concatenate(rows, axis=-2)


def assemble_windows(layouts, pieces) -> list[np.ndarray | None]:
    """Inside a task: the windows that :meth:`HaloWindows.window` described, from their ``(layout, pieces)``
    concatenated in order (``pieces`` holds each window's pieces one window after the other). A ``None`` layout
    is an absent input (None in the result, no pieces). Used by the removal's tile tasks and the composite's
    block tasks (pipeline/composite.py)."""
    arrays, k = [], 0
    for layout in layouts:
        if layout is None:
            arrays.append(None)
            continue
        n = sum(layout)
        arrays.append(_assemble(layout, *pieces[k:k + n]))
        k += n
    return arrays


def _predict_task(model, context, static: dict, layouts: tuple, *pieces):
    """One tile: its input windows assembled from chunk/strip pieces (in the task: no window is held as a
    separate result), then :func:`predict_tile`."""
    target, cloud_mask, cloud_prob, references, reference_masks, sar = assemble_windows(layouts, pieces)
    return predict_tile(model, target, cloud_mask, cloud_prob, references, reference_masks, context=context,
                        sar=sar, **static)


#: each output block blends copies of its part of the neighbours' predictions (:func:`_piece`), so a prediction is
#: released as soon as its parts are cut, not when the last of its 9 blocks is blended.
BLEND_PIECES = True


def _blend_parts(core, near, axis_w, n_bands, kind, *preds):
    return _blend_task(core, list(zip(near, preds)), axis_w, n_bands, kind)


def remove_clouds(inputs: SceneInputs, model, tiles: list[TileWindow], halo: int, context=None,
                  blend: str = "feather", timings: list | None = None) -> xr.Dataset:
    """Lazy Dataset with ``reflectance (band, y, x)``, ``confidence (y, x)`` and ``source (y, x)``.

    ``context`` (from ``model.fit_scene``) is passed to every tile. ``blend`` (``feather`` | ``hann`` | ``none``)
    picks how overlapping tile predictions are merged (:mod:`cloudfree.stages.mosaic`); with ``halo == 0`` it makes no
    difference and the cheaper core crop is used. When ``timings`` is a list, one lazy ``(tile index, seconds)``
    pair per tile is appended to it (compute them in the same pass as the output).

    Every input chunk is read once: tiles get their halo from the neighbouring chunks (:class:`HaloWindows`).
    A registered model travels as a :class:`ModelHandle` and is built once per worker process.
    """
    from cloudfree.stages.mosaic import grid_axis_weights, neighbours, piece_of

    from dask._task_spec import DataNode, Task, TaskRef
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    bands = tuple(str(b) for b in inputs.target.band.values)
    nb = len(bands)
    kind = blend if halo > 0 else "none"
    handle = ModelHandle.of(model)
    sar_bands = tuple(str(b) for b in inputs.sar.band.values) if inputs.sar is not None else ()
    if len(tiles) == 1 and in_memory(inputs.target, inputs.cloud_mask, inputs.cloud_prob, inputs.references,
                                     inputs.reference_masks, inputs.sar):
        return _remove_one_tile(inputs, handle if handle is not None else model, tiles[0], halo, context, kind,
                                timings, bands, sar_bands)
    size = max(t.core[0].stop - t.core[0].start for t in tiles)
    arrays = {role: _as_dask(da.data, size) for role, da in (
        ("target", inputs.target), ("mask", inputs.cloud_mask), ("prob", inputs.cloud_prob),
        ("refs", inputs.references), ("rmask", inputs.reference_masks), ("sar", inputs.sar)) if da is not None}
    token = dask.base.tokenize(handle or model, context, tiles, halo, kind, inputs.target_id,
                               *(a.name for a in arrays.values()))
    name = f"cloudfree-tiles-{token}"
    layer: dict = {}
    model_k, ctx_k = (f"{name}-model",), (f"{name}-context",)
    layer[model_k] = DataNode(model_k, handle if handle is not None else model)
    layer[ctx_k] = DataNode(ctx_k, dict(context or {}))
    deps, wins = [], {}
    for role, arr in arrays.items():
        wins[role] = HaloWindows(arr, f"{name}-{role}", layer, cut_strips=False)
        deps.append(wins[role].arr)
    static = {"bands": bands, "halo": halo, "reference_ids": inputs.reference_ids,
              "reference_dt_days": inputs.reference_dt_days, "target_id": inputs.target_id, "sar_bands": sar_bands}
    preds = {}
    for t in tiles:
        ry, rx = t.read
        layouts, pieces = [], []
        for role in ("target", "mask", "prob", "refs", "rmask", "sar"):
            if role in wins:
                lay, pcs = wins[role].window(t.index, ry, rx)
                layouts.append(lay)
                pieces.extend(pcs)
            else:
                layouts.append(None)
        k = (f"{name}-predict", *t.index)
        layer[k] = Task(k, _predict_task, TaskRef(model_k), TaskRef(ctx_k), {**static, "origin": (ry.start, rx.start)},
                        tuple(layouts), *pieces)
        preds[t.index] = k
    out_name = f"cloudfree-removed-{token}"
    axis_k = (f"{name}-weights",)
    if kind != "none":
        layer[axis_k] = DataNode(axis_k, grid_axis_weights(tiles, halo, kind))
    rows = grid_of_tiles(tiles)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            k = (out_name, 0, r, c)
            if kind == "none":
                ys, xs = t.core_in_read
                layer[k] = Task(k, _core, TaskRef(preds[t.index]), ys, xs)
            else:
                near = neighbours(t, tiles)
                if not BLEND_PIECES:
                    layer[k] = Task(k, _blend_parts, t, tuple(near), TaskRef(axis_k), nb, kind,
                                    *(TaskRef(preds[n.index]) for n in near))
                    continue
                refs = []
                for n in near:
                    pk = (f"{name}-piece", *n.index, *t.index)
                    layer[pk] = Task(pk, _piece, TaskRef(preds[n.index]), piece_of(n, t))
                    refs.append(TaskRef(pk))
                layer[k] = Task(k, _blend_pieces, t, tuple(near), TaskRef(axis_k), nb, kind, *refs)
    timing_keys = []
    if timings is not None:
        for t in tiles:
            k = (f"{name}-seconds", *t.index)
            layer[k] = Task(k, _timing_of, t.index, TaskRef(preds[t.index]))
            timing_keys.append(k)
    graph = HighLevelGraph.from_collections(out_name, layer, dependencies=deps)
    chunks = ((nb + 2,), tuple(row[0].core[0].stop - row[0].core[0].start for row in rows),
              tuple(t.core[1].stop - t.core[1].start for t in rows[0]))
    stacked = dsa.Array(graph, out_name, chunks, dtype=np.float32)
    if timings is not None:
        timings.extend(Delayed(k, graph, layer=out_name) for k in timing_keys)
    y, x = inputs.target.y, inputs.target.x
    refl = xr.DataArray(stacked[:nb], dims=("band", "y", "x"), coords={"band": list(bands), "y": y, "x": x})
    conf = xr.DataArray(stacked[nb], dims=("y", "x"), coords={"y": y, "x": x})
    src = xr.DataArray(stacked[nb + 1], dims=("y", "x"), coords={"y": y, "x": x})
    ds = xr.Dataset({"reflectance": refl, "confidence": conf, "source": src})
    if inputs.target.rio.crs is not None:
        ds = ds.rio.write_crs(inputs.target.rio.crs)
    return ds


def in_memory(*arrays) -> bool:
    """True when every one of ``arrays`` (xarray objects or None) holds a numpy array (e.g. a small target's inputs,
    :func:`cloudfree.stages.load.read_small_once`): the steps then compute them eagerly, with no dask graph."""
    return all(a is None or isinstance(a.data, np.ndarray) for a in arrays)


def _remove_one_tile(inputs: SceneInputs, model, tile: TileWindow, halo: int, context, kind: str,
                     timings: list | None, bands: tuple, sar_bands: tuple) -> xr.Dataset:
    """:func:`remove_clouds` of in-memory inputs on a plan of one tile, eagerly: the tile task's call
    (:func:`predict_tile` on the read window, then the core crop or the blend of its one prediction) without a
    graph. The same functions on the same pixels as the graph's tasks, so the same values."""
    from cloudfree.stages.mosaic import grid_axis_weights, neighbours

    ry, rx = tile.read

    def window(da):
        return None if da is None else np.asarray(da.data)[..., ry, rx]

    static = {"bands": bands, "halo": halo, "reference_ids": inputs.reference_ids,
              "reference_dt_days": inputs.reference_dt_days, "target_id": inputs.target_id, "sar_bands": sar_bands,
              "origin": (ry.start, rx.start)}
    pred = predict_tile(model, window(inputs.target), window(inputs.cloud_mask), window(inputs.cloud_prob),
                        window(inputs.references), window(inputs.reference_masks), context=dict(context or {}),
                        sar=window(inputs.sar), **static)
    if kind == "none":
        ys, xs = tile.core_in_read
        stacked = _core(pred, ys, xs)
    else:
        stacked = _blend_parts(tile, tuple(neighbours(tile, [tile])), grid_axis_weights([tile], halo, kind),
                               len(bands), kind, pred)
    if timings is not None:
        timings.append(_timing_of(tile.index, pred))
    nb = len(bands)
    y, x = inputs.target.y, inputs.target.x
    ds = xr.Dataset({"reflectance": xr.DataArray(stacked[:nb], dims=("band", "y", "x"),
                                                 coords={"band": list(bands), "y": y, "x": x}),
                     "confidence": xr.DataArray(stacked[nb], dims=("y", "x"), coords={"y": y, "x": x}),
                     "source": xr.DataArray(stacked[nb + 1], dims=("y", "x"), coords={"y": y, "x": x})})
    if inputs.target.rio.crs is not None:
        ds = ds.rio.write_crs(inputs.target.rio.crs)
    return ds


def mark_unfilled(ds, cloud_mask):
    """Cloudy target pixels that the model kept as they are (``SOURCE_TARGET``) become ``SOURCE_UNFILLED`` with
    confidence 0: the pixel is the cloudy observation, never labelled "target observation (clear)"."""
    from cloudfree.pipeline.contract import SOURCE_TARGET, SOURCE_UNFILLED

    if all(isinstance(a.data, np.ndarray) for a in (cloud_mask, ds.source, ds.confidence)):
        from cloudfree.stages.masks import replace_vars

        src, conf = ds.source.data, ds.confidence.data
        unfilled = cloud_mask.data & (src == float(SOURCE_TARGET))  # in memory: numpy, no alignment
        return replace_vars(ds, source=np.where(~unfilled, src, float(SOURCE_UNFILLED)),
                            confidence=np.where(~unfilled, conf, 0.0))
    unfilled = cloud_mask & (ds.source == float(SOURCE_TARGET))
    return ds.assign(source=ds.source.where(~unfilled, float(SOURCE_UNFILLED)),
                     confidence=ds.confidence.where(~unfilled, 0.0))
