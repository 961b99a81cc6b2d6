"""The runner: search -> load -> masks -> tile -> remove -> write -> publish, one target at a time.

Each target is computed in one dask pass (inputs read once), under its lock, in its own staging folder, published
with one rename and marked done by its STAC item, so a rerun skips finished targets (resume) unless ``overwrite``.
A target that raises is recorded as ``failed`` (message redacted, naming the target and the fix) and the batch goes
on; a target whose cloudy pixels could not be restored is written but reported ``unrestored`` (source code
``SOURCE_UNFILLED``, ``cloudfree:status``) and retried by the next run. See docs/reliability.md.
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
import xarray as xr

from cloudfree.catalogs.base import open_catalog
from cloudfree.pipeline.config import Config
from cloudfree.pipeline.errors import CloudfreeError
from cloudfree.stages.search import TargetPlan, plan_targets

log = logging.getLogger(__name__)

QUICKLOOK_MAX = 900


@dataclass
class TargetResult:
    target_id: str
    status: str  # done | unrestored | skipped | dry-run | failed
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
    #: what the run report lists under the target: plausibility warnings, unreliable/rejected/failed
    #: co-registrations, cloud the mask missed, the output check.
    warnings: list[str] = field(default_factory=list)


def output_stem(target_id: str, model_name: str) -> str:
    """The output folder/file stem of a target: ``<id>__<model>``, mapped to a safe stem (item ids are untrusted:
    ``..``, separators, NUL or very long ids get a sanitised, hashed stem, see :func:`cloudfree.pipeline.safety.safe_stem`)."""
    from cloudfree.pipeline.safety import safe_stem

    return safe_stem(f"{target_id}__{model_name}")


@contextlib.contextmanager
def dask_context(cfg: Config):
    """The configured scheduler, scoped (no global state).

    ``distributed`` connects to ``run.address`` (any running scheduler) or starts a LocalCluster of
    ``run.workers`` single-threaded processes for the run; the dashboard link is printed either way. Models reach
    the workers as handles (:class:`cloudfree.stages.remove.ModelHandle`) and are built once per worker process.
    """
    if cfg.run.scheduler == "distributed":
        from dask.distributed import Client, LocalCluster

        if cfg.run.address:
            with Client(cfg.run.address) as client:
                redact_worker_logs(client)
                _announce(client, public_address(cfg.run.address))
                yield
            return
        with LocalCluster(n_workers=cfg.run.workers or 2, threads_per_worker=1, memory_limit=cfg.run.memory_limit,
                          processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            redact_worker_logs(client)
            _announce(client, "LocalCluster")
            yield
    else:
        limit_malloc_arenas(cfg.run.malloc_arenas)
        kw = {"scheduler": cfg.run.scheduler}
        if cfg.run.workers and cfg.run.scheduler in ("threads", "processes"):
            kw["num_workers"] = cfg.run.workers
        with dask.config.set(**kw):
            yield


def redact_worker_logs(client) -> None:
    """The redacting log filter on every worker (a worker plugin: also on workers that join later) and on the
    handlers ``distributed`` added in this process (scheduler, nanny, client logs)."""
    from cloudfree.pipeline.redact import RedactWorkerLogs, install, tracebacks_shown

    shown = tracebacks_shown()
    install(tracebacks=shown)
    client.register_plugin(RedactWorkerLogs(tracebacks=shown))


def concurrent_units(cfg: Config) -> int:
    """How many targets / tiles one runner computes at the same time (``run.concurrent_targets``; 1 unless the
    scheduler is distributed)."""
    n = cfg.run.concurrent_targets
    if n > 1 and cfg.run.scheduler != "distributed":
        log.warning("run.concurrent_targets %d needs run.scheduler: distributed (with %r the targets would compete "
                    "for the same threads); computing one at a time", n, cfg.run.scheduler)
        return 1
    return n


def map_units(func, units: list, n: int) -> list:
    """``[func(u) for u in units]``, with up to ``n`` calls in flight (threads: each call submits its own graph to
    the cluster and waits for it); results in the order of ``units``. ``func`` must not raise for one unit's
    failure (the runner records it), so one failing unit never cancels the others."""
    if n <= 1 or len(units) <= 1:
        return [func(u) for u in units]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(n, len(units)), thread_name_prefix="cloudfree-unit") as ex:
        return list(ex.map(func, units))


def limit_malloc_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas of this process at ``n`` (see ``run.malloc_arenas``); True when set. No-op on other
    C libraries, with ``n == 0`` or when ``MALLOC_ARENA_MAX`` is set (the environment wins)."""
    import ctypes
    import os
    import platform

    if n <= 0 or os.environ.get("MALLOC_ARENA_MAX") or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX
    except (OSError, AttributeError):  # musl and others: no mallopt / no M_ARENA_MAX
        return False


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
    from cloudfree.models.registry import build_model, check_usable

    model = build_model(cfg.model.name, cfg.model.params)
    check_usable(model, cfg.model.allow_experimental)
    catalog = open_catalog(cfg.catalog)
    search_cfg = cfg.search if not targets else cfg.search.model_copy(update={"targets": list(targets)})
    plans = plan_targets(catalog, search_cfg, cfg.catalog.collection, cfg.catalog.sar_collection)
    if model.spec.needs_reference:
        for p in plans:
            if not p.references:
                log.warning("target %s has no reference; model %s needs one: its cloudy pixels stay unfilled",
                            p.target.id, model.name)
    run_id = uuid.uuid4().hex[:12]
    out_dir = Path(cfg.output.dir)
    if not dry_run:  # a file where the folder should be, or an uncreatable folder: exit 2 before any target
        from cloudfree.pipeline.safety import prepare_output_dir

        prepare_output_dir(out_dir)

    from cloudfree.pipeline.progress import BatchProgress

    progress = BatchProgress(len(plans), "targets", enabled=cfg.run.progress and not dry_run)

    def one(plan: TargetPlan) -> TargetResult:
        refs = [c.item.id for c in plan.references]
        if dry_run:
            try:
                return TargetResult(plan.target.id, "dry-run", refs, stats=dry_run_plan(plan, model, cfg))
            except CloudfreeError as exc:
                return TargetResult(plan.target.id, "failed", refs, error=str(exc))
        t0 = time.perf_counter()
        try:  # one failing target never stops the batch: it is recorded and the next one runs
            res = _run_target(plan, model, cfg, run_id, out_dir, catalog=catalog)
        except Exception as exc:  # noqa: BLE001 - fault isolation per target; KeyboardInterrupt still stops
            from cloudfree.pipeline.redact import redact

            msg = redact(failure_message(plan, exc, out_dir))
            log.error("%s failed: %s", plan.target.id, msg)
            log.debug("%s: traceback", plan.target.id, exc_info=True)
            res = TargetResult(plan.target.id, "failed", refs, error=msg)
        res.seconds = time.perf_counter() - t0
        progress.update(plan.target.id, res.status)
        return res

    with dask_context(cfg), progress:
        results = map_units(one, plans, concurrent_units(cfg))
    if cfg.output.report and not dry_run:
        from cloudfree.pipeline.run_report import write_report

        try:
            path = write_report(results, cfg, run_id, model.name, skipped=getattr(plans, "skipped", ()))
            log.info("run report: %s", path)
        except (OSError, ValueError) as exc:  # a report problem must not fail a finished run
            log.error("run report could not be written: %s", exc)
    return results


def dry_run_plan(plan: TargetPlan, model, cfg: Config) -> dict:
    """What a run would do for ``plan`` without reading a pixel: the output grid, the tile plan (count, size,
    halo), the model and the references it would get."""
    from cloudfree.stages.load import output_geobox
    from cloudfree.stages.search import load_aoi
    from cloudfree.stages.tile import plan_tiles

    geobox = output_geobox(plan.target, cfg.grid, load_aoi(cfg.search.aoi)[0])
    halo = cfg.tile.halo if cfg.tile.halo is not None else model.spec.halo
    tiles = plan_tiles(geobox.shape, cfg.tile.size, halo)
    return {"grid": {"crs": str(geobox.crs), "shape": list(geobox.shape), "resolution": abs(geobox.resolution.x)},
            "tiles": len(tiles), "tile_size": cfg.tile.size, "halo": halo, "model": model.name,
            "model_references": [c.item.id for c in model_references(plan, model.spec.max_references, cfg)]}


def _run_target(plan: TargetPlan, model, cfg: Config, run_id: str, out_dir: Path, catalog=None) -> TargetResult:
    """One target under its lock: stale staging from killed runs removed, then skipped (done) or processed."""
    from cloudfree.pipeline.safety import clean_stale_staging, target_lock
    from cloudfree.stages.write import is_done, paths_for

    stem = output_stem(plan.target.id, model.name)
    refs = [c.item.id for c in plan.references]
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(target_lock(out_dir, stem))
        except OSError as exc:
            # a read-only archive of finished outputs: the lock cannot be created, but a done target needs no write
            if is_done(out_dir, stem) and not cfg.output.overwrite:
                log.info("%s: output exists (output folder not writable: %s), skipping", stem, exc)
                return TargetResult(plan.target.id, "skipped", refs, outputs=paths_for(out_dir, stem))
            raise
        clean_stale_staging(out_dir, stem)
        if is_done(out_dir, stem) and not cfg.output.overwrite:
            log.info("%s: output exists, skipping (use --overwrite to redo)", stem)
            from cloudfree.stages.publish import update_collection

            try:  # outputs from before the collection existed (or another run) are listed too
                update_collection(out_dir, paths_for(out_dir, stem)["item"], cfg.output.collection)
            except OSError as exc:  # a read-only archive: the finished output is still there
                log.warning("%s: output exists; the collection could not be updated (%s)", stem, exc)
            return TargetResult(plan.target.id, "skipped", refs, outputs=paths_for(out_dir, stem))
        return process_dropping_references(plan, model, cfg, run_id, catalog=catalog)


def process_dropping_references(plan: TargetPlan, model, cfg: Config, run_id: str, catalog=None) -> TargetResult:
    """:func:`process_target`; when it fails because of one reference (a truncated or corrupt file, a file without
    CRS, an implausible scale: :func:`failing_reference`), that reference is dropped, recorded (the output item's
    ``cloudfree:dropped_references``, a warning on the result) and the target is redone with the others."""
    from dataclasses import replace

    from cloudfree.pipeline.redact import redact

    while True:
        try:
            res = process_target(plan, model, cfg, run_id, catalog=catalog)
        except Exception as exc:  # noqa: BLE001 - re-raised unless one reference is to blame
            ref = failing_reference(plan, model, cfg, exc)
            if ref is None:
                raise
            reason = redact(exception_chain(exc))
            log.warning("%s: reference %s dropped, the target goes on with the others: %s", plan.target.id, ref.id,
                        reason)
            plan = replace(plan, references=tuple(c for c in plan.references if c.item.id != ref.id),
                           dropped=(*plan.dropped, {"id": ref.id, "reason": reason}))
            continue
        if plan.dropped and res.status != "failed":
            note = "reference(s) dropped: " + "; ".join(f"{d['id']} ({d['reason']})" for d in plan.dropped)
            res.error = f"{res.error}; {note}" if res.error else note
        return res


def failing_reference(plan: TargetPlan, model, cfg: Config, exc: BaseException):
    """The reference item (of those the model uses) that ``exc`` is about, or None: the exception chain names one
    of its asset files (a full href, or a file name no other item of the target has: GDAL names the file it failed
    on by its base name) or says ``item <id>`` / ``reference <id>``; never when it names a file of the target."""
    import re

    text = exception_chain(exc, limit=8)
    refs = [c.item for c in model_references(plan, model.spec.max_references, cfg)]

    def hrefs(item) -> set[str]:
        return {h.split("?", 1)[0] for a in item.assets.values() if (h := a.get_absolute_href() or a.href)}

    owners: dict[str, set[str]] = {}
    for it in (plan.target, *refs):
        for h in hrefs(it):
            owners.setdefault(h.rsplit("/", 1)[-1], set()).add(it.id)

    def named(item) -> bool:
        for h in hrefs(item):
            base = h.rsplit("/", 1)[-1]
            if h in text or (owners.get(base) == {item.id}
                             and re.search(rf"(?<![\w.-]){re.escape(base)}(?![\w.-])", text)):
                return True
        return False

    if named(plan.target):
        return None
    for it in refs:
        if named(it) or re.search(rf"(?:item|reference) {re.escape(it.id)}(?=[\s:,;.)]|$)", text):
            return it
    return None


#: longest side (pixels) of the coarse whole-scene sample given to ``model.fit_scene``.
SCENE_SAMPLE_MAX = 1024


def scene_context(model, items, bands, geobox, cfg: Config, plan: TargetPlan) -> dict:
    """Run ``model.fit_scene`` on a coarse load of the whole scene (COG overviews: cheap, bounded memory)."""
    from cloudfree.stages.load import load_reflectance_checked
    from cloudfree.stages.masks import build_mask_layers
    from cloudfree.stages.remove import SceneInputs, to_tile_inputs

    k = max(1, int(np.ceil(max(geobox.shape) / SCENE_SAMPLE_MAX)))
    coarse = geobox.zoom_out(k) if k > 1 else geobox
    # failed assets (already reported by process_target) are NaN in the sample instead of raising mid-compute
    stack = load_reflectance_checked(items, bands, coarse, cfg.grid.chunk, name=f"{items[0].id}-sample")[0]
    layers = build_mask_layers(items, coarse, cfg.mask, cfg.grid.chunk)
    mask, prob = layers.mask, layers.prob
    n = len(items)
    sample = to_tile_inputs(SceneInputs(
        stack[0], mask[0], prob[0], stack[1:] if n > 1 else None,
        (mask[1:] | layers.opened[1:] | stack[1:].isnull().any("band")) if n > 1 else None,
        tuple(i.id for i in items[1:]), reference_offsets(plan, items[1:]), items[0].id,
    ))
    if cfg.mask.missed_cloud and n > 1:  # the scene fits never see cloud the mask missed
        from cloudfree.stages.missed_cloud import apply_to_tile

        sample = apply_to_tile(sample)[0]
    ctx = model.fit_scene(sample)
    log.info("%s: scene context from a %dx%d sample: %s", items[0].id, *coarse.shape, sorted(ctx))
    return ctx


def model_references(plan: TargetPlan, max_references: int, cfg: Config) -> tuple:
    """The plan's references a model that takes at most ``max_references`` gets, chosen as the search chose them
    (:func:`cloudfree.stages.search.select_references`: with ``search.policy.bracket`` the best before and the best after
    the target stay when the model takes two or more), in score order. A plain ``[:max_references]`` of the
    score-ordered plan could keep two references on one side and make a temporal model extrapolate."""
    from cloudfree.stages.search import select_references

    return select_references(plan.references, max(max_references, 0), cfg.search.policy.bracket)


def reference_offsets(plan: TargetPlan, refs) -> tuple[float, ...]:
    """Signed days from the target to each item of ``refs`` (items of ``plan.references``), in that order."""
    by_id = {c.item.id: c.offset_days for c in plan.references}
    return tuple(by_id[r.id] for r in refs)


def process_target(plan: TargetPlan, model, cfg: Config, run_id: str, catalog=None) -> TargetResult:
    from concurrent.futures import ThreadPoolExecutor

    from cloudfree.stages.load import check_grid_size, fetch_remote_assets, output_geobox
    from cloudfree.stages.masks import mask_inputs
    from cloudfree.stages.masks import resolved as resolved_masks
    from cloudfree.stages.search import load_aoi

    target = plan.target
    refs = [c.item for c in model_references(plan, model.spec.max_references, cfg)]
    items = [target, *refs]
    bands = list(dict.fromkeys([*cfg.grid.bands, *model.spec.bands]))
    # bounded before any read: an item declaring a huge grid fails here, naming the item (grid.max_pixels)
    geobox = check_grid_size(output_geobox(target, cfg.grid, load_aoi(cfg.search.aoi)[0]), target, cfg.grid)
    # mask.methods "auto" follows what these items carry (SCL, else CLD/MSK_CLDPRB, else spectral); the choice is
    # used throughout the target and recorded in its output item
    mask_cfg = resolved_masks(items, cfg.mask)
    if mask_cfg.methods != cfg.mask.methods:
        cfg = cfg.replace(mask={"methods": list(mask_cfg.methods)})
    # assets that exist only behind an API (Sentinel Hub's Process API) are fetched on the output grid, once
    items = fetch_remote_assets(items, [*bands, *mask_inputs(items, cfg.mask)], geobox)
    target, refs = items[0], items[1:]
    # the model's scene context (a coarse load of the scene + fit_scene) does not depend on anything below: it is
    # computed in a second thread while this one probes the assets and estimates the co-registration (both are
    # small, partly single-threaded computes: on two cores the pair took 2 s of the 16x bench scene one after
    # the other)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudfree-context")
    context_future = (pool.submit(scene_context, model, items, bands, geobox, cfg, plan)
                      if model.spec.scene_context else None)
    pool.shutdown(wait=False)
    try:
        return _process_target(plan, model, cfg, run_id, catalog, target, refs, items, bands, geobox,
                               context_future)
    finally:
        if context_future is not None and not context_future.done():
            context_future.cancel()
            try:
                context_future.result()  # never leave it running after this target (e.g. it failed early)
            except Exception:  # noqa: BLE001 - the target's own error is the one reported
                pass


def _process_target(plan, model, cfg: Config, run_id: str, catalog, target, refs, items, bands, geobox,
                    context_future) -> TargetResult:
    from cloudfree.stages.load import load_reflectance_checked
    from cloudfree.stages.masks import NODATA_BIT, build_mask_layers, mask_provenance
    from cloudfree.stages.mosaic import confidence_fallback
    from cloudfree.stages.plausibility import check_reflectance
    from cloudfree.stages.publish import update_collection
    from cloudfree.stages.remove import SceneInputs, remove_clouds
    from cloudfree.stages.tile import plan_tiles
    from cloudfree.stages.write import is_done, paths_for

    from cloudfree.stages.output_check import check_band_crs

    check_band_crs(target, bands)  # a band on another CRS than its item: the target fails, never a `done` output
    stack, failed, read_failures = load_reflectance_checked(items, bands, geobox, cfg.grid.chunk, name=target.id)
    # wrong scale/offset or band order: fails the target (InputDataError naming item, band, fix) or warns
    plausibility = check_reflectance(target, refs, bands, skip={(f.item_id, f.band) for f in read_failures})
    layers = build_mask_layers(items, geobox, cfg.mask, cfg.grid.chunk)
    from cloudfree.stages.load import read_small_once

    # a target within the co-registration window is read once, now, for the estimate and the main pass alike
    names = list(layers.by_method)
    stack, failed, mask, prob, opened, *per_method = read_small_once(
        geobox, cfg.coregister.window, stack, failed, layers.mask, layers.prob, layers.opened,
        *(layers.by_method[m] for m in names))
    layers = type(layers)(mask, prob, dict(zip(names, per_method)), opened)
    mask, prob, by_method = layers.mask, layers.prob, layers.by_method
    ref_masks = None
    ref_stack = stack[1:] if refs else None
    if refs:  # a reference pixel the refinement's opening removed from the mask is not a clear observation either
        ref_masks = mask[1:] | layers.opened[1:] | stack[1:].isnull().any("band") | failed[1:]
    coreg = []
    if refs and cfg.coregister.enabled:
        from cloudfree.stages.coregister import estimate_reference_shifts, load_aligned_references

        coreg = estimate_reference_shifts(stack[0], mask[0] | layers.opened[0], ref_stack, ref_masks,
                                          [r.id for r in refs], cfg.coregister)
        if any(c.applied for c in coreg):  # re-read the references on shifted grids: one resampling, lazy
            ref_stack, ref_masks = load_aligned_references(refs, coreg, geobox, bands, cfg.mask, cfg.grid.chunk,
                                                           stack[0])
    target_mask, target_prob, missed = mask[0], prob[0], None
    if refs and cfg.mask.missed_cloud:  # cloud and shadow the mask missed (multi-temporal test, lazy)
        from cloudfree.stages.missed_cloud import add_missed_cloud

        target_mask, target_prob, ref_masks, missed = add_missed_cloud(stack[0], target_mask, target_prob, ref_stack,
                                                                       ref_masks)
    sar = None
    if model.spec.needs_sar or model.spec.accepts_sar:
        sar, sar_records = model_sar(plan, refs, catalog, stack[0], mask[0], geobox, cfg, model)
        coreg.extend(sar_records)
    elif plan.sar and cfg.coregister.enabled:
        coreg.append(_sar_coregistration(plan, stack[0], mask[0], geobox, cfg))
    inputs = SceneInputs(
        target=stack[0], cloud_mask=target_mask, cloud_prob=target_prob,
        references=ref_stack, reference_masks=ref_masks,
        reference_ids=tuple(r.id for r in refs),
        reference_dt_days=reference_offsets(plan, refs), target_id=target.id, sar=sar,
    )
    halo = cfg.tile.halo if cfg.tile.halo is not None else model.spec.halo
    tiles = plan_tiles(geobox.shape, cfg.tile.size, halo)
    context = context_future.result() if context_future is not None else {}
    tile_timings: list = []
    ds = remove_clouds(inputs, model, tiles, halo, context, blend=cfg.tile.blend, timings=tile_timings)
    # opened specks first: their lowered confidence is then subject to the low-confidence fallback like any other
    ds = mark_opened(ds, layers.opened[0], prob[0])
    ds = confidence_fallback(ds, inputs, cfg.output.confidence_floor, cfg.output.low_confidence)
    prov = mask_provenance({m: v[0] for m, v in by_method.items()}, cfg.mask.methods)  # same reads as `mask`
    prov = prov | stack[0].isnull().any("band").astype(np.uint8) * np.uint8(NODATA_BIT)
    if missed is not None:
        from cloudfree.stages.missed_cloud import MISSED_BIT

        prov = prov | missed.astype(np.uint8) * np.uint8(MISSED_BIT)
    ds["mask_provenance"] = (("y", "x"), prov.data)
    ds = mark_unfilled(ds, target_mask)
    if read_failures:
        ds = mark_failed(ds, failed[0], [f.band for f in read_failures if f.item_id == target.id])
    stem = output_stem(target.id, model.name)
    from cloudfree.pipeline.safety import publish_dir, safe_rmtree, staging_dir

    stage = staging_dir(cfg.output.dir, stem, run_id)
    try:
        res = _compute_and_write(plan, model, cfg, run_id, stem, stage, target, refs, items, bands, geobox, stack,
                                 prov, ds, coreg, tiles, halo, tile_timings, read_failures, plausibility,
                                 ref_stack=ref_stack, ref_masks=ref_masks)
        final = paths_for(cfg.output.dir, stem)
        if res.status != "done" and cfg.output.overwrite and is_done(cfg.output.dir, stem):
            # --overwrite never replaces a `done` output with a worse-labelled one
            safe_rmtree(cfg.output.dir, stage)
            msg = (f"the new output is {res.status} ({res.error}); the existing `done` output was kept "
                   "(--overwrite never replaces a done output with a worse one)")
            log.warning("%s: %s", target.id, msg)
            return TargetResult(target.id, "skipped", res.references, outputs=final, error=msg, stats=res.stats,
                                coregistration=res.coregistration)
        publish_dir(cfg.output.dir, stage, final["item"].parent)
    except BaseException:
        for attempt in range(3):  # a tile task still running may write into it while it is removed: try again
            try:
                safe_rmtree(cfg.output.dir, stage)
                break
            except OSError as exc:  # the original error is the one reported
                if attempt == 2:
                    log.warning("%s: staging folder %s could not be removed (%s)", target.id, stage, exc)
                time.sleep(0.2)
        raise
    res.outputs = {k: final["item"].parent / Path(v).name for k, v in res.outputs.items()}
    update_collection(cfg.output.dir, final["item"], cfg.output.collection)
    if res.status == "unrestored":
        log.warning("%s: %s", target.id, res.error)
    return res


def _compute_and_write(plan, model, cfg, run_id, stem, stage, target, refs, items, bands, geobox, stack, prov, ds,
                       coreg, tiles, halo, tile_timings, read_failures, plausibility, ref_stack=None,
                       ref_masks=None) -> TargetResult:
    """Write the COGs, quicklook and item of one target into its staging folder ``stage``.

    ``prov`` is the mask-provenance layer ``(y, x)`` (the quicklook's mask panel); with references, a decimated
    copy of the output and of the references is computed in the same pass for the output check
    (:func:`cloudfree.stages.output_check.check_output`)."""
    from cloudfree.catalogs.harmonise import harmonise
    from cloudfree.pipeline.contract import SOURCE_UNFILLED
    from cloudfree.stages.publish import file_sha256, output_item
    from cloudfree.stages.write import RGB, paths_for, quicklook, write_json_atomic, write_outputs

    k = max(1, int(np.ceil(max(geobox.shape) / QUICKLOOK_MAX)))
    rgb = [b for b in RGB if b in bands]
    extras = ()
    if cfg.output.quicklook and len(rgb) == 3:
        extras = (stack[0].sel(band=rgb)[:, ::k, ::k].data, ds.reflectance.sel(band=rgb)[:, ::k, ::k].data,
                  prov[::k, ::k].data)
    check_inputs = ()
    if ref_stack is not None and ref_masks is not None:
        from cloudfree.stages.output_check import CHECK_MAX_SIDE

        kc = max(1, int(np.ceil(max(geobox.shape) / CHECK_MAX_SIDE)))
        check_inputs = (ds.reflectance[:, ::kc, ::kc].data, ds.source[::kc, ::kc].data,
                        ref_stack[:, :, ::kc, ::kc].data, ref_masks[:, ::kc, ::kc].data)
    log.info("%s: %d tiles of %d px (halo %d), %d reference(s), model %s", target.id, len(tiles), cfg.tile.size,
             halo, len(refs), model.name)
    out, computed = write_outputs(ds, cfg.output.dir, stem, cfg.output,
                                  extra_compute=(*extras, *check_inputs, tile_timings),
                                  progress=_progress_callback(cfg), stage=stage)
    staged = paths_for(stage.parent, stem)
    staged = {k: stage / v.name for k, v in staged.items()}
    final = paths_for(cfg.output.dir, stem)
    *computed, timings = computed
    checked = None
    if check_inputs:
        *computed, c_refl, c_src, c_refs, c_rmask = computed
        from cloudfree.pipeline.contract import SOURCE_FUSED, SOURCE_MODEL, SOURCE_REFERENCE_BASE
        from cloudfree.stages.output_check import check_output

        restored = np.isin(c_src, (SOURCE_MODEL, SOURCE_FUSED)) | (c_src >= SOURCE_REFERENCE_BASE)
        checked = check_output(np.asarray(c_refl), restored, np.asarray(c_refs), ~np.asarray(c_rmask, bool), bands)
    tile_seconds = {f"{i}-{j}": round(float(sec), 3) for (i, j), sec in timings}
    if computed:
        before, after, m = computed
        out.files["quicklook"] = quicklook(before, after, m, staged["quicklook"], title=f"{target.id} / {model.name}")
    metrics = {}
    if "truth" in target.assets:
        from cloudfree.pipeline.evaluation.truth import evaluate_against_truth

        metrics = evaluate_against_truth(target, out.reflectance, geobox, bands, cfg.grid.chunk)
    extra = {"cloudfree:evaluation": metrics} if metrics else {}
    stats = cover_stats(out.files["confidence"], out.files["mask_provenance"], cfg.output.confidence_floor,
                        source_path=out.files["source"])
    # eo:cloud_cover of an output = the share that is not a usable cloud-free estimate (low confidence, cloudy and
    # not restored, failed reads, nodata), so an unusable output never ranks as a clear reference later
    extra["eo:cloud_cover"] = round(100 * stats["unusable_after"], 2)
    status, why = restoration_status(stats)
    from cloudfree.stages.output_check import no_target_data

    if no_target_data(stats):
        failed_bands = sorted({f.band for f in read_failures if f.item_id == target.id})
        status, why = "unrestored", (
            f"the target's band(s) {', '.join(failed_bands)} could not be read, so no target pixel is a complete "
            "observation: the output holds the references where one is clear and nodata in those bands elsewhere"
            if failed_bands and set(failed_bands) != set(bands) else
            "no target pixel could be read (every band nodata or a failed read): the output would be the references "
            "under the target's date")
        extra["eo:cloud_cover"] = 100.0
    if checked is not None:
        extra["cloudfree:output_check"] = checked.as_properties()
        if not checked.ok and status == "done":
            status, why = "unrestored", f"output check: {checked.reason}"
            extra["eo:cloud_cover"] = max(extra["eo:cloud_cover"], round(100 * checked.implausible_share, 2))
    if stats.get("missed_cloud_before") is not None:
        extra["cloudfree:missed_cloud"] = {
            "share": stats["missed_cloud_before"],
            "test": "multi-temporal: blue far above every clear reference (cloud) or NIR/SWIR far below (shadow), "
                    "on pixels the mask called clear (stages/missed_cloud.py)"}
    extra["cloudfree:status"] = status
    extra["cloudfree:mask_methods"] = list(cfg.mask.methods)
    extra["cloudfree:target_cloud_cover"] = target.properties.get("eo:cloud_cover")
    extra["cloudfree:cover"] = stats
    extra["cloudfree:tile_seconds"] = tile_seconds
    extra["cloudfree:blend"] = cfg.tile.blend if halo > 0 else "none"
    extra["cloudfree:low_confidence"] = {"floor": cfg.output.confidence_floor, "mode": cfg.output.low_confidence}
    extra["cloudfree:mask_refinement"] = mask_refinement_property(cfg.mask, stats)
    wpath = Path(model.spec.weights) if model.spec.weights else None
    weights_sha = file_sha256(wpath) if wpath is not None and wpath.is_file() else None
    if read_failures:
        from cloudfree.pipeline.redact import redact

        # hrefs may be signed (SAS tokens): never put a credential into an output file
        extra["cloudfree:read_failures"] = [{k: redact(v) if isinstance(v, str) else v for k, v in
                                             f.as_properties().items()} for f in read_failures]
    if plausibility:
        extra["cloudfree:plausibility"] = list(plausibility)
    if plan.dropped:  # references whose read failed: dropped, the target made with the others
        extra["cloudfree:dropped_references"] = list(plan.dropped)
    if coreg:
        extra["cloudfree:coregistration"] = [c.as_properties() for c in coreg]
    item = output_item(target, refs, out, geobox, bands, model.name, dict(cfg.model.params), run_id,
                       [harmonise(i).as_properties() for i in items], extra=extra, weights_sha256=weights_sha,
                       collection_id=cfg.output.collection, mask_bits=_mask_bits(cfg),
                       item_dir=final["item"].parent)
    item.set_self_href(str(final["item"].resolve()))
    write_json_atomic(item.to_dict(include_self_link=False, transform_hrefs=False), staged["item"])
    out.files["item"] = staged["item"]
    error = None
    if status == "unrestored":
        error = (f"{why}; written (cloudy pixels not restored carry source code {SOURCE_UNFILLED}), "
                 f"eo:cloud_cover {extra['eo:cloud_cover']} and cloudfree:status 'unrestored', so later searches do not "
                 "take it as a clear reference and a rerun retries it; widen search.max_days / "
                 "search.reference_max_cloud_cover or rerun when newer acquisitions exist")
    return TargetResult(target.id, status, [r.id for r in refs], outputs=dict(out.files), metrics=metrics,
                        error=error, tile_seconds=tile_seconds, stats=stats,
                        coregistration=[c.as_properties() for c in coreg],
                        warnings=run_warnings(plausibility, coreg, stats, checked))


def run_warnings(plausibility, coreg, stats: dict, checked) -> list[str]:
    """The warnings of one target for the run report (see :attr:`TargetResult.warnings`)."""
    out = [f"plausibility: {w}" for w in plausibility or []]
    for c in coreg or []:
        if c.status in ("unreliable", "rejected", "failed"):
            out.append(f"co-registration of {c.id} ({c.kind}) {c.status}: {c.reason}")
    share = stats.get("missed_cloud_before")
    if share:
        out.append(f"the mask missed cloud or shadow on {100 * share:.1f} % of the target's valid pixels (found by "
                   "the multi-temporal test and added to the mask)")
    if checked is not None and not checked.ok:
        out.append(f"output check: {checked.reason}")
    return out


def _mask_bits(cfg: Config) -> dict[str, int]:
    """The provenance bits of the configured mask methods, plus the multi-temporal missed-cloud test's."""
    from cloudfree.stages.masks import method_bits
    from cloudfree.stages.missed_cloud import MISSED_BIT

    bits = method_bits(cfg.mask.methods)
    if cfg.mask.missed_cloud:
        bits["missed_cloud"] = MISSED_BIT
    return bits


def failure_message(plan: TargetPlan, exc: BaseException, out_dir: str | Path | None = None) -> str:
    """What the run report and the ``failed`` line say about a target that raised ``exc``: an output-side fault
    (disk full, read-only or not a folder under ``out_dir``) names the output and its fix, never the inputs."""
    import rasterio.errors

    if out_dir is not None:
        from cloudfree.pipeline.safety import output_fault

        fault = output_fault(exc, out_dir)
        if fault:
            return f"target {plan.target.id}: {fault}"
    if isinstance(exc, CloudfreeError):
        return str(exc)
    if isinstance(exc, (rasterio.errors.RasterioError, OSError)):  # a file that passed the probe broke mid-read
        return (f"target {plan.target.id}: an input failed mid-read ({exception_chain(exc)}); items "
                f"{[plan.target.id, *(c.item.id for c in plan.references)]}: check their files (truncated or corrupt "
                "download, network; the log names the file), fetch them again or drop the item, and rerun")
    return f"target {plan.target.id}: {exception_chain(exc)}"


def exception_chain(exc: BaseException, limit: int = 4) -> str:
    """``exc`` and its causes in one line (GDAL names the failing file in the chained errors)."""
    parts, x = [], exc
    while x is not None and len(parts) < limit:
        parts.append(f"{type(x).__name__}: {x}")
        x = x.__cause__ or x.__context__
    return " <- ".join(parts)


def restoration_status(stats: dict) -> tuple[str, str]:
    """``("done", "")`` or ``("unrestored", why)``: unrestored when the target had cloudy pixels and none of them was
    restored, or when no output pixel is a usable estimate."""
    if stats.get("unusable_after", 0.0) >= 1.0:
        return "unrestored", "no output pixel is a usable cloud-free estimate"
    if stats.get("unfilled_after", 0.0) > 0 and stats.get("restored_after", 0.0) == 0:
        return "unrestored", (f"none of the cloudy pixels could be restored ({100 * stats['unfilled_after']:.1f} % of "
                              "the output is cloudy and unfilled)")
    return "done", ""


#: confidence below this counts as "still cloudy" in the cover statistics when no floor is configured.
LOW_CONFIDENCE = 0.5


def _progress_callback(cfg: Config):
    """The CLI's progress bar as the write stage's callback (None when ``run.progress`` is off)."""
    if not cfg.run.progress:
        return None
    from cloudfree.pipeline.progress import progress_bar

    return lambda desc: progress_bar(True, desc)


def cover_stats(confidence_path: Path, provenance_path: Path | None, floor: float = 0.0,
                max_side: int = 1024, source_path: Path | None = None) -> dict:
    """Cover statistics of an output, read decimated from its COGs. Shares are of all output pixels unless said:

    * ``masked_before``: share of the target's *valid* pixels any mask method flagged (None: no valid pixel);
    * ``nodata_before``: share of the target without valid data;
    * ``low_confidence_after``: share of the valid output pixels with confidence below ``floor`` (0.5 without
      a floor; None: no valid pixel); ``nodata_after``: share of output nodata;
    * with ``source_path``: ``unfilled_after`` (cloudy, not restored), ``failed_after`` (read failed),
      ``restored_after`` (model, fusion or a reference supplied the pixel), ``opened_after`` (flagged cloud the
      mask refinement's opening removed, kept as observed: ``SOURCE_OPENED``);
    * ``unusable_after``: share that is not a usable cloud-free estimate (nodata, low confidence, unfilled or
      failed), the value published as the output's ``eo:cloud_cover``.
    """
    import rasterio

    from cloudfree.pipeline.contract import (SOURCE_FAILED, SOURCE_FUSED, SOURCE_MODEL, SOURCE_OPENED,
                                             SOURCE_REFERENCE_BASE, SOURCE_UNFILLED)
    from cloudfree.stages.masks import NODATA_BIT

    def read(path, shape=None):
        with rasterio.open(path) as ds:
            if shape is None:
                k = max(1, int(np.ceil(max(ds.shape) / max_side)))
                shape = (max(1, ds.height // k), max(1, ds.width // k))
            return ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)

    conf = read(confidence_path)
    shape = conf.shape
    # e.g. composites: no single target whose mask could be reported
    bits = np.zeros(shape, np.uint8) if provenance_path is None else read(provenance_path, shape)
    src = None if source_path is None else read(source_path, shape)
    valid_in = (bits & NODATA_BIT) == 0
    valid_out = conf != 255
    thr = 100 * (floor if floor > 0 else LOW_CONFIDENCE)
    low = conf < thr
    unusable = ~valid_out | low
    from cloudfree.stages.missed_cloud import MISSED_BIT

    stats = {
        "masked_before": float(((bits & ~np.uint8(NODATA_BIT)) > 0)[valid_in].mean()) if valid_in.any() else None,
        #: share of the valid target pixels only the multi-temporal test flagged (cloud/shadow the mask missed)
        "missed_cloud_before": (float(((bits & np.uint8(MISSED_BIT)) > 0)[valid_in].mean())
                                if valid_in.any() and provenance_path is not None else None),
        "nodata_before": float((~valid_in).mean()) if provenance_path is not None else None,
        "low_confidence_after": float(low[valid_out].mean()) if valid_out.any() else None,
        "low_confidence_threshold": thr / 100,
        "nodata_after": float((~valid_out).mean()),
    }
    if src is not None:
        unfilled, failed = src == SOURCE_UNFILLED, src == SOURCE_FAILED
        restored = np.isin(src, (SOURCE_MODEL, SOURCE_FUSED)) | (src >= SOURCE_REFERENCE_BASE)
        stats.update(unfilled_after=float(unfilled.mean()), failed_after=float(failed.mean()),
                     restored_after=float(restored.mean()), opened_after=float((src == SOURCE_OPENED).mean()))
        unusable |= unfilled | failed
    stats["unusable_after"] = float(unusable.mean())
    return stats


def mark_unfilled(ds, cloud_mask):
    """Cloudy target pixels that the model kept as they are (``SOURCE_TARGET``) become ``SOURCE_UNFILLED`` with
    confidence 0: the pixel is the cloudy observation, never labelled "target observation (clear)"."""
    from cloudfree.pipeline.contract import SOURCE_TARGET, SOURCE_UNFILLED

    unfilled = cloud_mask & (ds.source == float(SOURCE_TARGET))
    return ds.assign(source=ds.source.where(~unfilled, float(SOURCE_UNFILLED)),
                     confidence=ds.confidence.where(~unfilled, 0.0))


def mark_opened(ds, opened, cloud_prob):
    """Target pixels that the cloud layer flagged but the mask refinement's opening removed from the mask
    (:class:`cloudfree.stages.masks.MaskLayers` ``opened``) and that the model kept as observed (``SOURCE_TARGET``)
    become ``SOURCE_OPENED`` with confidence at most ``1 - probability``: never "target observation (clear)"."""
    from cloudfree.pipeline.contract import SOURCE_OPENED, SOURCE_TARGET

    hit = opened & (ds.source == float(SOURCE_TARGET))
    cap = (1.0 - cloud_prob.fillna(1.0)).clip(0, 1).astype(np.float32)
    return ds.assign(source=ds.source.where(~hit, float(SOURCE_OPENED)),
                     confidence=ds.confidence.where(~hit, np.minimum(ds.confidence, cap)))


def mask_refinement_property(mask_cfg, stats: dict) -> dict:
    """``cloudfree:mask_refinement`` of an output item: the refinement applied to thresholded cloud layers and the
    share of output pixels that it removed from the mask (written as ``SOURCE_OPENED``, never as clear)."""
    from cloudfree.stages.masks import refinement_params

    p = refinement_params(mask_cfg)
    return {"mode": mask_cfg.refinement, "closing_radius": p["closing"], "opening_radius": p["opening"],
            "opening_keep_prob": p["keep_prob"], "dilation": p["dilation"],
            "opened_fraction": stats.get("opened_after", 0.0)}


def mark_failed(ds, failed, bands=None):
    """Pixels whose target read failed become ``SOURCE_FAILED`` (confidence 0), not nodata.

    ``bands``: the bands whose read failed (default: all). Only those bands become NaN, the others keep their
    values; pixels a reference supplied (source >= ``SOURCE_REFERENCE_BASE``, every band from that reference)
    keep their value and code.
    """
    from cloudfree.pipeline.contract import SOURCE_FAILED, SOURCE_REFERENCE_BASE

    if bands is None:
        hit = failed
        band_hit = xr.DataArray(np.ones(ds.sizes["band"], bool), dims="band")
    else:
        hit = failed & (ds.source < SOURCE_REFERENCE_BASE)
        band_hit = xr.DataArray(np.isin([str(b) for b in ds.band.values], list(bands)), dims="band")
    return ds.assign(reflectance=ds.reflectance.where(~(hit & band_hit)), confidence=ds.confidence.where(~hit, 0.0),
                     source=ds.source.where(~hit, float(SOURCE_FAILED)))


def model_sar(plan: TargetPlan, refs, catalog, target, target_mask, geobox, cfg: Config, model):
    """SAR for a model that needs or accepts it (:mod:`cloudfree.stages.sar`): one scene per optical date on the output
    grid, co-registered, in the model's units. A model that *needs* SAR and gets none (or whose target S1 cannot
    be read) fails the target; a model that only accepts it runs without SAR when the target's S1 cannot be read."""
    import rasterio.errors

    from cloudfree.pipeline.errors import InputDataError, ModelError, ReadError
    from cloudfree.stages.sar import prepare_model_sar, sar_items_per_date

    items = sar_items_per_date(plan, refs, catalog, cfg)
    band = cfg.coregister.band if cfg.coregister.band in target.band.values else str(target.band.values[-1])
    try:
        sar, records = prepare_model_sar(items, target.sel(band=band), target_mask, geobox, cfg, model.spec.sar_units)
    except (ReadError, InputDataError, rasterio.errors.RasterioError, OSError) as exc:
        if model.spec.needs_sar:
            raise
        # the model only accepts SAR: a broken S1 file costs the SAR, not the target
        from cloudfree.stages.coregister import Coregistration

        log.warning("%s: Sentinel-1 %s could not be read (%s); model %s runs without SAR", plan.target.id,
                    items[0].id, exc, model.name)
        return None, [Coregistration(items[0].id, "sar", "failed", reason=f"read failed: {exc}")]
    if sar is None and model.spec.needs_sar:
        why = ("no catalog.sar_collection is configured" if not cfg.catalog.sar_collection else
               f"no scene of {cfg.catalog.sar_collection} within {cfg.search.policy.sar_max_days} days covers it")
        raise ModelError(f"model {model.name} needs Sentinel-1 but target {plan.target.id} has none: {why}; set "
                         "catalog.sar_collection / widen search.policy.sar_max_days, or pick a model that runs "
                         "without SAR")
    if sar is None:
        log.info("%s: no Sentinel-1; model %s runs without SAR", plan.target.id, model.name)
    return sar, records


def _sar_coregistration(plan: TargetPlan, target, target_mask, geobox, cfg: Config):
    """Estimate and record (not apply) the S1 -> S2 shift for a model that neither needs nor accepts SAR (those get
    theirs through :func:`model_sar`). The scene is only recorded here, so a read that fails (a truncated file
    that passed the probe) is recorded as a failed co-registration, not a failed target."""
    import rasterio.errors

    from cloudfree.pipeline.errors import ReadError
    from cloudfree.stages.coregister import Coregistration, estimate_sar_shift
    from cloudfree.stages.load import load_sar

    sar_item = plan.sar[0].item
    band = cfg.coregister.band if cfg.coregister.band in target.band.values else str(target.band.values[-1])
    try:
        sar = load_sar([sar_item], geobox, chunk=cfg.grid.chunk)
        pol = "vv" if "vv" in sar.band.values else str(sar.band.values[0])
        return estimate_sar_shift(target.sel(band=band), target_mask, sar.sel(band=pol)[0], sar_item.id,
                                  cfg.coregister)
    except (ReadError, CloudfreeError, rasterio.errors.RasterioError, OSError) as exc:
        log.warning("%s: SAR co-registration with %s failed: %s", plan.target.id, sar_item.id, exc)
        return Coregistration(sar_item.id, "sar", "failed", reason=str(exc))
