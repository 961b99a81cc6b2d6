"""Speed of the removal models next to the cost of reading their input (``python -m pipeline.evaluation.bench_models``).

For every registered model and :data:`EXTRA_VARIANTS` (or ``--models``): megapixels per second of ``predict`` on one 512x512 tile of 6 bands
(B02, B03, B04, B08, B11, B12; real 29RKH pixels, simulated clouds, two simulated references; see
:func:`benchmark_tile`), best of ``--repeats``. ``fit_scene`` (once per scene, on a coarse
sample) is timed apart.

I/O reference: reading the same amount of data (a 512x512 window of the same 6 bands) from the Cloud-Optimized
GeoTIFFs of ``s2-l2a-tile-29RKH-100m`` with rasterio and converting it to float32 reflectance, best of
``--repeats`` (files opened each time; the OS page cache is warm after the first run, so this is decode cost, not
disk). ``io_target_mpx_per_s`` reads the target only; a model reads the target and its references, so
``io_model_inputs_mpx_per_s`` divides by ``1 + n_references`` (2 in the benchmark tile). The 20 m bands are read
through ``out_shape`` (nearest upsampling by GDAL), as the load stage does.

Per model also: ``tiles_per_s`` (512x512 tiles through ``predict``), ``batched_tiles_per_s`` (``--batch`` tiles in
one ``predict_batch`` call: the path GPU/learned models batch), and memory: each model runs in a fresh spawned process
(``--isolate``, the default) and reports ``peak_rss_mb`` (the process's peak resident memory, ``ru_maxrss``) and
``model_peak_mb`` = peak minus the resident memory after the imports and the benchmark tile were ready (what the
model itself added: weights, activations, intermediates). Learned models run on CPU unless ``--device`` says
otherwise.

Writes ``<out>/bench_models.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cloudfree.pipeline.contract import TileInputs
from cloudfree.pipeline.errors import InputDataError
from cloudfree.pipeline.evaluation.cases import DEFAULT_DATA_DIR, SIM_BANDS, load_29rkh, simulated_case
from cloudfree.pipeline.evaluation.running import with_scene_context

log = logging.getLogger(__name__)

BENCH_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
#: variants timed next to every registered model by default: the per-scene self-supervised residual
#: (models.self_supervised) on top of phyvlm-cr; on top of temporal it is the registered ``temporal-ssl``. Its
#: ``seconds`` is the cost per 512x512 tile (blind base runs per pseudo-cloud, cross-fitted learner, application).
EXTRA_VARIANTS = ("phyvlm-cr[ssl.learner=lightgbm]",)


def default_bench_models() -> list[str]:
    """Every registered model, plus :data:`EXTRA_VARIANTS` of registered models."""
    from cloudfree.models.registry import available_models
    from cloudfree.pipeline.evaluation.running import parse_model_spec

    names = list(available_models())
    return names + [v for v in EXTRA_VARIANTS if parse_model_spec(v)[0] in names]


def benchmark_tile(data_dir: str | Path, size: int = 512, bands: Sequence[str] = BENCH_BANDS,
                   sar: bool = False) -> TileInputs:
    """One ``size x size x len(bands)`` tile of real 29RKH pixels (20 m bands nearest-upsampled from their 200 m
    files onto the 100 m grid) with simulated clouds and two simulated references (seed 99). ``sar``: with
    SIMULATED Sentinel-1 VV/VH in dB (:func:`cloudfree.pipeline.training.datasets.simulate_sar` of the clear
    pixels, as the steps table gives CM-CR), so models that need SAR are timed too: their speed does not depend
    on what the radar saw."""
    full = load_29rkh(data_dir, bands=[b for b in bands if b in SIM_BANDS])
    extra = [b for b in bands if b not in SIM_BANDS]
    if extra:  # 20 m bands are stored at 200 m: nearest-upsample them onto the 100 m grid
        ex = load_29rkh(data_dir, bands=extra)
        ex = np.repeat(np.repeat(ex, 2, axis=1), 2, axis=2)[:, : full.shape[1], : full.shape[2]]
        full = np.concatenate([full, ex])
        order = [b for b in bands if b in SIM_BANDS] + extra
        full = full[[order.index(b) for b in bands]]
    clear = full[:, 200:200 + size, 200:200 + size]
    tile = simulated_case(clear, tuple(bands), seed=99).tile_inputs()
    if sar:
        import dataclasses

        from cloudfree.pipeline.training.datasets import simulate_sar

        db = (simulate_sar(clear, tuple(bands), np.random.default_rng(99)) * 25.0 - 25.0)[None].astype(np.float32)
        tile = dataclasses.replace(tile, sar=db, sar_bands=("vv", "vh"))
    return tile


def benchmark(model_names: Sequence[str], data_dir: str | Path, size: int = 512, repeats: int = 3,
              bands: Sequence[str] = BENCH_BANDS) -> dict[str, float]:
    """Mpx/s of ``predict`` per model on :func:`benchmark_tile` (scene context, if any, fitted beforehand and
    not timed: it is computed once per scene); the best of ``repeats`` runs."""
    from cloudfree.pipeline.evaluation.running import build_spec

    tile = benchmark_tile(data_dir, size, bands)
    speeds = {}
    for name in model_names:
        model = build_spec(name)
        if getattr(model.spec, "needs_sar", False) and tile.sar is None:  # as the evaluation's cases: not timed
            log.warning("speed: %s needs Sentinel-1 and the benchmark tile has none; not timed", name)
            continue
        t = with_scene_context(model, tile)
        model.predict(t)  # warm-up
        best = min(_timed(model, t) for _ in range(repeats))
        speeds[name] = size * size / best / 1e6
    return speeds


def _timed(model: Any, tile: TileInputs) -> float:
    t0 = time.perf_counter()
    model.predict(tile)
    return time.perf_counter() - t0


#: the benchmark tile's window in the 29RKH 100 m grid (rows/cols 200:712, as benchmark_tile).
WINDOW_OFFSET = 200


def read_window(data_dir: str | Path, size: int = 512, bands: Sequence[str] = BENCH_BANDS) -> np.ndarray:
    """``(band, size, size)`` float32 reflectance read from the 29RKH COGs (the I/O-only measurement)."""
    import rasterio
    from rasterio.windows import Window

    d = Path(data_dir)
    if (d / "s2-l2a-tile-29RKH-100m").is_dir():
        d = d / "s2-l2a-tile-29RKH-100m"
    out = np.empty((len(bands), size, size), np.float32)
    for i, b in enumerate(bands):
        path = d / f"{b}.tif"
        if not path.exists():
            raise InputDataError(f"I/O benchmark: {path} not found; pass the folder holding s2-l2a-tile-29RKH-100m")
        with rasterio.open(path) as ds:
            k = max(1, round(1098 / ds.width))  # 1 for the 100 m files, 2 for the 200 m ones
            win = Window(WINDOW_OFFSET // k, WINDOW_OFFSET // k, size // k, size // k)
            out[i] = ds.read(1, window=win, out_shape=(size, size)).astype(np.float32) * np.float32(1e-4)
    return out


def best_of(fn: Any, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _rss_mb(peak: bool) -> float:
    import resource

    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_one(name: str, data_dir: str | Path, size: int, repeats: int, batch: int = 4,
              params: dict | None = None) -> dict[str, Any]:
    """Timing and memory of one model (see the module docstring)."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.running import parse_model_spec

    base, spec_params = parse_model_spec(name)  # "name" or "name[key=value,...]"
    model = build_model(base, {**spec_params, **dict(params or {})})
    needs_sar = bool(getattr(model.spec, "needs_sar", False))
    tile = benchmark_tile(data_dir, size, sar=needs_sar)
    npx = size * size
    base_rss = _rss_mb(False)
    t0 = time.perf_counter()
    ctx_tile = with_scene_context(model, tile)
    fit_s = time.perf_counter() - t0 if model.spec.scene_context else None
    model.predict(ctx_tile)  # warm-up (learned models: lazy weight load happens here)
    secs = best_of(lambda: model.predict(ctx_tile), repeats)
    bsecs = best_of(lambda: model.predict_batch([ctx_tile] * batch), max(1, repeats - 1))
    peak = _rss_mb(True)
    out = {"mpx_per_s": npx / secs / 1e6, "seconds": secs, "tiles_per_s": 1 / secs,
           "batched_tiles_per_s": batch / bsecs, "batch": batch, "fit_scene_seconds": fit_s,
           "peak_rss_mb": round(peak, 1), "model_peak_mb": round(peak - base_rss, 1),
           "sar": "SIMULATED" if needs_sar else None, "device": str(getattr(model.params, "device", "cpu"))
           if hasattr(model, "params") else "cpu"}
    log.info("%-20s %.2f Mpx/s, %.2f tiles/s (%.2f batched), model peak +%.0f MB", name, out["mpx_per_s"],
             out["tiles_per_s"], out["batched_tiles_per_s"], out["model_peak_mb"])
    return out


def _bench_child(args, queue) -> None:
    try:
        queue.put(bench_one(*args))
    except Exception as exc:  # reported in the parent, with the model name
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def bench_models(model_names: Sequence[str] | None = None, data_dir: str | Path = DEFAULT_DATA_DIR,
                 size: int = 512, repeats: int = 3, isolate: bool = True, batch: int = 4,
                 device: str = "cpu") -> dict[str, Any]:
    """Mpx/s, tiles/s and peak memory per model (predict, and fit_scene apart) and of reading the same data."""
    import multiprocessing as mp

    from cloudfree.models.registry import available_models

    names = list(model_names) if model_names else default_bench_models()
    tile = benchmark_tile(data_dir, size)
    from cloudfree.pipeline.evaluation.running import build_spec

    for n in names:  # timed on SIMULATED Sentinel-1 (benchmark_tile(sar=True)): speed, not quality
        if getattr(build_spec(n).spec, "needs_sar", False):
            log.warning("bench: %s needs Sentinel-1; timed with SIMULATED SAR", n)
    npx = size * size
    models: dict[str, Any] = {}
    for name in names:
        from cloudfree.pipeline.evaluation.running import parse_model_spec

        cls = available_models()[parse_model_spec(name)[0]]
        params = {"device": device} if hasattr(cls, "trainable") else {}
        args = (name, str(data_dir), size, repeats, batch, params)
        if isolate:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            proc = ctx.Process(target=_bench_child, args=(args, q))
            proc.start()
            res = q.get()
            proc.join()
        else:
            res = bench_one(*args)
        models[name] = res
    read_window(data_dir, size)  # warm the page cache
    io_s = best_of(lambda: read_window(data_dir, size), repeats)
    n_refs = int(tile.references.shape[0])
    result = {
        "tile": {"size": size, "bands": list(BENCH_BANDS), "references": n_refs, "repeats": repeats,
                 "batch": batch, "isolated_processes": isolate, "learned_device": device},
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "cpus": _cpus()},
        "models": models,
        "io_target_mpx_per_s": npx / io_s / 1e6,
        "io_model_inputs_mpx_per_s": npx / io_s / 1e6 / (1 + n_refs),
        "io_seconds_per_image": io_s,
    }
    log.info("I/O (target only) %.2f Mpx/s; target + %d references %.2f Mpx/s", result["io_target_mpx_per_s"],
             n_refs, result["io_model_inputs_mpx_per_s"])
    return result


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Mpx/s per removal model next to COG reading; writes bench_models.json")
    ap.add_argument("--out", default="bench", help="output folder")
    ap.add_argument("--models", default="", help="comma list (default: every registered model and EXTRA_VARIANTS)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="tiles per predict_batch call")
    ap.add_argument("--device", default="cpu", help="device of the learned models (cpu, cuda, auto)")
    ap.add_argument("--no-isolate", action="store_true", help="run all models in this process (no memory figures "
                    "per model)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = bench_models([m for m in args.models.split(",") if m] or None, args.data_dir, args.size, args.repeats,
                       not args.no_isolate, args.batch, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_models.json").write_text(json.dumps(res, indent=1))
    log.info("wrote %s", out / "bench_models.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
