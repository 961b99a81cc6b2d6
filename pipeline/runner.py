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
from typing import Any

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
        fix_mmap_threshold(cfg.run.malloc_mmap_threshold)
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
    """How many targets / tiles one runner computes at the same time (``run.concurrent_targets``).

    On ``distributed`` each unit submits its graph to the cluster; on ``threads`` each unit's computes get their own
    pool of ``run.workers`` threads (dask keeps one pool per calling thread), so a small target's single-threaded
    Python (graph building, item JSON, co-registration) overlaps another's reads: 12 targets of 104 px took 10.3 s
    with 2 in flight against 11.9 / 12.7 s one at a time, same bytes (issue 22; memory: n targets' inputs). The
    synchronous and processes schedulers compute one at a time."""
    n = cfg.run.concurrent_targets
    if n > 1 and cfg.run.scheduler not in ("distributed", "threads"):
        log.warning("run.concurrent_targets %d needs run.scheduler: distributed or threads (with %r the targets "
                    "would compete for the same workers); computing one at a time", n, cfg.run.scheduler)
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


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold of this process at ``nbytes`` (see ``run.malloc_mmap_threshold``); True when set.
    No-op on other C libraries, with ``nbytes == 0`` or when ``MALLOC_MMAP_THRESHOLD_`` is set."""
    import ctypes
    import os
    import platform

    if nbytes <= 0 or os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.system() != "Linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
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
    store = None
    if cfg.output.store and not dry_run:  # s3:// gs:// az://: computed in out_dir (the work folder), published there
        from cloudfree.pipeline.outstore import open_output_store

        store = open_output_store(cfg.output)

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
            res = (_run_target(plan, model, cfg, run_id, out_dir, catalog=catalog) if store is None else
                   _run_target_in_store(plan, model, cfg, run_id, out_dir, store, catalog=catalog))
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
            if store is not None:
                from cloudfree.pipeline.outstore import upload_tree

                upload_tree(store, out_dir, "reports", run_id)
                log.info("run report uploaded to %s/reports/", store.url)
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


def _run_target_in_store(plan: TargetPlan, model, cfg: Config, run_id: str, out_dir: Path, store,
                         catalog=None) -> TargetResult:
    """One target of an object-store run (pipeline/outstore.py): under the store's lock (conditional create), stale
    staging keys removed, skipped when the store's item is ``done``, else computed in the local work folder
    ``out_dir`` exactly as a local run (:func:`_run_target`) and published to the store, the item JSON last."""
    import shutil

    from cloudfree.pipeline.safety import ensure_inside

    stem = output_stem(plan.target.id, model.name)
    with store.lock(stem):
        store.clean_stale_staging(stem)
        if store.is_done(stem) and not cfg.output.overwrite:
            log.info("%s: output exists in %s, skipping (use --overwrite to redo)", stem, store.url)
            store.update_collection(out_dir, stem, cfg.output.collection, run_id)
            return TargetResult(plan.target.id, "skipped", [c.item.id for c in plan.references],
                                outputs={"item": out_dir / stem / f"{stem}.json"})
        # the store decides, not the work folder: its copy of this target is reset to the store's item (if any)
        local = ensure_inside(out_dir, out_dir / stem)
        if local.exists():
            shutil.rmtree(local)
        item = store.get(f"{stem}/{stem}.json")
        if item is not None:
            local.mkdir(parents=True)
            (local / f"{stem}.json").write_bytes(item)
        res = _run_target(plan, model, cfg, run_id, out_dir, catalog=catalog)
        if res.status in ("done", "unrestored") and (local / f"{stem}.json").exists():
            store.publish(stem, local, run_id)
            store.update_collection(out_dir, stem, cfg.output.collection, run_id)
        return res


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

    k = max(1, int(np.ceil(max(geobox.shape) / SCENE_SAMPLE_MAX)))
    coarse = geobox.zoom_out(k) if k > 1 else geobox
    # failed assets (already reported by process_target) are NaN in the sample instead of raising mid-compute
    stack = load_reflectance_checked(items, bands, coarse, cfg.grid.chunk, name=f"{items[0].id}-sample")[0]
    layers = build_mask_layers(items, coarse, cfg.mask, cfg.grid.chunk)
    return fit_scene_context(model, items, stack, layers, cfg, plan, coarse.shape)


def small_target(geobox, cfg: Config) -> bool:
    """A target read once before the co-registration (:func:`cloudfree.stages.load.read_small_once`) whose scene
    sample is the target itself (no zoom-out): its scene context is fitted on the blocks already in memory
    (:func:`remove`) instead of a second load of the same pixels in the context thread."""
    return max(geobox.shape) <= min(cfg.coregister.window, SCENE_SAMPLE_MAX)


def fit_scene_context(model, items, stack, layers, cfg: Config, plan: TargetPlan, shape) -> dict:
    """``model.fit_scene`` on a sample ``stack`` ``(time, band, y, x)`` and its mask ``layers`` (:func:`scene_context`)."""
    from cloudfree.stages.remove import SceneInputs, to_tile_inputs

    mask, prob = layers.mask, layers.prob
    n = len(items)
    sample = to_tile_inputs(SceneInputs(
        stack[0], mask[0], prob[0], stack[1:] if n > 1 else None,
        (layers.cloudy[1:] | stack[1:].isnull().any("band")) if n > 1 else None,
        tuple(i.id for i in items[1:]), reference_offsets(plan, items[1:]), items[0].id,
    ))
    if cfg.mask.missed_cloud and n > 1:  # the scene fits never see cloud the mask missed
        from cloudfree.stages.missed_cloud import apply_to_tile

        sample = apply_to_tile(sample)[0]
    ctx = model.fit_scene(sample)
    log.info("%s: scene context from a %dx%d sample: %s", items[0].id, *shape, sorted(ctx))
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


@dataclass
class TargetContext:
    """One target on its way through the steps of :func:`process_target`: what the plan fixes (``plan`` .. ``geobox``),
    then what each step adds, in the order the steps run (lazy dask arrays until :func:`write_staged` computes)."""

    plan: TargetPlan
    model: Any
    cfg: Config
    run_id: str
    catalog: Any
    target: Any  #: the target item (after any remote fetch)
    refs: list  #: the reference items the model gets
    bands: list[str]
    geobox: Any
    context_future: Any = None  #: the model's scene context, computed in a second thread (None: no context)
    # load_inputs
    stack: Any = None  #: (time, band, y, x): target then references
    failed: Any = None  #: (time, y, x) failed reads
    read_failures: list = field(default_factory=list)
    plausibility: list = field(default_factory=list)
    # compute_masks / coregister_references / find_missed_cloud
    layers: Any = None  #: stages.masks.MaskLayers of every item
    target_mask: Any = None
    target_prob: Any = None
    ref_stack: Any = None
    ref_masks: Any = None
    missed: Any = None
    coreg: list = field(default_factory=list)
    # attach_sar
    sar: Any = None
    # remove
    inputs: Any = None
    tiles: list = field(default_factory=list)
    halo: int = 0
    tile_timings: list = field(default_factory=list)
    ds: Any = None
    # mark_provenance
    prov: Any = None

    @property
    def items(self) -> list:
        return [self.target, *self.refs]

    @property
    def stem(self) -> str:
        return output_stem(self.target.id, self.model.name)


def process_target(plan: TargetPlan, model, cfg: Config, run_id: str, catalog=None) -> TargetResult:
    """One target: the steps below, in data-flow order, over one :class:`TargetContext`; published on success."""
    from concurrent.futures import ThreadPoolExecutor

    from cloudfree.stages.load import eager_loads
    from cloudfree.stages.masks import mask_inputs

    ctx = prepare_target(plan, model, cfg, run_id, catalog)
    # the model's scene context (a coarse load of the scene + fit_scene) does not depend on anything below: it is
    # computed in a second thread while this one probes the assets and estimates the co-registration (both are
    # small, partly single-threaded computes: on two cores the pair took 2 s of the 16x bench scene one after
    # the other)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudfree-context")
    if model.spec.scene_context and not small_target(ctx.geobox, ctx.cfg):
        ctx.context_future = pool.submit(scene_context, model, ctx.items, ctx.bands, ctx.geobox, ctx.cfg, plan)
    pool.shutdown(wait=False)
    future = ctx.context_future
    try:
        with eager_loads(reads_once(ctx), layers=mask_inputs(ctx.items, ctx.cfg.mask)):
            load_inputs(ctx)
            compute_masks(ctx)
        coregister_references(ctx)
        find_missed_cloud(ctx)
        attach_sar(ctx)
        remove(ctx)
        mark_provenance(ctx)
        return write_and_publish(ctx)
    finally:
        if future is not None and not future.done():
            future.cancel()
            try:
                future.result()  # never leave it running after this target (e.g. it failed early)
            except Exception:  # noqa: BLE001 - the target's own error is the one reported
                pass


def reads_once(ctx: TargetContext) -> bool:
    """A target read whole at once (:func:`cloudfree.stages.load.read_small_once`), by this process: its loads are
    eager (``stages.load.eager_loads``: no dask graph for ~15 chunk reads). On ``distributed`` the workers read, as
    for any target (they may see files the client does not)."""
    return max(ctx.geobox.shape) <= ctx.cfg.coregister.window and ctx.cfg.run.scheduler != "distributed"


def prepare_target(plan: TargetPlan, model, cfg: Config, run_id: str, catalog=None) -> TargetContext:
    """Search -> grid: the model's references, the bands, the output grid (bounded before any read), the resolved
    mask methods, and assets that exist only behind an API fetched on the output grid."""
    from cloudfree.models.registry import check_level
    from cloudfree.stages.load import check_grid_size, fetch_remote_assets, output_geobox
    from cloudfree.stages.masks import mask_inputs
    from cloudfree.stages.masks import resolved as resolved_masks
    from cloudfree.stages.search import load_aoi

    target = plan.target
    refs = [c.item for c in model_references(plan, model.spec.max_references, cfg)]
    items = [target, *refs]
    # an L2A model on L1C items (or the reverse) fails the target, naming the item and the fix
    check_level(model, items, cfg.model.allow_level_mismatch)
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
    return TargetContext(plan=plan, model=model, cfg=cfg, run_id=run_id, catalog=catalog, target=items[0],
                         refs=items[1:], bands=bands, geobox=geobox)


def load_inputs(ctx: TargetContext) -> None:
    """Load: every band of every item on the output grid (failed reads recorded, not raised), then the
    plausibility check (wrong scale/offset or band order fails the target naming item, band and fix, or warns)."""
    from cloudfree.stages.load import load_reflectance_checked
    from cloudfree.stages.output_check import check_band_crs
    from cloudfree.stages.plausibility import check_reflectance

    check_band_crs(ctx.target, ctx.bands)  # a band on another CRS than its item: the target fails, never `done`
    ctx.stack, ctx.failed, ctx.read_failures = load_reflectance_checked(ctx.items, ctx.bands, ctx.geobox,
                                                                        ctx.cfg.grid.chunk, name=ctx.target.id)
    ctx.plausibility = check_reflectance(ctx.target, ctx.refs, ctx.bands,
                                         skip={(f.item_id, f.band) for f in ctx.read_failures})


#: most bytes of reflectance input (items x bands x pixels x 4 B) of a target larger than the co-registration window
#: that is still read whole before the estimate (:func:`read_whole`): 58 MB for the bench's 1x scene (3 items x 4
#: bands x 1098^2 px), 231 MB at 4x (read lazily).
READ_WHOLE_MAX_BYTES = 128 * 2**20


def read_whole(ctx: TargetContext) -> bool:
    """A target larger than ``coregister.window`` whose inputs are nevertheless computed together before the
    co-registration (:func:`cloudfree.stages.load.read_small_once`): its references are co-registered and its
    reflectance inputs are at most :data:`READ_WHOLE_MAX_BYTES`.

    The estimate reads the chunks under its central window (all bands: the chunks hold every band), and the main
    pass read them again: 4 of the 9 chunks of a 3 x 3-chunk target (the bench's 1x scene: 1.1 of its 5.8
    task-seconds). Read whole, once, every pixel is read once; the steps after run on the arrays in memory
    (issue 22; ``bench --factors 1 --workers 2 --repeat 3``, with and without, alternated: phyvlm-cr 4.35 / 4.33 s
    against 4.74 s, reference-replace 3.04 / 3.10 against 3.33). The cost is memory: the whole inputs and the
    eager steps' whole-image temporaries, peak RSS 725 / 717 against 653 MB (phyvlm-cr), 492 / 488 against 353 MB
    (reference-replace), hence the byte bound. Not on ``distributed``: the arrays would travel to the client and
    back."""
    npx = ctx.geobox.shape[0] * ctx.geobox.shape[1]
    return (bool(ctx.refs) and ctx.cfg.coregister.enabled and ctx.cfg.run.scheduler != "distributed"
            and len(ctx.items) * len(ctx.bands) * npx * 4 <= READ_WHOLE_MAX_BYTES)


def compute_masks(ctx: TargetContext) -> None:
    """Masks: the configured methods' layers of every item; a reference pixel is clear only where no mask flags it,
    the refinement's opening did not remove it from the mask, every band is valid and its read did not fail."""
    from cloudfree.stages.load import read_small_once
    from cloudfree.stages.masks import build_mask_layers

    layers = build_mask_layers(ctx.items, ctx.geobox, ctx.cfg.mask, ctx.cfg.grid.chunk)
    # a target within the co-registration window, or small enough to read whole (read_whole), is read once, now,
    # for the estimate and the main pass alike
    names = list(layers.by_method)
    window = max(ctx.geobox.shape) if read_whole(ctx) else ctx.cfg.coregister.window
    ctx.stack, ctx.failed, mask, prob, opened, *per_method = read_small_once(
        ctx.geobox, window, ctx.stack, ctx.failed, layers.mask, layers.prob, layers.opened,
        *(layers.by_method[m] for m in names))
    ctx.layers = layers = type(layers)(mask, prob, dict(zip(names, per_method)), opened)
    ctx.target_mask, ctx.target_prob = layers.mask[0], layers.prob[0]
    if ctx.refs:
        ctx.ref_stack = ctx.stack[1:]
        ctx.ref_masks = layers.cloudy[1:] | ctx.stack[1:].isnull().any("band") | ctx.failed[1:]


def coregister_references(ctx: TargetContext) -> None:
    """Co-registration: estimate each reference's shift; shifted references are re-read on shifted grids (one
    resampling, lazy)."""
    if not (ctx.refs and ctx.cfg.coregister.enabled):
        return
    from cloudfree.stages.coregister import estimate_reference_shifts, load_aligned_references

    cfg, layers = ctx.cfg, ctx.layers
    ctx.coreg = estimate_reference_shifts(ctx.stack[0], layers.cloudy[0], ctx.ref_stack,
                                          ctx.ref_masks, [r.id for r in ctx.refs], cfg.coregister)
    if any(c.applied for c in ctx.coreg):
        ctx.ref_stack, ctx.ref_masks = load_aligned_references(ctx.refs, ctx.coreg, ctx.geobox, ctx.bands, cfg.mask,
                                                               cfg.grid.chunk, ctx.stack[0])


def find_missed_cloud(ctx: TargetContext) -> None:
    """Cloud and shadow the mask missed (multi-temporal test, lazy), added to the target's and references' masks."""
    if not (ctx.refs and ctx.cfg.mask.missed_cloud):
        return
    from cloudfree.stages.missed_cloud import add_missed_cloud

    ctx.target_mask, ctx.target_prob, ctx.ref_masks, ctx.missed = add_missed_cloud(
        ctx.stack[0], ctx.target_mask, ctx.target_prob, ctx.ref_stack, ctx.ref_masks)


def attach_sar(ctx: TargetContext) -> None:
    """Sentinel-1 for a model that needs or accepts it; otherwise only the S1 -> S2 shift is recorded."""
    from cloudfree.stages.sar import model_sar, sar_coregistration_record

    spec, mask0 = ctx.model.spec, ctx.layers.mask[0]
    if spec.needs_sar or spec.accepts_sar:
        ctx.sar, records = model_sar(ctx.plan, ctx.refs, ctx.catalog, ctx.stack[0], mask0, ctx.geobox, ctx.cfg,
                                     ctx.model)
        ctx.coreg.extend(records)
    elif ctx.plan.sar and ctx.cfg.coregister.enabled:
        ctx.coreg.append(sar_coregistration_record(ctx.plan, ctx.stack[0], mask0, ctx.geobox, ctx.cfg))


def remove(ctx: TargetContext) -> None:
    """Tile -> remove: the model over the tile plan (halo, blend), then opened specks and the low-confidence
    fallback (opened specks first: their lowered confidence is then subject to the fallback like any other)."""
    from cloudfree.stages.masks import mark_opened
    from cloudfree.stages.mosaic import confidence_fallback
    from cloudfree.stages.remove import SceneInputs, remove_clouds
    from cloudfree.stages.tile import plan_tiles

    cfg = ctx.cfg
    ctx.inputs = SceneInputs(
        target=ctx.stack[0], cloud_mask=ctx.target_mask, cloud_prob=ctx.target_prob,
        references=ctx.ref_stack, reference_masks=ctx.ref_masks,
        reference_ids=tuple(r.id for r in ctx.refs),
        reference_dt_days=reference_offsets(ctx.plan, ctx.refs), target_id=ctx.target.id, sar=ctx.sar,
    )
    ctx.halo = cfg.tile.halo if cfg.tile.halo is not None else ctx.model.spec.halo
    ctx.tiles = plan_tiles(ctx.geobox.shape, cfg.tile.size, ctx.halo)
    context = {}
    if ctx.context_future is not None:
        context = ctx.context_future.result()
    elif ctx.model.spec.scene_context:  # small_target: the scene sample is the target, already read (compute_masks)
        context = fit_scene_context(ctx.model, ctx.items, ctx.stack, ctx.layers, cfg, ctx.plan, ctx.geobox.shape)
    ds = remove_clouds(ctx.inputs, ctx.model, ctx.tiles, ctx.halo, context, blend=cfg.tile.blend,
                       timings=ctx.tile_timings)
    ds = mark_opened(ds, ctx.layers.opened[0], ctx.layers.prob[0])
    ctx.ds = confidence_fallback(ds, ctx.inputs, cfg.output.confidence_floor, cfg.output.low_confidence)


def mark_provenance(ctx: TargetContext) -> None:
    """The mask-provenance layer (which method flagged each pixel, nodata, missed cloud), cloudy pixels the model
    kept marked unfilled, failed target reads marked failed."""
    from cloudfree.stages.load import mark_failed
    from cloudfree.stages.masks import NODATA_BIT, mask_provenance
    from cloudfree.stages.remove import in_memory, mark_unfilled

    prov = mask_provenance({m: v[0] for m, v in ctx.layers.by_method.items()}, ctx.cfg.mask.methods)
    target = ctx.stack[0]
    if in_memory(prov, target, ctx.missed):  # a small target: the same bits in numpy (no xarray alignment)
        bits = prov.data | np.isnan(target.data).any(axis=0).astype(np.uint8) * np.uint8(NODATA_BIT)
        if ctx.missed is not None:
            from cloudfree.stages.missed_cloud import MISSED_BIT

            bits = bits | ctx.missed.data.astype(np.uint8) * np.uint8(MISSED_BIT)
        prov = prov.copy(data=bits)
    else:
        prov = prov | target.isnull().any("band").astype(np.uint8) * np.uint8(NODATA_BIT)
        if ctx.missed is not None:
            from cloudfree.stages.missed_cloud import MISSED_BIT

            prov = prov | ctx.missed.astype(np.uint8) * np.uint8(MISSED_BIT)
    ctx.prov = prov
    ds = ctx.ds
    ds["mask_provenance"] = (("y", "x"), prov.data)
    ds = mark_unfilled(ds, ctx.target_mask)
    if ctx.read_failures:
        ds = mark_failed(ds, ctx.failed[0], [f.band for f in ctx.read_failures if f.item_id == ctx.target.id])
    ctx.ds = ds


def write_and_publish(ctx: TargetContext) -> TargetResult:
    """Write into a staging folder, then publish it with one rename (never a `done` output replaced by a worse one
    under --overwrite) and list it in the output collection."""
    from cloudfree.pipeline.safety import publish_dir, safe_rmtree, staging_dir
    from cloudfree.stages.publish import update_collection
    from cloudfree.stages.write import is_done, paths_for

    out_dir, stem = ctx.cfg.output.dir, ctx.stem
    stage = staging_dir(out_dir, stem, ctx.run_id)
    try:
        res = write_staged(ctx, stage)
        final = paths_for(out_dir, stem)
        if res.status != "done" and ctx.cfg.output.overwrite and is_done(out_dir, stem):
            safe_rmtree(out_dir, stage)
            msg = (f"the new output is {res.status} ({res.error}); the existing `done` output was kept "
                   "(--overwrite never replaces a done output with a worse one)")
            log.warning("%s: %s", ctx.target.id, msg)
            return TargetResult(ctx.target.id, "skipped", res.references, outputs=final, error=msg, stats=res.stats,
                                coregistration=res.coregistration)
        publish_dir(out_dir, stage, final["item"].parent)
    except BaseException:
        for attempt in range(3):  # a tile task still running may write into it while it is removed: try again
            try:
                safe_rmtree(out_dir, stage)
                break
            except OSError as exc:  # the original error is the one reported
                if attempt == 2:
                    log.warning("%s: staging folder %s could not be removed (%s)", ctx.target.id, stage, exc)
                time.sleep(0.2)
        raise
    res.outputs = {k: final["item"].parent / Path(v).name for k, v in res.outputs.items()}
    update_collection(out_dir, final["item"], ctx.cfg.output.collection)
    if res.status == "unrestored":
        log.warning("%s: %s", ctx.target.id, res.error)
    return res


def _side_computes(ctx: TargetContext) -> tuple[tuple, tuple]:
    """What the write's single dask pass computes besides the COGs: the quicklook's decimated before/after/mask,
    and (with references) a decimated copy of the output and the references for the output check."""
    from cloudfree.stages.write import RGB

    cfg, geobox, ds = ctx.cfg, ctx.geobox, ctx.ds
    k = max(1, int(np.ceil(max(geobox.shape) / QUICKLOOK_MAX)))
    rgb = [b for b in RGB if b in ctx.bands]
    extras = ()
    if cfg.output.quicklook and len(rgb) == 3:
        extras = (ctx.stack[0].sel(band=rgb)[:, ::k, ::k].data, ds.reflectance.sel(band=rgb)[:, ::k, ::k].data,
                  ctx.prov[::k, ::k].data)
    check_inputs = ()
    if ctx.ref_stack is not None and ctx.ref_masks is not None:
        from cloudfree.stages.output_check import CHECK_MAX_SIDE

        kc = max(1, int(np.ceil(max(geobox.shape) / CHECK_MAX_SIDE)))
        check_inputs = (ds.reflectance[:, ::kc, ::kc].data, ds.source[::kc, ::kc].data,
                        ctx.ref_stack[:, :, ::kc, ::kc].data, ctx.ref_masks[:, ::kc, ::kc].data)
    return extras, check_inputs


def _checked_output(ctx: TargetContext, c_refl, c_src, c_refs, c_rmask):
    """The output check (:func:`cloudfree.stages.output_check.check_output`) on the decimated copies."""
    from cloudfree.pipeline.contract import SOURCE_FUSED, SOURCE_MODEL, SOURCE_REFERENCE_BASE
    from cloudfree.stages.output_check import check_output

    restored = np.isin(c_src, (SOURCE_MODEL, SOURCE_FUSED)) | (c_src >= SOURCE_REFERENCE_BASE)
    return check_output(np.asarray(c_refl), restored, np.asarray(c_refs), ~np.asarray(c_rmask, bool), ctx.bands)


def write_staged(ctx: TargetContext, stage: Path) -> TargetResult:
    """Write: the COGs, quicklook and item of one target into its staging folder ``stage``, in one dask pass (scenes in
    column strips of :data:`~cloudfree.stages.cog.STRIP_BLOCKS` blocks, so memory follows the strip's width)."""
    from cloudfree.stages.cog import STRIP_BLOCKS
    from cloudfree.stages.write import paths_for, quicklook, write_outputs

    cfg, stem = ctx.cfg, ctx.stem
    extras, check_inputs = _side_computes(ctx)
    log.info("%s: %d tiles of %d px (halo %d), %d reference(s), model %s", ctx.target.id, len(ctx.tiles),
             cfg.tile.size, ctx.halo, len(ctx.refs), ctx.model.name)
    out, computed = write_outputs(ctx.ds, cfg.output.dir, stem, cfg.output,
                                  extra_compute=(*extras, *check_inputs, ctx.tile_timings),
                                  progress=_progress_callback(cfg), stage=stage, strip_blocks=STRIP_BLOCKS)
    staged = {k: stage / v.name for k, v in paths_for(stage.parent, stem).items()}
    *computed, timings = computed
    checked = None
    if check_inputs:
        *computed, c_refl, c_src, c_refs, c_rmask = computed
        checked = _checked_output(ctx, c_refl, c_src, c_refs, c_rmask)
    tile_seconds = {f"{i}-{j}": round(float(sec), 3) for (i, j), sec in timings}
    if computed:
        before, after, m = computed
        out.files["quicklook"] = quicklook(before, after, m, staged["quicklook"],
                                           title=f"{ctx.target.id} / {ctx.model.name}")
    return write_item(ctx, out, staged, checked, tile_seconds)


def target_status(ctx: TargetContext, stats: dict, checked, extra: dict) -> tuple[str, str]:
    """``(status, why)`` of a written target from its cover statistics, whether any target pixel was read and the
    output check; ``extra["eo:cloud_cover"]`` raised to match (an unusable output never ranks as a clear
    reference later)."""
    from cloudfree.stages.output_check import no_target_data, restoration_status

    status, why = restoration_status(stats)
    if no_target_data(stats):
        failed_bands = sorted({f.band for f in ctx.read_failures if f.item_id == ctx.target.id})
        status, why = "unrestored", (
            f"the target's band(s) {', '.join(failed_bands)} could not be read, so no target pixel is a complete "
            "observation: the output holds the references where one is clear and nodata in those bands elsewhere"
            if failed_bands and set(failed_bands) != set(ctx.bands) else
            "no target pixel could be read (every band nodata or a failed read): the output would be the references "
            "under the target's date")
        extra["eo:cloud_cover"] = 100.0
    if checked is not None:
        extra["cloudfree:output_check"] = checked.as_properties()
        if not checked.ok and status == "done":
            status, why = "unrestored", f"output check: {checked.reason}"
            extra["eo:cloud_cover"] = max(extra["eo:cloud_cover"], round(100 * checked.implausible_share, 2))
    return status, why


def write_item(ctx: TargetContext, out, staged: dict, checked, tile_seconds: dict) -> TargetResult:
    """Publish (staged): the evaluation against truth, cover statistics, status, and the STAC item that marks the
    target done."""
    from cloudfree.catalogs.harmonise import harmonise
    from cloudfree.pipeline.contract import SOURCE_UNFILLED
    from cloudfree.stages.output_check import cover_stats
    from cloudfree.stages.publish import file_sha256, output_item, with_collection_links
    from cloudfree.stages.write import paths_for, write_json_atomic

    cfg, target = ctx.cfg, ctx.target
    metrics = {}
    if "truth" in target.assets:
        from cloudfree.pipeline.evaluation.truth import evaluate_against_truth

        metrics = evaluate_against_truth(target, out.reflectance, ctx.geobox, ctx.bands, cfg.grid.chunk)
    extra = {"cloudfree:evaluation": metrics} if metrics else {}
    stats = cover_stats(out.files["confidence"], out.files["mask_provenance"], cfg.output.confidence_floor,
                        source_path=out.files["source"], arrays=out.arrays)
    # eo:cloud_cover of an output = the share that is not a usable cloud-free estimate (low confidence, cloudy and
    # not restored, failed reads, nodata), so an unusable output never ranks as a clear reference later
    extra["eo:cloud_cover"] = round(100 * stats["unusable_after"], 2)
    status, why = target_status(ctx, stats, checked, extra)
    extra.update(_item_properties(ctx, stats, status, tile_seconds))
    wpath = Path(ctx.model.spec.weights) if ctx.model.spec.weights else None
    weights_sha = file_sha256(wpath) if wpath is not None and wpath.is_file() else None
    final = paths_for(cfg.output.dir, ctx.stem)
    item = output_item(target, ctx.refs, out, ctx.geobox, ctx.bands, ctx.model.name, dict(cfg.model.params),
                       ctx.run_id, [harmonise(i).as_properties() for i in ctx.items], extra=extra,
                       weights_sha256=weights_sha, collection_id=cfg.output.collection, mask_bits=_mask_bits(cfg),
                       item_dir=final["item"].parent)
    item.set_self_href(str(final["item"].resolve()))
    # with the collection links update_collection gives it once published: the item is serialised once
    write_json_atomic(with_collection_links(item.to_dict(include_self_link=False, transform_hrefs=False),
                                            final["item"], cfg.output.dir, cfg.output.collection), staged["item"])
    out.files["item"] = staged["item"]
    error = None
    if status == "unrestored":
        error = (f"{why}; written (cloudy pixels not restored carry source code {SOURCE_UNFILLED}), "
                 f"eo:cloud_cover {extra['eo:cloud_cover']} and cloudfree:status 'unrestored', so later searches do not "
                 "take it as a clear reference and a rerun retries it; widen search.max_days / "
                 "search.reference_max_cloud_cover or rerun when newer acquisitions exist")
    return TargetResult(target.id, status, [r.id for r in ctx.refs], outputs=dict(out.files), metrics=metrics,
                        error=error, tile_seconds=tile_seconds, stats=stats,
                        coregistration=[c.as_properties() for c in ctx.coreg],
                        warnings=run_warnings(ctx.plausibility, ctx.coreg, stats, checked))


def _item_properties(ctx: TargetContext, stats: dict, status: str, tile_seconds: dict) -> dict:
    """The ``cloudfree:*`` properties of an output item after its status (in the order the items list them)."""
    from cloudfree.stages.masks import mask_refinement_property

    cfg, extra = ctx.cfg, {}
    if stats.get("missed_cloud_before") is not None:
        extra["cloudfree:missed_cloud"] = {
            "share": stats["missed_cloud_before"],
            "test": "multi-temporal: blue far above every clear reference (cloud) or NIR/SWIR far below (shadow), "
                    "on pixels the mask called clear (stages/missed_cloud.py)"}
    extra["cloudfree:status"] = status
    extra["cloudfree:mask_methods"] = list(cfg.mask.methods)
    extra["cloudfree:target_cloud_cover"] = ctx.target.properties.get("eo:cloud_cover")
    extra["cloudfree:cover"] = stats
    extra["cloudfree:tile_seconds"] = tile_seconds
    extra["cloudfree:blend"] = cfg.tile.blend if ctx.halo > 0 else "none"
    extra["cloudfree:low_confidence"] = {"floor": cfg.output.confidence_floor, "mode": cfg.output.low_confidence}
    extra["cloudfree:mask_refinement"] = mask_refinement_property(cfg.mask, stats)
    if ctx.read_failures:
        from cloudfree.pipeline.redact import redact

        # hrefs may be signed (SAS tokens): never put a credential into an output file
        extra["cloudfree:read_failures"] = [{k: redact(v) if isinstance(v, str) else v for k, v in
                                             f.as_properties().items()} for f in ctx.read_failures]
    if ctx.plausibility:
        extra["cloudfree:plausibility"] = list(ctx.plausibility)
    if ctx.plan.dropped:  # references whose read failed: dropped, the target made with the others
        extra["cloudfree:dropped_references"] = list(ctx.plan.dropped)
    if ctx.coreg:
        extra["cloudfree:coregistration"] = [c.as_properties() for c in ctx.coreg]
    return extra


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


def _progress_callback(cfg: Config):
    """The CLI's progress bar as the write stage's callback (None when ``run.progress`` is off)."""
    if not cfg.run.progress:
        return None
    from cloudfree.pipeline.progress import progress_bar

    return lambda desc: progress_bar(True, desc)


