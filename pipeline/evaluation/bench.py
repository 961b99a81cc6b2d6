"""Benchmark: cloudfree against odc-stac on the same job, next to the I/O floor, as the area grows.

``python -m cloudfree.pipeline.evaluation.bench --out docs`` (``make bench``) writes ``docs/bench.json`` and
``docs/bench.md``. Every measurement runs in its own subprocess (wall time of the job, ``ru_maxrss`` of that
process), all in the same run so the ratios compare like with like on a noisy machine.

Data: the real Sentinel-2 L2A tile 29RKH (2020-02-19) decimated to 100 m in ``../shared/data``, as local STAC
items whose assets point at the local COGs (:func:`local_29rkh_item`). Time series: 8 dated copies of the item
(other ids, dates 5 days apart: the shared data has one acquisition of the tile), 4 bands (B02, B03, B04, B08) +
SCL. The copies read the same files, so GDAL's block cache (capped per run, ``--gdal-cachemax``) serves some
repeated reads, for every job alike.

Area: 1x, 4x and 16x the pixels = the whole MGRS tile on its native grid at 100, 50 and 25 m (1098^2, 2196^2,
4392^2 px). Workers: dask threads with 1 and 2 workers (``--workers``); the scene models other than phyvlm-cr run
at the largest worker count only unless ``--all-workers``.

Jobs (``--jobs``):

* ``odc-median``: what users do today: ``odc.stac.load`` of the 8 items, nodata masked, ``median("time")``,
  ``odc.geo.xr.write_cog`` of the uint16 result;
* ``io-floor``: read every input of the scene job once (3 items x 4 bands + SCL, odc-stac, on the output grid)
  and write a COG of the same size through the same writer: no masks, no model, no blending;
* ``composite``: ``cloudfree composite --method median`` of the 8 items (the per-MGRS-tile work of
  :func:`cloudfree.pipeline.composite.run_composite`: load, SCL masks, median kernel, COG write, STAC item);
* ``scene:<model>``: ``cloudfree scene`` (:func:`cloudfree.pipeline.runner.process_target`): target + 2 references (dated
  copies), SCL masks, co-registration, scene context, tiles with the model's halo, blending, COGs, STAC item.

Each measurement at 1x and 4x is run 3 times (``--repeat``) and the median is reported (a run of a few seconds
varies 10-20 % between identical runs); 16x once. Seconds are the job's wall time after the Python imports (:func:`warm_imports`, done before the clock starts for
every job); building the model and everything else the job does are inside.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pystac

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "s2-l2a-tile-29RKH-100m"
BANDS = ["B02", "B03", "B04", "B08"]
FILES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12", "SCL")
#: area factor -> grid resolution (m) of the whole tile.
FACTORS = {1: 100.0, 4: 50.0, 16: 25.0}
N_DATES = 8
DEFAULT_JOBS = ("odc-median", "io-floor", "composite", "scene:phyvlm-cr", "scene:reference-replace", "scene:dcp")
#: jobs with one extra profiled run (:class:`HeldMemory`) at the smallest and largest area, most workers: what dask
#: holds at its peak and where the task-seconds go, for the misses (``--profile-jobs``).
PROFILE_JOBS = ("composite", "scene:phyvlm-cr", "scene:reference-replace", "scene:dcp")
#: jobs measured at every worker count; the others only at the largest (keeps ``make bench`` near 10 minutes).
ALL_WORKER_JOBS = ("odc-median", "io-floor", "composite", "scene:phyvlm-cr")


def local_29rkh_item(folder: Path = DATA, item_id: str | None = None, shift_days: float = 0.0) -> pystac.Item:
    """A STAC item for the local decimated 29RKH COGs, from the Earth Search v0 item JSON beside them."""
    import rasterio

    src = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    dt = datetime.fromisoformat(src["properties"]["datetime"].replace("Z", "+00:00")) + timedelta(days=shift_days)
    props = {k: v for k, v in src["properties"].items() if k != "datetime"}
    with rasterio.open(folder / "B02.tif") as ds:
        props["proj:shape"], props["proj:transform"] = list(ds.shape), list(ds.transform)[:6]
    item = pystac.Item(item_id or src["id"], src["geometry"], src["bbox"], dt, props,
                       stac_extensions=src.get("stac_extensions", []))
    for name in FILES:
        with rasterio.open(folder / f"{name}.tif") as ds:
            rb = {"nodata": 0, "data_type": ds.dtypes[0]}
            if name != "SCL":
                rb.update(scale=1e-4, offset=0.0)
            item.add_asset(name, pystac.Asset(
                str((folder / f"{name}.tif").resolve()), media_type=pystac.MediaType.COG,
                roles=["data"], extra_fields={"proj:shape": list(ds.shape), "proj:transform": list(ds.transform)[:6],
                                              "raster:bands": [rb], "eo:bands": [{"name": name}]}))
    return item


def _config(res: float, out: Path, model: str = "reference-replace", workers: int = 2):
    from cloudfree.pipeline.config import parse_config

    return parse_config({
        "grid": {"resolution": res, "bands": BANDS, "chunk": 512},
        "mask": {"methods": ["scl"]},
        "tile": {"size": 512},
        "model": {"name": model},
        "composite": {"method": "median"},
        "output": {"dir": str(out), "quicklook": False, "overwrite": True, "report": False},
        "run": {"scheduler": "threads", "workers": workers, "progress": False},
    }, source="bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def dated_items(folder: Path, n: int) -> list[pystac.Item]:
    """The tile and ``n - 1`` dated copies (5 days apart), least recent last."""
    first = local_29rkh_item(folder)
    return [first] + [local_29rkh_item(folder, item_id=f"{first.id}_D{k}", shift_days=-5.0 * k) for k in range(1, n)]


def scene_plan(items: list[pystac.Item], reason: str = "bench"):
    """The plan of a scene job: ``items[0]`` the target, the others its references, 5 days apart (as
    :func:`dated_items` dates them), every candidate clear and on the same orbit and tile."""
    from cloudfree.stages.search import Candidate, TargetPlan

    return TargetPlan(items[0], tuple(Candidate(item=it, dt_days=-5.0 * k, clear_fraction=1.0, overlap=1.0,
                                                same_orbit=True, same_tile=True, score=1.0, reason=reason)
                                      for k, it in enumerate(items[1:], 1)), ())


def _odc_median(items, geobox, out: Path) -> None:
    import odc.stac
    from odc.geo.xr import write_cog

    ds = odc.stac.load(items, bands=BANDS, geobox=geobox, chunks={"x": 512, "y": 512}, groupby="id",
                       resampling="bilinear")
    med = ds.where(ds != 0).chunk({"time": -1}).median("time")
    arr = med.to_array("band").round().fillna(0).astype("uint16")
    write_cog(arr, out / "odc-median.tif", overwrite=True, nodata=0, blocksize=512, compress="deflate",
              predictor=2)


def _io_floor(items, geobox, out: Path, cfg) -> None:
    """Read every input of the scene job once and write one COG of the same size (no masks, no model)."""
    import dask.array as dsa
    import numpy as np

    from cloudfree.stages.cog import compute_once, cog_write, layer_array
    from cloudfree.stages.load import load_layer, load_reflectance

    stack = load_reflectance(items, BANDS, geobox, cfg.grid.chunk)
    scl = load_layer(items, "SCL", geobox, cfg.grid.chunk)

    def first_valid(refl, s):  # touches every input pixel, keeps the target
        keep = np.isfinite(refl).all(axis=(0, 1)) & np.isfinite(s).all(axis=(0, 1))
        return np.where(keep, np.round(refl[0] * 1e4), 0).astype(np.uint16)

    dn = dsa.map_blocks(first_valid, stack.data.rechunk({0: -1}), scl.data[:, None].rechunk({0: -1}), drop_axis=0,
                        dtype=np.uint16)
    from dask.core import flatten

    # the same bounded look-ahead as every cloudfree write (stages.cog.bound_lookahead)
    compute_once(cog_write(layer_array(dn, geobox, BANDS, 0), out / "io-floor.tif"),
                 markers=[[k] for k in flatten(dn.__dask_keys__())])


#: modules the jobs import on first use, imported before the clock starts (for every job alike: odc-stac's own
#: modules are imported at the top of ``cloudfree.stages.load`` for all of them). A batch pays these once per process, not
#: per target; measured inside the job they were ~2 s of a 1x scene (scikit-image's ``filters`` pulls in
#: ``scipy.signal``, rio-cogeo, odc-geo's COG writer, tifffile/imagecodecs).
WARM_IMPORTS = ("cloudfree.pipeline.composite", "cloudfree.pipeline.runner", "cloudfree.stages.cog", "cloudfree.stages.write", "cloudfree.stages.masks",
                "cloudfree.stages.coregister", "cloudfree.stages.remove", "cloudfree.stages.mosaic", "cloudfree.stages.publish", "cloudfree.stages.plausibility",
                "cloudfree.stages.sar", "rio_cogeo.cogeo", "skimage.registration", "skimage.filters", "odc.geo.cog",
                "odc.geo.xr", "tifffile", "imagecodecs")


def warm_imports(model_name: str | None = None) -> None:
    """Import :data:`WARM_IMPORTS` and the module of ``model_name`` (not the model itself: building it, with
    its weights, stays inside the measured job)."""
    import importlib

    for mod in WARM_IMPORTS:
        importlib.import_module(mod)
    if model_name:
        from cloudfree.models.registry import get_model_class

        get_model_class(model_name)


def _group(key) -> str:
    """A task key's group: its name without dask's tokens (``cloudfree-tiles-predict``, ``rechunk-merge``, ``B04``)."""
    import re

    from dask.utils import key_split

    name = str(key[0] if isinstance(key, tuple) else key)
    return re.sub(r"-[0-9a-f]{32}", "", name) if name.startswith("cloudfree") else key_split(key)


class HeldMemory:
    """Dask callbacks (local schedulers) that profile a compute: the results dask holds between tasks (their
    ``sizeof``, sampled after every task) at its peak, grouped by task name, and the task-seconds per group.
    Installed with :func:`cloudfree.stages.cog.profile_computes`; costs O(held results) per task, so the profiled
    run is a separate run from the timed ones."""

    def __init__(self):
        import threading

        self.sizes: dict = {}
        self.total = self.peak = 0
        self.peak_groups: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.tasks = 0
        self._t0: dict = {}
        self._lock = threading.Lock()

    def callback(self):
        from dask.callbacks import Callback

        return Callback(pretask=self._pretask, posttask=self._posttask)

    def _pretask(self, key, dsk, state):
        self._t0[key] = time.perf_counter()

    def _posttask(self, key, result, dsk, state, worker_id):
        from dask.sizeof import sizeof

        dt = time.perf_counter() - self._t0.pop(key, time.perf_counter())
        g = _group(key)
        cache = state["cache"]
        with self._lock:
            self.tasks += 1
            self.seconds[g] = self.seconds.get(g, 0.0) + dt
            size = sizeof(result) if key in cache else 0
            self.sizes[key] = size
            self.total += size
            for k in [k for k in self.sizes if k not in cache]:
                self.total -= self.sizes.pop(k)
            if self.total > self.peak:
                self.peak = self.total
                groups: dict[str, int] = {}
                for k, v in self.sizes.items():
                    groups[_group(k)] = groups.get(_group(k), 0) + v
                self.peak_groups = groups

    def summary(self, top: int = 8) -> dict:
        mb = 2 ** 20
        return {"held_peak_mb": round(self.peak / mb, 1),
                "held_at_peak_mb": {k: round(v / mb, 1) for k, v in sorted(self.peak_groups.items(),
                                                                        key=lambda kv: -kv[1])[:top] if v >= mb / 2},
                "task_seconds": round(sum(self.seconds.values()), 1),
                "task_seconds_by_group": {k: round(v, 2) for k, v in sorted(self.seconds.items(),
                                                                           key=lambda kv: -kv[1])[:top]}}


def run_one(job: str, factor: int, workers: int, folder: Path, profile: bool = False) -> dict:
    """One measurement in this process (call it in a fresh subprocess)."""
    import dask

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.runner import dask_context, process_target
    from cloudfree.stages.cog import observe_graphs, profile_computes
    from cloudfree.stages.load import output_geobox
    from cloudfree.stages.tile import plan_tiles

    res = FACTORS[factor]
    items = dated_items(folder, N_DATES)
    model_name = job.split(":", 1)[1] if job.startswith("scene:") else "reference-replace"
    n_tiles = 0
    graph_sizes: list[int] = []
    held = HeldMemory() if profile else None
    with tempfile.TemporaryDirectory(prefix="cloudfree-bench-") as tmp, \
            observe_graphs(lambda tasks, gated: graph_sizes.append(tasks)), \
            profile_computes(*([held.callback()] if held else [])):
        out = Path(tmp)
        cfg = _config(res, out, model_name, workers)
        geobox = output_geobox(items[0], cfg.grid)
        warm_imports(model_name if job.startswith("scene:") else None)
        base = _peak_rss_mb()
        t0 = time.perf_counter()
        with dask_context(cfg):
            if job == "odc-median":
                with dask.config.set(scheduler="threads", num_workers=workers):
                    _odc_median(items, geobox, out)
            elif job == "io-floor":
                _io_floor(items[:3], geobox, out, cfg)
            elif job == "composite":
                from cloudfree.pipeline.composite import _pixel_composite

                _pixel_composite(items, "29RKH", "2020-02", cfg, None, out, "bench")
            elif job.startswith("scene:"):
                model = build_model(model_name, {})
                plan = scene_plan(items[:3])
                r = process_target(plan, model, cfg, "bench")
                if r.status != "done":
                    raise RuntimeError(f"bench run failed: {r.error}")
                n_tiles = len(plan_tiles(geobox.shape, cfg.tile.size, model.spec.halo))
            else:
                raise SystemExit(f"unknown bench job {job!r}")
        secs = time.perf_counter() - t0
    npx = geobox.shape[0] * geobox.shape[1]
    blocks = -(-geobox.shape[0] // 512) * -(-geobox.shape[1] // 512)
    out = {"graph_tasks": max(graph_sizes) if graph_sizes else None, "blocks": blocks, "job": job, "factor": factor, "workers": workers, "resolution_m": res, "shape": list(geobox.shape),
           "megapixels": round(npx / 1e6, 3), "tiles": n_tiles, "seconds": round(secs, 2),
           "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    if held is not None:
        out["profile"] = held.summary()
    return out


#: the small-target batch (issue 22): ``(job, targets, side px)``. Each runs in one warm process: the model is
#: built once and one target is run (untimed) before the timed ones, as a batch does after its first target.
#: ``batch:<model>`` = ``process_target`` per target (target + 2 references, masks, co-registration, tiles, COGs,
#: STAC item); ``odc-loop`` = per target an odc-stac ``load`` of the same 3 items and bands on the same grid +
#: ``median("time")`` + ``write_cog``. Two sides give the fixed cost and the per-pixel cost (time = a + b * px).
#: An optional 4th element runs that many targets in flight (``run.concurrent_targets`` on the threaded scheduler,
#: ``runner.map_units``); its seconds per target are then the batch's total over its targets (throughput).
BATCH_JOBS = (("batch:reference-replace", 50, 100), ("odc-loop", 50, 100), ("batch:reference-replace", 50, 100, 2),
              ("batch:reference-replace", 3, 400), ("odc-loop", 3, 400), ("batch:phyvlm-cr", 16, 100),
              ("batch:phyvlm-cr", 3, 400))


def batch_windows(item: pystac.Item, side: int, n: int) -> list[tuple[float, float, float, float]]:
    """``n`` AOIs (EPSG:4326 bboxes) of ``side`` x ``side`` px of the item's grid at 100 m, row by row, each inside
    its window by a quarter pixel (so the snapped output grid is that window)."""
    from odc.geo.geom import BoundingBox

    from cloudfree.stages.load import native_geobox

    gb = native_geobox(item).zoom_to(resolution=100.0)
    per_row = (gb.shape[1] - 50) // side
    out = []
    for k in range(n):
        r, c = divmod(k, per_row)
        win = gb[50 + r * side: 50 + (r + 1) * side, 50 + c * side: 50 + (c + 1) * side]
        b = win.boundingbox
        q = 25.0
        bb = BoundingBox(b.left + q, b.bottom + q, b.right - q, b.top - q, crs=gb.crs).to_crs("EPSG:4326")
        out.append((bb.left, bb.bottom, bb.right, bb.top))
    return out


def run_batch(job: str, n: int, side: int, workers: int, folder: Path, in_flight: int = 1) -> dict:
    """One small-target batch in this process (call it in a fresh subprocess): per-target seconds after one untimed
    warm-up target, the batch's total and the process's peak RSS. ``in_flight`` > 1: that many targets at a time
    (``runner.map_units``, as ``run.concurrent_targets`` on threads); seconds per target = total / targets."""
    import statistics

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.runner import dask_context, map_units, process_target
    from cloudfree.stages.load import output_geobox

    items = dated_items(folder, 3)
    model_name = job.split(":", 1)[1] if job.startswith("batch:") else "reference-replace"
    aois = batch_windows(items[0], side, n + 1)
    warm_imports(model_name if job.startswith("batch:") else None)
    base = _peak_rss_mb()
    secs, shapes = [], set()
    with tempfile.TemporaryDirectory(prefix="cloudfree-bench-") as tmp:
        cfg0 = _config(100.0, Path(tmp), model_name, workers)
        model = build_model(model_name, {}) if job.startswith("batch:") else None
        plan = scene_plan(items[:3])
        def one(i: int) -> float:
            aoi = aois[i]
            out = Path(tmp) / f"t{i}"
            cfg = cfg0.replace(search={"aoi": list(aoi)}, output={"dir": str(out)})
            t0 = time.perf_counter()
            if model is not None:
                r = process_target(plan, model, cfg, "bench")
                if r.status != "done":
                    raise RuntimeError(f"bench batch target {i} failed: {r.error}")
            else:
                import dask

                out.mkdir(parents=True)
                geobox = output_geobox(items[0], cfg.grid, aoi)
                with dask.config.set(scheduler="threads", num_workers=workers):
                    _odc_median(items, geobox, out)
            shapes.add(tuple(output_geobox(items[0], cfg.grid, aoi).shape))
            return time.perf_counter() - t0

        with dask_context(cfg0):
            one(0)  # the first target warms the process (GDAL, numba, the model's first call): not timed
            t_all = time.perf_counter()
            secs = map_units(one, list(range(1, len(aois))), in_flight)
            total = time.perf_counter() - t_all
    row = {"job": job, "targets": n, "side_px": side, "workers": workers, "shapes": sorted(shapes),
           "seconds_per_target": round(statistics.median(secs), 3), "seconds_total": round(sum(secs), 2),
           "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    if in_flight > 1:  # the targets overlap: the batch's wall-clock total, and per target its share of it
        row.update(in_flight=in_flight, seconds_total=round(total, 2), seconds_per_target=round(total / n, 3))
    return row


def batch_ratios(batch: list[dict]) -> dict:
    """Per job: fixed cost and per-pixel cost from its two sides (``time = a + b * px``), and the 50-target batch
    over the odc-stac loop."""
    out: dict = {"fixed_and_per_pixel": {}, "batch_over_odc_loop": {}}
    for job in sorted({b["job"] for b in batch if "seconds_per_target" in b}):
        rows = sorted((b for b in batch if b["job"] == job and "seconds_per_target" in b
                       and b.get("in_flight", 1) == 1), key=lambda b: b["side_px"])
        if len(rows) >= 2:
            (s0, t0), (s1, t1) = (rows[0]["side_px"] ** 2, rows[0]["seconds_per_target"]), \
                (rows[-1]["side_px"] ** 2, rows[-1]["seconds_per_target"])
            b = (t1 - t0) / (s1 - s0)
            out["fixed_and_per_pixel"][job] = {"fixed_s": round(t0 - b * s0, 3), "us_per_px": round(b * 1e6, 3)}
    odc = {b["side_px"]: b for b in batch if b["job"] == "odc-loop" and "seconds_total" in b}
    for b in batch:
        o = odc.get(b["side_px"])
        if b["job"] != "odc-loop" and o and "seconds_total" in b and b["targets"] == o["targets"]:
            flight = f", {b['in_flight']} in flight" if b.get("in_flight", 1) > 1 else ""
            out["batch_over_odc_loop"][f"{b['job']} {b['targets']}x{b['side_px']}px{flight}"] = round(
                b["seconds_total"] / o["seconds_total"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="cloudfree benchmark against odc-stac (see the module docstring)")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--jobs", default=",".join(DEFAULT_JOBS))
    ap.add_argument("--all-workers", action="store_true",
                    help="every job at every worker count (default: the extra scene models only at the largest)")
    ap.add_argument("--gdal-cachemax", type=int, default=64,
                    help="GDAL block cache (MB) of each run; GDAL's default, 5%% of RAM, grows with the area")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per measurement at areas up to --repeat-max-factor (the median is reported: runs of a "
                         "few seconds vary by 10-20%% between identical runs)")
    ap.add_argument("--repeat-max-factor", type=int, default=4)
    ap.add_argument("--one", nargs=3, metavar=("JOB", "FACTOR", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-jobs", default=",".join(PROFILE_JOBS),
                    help="jobs that get one extra profiled run (held memory, task-seconds) at the smallest and the "
                         "largest area with the most workers; '' = none")
    ap.add_argument("--one-batch", nargs=4, metavar=("JOB", "N", "SIDE", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--in-flight", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch-only", action="store_true", help="only the small-target batches (BATCH_JOBS)")
    ap.add_argument("--no-batch", action="store_true",
                    help="skip the small-target batches (the batch section of an existing bench.md is kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.one:
        sys.stdout.write(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.data,
                                            profile=args.profile)) + "\n")
        return 0
    if args.one_batch:
        j, n, side, w = args.one_batch
        sys.stdout.write(json.dumps(run_batch(j, int(n), int(side), int(w), args.data, args.in_flight)) + "\n")
        return 0
    if not (args.data / "B02.tif").exists():
        log.error("benchmark data %s not found; pass --data to the s2-l2a-tile-29RKH-100m folder", args.data)
        return 2
    runs = []
    t_all = time.perf_counter()
    workers = [int(x) for x in args.workers.split(",")]
    env = {**os.environ, "GDAL_CACHEMAX": str(args.gdal_cachemax)}
    batch = []
    for job, n, side, *flight in (() if args.no_batch else BATCH_JOBS):
        w, in_flight = max(workers), (flight or [1])[0]
        load = round(os.getloadavg()[0], 2)  # the machine's 1-min load when the row starts (shared machines)
        proc = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.evaluation.bench", "--data", str(args.data),
                               "--one-batch", job, str(n), str(side), str(w), "--in-flight", str(in_flight)],
                              capture_output=True, text=True, check=False, env=env)
        if proc.returncode:
            log.error("bench batch %s %dx%d failed:\n%s", job, n, side, proc.stderr[-3000:])
            batch.append({"job": job, "targets": n, "side_px": side, "workers": w, "error": proc.stderr[-500:],
                          "load_before": load, **({"in_flight": in_flight} if in_flight > 1 else {})})
            continue
        batch.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load})
        log.warning("%s", batch[-1])
    if args.batch_only:  # the batch section of an existing bench.md is replaced, the rest kept (bench_batch.json)
        args.out.mkdir(parents=True, exist_ok=True)
        res = {"machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
               "total_seconds": round(time.perf_counter() - t_all, 1), "batch": batch,
               "batch_ratios": batch_ratios(batch)}
        (args.out / "bench_batch.json").write_text(json.dumps(res, indent=1))
        md = args.out / "bench.md"
        section = f"{BATCH_BEGIN}\n{batch_markdown(res)}{BATCH_END}\n"
        text = md.read_text() if md.exists() else ""
        if BATCH_BEGIN in text and BATCH_END in text:
            head, rest = text.split(BATCH_BEGIN, 1)
            text = head + section + rest.split(BATCH_END, 1)[1].lstrip("\n")
        else:
            text = text + ("\n" if text else "") + section
        md.write_text(text)
        return 0
    for f in (int(x) for x in args.factors.split(",")):
        for w in workers:
            for job in args.jobs.split(","):
                if w != max(workers) and job not in ALL_WORKER_JOBS and not args.all_workers:
                    continue
                env = {**os.environ, "GDAL_CACHEMAX": str(args.gdal_cachemax)}
                n = args.repeat if f <= args.repeat_max_factor else 1
                reps, failed = [], None
                for _ in range(n):
                    proc = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.evaluation.bench", "--data",
                                           str(args.data), "--one", job, str(f), str(w)], capture_output=True,
                                          text=True, check=False, env=env)
                    if proc.returncode:
                        failed = proc.stderr
                        break
                    reps.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if failed is not None:
                    log.error("bench %s x%d w%d failed:\n%s", job, f, w, failed[-3000:])
                    runs.append({"job": job, "factor": f, "workers": w, "error": failed[-500:]})
                    continue
                runs.append(median_run(reps))
                log.warning("%s", runs[-1])
    profiles = []
    factors = [int(x) for x in args.factors.split(",")]
    for job in [j for j in args.profile_jobs.split(",") if j]:
        for f in sorted({min(factors), max(factors)}):
            env = {**os.environ, "GDAL_CACHEMAX": str(args.gdal_cachemax)}
            proc = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.evaluation.bench", "--data",
                                   str(args.data), "--one", job, str(f), str(max(workers)), "--profile"],
                                  capture_output=True, text=True, check=False, env=env)
            if proc.returncode:
                log.error("bench profile %s x%d failed:\n%s", job, f, proc.stderr[-3000:])
                continue
            profiles.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log.warning("profile %s", profiles[-1])
    result = {"machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
              "profiles": profiles, "data": str(args.data), "gdal_cachemax_mb": args.gdal_cachemax, "dates": N_DATES, "bands": BANDS,
              "malloc_arenas": _config(100.0, Path(".")).run.malloc_arenas,
              "malloc_mmap_threshold": _config(100.0, Path(".")).run.malloc_mmap_threshold,
              "total_seconds": round(time.perf_counter() - t_all, 1), "runs": runs, "ratios": ratios(runs),
              "batch": batch, "batch_ratios": batch_ratios(batch)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    text = to_markdown(result)
    md = args.out / "bench.md"
    if args.no_batch and md.exists():  # the batch section of the existing bench.md (--batch-only's) is kept
        old = md.read_text()
        if BATCH_BEGIN in old and BATCH_END in old:
            section = BATCH_BEGIN + old.split(BATCH_BEGIN, 1)[1].split(BATCH_END, 1)[0] + BATCH_END
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)
    return 0


def median_run(reps: list[dict]) -> dict:
    """One row from repeated runs of a measurement: the median seconds and the median peak RSS (each run's own
    values kept under ``repeats``)."""
    import statistics

    out = dict(reps[0])
    if len(reps) > 1:
        out["seconds"] = round(statistics.median(r["seconds"] for r in reps), 2)
        out["peak_rss_mb"] = round(statistics.median(r["peak_rss_mb"] for r in reps), 1)
        out["repeats"] = [{"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]} for r in reps]
    return out


def _get(runs, job, f, w):
    return next((r for r in runs if r["job"] == job and r["factor"] == f and r["workers"] == w and "seconds" in r),
                None)


def ratios(runs: list[dict]) -> dict:
    """The issue's targets, per area and worker count: composite / odc-median time, scene:phyvlm-cr / io-floor
    and / odc-median time, and per job the peak RSS at 16x over 1x."""
    out = {"per_size": [], "rss_16x_over_1x": {}}
    sizes = sorted({(r["factor"], r["workers"]) for r in runs if "seconds" in r})
    for f, w in sizes:
        odc, floor = _get(runs, "odc-median", f, w), _get(runs, "io-floor", f, w)
        comp, phy = _get(runs, "composite", f, w), _get(runs, "scene:phyvlm-cr", f, w)
        row = {"factor": f, "workers": w}
        if odc and comp:
            row["composite_over_odc_median"] = round(comp["seconds"] / odc["seconds"], 2)
        if floor and phy:
            row["phyvlm_scene_over_io_floor"] = round(phy["seconds"] / floor["seconds"], 2)
        if odc and phy:
            row["phyvlm_scene_over_odc_median"] = round(phy["seconds"] / odc["seconds"], 2)
        out["per_size"].append(row)
    for job in sorted({r["job"] for r in runs}):
        for w in sorted({r["workers"] for r in runs}):
            a, b = _get(runs, job, 1, w), _get(runs, job, 16, w)
            if a and b:
                out["rss_16x_over_1x"][f"{job} w{w}"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)
    return out


def to_markdown(result: dict) -> str:
    """The runs and the ratios as Markdown tables."""
    m = result["machine"]
    lines = [HEADER, "", f"Machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; GDAL cache "
             f"{result.get('gdal_cachemax_mb')} MB per run; dask threads; glibc malloc arenas "
             f"{result.get('malloc_arenas', 'default')}; tiles, chunks and COG blocks 512 px; "
             f"{result.get('dates')} dates x {len(result.get('bands', []))} bands; whole bench "
             f"{result.get('total_seconds')} s.", "",
             "| job | area | workers | grid | shape | Mpx | seconds (median of runs) | RSS after imports (MB) | "
             "peak RSS (MB, median) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["runs"]:
        if "seconds" not in r:
            lines.append(f"| {r['job']} | {r['factor']}x | {r['workers']} | | | | failed | | |")
            continue
        lines.append(f"| {r['job']} | {r['factor']}x | {r['workers']} | {r['resolution_m']:g} m | "
                     f"{r['shape'][0]}x{r['shape'][1]} | {r['megapixels']} | {r['seconds']} | "
                     f"{r['rss_after_imports_mb']} | {r['peak_rss_mb']} |")
    rt = result.get("ratios") or {}
    if rt.get("per_size"):
        lines += ["", "| area | workers | composite / odc-median (target <= 1) | phyvlm-cr scene / I/O floor "
                  "(target <= 1.5) | phyvlm-cr scene / odc-median (target < 1) |", "|---:|---:|---:|---:|---:|"]
        for row in rt["per_size"]:
            lines.append(f"| {row['factor']}x | {row['workers']} | {row.get('composite_over_odc_median', '')} | "
                         f"{row.get('phyvlm_scene_over_io_floor', '')} | {row.get('phyvlm_scene_over_odc_median', '')} |")
    if rt.get("rss_16x_over_1x"):
        lines += ["", "| job | peak RSS 16x / 1x (target <= 1.2) |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in rt["rss_16x_over_1x"].items()]
    lines += profile_markdown(result)
    lines += verdicts(result)
    if result.get("batch"):
        lines += ["", BATCH_BEGIN, batch_markdown(result).rstrip("\n"), BATCH_END]
    return "\n".join(lines) + "\n"


HEADER = """# Benchmark: cloudfree against odc-stac on the same job, next to the I/O floor, at 1x / 4x / 16x the area

Generated, every number below, by `python -m cloudfree.pipeline.evaluation.bench --out docs` (the first half of
`make bench`; the JSON of the run is `docs/bench.json`, every repeated run under `repeats`). Method in the docstring of
`pipeline/evaluation/bench.py`: the real S2 L2A tile 29RKH (decimated to 100 m, `../shared/data`), 8 dated copies of
the item, 4 bands + SCL, the whole MGRS tile on its native grid at 100 / 50 / 25 m (1x / 4x / 16x the pixels), dask
threads with 1 and 2 workers, every measurement in its own subprocess (wall time of the job after the Python
imports, `ru_maxrss` of the process), GDAL cache 64 MB and glibc's malloc settings (`run.malloc_arenas`,
`run.malloc_mmap_threshold`) the same for every job, odc-stac's included. Jobs: `odc-median` = odc-stac `load` +
`median("time")` + `write_cog` of the 8 items; `io-floor` = read every input of the scene job once and write one COG
of the same size through the same writer; `composite` = `cloudfree composite --method median` of the 8 items;
`scene:<model>` = `cloudfree scene` (target + 2 references, SCL masks, co-registration, scene context, tiles with
the model's halo in column strips, blending, 4 COG layers, STAC item). The profile table comes from one extra run
per job with dask callbacks (`HeldMemory`: results held between tasks at their peak, by task group, and
task-seconds); its seconds are not the timed ones."""


def profile_markdown(result: dict) -> list[str]:
    """The profiled runs: held memory at the peak (by task group) and task-seconds."""
    rows = [p for p in result.get("profiles") or () if p.get("profile")]
    if not rows:
        return []
    lines = ["", "Profile (one extra run each, most workers; `held` = results dask holds between tasks at their peak):",
             "", "| job | area | peak RSS (MB) | held at the peak (MB) | largest held groups (MB) | task-seconds | "
             "largest task groups (s) |", "|---|---:|---:|---:|---|---:|---|"]
    for p in rows:
        pr = p["profile"]
        held = ", ".join(f"{k} {v}" for k, v in list(pr["held_at_peak_mb"].items())[:5])
        secs = ", ".join(f"{k} {v}" for k, v in list(pr["task_seconds_by_group"].items())[:5])
        lines.append(f"| {p['job']} | {p['factor']}x | {p['peak_rss_mb']} | {pr['held_peak_mb']} | {held} | "
                     f"{pr['task_seconds']} | {secs} |")
    return lines


def verdicts(result: dict) -> list[str]:
    """The issue's targets, met or missed, from the ratios of this run."""
    rt = result.get("ratios") or {}
    lines = ["", "Targets (this run):", ""]
    for row in rt.get("per_size", []):
        where = f"{row['factor']}x, {row['workers']} worker(s)"
        for key, label, limit in (("composite_over_odc_median", "composite / odc-median", 1.0),
                                  ("phyvlm_scene_over_odc_median", "phyvlm-cr scene / odc-median", 1.0)):
            if key in row:
                lines.append(f"- {label} at {where}: {row[key]} ({'met' if row[key] <= limit else 'missed'}, "
                             f"target <= {limit:g})")
    for job, v in (rt.get("rss_16x_over_1x") or {}).items():
        if job.startswith(("scene:", "composite")):
            lines.append(f"- peak RSS 16x / 1x of {job}: {v} ({'met' if v <= 1.2 else 'missed'}, target <= 1.2)")
    return lines if len(lines) > 3 else []


BATCH_BEGIN, BATCH_END = "<!-- bench: small-target batches -->", "<!-- /bench: small-target batches -->"


def batch_markdown(result: dict) -> str:
    """The small-target batches (``result["batch"]``) and their ratios as Markdown tables."""
    lines = ["Small-target batches (`python -m cloudfree.pipeline.evaluation.bench --batch-only`, part of `make bench`): "
             "one warm process per row, target + 2 references on the 29RKH grid at 100 m, per-target seconds = median "
             "after one untimed warm-up target; `odc-loop` = odc-stac load of the same 3 items and bands on the same "
             "grid + median + write_cog per target. `in flight` > 1: that many targets at a time "
             "(`run.concurrent_targets` on the threaded scheduler); seconds per target = the batch's wall-clock "
             "total / targets. `load` = the machine's 1-min load average when the row started "
             f"({(result.get('machine') or {}).get('cpus', '?')} CPUs; the ratios hold only between rows of "
             "similar load).", "",
             "| job | in flight | targets | side (px) | output shape | seconds per target | seconds total | "
             "peak RSS (MB) | load |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for b in result["batch"]:
        flight, load = b.get("in_flight", 1), b.get("load_before", "")
        if "seconds_per_target" not in b:
            lines.append(f"| {b['job']} | {flight} | {b['targets']} | {b['side_px']} | | failed | | | {load} |")
            continue
        shapes = ", ".join(f"{h}x{w}" for h, w in b.get("shapes", []))
        lines.append(f"| {b['job']} | {flight} | {b['targets']} | {b['side_px']} | {shapes} | "
                     f"{b['seconds_per_target']} | {b['seconds_total']} | {b['peak_rss_mb']} | {load} |")
    br = result.get("batch_ratios") or {}
    if br.get("fixed_and_per_pixel"):
        lines += ["", "| job | fixed cost per target (s, target <= 1) | per-pixel cost (us/px) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['fixed_s']} | {v['us_per_px']} |" for k, v in br["fixed_and_per_pixel"].items()]
    if br.get("batch_over_odc_loop"):
        lines += ["", "| batch | over the odc-stac loop (target <= 1.5) |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in br["batch_over_odc_loop"].items()]
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    raise SystemExit(main())
