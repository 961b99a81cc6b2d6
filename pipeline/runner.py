"""The runner: search -> load -> masks -> tile -> remove -> write -> publish, one target at a time.

Each target is computed in one dask pass (inputs read once), written atomically, and marked done by its STAC item,
so a rerun skips finished targets (resume) unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np

from catalogs.base import open_catalog
from pipeline.config import Config
from pipeline.errors import CloudfreeError
from stages.search import TargetPlan, plan_targets

log = logging.getLogger(__name__)

QUICKLOOK_MAX = 900


@dataclass
class TargetResult:
    target_id: str
    status: str  # done | skipped | dry-run | failed
    references: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    #: ``{"tile (i, j)": seconds}`` of the model per tile, and cloud cover before/after (fractions).
    tile_seconds: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    #: per-reference (and SAR) co-registration records (stages.coregister.Coregistration.as_properties()).
    coregistration: list[dict] = field(default_factory=list)


def output_stem(target_id: str, model_name: str) -> str:
    return f"{target_id}__{model_name}"


@contextlib.contextmanager
def dask_context(cfg: Config):
    """The configured scheduler, scoped (no global state).

    ``distributed`` connects to ``run.address`` (any running scheduler) or starts a LocalCluster of
    ``run.workers`` single-threaded processes for the run; the dashboard link is printed either way. Models reach
    the workers as handles (:class:`stages.remove.ModelHandle`) and are built once per worker process.
    """
    if cfg.run.scheduler == "distributed":
        from dask.distributed import Client, LocalCluster

        if cfg.run.address:
            with Client(cfg.run.address) as client:
                _announce(client, public_address(cfg.run.address))
                yield
            return
        with LocalCluster(n_workers=cfg.run.workers or 2, threads_per_worker=1, memory_limit=cfg.run.memory_limit,
                          processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            _announce(client, "LocalCluster")
            yield
    else:
        kw = {"scheduler": cfg.run.scheduler}
        if cfg.run.workers and cfg.run.scheduler in ("threads", "processes"):
            kw["num_workers"] = cfg.run.workers
        with dask.config.set(**kw):
            yield


def public_address(address: str) -> str:
    """``address`` without any user:password part (logs never carry credentials)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def _announce(client, where: str) -> None:
    import sys

    n = len(client.scheduler_info().get("workers", {}))
    link = client.dashboard_link or "(no dashboard: install bokeh>=3.1)"
    msg = f"dask.distributed: {where}, {n} worker(s); dashboard: {link}"
    log.info(msg)
    print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, *, dry_run: bool = False, targets: list[str] | None = None) -> list[TargetResult]:
    """Run the batch job the config describes; returns one result per target."""
    from models.registry import build_model

    model = build_model(cfg.model.name, cfg.model.params)
    catalog = open_catalog(cfg.catalog)
    search_cfg = cfg.search if not targets else cfg.search.model_copy(update={"targets": list(targets)})
    plans = plan_targets(catalog, search_cfg, cfg.catalog.collection, cfg.catalog.sar_collection)
    if model.spec.needs_reference:
        for p in plans:
            if not p.references:
                log.warning("target %s has no reference; model %s needs one: its cloudy pixels stay unfilled",
                            p.target.id, model.name)
    run_id = uuid.uuid4().hex[:12]
    results = []
    with dask_context(cfg):
        for plan in plans:
            stem = output_stem(plan.target.id, model.name)
            refs = [c.item.id for c in plan.references]
            if dry_run:
                results.append(TargetResult(plan.target.id, "dry-run", refs))
                continue
            from stages.write import is_done, paths_for

            if is_done(cfg.output.dir, stem) and not cfg.output.overwrite:
                log.info("%s: output exists, skipping (use --overwrite to redo)", stem)
                from stages.publish import update_collection

                # outputs from before the collection existed (or another run) are listed too
                update_collection(cfg.output.dir, paths_for(cfg.output.dir, stem)["item"], cfg.output.collection)
                results.append(TargetResult(plan.target.id, "skipped", refs,
                                            outputs=paths_for(cfg.output.dir, stem)))
                continue
            t0 = time.perf_counter()
            try:
                res = process_target(plan, model, cfg, run_id)
            except CloudfreeError as exc:
                log.error("%s failed: %s", plan.target.id, exc)
                res = TargetResult(plan.target.id, "failed", refs, error=str(exc))
            res.seconds = time.perf_counter() - t0
            results.append(res)
    if cfg.output.report and not dry_run:
        from pipeline.report import write_report

        try:
            path = write_report(results, cfg, run_id, model.name)
            log.info("run report: %s", path)
        except (OSError, ValueError) as exc:  # a report problem must not fail a finished run
            log.error("run report could not be written: %s", exc)
    return results


#: longest side (pixels) of the coarse whole-scene sample given to ``model.fit_scene``.
SCENE_SAMPLE_MAX = 1024


def scene_context(model, items, bands, geobox, cfg: Config, plan: TargetPlan) -> dict:
    """Run ``model.fit_scene`` on a coarse load of the whole scene (COG overviews: cheap, bounded memory)."""
    from stages.load import load_reflectance_checked
    from stages.masks import build_masks
    from stages.remove import SceneInputs, to_tile_inputs

    k = max(1, int(np.ceil(max(geobox.shape) / SCENE_SAMPLE_MAX)))
    coarse = geobox.zoom_out(k) if k > 1 else geobox
    # failed assets (already reported by process_target) are NaN in the sample instead of raising mid-compute
    stack = load_reflectance_checked(items, bands, coarse, cfg.grid.chunk, name=f"{items[0].id}-sample")[0]
    mask, prob = build_masks(items, coarse, cfg.mask, cfg.grid.chunk)
    n = len(items)
    sample = to_tile_inputs(SceneInputs(
        stack[0], mask[0], prob[0], stack[1:] if n > 1 else None,
        (mask[1:] | stack[1:].isnull().any("band")) if n > 1 else None,
        tuple(i.id for i in items[1:]), tuple(c.dt_days for c in plan.references[: n - 1]), items[0].id,
    ))
    ctx = model.fit_scene(sample)
    log.info("%s: scene context from a %dx%d sample: %s", items[0].id, *coarse.shape, sorted(ctx))
    return ctx


def process_target(plan: TargetPlan, model, cfg: Config, run_id: str) -> TargetResult:
    from catalogs.harmonise import harmonise
    from stages.load import load_reflectance_checked, output_geobox
    from stages.masks import NODATA_BIT, build_masks_by_method, mask_provenance, method_bits
    from stages.mosaic import confidence_fallback
    from stages.publish import file_sha256, output_item, update_collection
    from stages.remove import SceneInputs, remove_clouds
    from stages.search import load_aoi
    from stages.tile import plan_tiles
    from stages.write import RGB, paths_for, quicklook, write_json_atomic, write_outputs

    target = plan.target
    refs = [c.item for c in plan.references][: max(model.spec.max_references, 0)]
    items = [target, *refs]
    bands = list(dict.fromkeys([*cfg.grid.bands, *model.spec.bands]))
    geobox = output_geobox(target, cfg.grid, load_aoi(cfg.search.aoi)[0])
    stack, failed, read_failures = load_reflectance_checked(items, bands, geobox, cfg.grid.chunk, name=target.id)
    mask, prob, by_method = build_masks_by_method(items, geobox, cfg.mask, cfg.grid.chunk)
    ref_masks = None
    ref_stack = stack[1:] if refs else None
    if refs:
        ref_masks = mask[1:] | stack[1:].isnull().any("band") | failed[1:]
    coreg = []
    if refs and cfg.coregister.enabled:
        from stages.coregister import estimate_reference_shifts, load_aligned_references

        coreg = estimate_reference_shifts(stack[0], mask[0], ref_stack, ref_masks, [r.id for r in refs],
                                          cfg.coregister)
        if any(c.applied for c in coreg):  # re-read the references on shifted grids: one resampling, lazy
            ref_stack, ref_masks = load_aligned_references(refs, coreg, geobox, bands, cfg.mask, cfg.grid.chunk,
                                                           stack[0])
    if plan.sar and cfg.coregister.enabled:
        coreg.append(_sar_coregistration(plan, stack[0], mask[0], geobox, cfg))
    inputs = SceneInputs(
        target=stack[0], cloud_mask=mask[0], cloud_prob=prob[0],
        references=ref_stack, reference_masks=ref_masks,
        reference_ids=tuple(r.id for r in refs),
        reference_dt_days=tuple(c.dt_days for c in plan.references[: len(refs)]), target_id=target.id,
    )
    halo = cfg.tile.halo if cfg.tile.halo is not None else model.spec.halo
    tiles = plan_tiles(geobox.shape, cfg.tile.size, halo)
    context = scene_context(model, items, bands, geobox, cfg, plan) if model.spec.scene_context else {}
    tile_timings: list = []
    ds = remove_clouds(inputs, model, tiles, halo, context, blend=cfg.tile.blend, timings=tile_timings)
    ds = confidence_fallback(ds, inputs, cfg.output.confidence_floor, cfg.output.low_confidence)
    prov = mask_provenance({m: v[0] for m, v in by_method.items()}, cfg.mask.methods)  # same reads as `mask`
    prov = prov | stack[0].isnull().any("band").astype(np.uint8) * np.uint8(NODATA_BIT)
    ds["mask_provenance"] = (("y", "x"), prov.data)
    if read_failures:
        ds = mark_failed(ds, failed[0])
    stem = output_stem(target.id, model.name)
    k = max(1, int(np.ceil(max(geobox.shape) / QUICKLOOK_MAX)))
    rgb = [b for b in RGB if b in bands]
    extras = ()
    if cfg.output.quicklook and len(rgb) == 3:
        extras = (stack[0].sel(band=rgb)[:, ::k, ::k].data, ds.reflectance.sel(band=rgb)[:, ::k, ::k].data,
                  mask[0][::k, ::k].data)
    log.info("%s: %d tiles of %d px (halo %d), %d reference(s), model %s", target.id, len(tiles), cfg.tile.size,
             halo, len(refs), model.name)
    out, computed = write_outputs(ds, cfg.output.dir, stem, cfg.output, extra_compute=(*extras, tile_timings),
                                  progress=cfg.run.progress)
    paths = paths_for(cfg.output.dir, stem)
    *computed, timings = computed
    tile_seconds = {f"{i}-{j}": round(float(sec), 3) for (i, j), sec in timings}
    if computed:
        before, after, m = computed
        out.files["quicklook"] = quicklook(before, after, m, paths["quicklook"], title=f"{target.id} / {model.name}")
    metrics = {}
    if "truth" in target.assets:
        from pipeline.evaluation.truth import evaluate_against_truth

        metrics = evaluate_against_truth(target, out.reflectance, geobox, bands, cfg.grid.chunk)
    extra = {"cloudfree:evaluation": metrics} if metrics else {}
    stats = cover_stats(out.files["confidence"], out.files["mask_provenance"], cfg.output.confidence_floor)
    # eo:cloud_cover of an output = the share still low-confidence, so outputs rank as (clear) references later
    extra["eo:cloud_cover"] = round(100 * stats["low_confidence_after"], 2)
    extra["cloudfree:target_cloud_cover"] = target.properties.get("eo:cloud_cover")
    extra["cloudfree:cover"] = stats
    extra["cloudfree:tile_seconds"] = tile_seconds
    extra["cloudfree:blend"] = cfg.tile.blend if halo > 0 else "none"
    extra["cloudfree:low_confidence"] = {"floor": cfg.output.confidence_floor, "mode": cfg.output.low_confidence}
    wpath = Path(model.spec.weights) if model.spec.weights else None
    weights_sha = file_sha256(wpath) if wpath is not None and wpath.is_file() else None
    if read_failures:
        extra["cloudfree:read_failures"] = [f.as_properties() for f in read_failures]
    if coreg:
        extra["cloudfree:coregistration"] = [c.as_properties() for c in coreg]
    item = output_item(target, refs, out, geobox, bands, model.name, dict(cfg.model.params), run_id,
                       [harmonise(i).as_properties() for i in items], extra=extra, weights_sha256=weights_sha,
                       collection_id=cfg.output.collection, mask_bits=method_bits(cfg.mask.methods))
    item.set_self_href(str(paths["item"].resolve()))
    write_json_atomic(item.to_dict(include_self_link=False, transform_hrefs=False), paths["item"])
    update_collection(cfg.output.dir, paths["item"], cfg.output.collection)
    out.files["item"] = paths["item"]
    return TargetResult(target.id, "done", [r.id for r in refs], outputs=dict(out.files), metrics=metrics,
                        tile_seconds=tile_seconds, stats=stats, coregistration=[c.as_properties() for c in coreg])


#: confidence below this counts as "still cloudy" in the cover statistics when no floor is configured.
LOW_CONFIDENCE = 0.5


def cover_stats(confidence_path: Path, provenance_path: Path | None, floor: float = 0.0,
                max_side: int = 1024) -> dict:
    """Cloud cover before (share of valid target pixels any mask method flagged) and after (share of valid output
    pixels with confidence below ``floor``, or 0.5 without a floor), read decimated from the COGs."""
    import rasterio

    from stages.masks import NODATA_BIT

    with rasterio.open(confidence_path) as ds:
        k = max(1, int(np.ceil(max(ds.shape) / max_side)))
        shape = (max(1, ds.height // k), max(1, ds.width // k))
        conf = ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    if provenance_path is None:  # e.g. composites: no single target whose mask could be reported
        bits = np.zeros(shape, np.uint8)
    else:
        with rasterio.open(provenance_path) as ds:
            bits = ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    valid_in = (bits & NODATA_BIT) == 0
    valid_out = conf != 255
    thr = 100 * (floor if floor > 0 else LOW_CONFIDENCE)
    return {
        "masked_before": float(((bits & ~np.uint8(NODATA_BIT)) > 0)[valid_in].mean()) if valid_in.any() else 0.0,
        "low_confidence_after": float((conf < thr)[valid_out].mean()) if valid_out.any() else 0.0,
        "low_confidence_threshold": thr / 100,
        "nodata_after": float((~valid_out).mean()),
    }


def mark_failed(ds, failed):
    """Pixels whose target read failed become ``SOURCE_FAILED`` (reflectance NaN, confidence 0), not nodata."""
    from pipeline.contract import SOURCE_FAILED

    return ds.assign(reflectance=ds.reflectance.where(~failed), confidence=ds.confidence.where(~failed, 0.0),
                     source=ds.source.where(~failed, float(SOURCE_FAILED)))


def _sar_coregistration(plan: TargetPlan, target, target_mask, geobox, cfg: Config):
    """Estimate and record (not apply: no model consumes SAR through the runner yet) the S1 -> S2 shift."""
    from pipeline.errors import ReadError
    from stages.coregister import Coregistration, estimate_sar_shift
    from stages.load import load_sar

    sar_item = plan.sar[0].item
    band = cfg.coregister.band if cfg.coregister.band in target.band.values else str(target.band.values[-1])
    try:
        sar = load_sar([sar_item], geobox, chunk=cfg.grid.chunk)
        pol = "vv" if "vv" in sar.band.values else str(sar.band.values[0])
        return estimate_sar_shift(target.sel(band=band), target_mask, sar.sel(band=pol)[0], sar_item.id,
                                  cfg.coregister)
    except (ReadError, CloudfreeError) as exc:
        log.warning("%s: SAR co-registration with %s failed: %s", plan.target.id, sar_item.id, exc)
        return Coregistration(sar_item.id, "sar", "failed", reason=str(exc))
