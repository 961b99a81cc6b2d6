"""Issue 10: every input chunk is read once (halo from neighbouring chunks), the tiled model output keeps its
halo semantics, the output grid nests in the target's native MGRS grid, and the streaming COG writer.

Real pixels: the Sentinel-2 L2A tile 29RKH at 100 m from ../shared/data (skipped without it).
"""

from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-tile-29RKH-100m"
pytestmark = pytest.mark.skipif(not (DATA / "B02.tif").exists(), reason="needs ../shared/data/s2-l2a-tile-29RKH-100m")
BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def items():
    from cloudfree.pipeline.evaluation.bench import local_29rkh_item

    t = local_29rkh_item(DATA)
    return t, local_29rkh_item(DATA, item_id=t.id + "_REF", shift_days=-10)


def _scene(items, geobox, chunk):
    from cloudfree.pipeline.config import MaskConfig
    from cloudfree.stages.load import load_reflectance
    from cloudfree.stages.masks import build_masks
    from cloudfree.stages.remove import SceneInputs

    t, r = items
    stack = load_reflectance([t, r], BANDS, geobox, chunk)
    mask, prob = build_masks([t, r], geobox, MaskConfig(methods=["scl"]), chunk)
    # an artificial cloud band across the target so that the model has something to fill (simulated mask)
    cloud = mask[0].copy(data=mask[0].data | (np.arange(geobox.shape[0])[:, None] % 97 < 30))
    return SceneInputs(stack[0], cloud, prob[0], stack[1:], mask[1:] | stack[1:].isnull().any("band"),
                       (r.id,), (-10.0,), t.id)


def test_native_grid_snapping(items):
    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.load import load_reflectance, native_geobox, output_geobox

    t, _ = items
    native = native_geobox(t)
    assert native.shape == (1098, 1098) and native.transform.c == 199980.0 and native.transform.f == 2800020.0
    for res, n in ((100, 1098), (50, 2196), (25, 4392), (60, 1830)):
        gb = output_geobox(t, GridConfig(resolution=res))
        assert gb.shape == (n, n) and (gb.transform.c, gb.transform.f) == (199980.0, 2800020.0), res
    assert output_geobox(t, GridConfig(resolution=100)) == native
    b = t.bbox
    aoi = [b[0] + 0.2, b[1] + 0.2, b[0] + 0.5, b[1] + 0.4]
    for res in (100, 50, 20):
        gb = output_geobox(t, GridConfig(resolution=res), aoi)
        assert gb.resolution.x == res and 0 < gb.shape[0] < 109800 / res
        # pixel edges on the tile's own grid: the window nests in the MGRS tiling
        assert (gb.transform.c - 199980.0) % res == 0 and (2800020.0 - gb.transform.f) % res == 0
    # at the native resolution the pixels are the file's, not resampled
    win = output_geobox(t, GridConfig(resolution=100), aoi)
    got = load_reflectance([t], ["B02"], win, 256).isel(time=0, band=0).values
    with rasterio.open(DATA / "B02.tif") as src:
        col, row = ~src.transform * (win.transform.c, win.transform.f)
        dn = src.read(1, window=rasterio.windows.Window(round(col), round(row), win.shape[1], win.shape[0]))
    from cloudfree.stages.load import item_harmonisation

    scale, offset = item_harmonisation(t, "B02")
    want = np.where(dn == 0, np.nan, dn.astype(np.float32) * np.float32(scale) + np.float32(offset))
    np.testing.assert_array_equal(got, want)  # no resampling: the file's DN, harmonised


class _Executed(dask.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.keys = []

    def _pretask(self, key, dsk, state):
        self.keys.append(key)


@pytest.mark.parametrize("res,k", [(50.0, 4), (25.0, 8), (100.0, 2), (33.3, 1)])
def test_class_layer_read_on_its_native_grid_equals_a_nearest_read(items, res, k, monkeypatch):
    """SCL (200 m in this decimated tile) is read on its own grid and repeated k x k when the output grid nests in
    it: the same values as odc-stac's nearest read on the output grid, with 1/k^2 of the reads. A grid that does
    not nest (33.3 m) reads as before."""
    import cloudfree.stages.load as load
    from cloudfree.pipeline.config import GridConfig

    gb = load.output_geobox(items[0], GridConfig(resolution=res, bands=BANDS))
    assert load.native_zoom(items, "SCL", gb, 512) == k
    fast = load.load_layer(list(items), "SCL", gb, 512)
    assert fast.shape == (2, *gb.shape) and fast.data.chunks[1][0] == 512
    monkeypatch.setattr(load, "native_zoom", lambda *a, **kw: 1)
    plain = load.load_layer(list(items), "SCL", gb, 512)
    np.testing.assert_array_equal(fast.values, plain.values)
    assert np.array_equal(fast.y.values, plain.y.values) and np.array_equal(fast.x.values, plain.x.values)
    assert np.isin(np.unique(fast.values[np.isfinite(fast.values)]), np.arange(12)).all()


def test_no_native_zoom_when_grids_do_not_nest(items):
    """An output origin off the layer's pixel edges, or a chunk the factor does not divide, reads as before."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from cloudfree.stages.load import native_zoom

    t = items[0].assets["SCL"].extra_fields["proj:transform"]
    gb = GeoBox((100, 100), Affine(50.0, 0, t[2] + 50.0, 0, -50.0, t[5]), items[0].properties.get("proj:code") or
                f"EPSG:{items[0].properties['proj:epsg']}")
    assert native_zoom(items, "SCL", gb, 512) == 1  # 50 m off the 200 m edges
    gb2 = GeoBox((100, 100), Affine(50.0, 0, t[2], 0, -50.0, t[5]), gb.crs)
    assert native_zoom(items, "SCL", gb2, 512) == 4 and native_zoom(items, "SCL", gb2, 510) == 1


def test_each_input_chunk_is_read_once_and_halo_semantics_are_unchanged(items):
    """The halo comes from neighbouring chunks: the odc-stac read tasks run once per chunk and item (the old
    per-window slicing ran them ~3.5x), and the blended output equals tile-by-tile prediction on numpy windows of
    the same inputs (the pre-issue-10 semantics) exactly."""
    from cloudfree.models.registry import build_model
    from cloudfree.stages.load import output_geobox
    from cloudfree.stages.mosaic import blend_block, grid_axis_weights, neighbours
    from cloudfree.stages.remove import predict_tile, remove_clouds
    from cloudfree.stages.tile import plan_tiles
    from cloudfree.pipeline.config import GridConfig

    gb = output_geobox(items[0], GridConfig(resolution=100))[200:520, 300:700]
    chunk, halo = 128, 20
    inputs = _scene(items, gb, chunk)
    model = build_model("phyvlm-cr", {})
    tiles = plan_tiles(gb.shape, chunk, halo)
    ds = remove_clouds(inputs, model, tiles, halo, {}, blend="feather")
    from cloudfree.stages.cog import compute_once

    cb = _Executed()
    with dask.config.set(scheduler="threads"), cb:
        (got,) = compute_once(ds.reflectance.data)
    reads = [k for k in cb.keys if isinstance(k, tuple) and str(k[0]).split("-")[0] in BANDS]
    n_chunks = int(np.ceil(gb.shape[0] / chunk) * np.ceil(gb.shape[1] / chunk))
    assert len(reads) == len(BANDS) * 2 * n_chunks, (len(reads), n_chunks)  # 2 items, once per chunk
    assert len(set(reads)) == len(reads)

    # reference: the old semantics, on plain numpy windows of the same (computed) inputs
    t, m, p, r, rm = dask.compute(inputs.target.data, inputs.cloud_mask.data, inputs.cloud_prob.data,
                                  inputs.references.data, inputs.reference_masks.data)
    preds = {}
    for tl in tiles:
        ry, rx = tl.read
        preds[tl.index] = predict_tile(model, t[:, ry, rx], m[ry, rx], p[ry, rx], r[:, :, ry, rx], rm[:, ry, rx],
                                       bands=tuple(BANDS), halo=halo, reference_ids=inputs.reference_ids,
                                       reference_dt_days=inputs.reference_dt_days, target_id=inputs.target_id,
                                       context={})[0]
    wy, wx = grid_axis_weights(tiles, halo, "feather")
    want = np.full_like(got, np.nan)
    for tl in tiles:
        parts = [(n, preds[n.index], np.outer(wy[n.index[0]], wx[n.index[1]])) for n in neighbours(tl, tiles)]
        (cy, cx) = tl.core
        want[:, cy, cx] = blend_block(tl, parts, len(BANDS), "feather")[: len(BANDS)]
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).mean() > 0.5


def test_streaming_cog_writer_layout_metadata_and_determinism(tmp_path):
    """Valid COG (rio-cogeo), overviews, 512 px tiles, DEFLATE + predictor 2, nodata, scale/offset, band names;
    pixels exact; identical bytes from the threaded and the synchronous scheduler. The graph size reaches an
    observer the caller passes in (observe_graphs), for the graphs run inside its block only."""
    import dask.array as dsa
    from rio_cogeo.cogeo import cog_info, cog_validate

    from cloudfree.stages.cog import compute_once, cog_write, layer_array, observe_graphs
    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.load import output_geobox
    from cloudfree.pipeline.evaluation.bench import local_29rkh_item

    gb = output_geobox(local_29rkh_item(DATA), GridConfig(resolution=100))
    with rasterio.open(DATA / "B02.tif") as a, rasterio.open(DATA / "B04.tif") as b:
        dn = np.stack([a.read(1), b.read(1)])
    outs, seen = [], []
    for sched in ("threads", "sync"):
        dst = tmp_path / f"{sched}.tif"
        lay = layer_array(dsa.from_array(dn, chunks=(2, 512, 512)), gb, ["B02", "B04"], 0)
        with dask.config.set(scheduler=sched), observe_graphs(lambda tasks, gated: seen.append(tasks)):
            compute_once(cog_write(lay, dst, overview_resampling="average", scales=[1e-4, 1e-4], offsets=[0.0, 0.0]))
        outs.append(dst)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    compute_once(dsa.ones(4, chunks=2).sum())  # outside any observe_graphs block: not recorded
    assert len(seen) == 2 and seen[0] == seen[1] > 0
    ok, errors, _ = cog_validate(outs[0], quiet=True)
    assert ok, errors
    assert len(cog_info(outs[0]).IFD) > 1
    with rasterio.open(outs[0]) as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0 and ds.block_shapes[0] == (512, 512)
        assert ds.compression.name.lower() == "deflate" and ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        assert ds.scales == (1e-4, 1e-4) and ds.offsets == (0.0, 0.0) and ds.descriptions == ("B02", "B04")
        assert ds.transform == gb.transform and ds.overviews(1)
        full = ds.read()
    np.testing.assert_array_equal(full, dn)  # exactly the grid: not padded to whole overview blocks
    assert not list(tmp_path.glob(".*parts*")), "part files left behind"


@pytest.mark.parametrize("shape", [(104, 104), (512, 300), (5, 17)])
def test_one_tile_cog_written_directly_has_the_streaming_writers_bytes(tmp_path, shape):
    """A small image (one 512 px tile, no overviews) written from memory by write_cog_array is byte for byte what
    the streaming writer (cog_write) writes for the same pixels: multi-band uint16 with scales, and one-band uint8
    with and without nodata (real 29RKH pixels); an image with overviews is refused and goes through cog_write."""
    import dask.array as dsa

    from cloudfree.pipeline.config import GridConfig
    from cloudfree.pipeline.evaluation.bench import local_29rkh_item
    from cloudfree.stages.cog import compute_once, cog_write, layer_array, one_tile, write_cog_array
    from cloudfree.stages.load import output_geobox

    full = output_geobox(local_29rkh_item(DATA), GridConfig(resolution=100))
    gb = full[7:7 + shape[0], 11:11 + shape[1]]
    with rasterio.open(DATA / "B02.tif") as a, rasterio.open(DATA / "B04.tif") as b:
        win = rasterio.windows.Window(11, 7, shape[1], shape[0])
        dn = np.stack([a.read(1, window=win), b.read(1, window=win)])
    cases = [(dn, ["B02", "B04"], 0, [1e-4, 1e-4], "average"),
             ((dn[:1] % 101).astype(np.uint8), ["confidence"], 255, None, "nearest"),
             ((dn[1:] % 7).astype(np.uint8), ["source"], None, None, "nearest")]
    assert one_tile(gb.shape, 512)
    for i, (arr, names, nodata, scales, resampling) in enumerate(cases):
        streamed, direct = tmp_path / f"s{i}.tif", tmp_path / f"d{i}.tif"
        compute_once(cog_write(layer_array(dsa.from_array(arr), gb, names, nodata), streamed,
                               overview_resampling=resampling, scales=scales,
                               offsets=[0.0] * len(scales) if scales else None))
        write_cog_array(arr, gb, direct, names, nodata, scales=scales, offsets=[0.0] * len(scales) if scales else None)
        assert direct.read_bytes() == streamed.read_bytes(), (shape, names)
        with rasterio.open(direct) as ds:
            np.testing.assert_array_equal(ds.read(), arr)
    assert not one_tile((513, 100), 512) and not one_tile((100, 4), 512)
    with pytest.raises(ValueError, match="one 512 px tile"):
        write_cog_array(np.zeros((1, 600, 600), np.uint8), full[:600, :600], tmp_path / "big.tif", ["x"], None)


@pytest.mark.parametrize("slack", [1, 2, 5])
def test_bounded_lookahead_gates_reads_and_never_deadlocks(slack):
    """cloudfree.stages.cog.bound_lookahead on a 2-D halo graph (every output block needs the reads of its 8 neighbours, as
    a halo model does): every read starts only after every marker up to ``slack`` blocks before the first block
    that needs it has finished, and the graph still completes (threads, 4 workers) with the right values."""
    import threading

    from dask._task_spec import DataNode, Task, TaskRef
    from dask.threaded import get

    from cloudfree.stages.cog import bound_lookahead

    ny, nx = 5, 6
    log, lock = [], threading.Lock()

    def read(cfg, i):
        with lock:
            log.append(("r", i))
        return i

    def block(i, *vals):
        with lock:
            log.append(("m", i))
        return sum(vals)

    dsk = {"cfg": DataNode("cfg", None)}
    for i in range(ny * nx):
        dsk[("r", i)] = Task(("r", i), read, TaskRef("cfg"), i)
    markers = []
    for y in range(ny):
        for x in range(nx):
            i = y * nx + x
            near = [(yy * nx + xx) for yy in range(max(0, y - 1), min(ny, y + 2)) for xx in range(max(0, x - 1), min(nx, x + 2))]
            dsk[("m", i)] = Task(("m", i), block, i, *(TaskRef(("r", j)) for j in near))
            markers.append([("m", i)])
    dsk["out"] = Task("out", lambda *v: list(v), *(TaskRef(m) for (m,) in markers))
    def first_block(i):  # the first block (raster order) whose halo needs read i
        return max(0, i // nx - 1) * nx + max(0, i % nx - 1)

    gated = bound_lookahead(dsk, markers, slack)
    assert gated == sum(1 for i in range(ny * nx) if first_block(i) >= slack)
    out = get(dsk, "out", num_workers=4)
    want = [sum(yy * nx + xx for yy in range(max(0, y - 1), min(ny, y + 2)) for xx in range(max(0, x - 1), min(nx, x + 2)))
            for y in range(ny) for x in range(nx)]
    assert out == want
    done = set()
    for kind, i in log:
        if kind == "m":
            done.add(i)
            continue
        lo = first_block(i)
        if lo >= slack:  # every block up to lo - slack, not that block alone (a late block holds reads back)
            assert set(range(lo - slack + 1)) <= done, (i, lo, sorted(done))


def test_bench_reports_the_median_of_repeated_runs_and_the_issue_ratios():
    from cloudfree.pipeline.evaluation.bench import median_run, ratios, to_markdown

    reps = [{"job": "composite", "factor": 1, "workers": 2, "seconds": s, "peak_rss_mb": m, "resolution_m": 100.0,
             "shape": [10, 10], "megapixels": 0.0, "rss_after_imports_mb": 1.0} for s, m in [(3.0, 50), (1.0, 70), (2.0, 60)]]
    row = median_run(reps)
    assert (row["seconds"], row["peak_rss_mb"]) == (2.0, 60) and len(row["repeats"]) == 3
    runs = [row, {**reps[0], "job": "odc-median", "seconds": 4.0, "peak_rss_mb": 100.0},
            {**reps[0], "factor": 16, "seconds": 8.0, "peak_rss_mb": 66.0}]
    r = ratios(runs)
    assert r["per_size"][0]["composite_over_odc_median"] == 0.5
    assert r["rss_16x_over_1x"]["composite w2"] == 1.1
    md = to_markdown({"machine": {"cpus": 2, "python": "3", "platform": "x"}, "runs": runs, "ratios": r})
    assert "| composite | 1x | 2 |" in md and "0.5" in md


def test_bench_batch_splits_fixed_and_per_pixel_cost_and_compares_with_the_odc_loop(tmp_path):
    """The small-target batch rows give the fixed cost and the per-pixel cost (time = a + b * px, from two sides),
    the batch over the odc-stac loop of the same size, and ``--batch-only`` replaces only its own section of an
    existing bench.md. The windows are ``side`` px of the item's 100 m grid (real 29RKH item)."""
    import json

    from cloudfree.pipeline.evaluation.bench import (BATCH_BEGIN, BATCH_END, batch_markdown, batch_ratios,
                                                     batch_windows, local_29rkh_item)
    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.load import output_geobox

    rows = [{"job": "batch:m", "targets": 50, "side_px": 100, "seconds_per_target": 0.5, "seconds_total": 25.0, "peak_rss_mb": 1.0},
            {"job": "batch:m", "targets": 4, "side_px": 400, "seconds_per_target": 2.0, "seconds_total": 8.0, "peak_rss_mb": 1.0},
            {"job": "odc-loop", "targets": 50, "side_px": 100, "seconds_per_target": 0.2, "seconds_total": 10.0, "peak_rss_mb": 1.0},
            {"job": "batch:m", "targets": 50, "side_px": 100, "seconds_per_target": 0.3, "seconds_total": 15.0,
             "peak_rss_mb": 2.0, "in_flight": 2}]
    r = batch_ratios(rows)
    b = 1.5 / (400 ** 2 - 100 ** 2)
    # the fixed and per-pixel cost come from the one-at-a-time rows only; the in-flight row has its own ratio
    assert r["fixed_and_per_pixel"]["batch:m"] == {"fixed_s": round(0.5 - b * 1e4, 3), "us_per_px": round(b * 1e6, 3)}
    assert r["batch_over_odc_loop"] == {"batch:m 50x100px": 2.5, "batch:m 50x100px, 2 in flight": 1.5}
    md = batch_markdown({"batch": rows, "batch_ratios": r})
    assert "| batch:m 50x100px | 2.5 |" in md and "| batch:m 50x100px, 2 in flight | 1.5 |" in md
    assert "| batch:m | 2 | 50 | 100 |" in md and "| batch:m | 1 | 50 | 100 |" in md
    rows[0]["load_before"] = 3.25  # the machine's load when the row started is stated with it
    md = batch_markdown({"batch": rows, "batch_ratios": r, "machine": {"cpus": 2}})
    assert "| 3.25 |" in md and "2 CPUs" in md
    item = local_29rkh_item(DATA)
    aois = batch_windows(item, 100, 3)
    shapes = {tuple(output_geobox(item, GridConfig(resolution=100.0), a).shape) for a in aois}
    assert all(100 <= h <= 110 and 100 <= w <= 110 for h, w in shapes), shapes
    assert len(set(aois)) == 3
    assert BATCH_BEGIN != BATCH_END and json.dumps(r)


def test_bench_no_batch_keeps_the_batch_section_of_an_existing_bench_md(tmp_path):
    """``--no-batch`` regenerates the area half of bench.md and keeps the section ``--batch-only`` wrote (a failing
    job still gives a 'failed' row: the real subprocess path, one run)."""
    from cloudfree.pipeline.evaluation.bench import BATCH_BEGIN, BATCH_END, main

    section = f"{BATCH_BEGIN}\n| batch:x | 1 | 50 | 100 | 104x104 | 0.3 | 15.0 | 1.0 | 2.0 |\n{BATCH_END}"
    (tmp_path / "bench.md").write_text(f"# old\n\nold area table\n\n{section}\n")
    assert main(["--out", str(tmp_path), "--data", str(DATA), "--no-batch", "--jobs", "no-such-job", "--factors", "1",
                 "--workers", "1", "--repeat", "1", "--profile-jobs", ""]) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "old area table" not in md and "| no-such-job | 1x | 1 | | | | failed | | |" in md
    assert md.count(BATCH_BEGIN) == 1 and section in md and md.endswith(f"{BATCH_END}\n")
