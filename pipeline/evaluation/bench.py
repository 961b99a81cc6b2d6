"""Benchmark: throughput and peak memory of load + mask + tile (+ model + write) as the area grows.

``python -m pipeline.evaluation.bench --out bench`` writes ``bench/bench.json`` (and prints nothing else than a log).

Data: the real Sentinel-2 L2A tile 29RKH (2020-02-19) decimated to 100 m in ``../shared/data``; a local STAC item
is built whose assets point at the local COGs (:func:`local_29rkh_item`). The reference for the
reference-replace model is the same acquisition under another id/date (a second real clear date of the tile is
not in the shared data): the model's work per pixel is the same, only its output is trivial.

Area scaling: 1x, 4x and 16x the pixels of the tile, obtained by loading the whole tile onto finer grids
(100 m, 50 m, 25 m: 1.2, 4.8 and 19.3 Mpx). Reads upsample the real COGs (bilinear; nearest for SCL), so the
pixel count, the chunk count, the tile count and the bytes moved through the pipeline grow 1:4:16 while
every read stays real. Each size runs in a fresh subprocess and reports ``ru_maxrss`` of that process alone.
GDAL's block cache is capped per run (``--gdal-cachemax``, 64 MB): with GDAL's default (5 % of RAM) the write
stage's GeoTIFF/COG passes fill the cache in proportion to the image, and peak RSS grew 480 -> 780 MB from 1x to
4x for that reason alone (measured on this machine); capped, it stays flat.

Three measurements per size:

* ``load-mask``: load 6 bands + the SCL mask and reduce them chunk by chunk (no write);
* ``remove``: the runner's chain up to the write (load, SCL mask, co-registration estimate and application,
  tile plan, scene context, reference-replace per tile), reduced chunk by chunk (no write);
* ``full``: the runner's ``process_target`` (load, SCL mask, co-registration estimate, tile plan,
  reference-replace per tile, COG write + STAC item), quicklook off.
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
BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
FILES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12", "SCL")
#: area factor -> grid resolution (m) of the whole tile.
FACTORS = {1: 100.0, 4: 50.0, 16: 25.0}


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


def _config(res: float, out: Path):
    from pipeline.config import parse_config

    return parse_config({
        "grid": {"resolution": res, "bands": BANDS, "chunk": 512},
        "mask": {"methods": ["scl"]},
        "tile": {"size": 512},
        "model": {"name": "reference-replace"},
        "output": {"dir": str(out), "quicklook": False, "overwrite": True},
        "run": {"scheduler": "threads", "workers": 2, "progress": False},
    }, source="bench")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_one(factor: int, stage: str, folder: Path) -> dict:
    """One measurement in this process (call it in a fresh subprocess)."""
    import dask

    from models.registry import build_model
    from pipeline.runner import dask_context, process_target
    from stages.load import load_reflectance, output_geobox
    from stages.masks import build_masks
    from stages.search import Candidate, TargetPlan
    from stages.tile import plan_tiles

    res = FACTORS[factor]
    target = local_29rkh_item(folder)
    ref = local_29rkh_item(folder, item_id=target.id + "_BENCHREF", shift_days=-10)
    with tempfile.TemporaryDirectory(prefix="cloudfree-bench-") as tmp:
        cfg = _config(res, Path(tmp))
        geobox = output_geobox(target, cfg.grid)
        base = _peak_rss_mb()
        t0 = time.perf_counter()
        with dask_context(cfg):
            if stage == "load-mask":
                stack = load_reflectance([target], BANDS, geobox, cfg.grid.chunk)
                mask, prob = build_masks([target], geobox, cfg.mask, cfg.grid.chunk)
                tiles = plan_tiles(geobox.shape, cfg.tile.size, 0)
                dask.compute(stack.sum(), mask.sum(), prob.sum())
                n_tiles = len(tiles)
            elif stage == "remove":
                plan = TargetPlan(target, (Candidate(ref, -10.0, 1.0, 1.0, True, True, 1.0, "bench"),), ())
                model = build_model(cfg.model.name, cfg.model.params)
                ds = _removed(plan, model, cfg, geobox)
                dask.compute(ds.reflectance.sum(), ds.source.sum(), ds.confidence.sum())
                n_tiles = len(plan_tiles(geobox.shape, cfg.tile.size, model.spec.halo))
            else:
                plan = TargetPlan(target, (Candidate(ref, -10.0, 1.0, 1.0, True, True, 1.0, "bench"),), ())
                model = build_model(cfg.model.name, cfg.model.params)
                r = process_target(plan, model, cfg, "bench")
                if r.status != "done":
                    raise RuntimeError(f"bench run failed: {r.error}")
                n_tiles = len(plan_tiles(geobox.shape, cfg.tile.size, model.spec.halo))
        secs = time.perf_counter() - t0
    npx = geobox.shape[0] * geobox.shape[1]
    return {"factor": factor, "stage": stage, "resolution_m": res, "shape": list(geobox.shape),
            "megapixels": round(npx / 1e6, 3), "tiles": n_tiles, "seconds": round(secs, 2),
            "mpx_per_s": round(npx / 1e6 / secs, 3), "rss_after_imports_mb": round(base, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _removed(plan, model, cfg, geobox):
    """The runner's chain up to (not including) the write: load, masks, co-registration, tiles, model."""
    from pipeline.runner import scene_context
    from stages.coregister import estimate_reference_shifts, load_aligned_references
    from stages.load import load_reflectance_checked
    from stages.masks import build_masks
    from stages.remove import SceneInputs, remove_clouds
    from stages.tile import plan_tiles

    items = [plan.target, *(c.item for c in plan.references)]
    stack, failed, _ = load_reflectance_checked(items, BANDS, geobox, cfg.grid.chunk)
    mask, prob = build_masks(items, geobox, cfg.mask, cfg.grid.chunk)
    ref_masks = mask[1:] | stack[1:].isnull().any("band") | failed[1:]
    ids = [c.item.id for c in plan.references]
    shifts = estimate_reference_shifts(stack[0], mask[0], stack[1:], ref_masks, ids, cfg.coregister)
    refs = stack[1:]
    if any(c.applied for c in shifts):
        refs, ref_masks = load_aligned_references([c.item for c in plan.references], shifts, geobox, BANDS, cfg.mask,
                                                  cfg.grid.chunk, stack[0])
    halo = model.spec.halo
    context = scene_context(model, items, BANDS, geobox, cfg, plan) if model.spec.scene_context else {}
    inputs = SceneInputs(stack[0], mask[0], prob[0], refs, ref_masks, tuple(ids),
                         tuple(c.dt_days for c in plan.references), plan.target.id)
    return remove_clouds(inputs, model, plan_tiles(geobox.shape, cfg.tile.size, halo), halo, context)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="cloudfree benchmark (see the module docstring)")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--stages", default="load-mask,remove,full")
    ap.add_argument("--gdal-cachemax", type=int, default=64,
                    help="GDAL block cache (MB) of each run; GDAL's default, 5%% of RAM, grows with the area")
    ap.add_argument("--one", nargs=2, metavar=("FACTOR", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.one:
        sys.stdout.write(json.dumps(run_one(int(args.one[0]), args.one[1], args.data)) + "\n")
        return 0
    if not (args.data / "B02.tif").exists():
        log.error("benchmark data %s not found; pass --data to the s2-l2a-tile-29RKH-100m folder", args.data)
        return 2
    runs = []
    for stage in args.stages.split(","):
        for f in (int(x) for x in args.factors.split(",")):
            env = {**os.environ, "GDAL_CACHEMAX": str(args.gdal_cachemax)}
            proc = subprocess.run([sys.executable, "-m", "pipeline.evaluation.bench", "--data", str(args.data), "--one", str(f),
                                   stage], capture_output=True, text=True, check=False, env=env)
            if proc.returncode:
                log.error("bench %s x%d failed:\n%s", stage, f, proc.stderr[-3000:])
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            logging.getLogger(__name__).warning("%s", runs[-1])
    result = {"machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
              "data": str(args.data), "gdal_cachemax_mb": args.gdal_cachemax, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench.md").write_text(to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    """The runs as a Markdown table."""
    m = result["machine"]
    lines = [f"Machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; GDAL cache "
             f"{result.get('gdal_cachemax_mb')} MB per run; dask threads, 2 workers; tiles and chunks 512 px.", "",
             "| stage | area | grid | shape | Mpx | tiles | seconds | Mpx/s | RSS after imports (MB) | peak RSS (MB) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['stage']} | {r['factor']}x | {r['resolution_m']:g} m | {r['shape'][0]}x{r['shape'][1]} | "
                     f"{r['megapixels']} | {r['tiles']} | {r['seconds']} | {r['mpx_per_s']} | "
                     f"{r['rss_after_imports_mb']} | {r['peak_rss_mb']} |")
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    raise SystemExit(main())
