"""Regional composites: one cloud-free image per MGRS tile and period, computed incrementally.

``cloudfree composite --region region.geojson --period 2024-06`` searches the configured catalog for every
acquisition intersecting the region in the period (``eo:cloud_cover <= composite.max_cloud_cover``), groups them by
MGRS tile and builds, per tile, a composite by ``composite.method``:

Pixels a cloud layer flagged but the mask refinement's opening removed (``mask.refinement``, stages/masks.py) are
not clear observations here either: both mask paths (in-task and lazy) count them as cloudy.

* ``median``: per-pixel median of the clear observations (masked by ``mask.methods``); confidence grows with the
  number of clear observations (0.67 for one, 1 for three or more: more observations guard against mask misses);
  where no observation is clear, the least cloudy one is kept with confidence 0;
* ``best-pixel``: per pixel the clear observation with the lowest cloud probability; confidence
  ``1 - probability``;
* ``model``: target-date reconstruction of the period's latest acquisition with the configured removal model,
  the other acquisitions as its references (the same code path as ``cloudfree run``).

Incremental: ``<output.dir>/composites/state.json`` records, per ``tile/period``, the input item ids with their
``updated`` timestamps (``created`` or the acquisition time when absent) and the method. A rerun with the same
inputs processes zero tiles; a new or reprocessed acquisition re-processes only its tile. Outputs are published
in ``<output.dir>/composites/collection.json`` like any cloudfree output.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pystac

from cloudfree.pipeline.config import Config
from cloudfree.pipeline.contract import SOURCE_FUSED, SOURCE_NODATA, SOURCE_REFERENCE_BASE
from cloudfree.pipeline.errors import CloudfreeError, ConfigError, NoItemsFoundError

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class CompositeResult:
    tile: str
    period: str
    status: str  # done | skipped | failed
    inputs: list[str] = field(default_factory=list)
    item: Path | None = None
    error: str | None = None
    seconds: float = 0.0


# -- pure kernel ---------------------------------------------------------------------------------------------------
def composite_kernel(stack: np.ndarray, cloudy: np.ndarray, prob: np.ndarray, method: str) -> np.ndarray:
    """``stack (t, band, y, x)``, ``cloudy (t, y, x)`` bool, ``prob (t, y, x)`` -> ``(band + 2, y, x)``:
    reflectance, confidence, source (``10 + t`` for observation t; ``SOURCE_FUSED`` for a median of several).

    Per output block this is most of the composite's compute: work that only a few pixels need (the fallback to
    the least cloudy observation where none is clear) is done on those pixels only."""
    nt, nb = stack.shape[:2]
    # odc-stac fills pixels outside an item's footprint with 0 (not NaN) when loading float32 from uint16 with
    # nodata 0 (stages/load.py); a real observation is never exactly 0 in every band, so treat that as nodata
    finite = np.isfinite(stack).all(axis=1)
    finite &= (stack != 0).any(axis=1)
    clear = finite & ~cloudy.astype(bool)
    n_clear = clear.sum(axis=0)
    from cloudfree.models.median_composite import composite  # the one median / best-pixel implementation

    p = None
    if method == "median":
        refl, _, _ = composite(stack, clear, None, "median", chosen=False, n_clear=n_clear,
                                 clear_is_finite=True)
        conf = (0.5 + 0.5 * np.minimum(n_clear, 3) / 3.0).astype(np.float32)  # one clear: 0.67 ... three or more: 1
        only = np.argmax(clear, axis=0)
        src = np.where(n_clear >= 2, SOURCE_FUSED, SOURCE_REFERENCE_BASE + only).astype(np.float32)
    elif method == "best-pixel":
        p = np.where(finite, np.nan_to_num(prob, nan=1.0), np.inf)
        refl, best, _ = composite(stack, clear, p, "best")
        best = np.maximum(best, 0)
        pb = np.take_along_axis(p, best[None], axis=0)[0]
        conf = np.where(n_clear > 0, 1.0 - np.clip(pb, 0, 1), 0.0).astype(np.float32)
        src = (SOURCE_REFERENCE_BASE + best).astype(np.float32)
    else:
        raise ConfigError(f"composite.method {method!r} has no pixel kernel; use median or best-pixel")
    none_clear = n_clear == 0
    if none_clear.any():  # no clear observation: the least cloudy finite one (first on ties: items are ranked)
        ys, xs = np.nonzero(none_clear)
        pn = np.where(finite[:, ys, xs], np.nan_to_num(prob[:, ys, xs], nan=1.0), np.inf)
        least = np.argmin(pn, axis=0)
        refl[:, ys, xs] = stack[least, :, ys, xs].T
        src[ys, xs] = SOURCE_REFERENCE_BASE + least
        conf[ys, xs] = 0.0
        nodata = ~finite[:, ys, xs].any(axis=0)  # no finite observation at all
        refl[:, ys[nodata], xs[nodata]] = np.nan
        src[ys[nodata], xs[nodata]] = SOURCE_NODATA
    return np.concatenate([refl.astype(np.float32, copy=False), conf[None], src[None]])


def fused_composite(stack, items, geobox, chunk: int, method: str, specs) -> "dask.array.Array":
    """The composite ``(band + 2, y, x)`` as ONE task per output block: the block's reads of every date and band,
    the mask layers' windows with their morphology halo (:class:`cloudfree.stages.masks.LayerMask`, cut from the
    neighbouring chunks by :class:`cloudfree.stages.remove.HaloWindows`), the masks, probabilities and the kernel computed
    inside the task. Nothing derived from the inputs waits in memory between tasks, so with the bounded
    look-ahead of the write (:func:`cloudfree.stages.cog.bound_lookahead`) memory depends on the block size and the dates,
    not on the area. Values are those of the mask stage + :func:`composite_kernel` (tested)."""
    import dask
    import dask.array as dsa
    from dask._task_spec import Task, TaskRef
    from dask.highlevelgraph import HighLevelGraph

    from cloudfree.stages.load import load_layer
    from cloudfree.stages.remove import HaloWindows
    from cloudfree.stages.tile import plan_tiles

    refl = stack.data
    nt, nb = refl.shape[:2]
    if len(refl.chunks[1]) != 1 or any(c != 1 for c in refl.chunks[0]):  # one block per (date, y, x): its key below
        refl = refl.rechunk({0: 1, 1: -1})
    layers = [load_layer(items, s.asset, geobox, chunk, dtype=s.dtype).data for s in specs]
    halo = max(s.halo for s in specs)
    tiles = plan_tiles(geobox.shape, chunk, halo)
    token = dask.base.tokenize(refl.name, [a.name for a in layers], method, specs, halo, chunk)
    name = f"cloudfree-composite-{token}"
    layer: dict = {}
    wins = [HaloWindows(a, f"{name}-{s.method}", layer) for a, s in zip(layers, specs)]
    for t in tiles:
        by, bx = t.index
        pieces = [TaskRef((refl.name, k, 0, by, bx)) for k in range(nt)]
        layouts = []
        for w in wins:
            lay, pcs = w.window(t.index, *t.read)
            layouts.append(lay)
            pieces.extend(pcs)
        key = (name, 0, by, bx)
        layer[key] = Task(key, _composite_block, method, tuple(specs), tuple(layouts), t.core_in_read, nt, *pieces)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[refl, *(w.arr for w in wins)])
    return dsa.Array(graph, name, ((nb + 2,), refl.chunks[2], refl.chunks[3]), dtype=np.float32)


def _composite_block(method, specs, layouts, core, nt, *pieces) -> np.ndarray:
    """One output block: the dates' reflectance blocks, then each mask layer's window pieces."""
    from cloudfree.stages.masks import in_task_masks
    from cloudfree.stages.remove import assemble_windows

    stack = np.concatenate(pieces[:nt], axis=0)
    cloudy, prob, _ = in_task_masks(specs, assemble_windows(layouts, pieces[nt:]), core)
    return composite_kernel(stack, cloudy, prob, method)


# -- state ---------------------------------------------------------------------------------------------------------
def item_updated(item: pystac.Item) -> str:
    """The timestamp that changes when an acquisition is (re)published."""
    p = item.properties
    return str(p.get("updated") or p.get("created") or (item.datetime.isoformat() if item.datetime else ""))


def signature(items: Sequence[pystac.Item]) -> dict[str, str]:
    return {it.id: item_updated(it) for it in sorted(items, key=lambda i: i.id)}


def load_state(path: Path) -> dict:
    if not path.exists():
        return {"version": STATE_VERSION, "tiles": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"composite state {path} is not valid JSON ({exc}); delete it to rebuild every tile") from None
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"composite state {path} has version {state.get('version')}, expected {STATE_VERSION}; "
                          "delete it to rebuild every tile")
    return state


def save_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


# -- planning ------------------------------------------------------------------------------------------------------
def period_interval(period: str) -> str:
    """``2024-06`` / ``2024`` / ``2024-06-01/2024-06-15`` -> an explicit ISO interval every backend accepts."""
    from cloudfree.catalogs.base import parse_interval

    start, end = parse_interval(period)
    if start is None or end is None:
        raise ConfigError(f"composite period {period!r} must be bounded, e.g. 2024-06 or 2024-06-01/2024-06-30")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return f"{start.strftime(fmt)}/{end.strftime(fmt)}"


def plan_composite(catalog, cfg: Config, region: str | Path, period: str) -> dict[str, list[pystac.Item]]:
    """Acquisitions per MGRS tile, least cloudy first, at most ``composite.max_items`` each."""
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.stages.search import load_aoi, mgrs_tile

    bbox, geom = load_aoi(str(region))
    items = catalog.search(SearchQuery(
        collections=(cfg.catalog.collection,), bbox=bbox, intersects=geom, datetime=period_interval(period),
        query={"eo:cloud_cover": {"lte": cfg.composite.max_cloud_cover}}, allow_empty=True))
    if not items:
        raise NoItemsFoundError(f"no acquisitions of {cfg.catalog.collection!r} intersect {region} in {period} with "
                                f"eo:cloud_cover <= {cfg.composite.max_cloud_cover}; widen the period or region")
    tiles: dict[str, list[pystac.Item]] = {}
    untiled = []
    for it in items:
        tile = mgrs_tile(it)
        if tile is None:
            untiled.append(it.id)
            log.warning("item %s has no MGRS tile (s2:mgrs_tile / mgrs:*); skipped", it.id)
            continue
        tiles.setdefault(tile, []).append(it)
    if not tiles:  # never a silent success with nothing done: a scheduled job would produce nothing forever
        raise NoItemsFoundError(
            f"none of the {len(items)} acquisition(s) of {cfg.catalog.collection!r} in {region} / {period} has an "
            f"MGRS tile id (s2:mgrs_tile, mgrs:utm_zone/latitude_band/grid_square, or _Txxxxx in the id), e.g. "
            f"{untiled[:3]}; composites are built per MGRS tile: add the tile ids to the catalog, or use "
            "`cloudfree run` (per scene, no tile ids needed)")
    for tile, its in tiles.items():
        its.sort(key=lambda i: (i.properties.get("eo:cloud_cover", 100.0), i.id))
        del its[cfg.composite.max_items:]
    return dict(sorted(tiles.items()))


# -- one tile ------------------------------------------------------------------------------------------------------
def _pixel_composite(items: list[pystac.Item], tile: str, period: str, cfg: Config, region_bbox, out_dir: Path,
                     run_id: str) -> Path:
    import dask.array as dsa
    import xarray as xr

    from cloudfree.stages.load import check_grid_size, fetch_remote_assets, load_reflectance, output_geobox
    from cloudfree.stages.masks import build_mask_layers, layer_masks, mask_inputs, resolved
    from cloudfree.stages.publish import update_collection
    from cloudfree.stages.write import paths_for

    method = cfg.composite.method
    bands = list(cfg.grid.bands)
    geobox = check_grid_size(output_geobox(items[0], cfg.grid, region_bbox), items[0], cfg.grid, f"composite tile {tile}")
    # mask.methods "auto" resolved for these items (recorded in the item); Sentinel Hub assets fetched once
    cfg = cfg.replace(mask={"methods": list(resolved(items, cfg.mask).methods)})
    items = fetch_remote_assets(items, [*bands, *mask_inputs(items, cfg.mask)], geobox)
    stack = load_reflectance(items, bands, geobox, cfg.grid.chunk, name=f"{tile}-{period}")
    nb = len(bands)
    specs = layer_masks(items, cfg.mask)
    if specs is not None:
        out = fused_composite(stack, items, geobox, cfg.grid.chunk, method, specs)
    else:  # a mask method that needs several bands (spectral, s2cloudless): masks from the mask stage
        layers = build_mask_layers(items, geobox, cfg.mask, cfg.grid.chunk)
        mask, prob = layers.cloudy, layers.prob  # an opened speck is never a clear observation
        # one task per output block over all dates: memory per task = dates x bands x block, whatever the area
        out = dsa.blockwise(composite_kernel, "cyx", stack.data, "tbyx", mask.data, "tyx",
                            prob.data.astype(np.float32), "tyx", method, None, new_axes={"c": nb + 2},
                            concatenate=True, dtype=np.float32)
    y, x = stack.y, stack.x
    ds = xr.Dataset({
        "reflectance": xr.DataArray(out[:nb], dims=("band", "y", "x"), coords={"band": bands, "y": y, "x": x}),
        "confidence": xr.DataArray(out[nb], dims=("y", "x"), coords={"y": y, "x": x}),
        "source": xr.DataArray(out[nb + 1], dims=("y", "x"), coords={"y": y, "x": x}),
    }).rio.write_crs(stack.rio.crs)
    from cloudfree.pipeline.safety import clean_stale_staging, publish_dir, safe_rmtree, safe_stem, staging_dir, target_lock

    stem = safe_stem(f"{tile}_{period.replace('/', '_')}_{method}")  # the tile name comes from the catalog: untrusted
    path = paths_for(out_dir, stem)["item"]
    # as for targets (pipeline.runner): under the tile's lock, staging left by killed runs removed, COGs and item
    # written into this run's staging folder and published with one rename
    with target_lock(out_dir, stem):
        clean_stale_staging(out_dir, stem)
        stage = staging_dir(out_dir, stem, run_id)
        try:
            _write_pixel_composite(ds, items, tile, period, cfg, geobox, bands, method, run_id, out_dir, stem, stage,
                                   best=stack[0])
            publish_dir(out_dir, stage, path.parent)
        except BaseException:
            safe_rmtree(out_dir, stage)
            raise
    update_collection(out_dir, path, f"{cfg.output.collection}-composites", "cloudfree regional composites")
    return path


def _write_pixel_composite(ds, items: list[pystac.Item], tile: str, period: str, cfg: Config, geobox, bands, method: str,
                           run_id: str, out_dir: Path, stem: str, stage: Path, best=None) -> None:
    """The COGs, the quicklook (``best``, the least cloudy acquisition | the composite | its low-confidence
    pixels) and the item of one pixel composite, written into ``stage`` (published by the caller)."""
    from cloudfree.catalogs.harmonise import harmonise
    from cloudfree.pipeline.runner import QUICKLOOK_MAX, _progress_callback
    from cloudfree.stages.output_check import LOW_CONFIDENCE
    from cloudfree.stages.publish import output_item
    from cloudfree.stages.write import RGB, paths_for, quicklook, write_json_atomic, write_outputs

    k = max(1, int(np.ceil(max(geobox.shape) / QUICKLOOK_MAX)))
    rgb = [b for b in RGB if b in bands]
    extras = ()
    if cfg.output.quicklook and len(rgb) == 3 and best is not None:  # computed in the same pass as the COGs
        extras = (best.sel(band=rgb)[:, ::k, ::k].data, ds.reflectance.sel(band=rgb)[:, ::k, ::k].data,
                  (ds.confidence[::k, ::k] < LOW_CONFIDENCE).data)
    written, computed = write_outputs(ds, out_dir, stem, cfg.output, extra_compute=extras,
                                      progress=_progress_callback(cfg), stage=stage)
    if extras:
        before, after, low = computed
        written.files["quicklook"] = quicklook(before, after, low, stage / paths_for(out_dir, stem)["quicklook"].name,
                                               title=f"{tile} {period}: least cloudy input | {method} composite")
    item = output_item(items[0], items[1:], written, geobox, bands, method, {}, run_id,
                       [harmonise(i).as_properties() for i in items],
                       collection_id=f"{cfg.output.collection}-composites",
                       item_dir=paths_for(out_dir, stem)["item"].parent)
    item.id = stem
    from cloudfree.catalogs.base import parse_interval

    # the requested period is the composite's time range (the acquisitions it used are in cloudfree:composite)
    start, end = parse_interval(period)
    times = sorted(i.datetime for i in items)
    item.datetime = None
    item.common_metadata.start_datetime, item.common_metadata.end_datetime = start or times[0], end or times[-1]
    codes = {str(SOURCE_NODATA): "nodata", str(SOURCE_FUSED): "median of several clear acquisitions"}
    codes |= {str(SOURCE_REFERENCE_BASE + k): f"acquisition {it.id}" for k, it in enumerate(items)}
    item.properties.update({
        "cloudfree:source_codes": codes, "cloudfree:composite": {
            "tile": tile, "period": period, "method": method, "inputs": signature(items)},
        "processing:lineage": f"{method} composite of {len(items)} acquisition(s) of MGRS {tile} in {period}",
        "cloudfree:mask_methods": list(cfg.mask.methods),
    })
    from cloudfree.stages.output_check import cover_stats

    stats = cover_stats(written.files["confidence"], None)
    # the share that is not a usable clear estimate: still uncertain or nodata
    item.properties["eo:cloud_cover"] = round(100 * stats["unusable_after"], 2)
    item.properties["cloudfree:cover"] = {k: v for k, v in stats.items() if k != "masked_before"}
    item.properties.pop("cloudfree:target", None)
    item.properties.pop("cloudfree:references", None)
    write_json_atomic(item.to_dict(include_self_link=False, transform_hrefs=False),
                      stage / paths_for(out_dir, stem)["item"].name)


def _model_composite(items: list[pystac.Item], tile: str, period: str, cfg: Config, out_dir: Path,
                     run_id: str) -> Path:
    from cloudfree.models.registry import build_model, check_usable
    from cloudfree.pipeline.runner import _run_target
    from cloudfree.stages.search import Candidate, TargetPlan, item_time, mgrs_tile

    target = max(items, key=lambda i: (item_time(i), i.id))
    t0 = item_time(target)
    cands = tuple(Candidate(item=it, dt_days=abs((item_time(it) - t0).total_seconds()) / 86400.0,
                            clear_fraction=1 - it.properties.get("eo:cloud_cover", 100.0) / 100.0, overlap=1.0,
                            same_orbit=True, same_tile=mgrs_tile(it) == tile, score=0.0, reason="composite input",
                            offset_days=(item_time(it) - t0).total_seconds() / 86400.0)
                  for it in items if it.id != target.id)
    model = build_model(cfg.model.name, cfg.model.params)
    check_usable(model, cfg.model.allow_experimental)
    sub = cfg.replace(output={"dir": str(out_dir), "overwrite": True,
                              "collection": f"{cfg.output.collection}-composites"})
    # through the runner's per-target path: under the target's lock, staging left by killed runs removed first
    res = _run_target(TargetPlan(target, cands, ()), model, sub, run_id, Path(out_dir))
    return res.outputs["item"]


# -- driver --------------------------------------------------------------------------------------------------------
def run_composite(cfg: Config, region: str | Path, period: str, *, force: bool = False) -> list[CompositeResult]:
    """Build (or bring up to date) the composite of every MGRS tile intersecting ``region`` in ``period``."""
    import uuid

    from cloudfree.catalogs.base import open_catalog
    from cloudfree.pipeline.runner import concurrent_units, dask_context, map_units
    from cloudfree.stages.search import load_aoi

    if cfg.output.store:
        from cloudfree.pipeline.errors import ConfigError

        raise ConfigError(f"output.dir {cfg.output.store}: composites are written only to a local folder (their "
                          "state file is rewritten in place after every tile); give --out a local folder and copy "
                          "the composites to the store afterwards (aws s3 sync, gsutil rsync, azcopy)")
    catalog = open_catalog(cfg.catalog)
    plans = plan_composite(catalog, cfg, region, period)
    out_dir = Path(cfg.output.dir) / "composites"
    state_path = out_dir / "state.json"
    state = load_state(state_path)
    bbox, geom = load_aoi(str(region))
    if bbox is None and geom is not None:
        from shapely.geometry import shape

        bbox = shape(geom).bounds
    run_id = uuid.uuid4().hex[:12]
    todo, results = [], {}
    for tile, items in plans.items():
        key = f"{tile}/{period}"
        sig = signature(items)
        prev = state["tiles"].get(key)
        if (not force and prev and prev["inputs"] == sig and prev["method"] == cfg.composite.method
                and (out_dir / prev["item"]).exists()):
            log.info("composite %s: inputs unchanged (%d acquisitions), skipped", key, len(items))
            results[tile] = CompositeResult(tile, period, "skipped", list(sig), out_dir / prev["item"])
            continue
        if prev:
            new = sorted(set(sig) - set(prev["inputs"]))
            changed = sorted(k for k in sig if k in prev["inputs"] and prev["inputs"][k] != sig[k])
            log.info("composite %s: new %s, updated %s: re-processing", key, new, changed)
        todo.append((tile, items))
    state_lock = threading.Lock()

    def one(unit) -> CompositeResult:
        tile, items = unit
        key, sig = f"{tile}/{period}", signature(items)
        t0 = time.perf_counter()
        try:
            if cfg.composite.method == "model":
                path = _model_composite(items, tile, period, cfg, out_dir, run_id)
            else:
                path = _pixel_composite(items, tile, period, cfg, bbox, out_dir, run_id)
        except Exception as exc:  # noqa: BLE001 - one failing tile never stops the batch (KeyboardInterrupt does)
            from cloudfree.pipeline.redact import redact
            from cloudfree.pipeline.runner import exception_chain

            msg = str(exc) if isinstance(exc, CloudfreeError) else (
                f"composite {key}: {exception_chain(exc)}; inputs {list(sig)}: check their files (truncated or "
                "corrupt download, network; the log names the file), fetch them again or drop the item, and rerun")
            msg = redact(msg)
            log.error("composite %s failed: %s", key, msg)
            log.debug("composite %s: traceback", key, exc_info=True)
            return CompositeResult(tile, period, "failed", list(sig), error=msg, seconds=time.perf_counter() - t0)
        with state_lock:  # tiles may finish concurrently (run.concurrent_targets)
            state["tiles"][key] = {
                "inputs": sig, "method": cfg.composite.method, "item": path.relative_to(out_dir).as_posix(),
                "run_id": run_id, "finished": datetime.now(timezone.utc).isoformat(),
            }
            save_state(state, state_path)  # after every tile: an interrupted run keeps what it finished
        return CompositeResult(tile, period, "done", list(sig), path, seconds=time.perf_counter() - t0)

    with dask_context(cfg):
        for res in map_units(one, todo, concurrent_units(cfg)):
            results[res.tile] = res
    results = [results[tile] for tile in plans]
    if cfg.output.report:
        _composite_report(results, cfg, out_dir, run_id)
    return results


def _composite_report(results: list[CompositeResult], cfg: Config, out_dir: Path, run_id: str) -> Path | None:
    """The run report of a composite run (``<out>/composites/reports/<run id>/``), as ``cloudfree run`` writes
    one: per tile its quicklook, confidence and source maps and cover; listed by ``cloudfree report``."""
    from cloudfree.pipeline.run_report import write_report
    from cloudfree.pipeline.runner import TargetResult
    from cloudfree.stages.write import paths_for

    rows = []
    for r in results:
        outputs, stats = {}, {}
        if r.item is not None and Path(r.item).exists():
            outputs = {k: v for k, v in paths_for(out_dir, Path(r.item).parent.name).items() if v.exists()}
            stats = json.loads(Path(r.item).read_text())["properties"].get("cloudfree:cover", {})
        rows.append(TargetResult(f"{r.tile} {r.period}", r.status, list(r.inputs), outputs=outputs, error=r.error,
                                 seconds=r.seconds, stats=stats))
    try:
        path = write_report(rows, cfg.replace(output={"dir": str(out_dir)}), run_id,
                            f"{cfg.composite.method} composite")
    except (OSError, ValueError) as exc:  # a report problem must not fail a finished run
        log.error("composite report could not be written: %s", exc)
        return None
    log.info("composite report: %s", path)
    return path
