"""Small targets (issue 22's batch of 104 px targets): the shortcuts they take give the general path's bytes.

Real data: the decimated 29RKH L2A tile in ../shared/data (the bench's local items: the target and two dated
copies as references), the bench's own target windows.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-tile-29RKH-100m"

pytestmark = pytest.mark.skipif(not (DATA / "B02.tif").exists(), reason="../shared/data 29RKH tile not available")

#: item properties that hold the time of the run (not the data): left out of the comparison.
VOLATILE = {"created", "updated", "processing:datetime", "cloudfree:tile_seconds"}


def _stable(d):
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_stable(x) for x in d]
    return d


def _batch(out: Path, n: int, model_name: str = "reference-replace", blocksize: int = 512) -> list[Path]:
    """``n`` targets of the bench's small-target batch through ``process_target`` into ``out``; their folders."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.bench import _config, batch_windows, dated_items, scene_plan
    from cloudfree.pipeline.runner import dask_context, process_target

    items = dated_items(DATA, 3)
    plan = scene_plan(items, "test")
    cfg0 = _config(100.0, out, model_name, 2).replace(output={"quicklook": True, "blocksize": blocksize})
    model = build_model(model_name, {})
    folders = []
    with dask_context(cfg0):
        for i, aoi in enumerate(batch_windows(items[0], 100, n)):
            cfg = cfg0.replace(search={"aoi": list(aoi)}, output={"dir": str(out / f"t{i}")})
            res = process_target(plan, model, cfg, "test-run")
            assert res.status == "done", res.error
            folders.append(out / f"t{i}")
    return folders


def _same_outputs(a: Path, b: Path) -> int:
    n = 0
    for f in sorted(p for p in a.rglob("*") if p.is_file() and ".staging" not in p.parts and "lock" not in p.name):
        g = b / f.relative_to(a)
        assert g.exists(), g
        if f.suffix == ".json":
            assert _stable(json.loads(f.read_text())) == _stable(json.loads(g.read_text())), f
        else:
            assert filecmp.cmp(f, g, shallow=False), f"{f.relative_to(a)} differs"
        n += 1
    return n


@pytest.mark.parametrize("model_name,blocksize", [("reference-replace", 512), ("phyvlm-cr", 512),
                                                  ("reference-replace", 64)])
def test_small_target_shortcuts_give_the_general_paths_bytes(tmp_path, monkeypatch, model_name, blocksize):
    """Three targets of the bench's batch: as they run now (inputs read eagerly by odc-stac's direct loader and
    kept as numpy, the steps after them eager; GeoTIFF tags cached across targets) against the general path (dask
    loads persisted as dask blocks, so every step builds its graph; the tags computed by GDAL for each grid): every COG, VRT and quicklook byte for
    byte the same, the STAC items the same apart from the run's timestamps. With 64 px COG tiles the in-memory
    layers go through the streaming writer (more than one tile, overviews)."""
    import dask

    import cloudfree.stages.cog as cog
    import cloudfree.pipeline.runner as runner
    import cloudfree.stages.load as load
    import cloudfree.stages.output_check as output_check
    import cloudfree.stages.plausibility as plausibility
    import cloudfree.stages.publish as publish

    fast = _batch(tmp_path / "fast", 3, model_name, blocksize)
    orig = cog._geotiff_tags_once

    def uncached(*a, **kw):
        cog._GEOTAGS.clear()
        return orig(*a, **kw)

    monkeypatch.setattr(runner, "reads_once", lambda ctx: False)  # the loads build their dask graphs
    monkeypatch.setattr(load, "read_small_once", lambda geobox, window, *arrays: dask.persist(*arrays))
    monkeypatch.setattr(cog, "_geotiff_tags_once", uncached)
    # and every target checks its items, validates every COG, reads its cover statistics back from the files and
    # takes odc-geo's footprint
    monkeypatch.setattr(plausibility, "_memo_key", lambda *a: None)
    monkeypatch.setattr(cog, "_validate_layouts", lambda files, layouts: cog._validate(files))
    stats = output_check.cover_stats
    monkeypatch.setattr(output_check, "cover_stats", lambda *a, arrays=None, **kw: stats(*a, **kw))
    monkeypatch.setattr(publish, "geographic_extent", lambda geobox: geobox.geographic_extent)
    general = _batch(tmp_path / "general", 3, model_name, blocksize)
    assert sum(_same_outputs(f, g) for f, g in zip(fast, general)) >= 3 * 12


def test_footprint_is_odc_geos_for_every_crs_and_shape():
    """The output item's footprint (``publish.geographic_extent``, without odc-geo's point-by-point ``dropna``
    rebuild when every point is finite) is exactly ``GeoBox.geographic_extent``: the same points, the same bbox."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from cloudfree.stages.publish import geographic_extent

    for crs, res, (x0, y0) in (("EPSG:32629", 100.0, (199980.0, 2800020.0)), ("EPSG:32633", 10.0, (500000.5, 5.3e6)),
                               ("EPSG:3857", 30.0, (1e6, 6e6)), ("EPSG:32601", 60.0, (166000.0, 7e6)),
                               ("EPSG:4326", 0.001, (10.0, 50.0))):
        for shape in ((104, 104), (400, 300), (1, 1)):
            gb = GeoBox(shape, Affine(res, 0, x0, 0, -res, y0), crs)
            want, got = gb.geographic_extent, geographic_extent(gb)
            assert got.geom.__geo_interface__ == want.geom.__geo_interface__, (crs, shape)
            assert list(got.boundingbox) == list(want.boundingbox)


def test_cover_stats_from_the_written_arrays_are_the_files(tmp_path):
    """A small target's cover statistics come from its encoded layers in memory: the same numbers as read back
    from its COGs (the writer keeps the arrays it wrote)."""
    from cloudfree.stages.output_check import cover_stats

    (folder,) = _batch(tmp_path, 1)
    files = {k: next(folder.glob(f"*/*_{k}.tif")) for k in ("confidence", "mask_provenance", "source")}
    import rasterio

    arrays = {}
    for k, f in files.items():
        with rasterio.open(f) as ds:
            arrays[k] = ds.read()
    want = cover_stats(files["confidence"], files["mask_provenance"], 0.3, source_path=files["source"])
    got = cover_stats(files["confidence"], files["mask_provenance"], 0.3, source_path=files["source"], arrays=arrays)
    assert got == want
    arrays["source"] = arrays["source"] * 0  # the arrays are what is used (all source 0: nothing restored)
    assert cover_stats(files["confidence"], files["mask_provenance"], 0.3, source_path=files["source"],
                       arrays=arrays)["restored_after"] == 0.0 != want["restored_after"]


def test_cached_geotiff_tags_are_gdals_for_every_origin_and_nodata():
    """The GeoTIFF tags of a grid computed once per CRS and pixel size, with each grid's own origin patched in and
    the nodata tag added, are exactly the tags GDAL writes for that grid (odc-geo's ``geotiff_metadata``), also for
    origins that are not whole metres, a geographic CRS and nodata read back as a float (0.0, 255.0)."""
    import numpy as np
    from affine import Affine
    from odc.geo.cog._tifffile import geotiff_metadata
    from odc.geo.geobox import GeoBox

    from cloudfree.stages.cog import _GEOTAGS, _geotiff_tags_once

    _GEOTAGS.clear()
    for crs, res in (("EPSG:32629", 100.0), ("EPSG:4326", 0.001)):
        for x0, y0 in ((300000.0, 3400000.0), (310050.5, 3300012.25), (299990.123456789, 3399999.987654321)):
            if crs == "EPSG:4326":
                x0, y0 = x0 / 1e5 - 5.0, y0 / 1e5
            gb = GeoBox((104, 103), Affine(res, 0, x0, 0, -res, y0), crs)
            for nodata in (None, 0, 0.0, 255.0, np.uint8(255), 65535.0):
                want, _ = geotiff_metadata(gb, nodata=nodata)
                got, _ = _geotiff_tags_once(geotiff_metadata, gb, nodata=nodata)
                assert [tuple(t) for t in got] == [tuple(t) for t in want], (crs, x0, y0, nodata)
    assert len(_GEOTAGS) == 2  # one entry per CRS and pixel size, whatever the origin


def test_a_small_targets_item_is_serialised_once(tmp_path):
    """The runner writes the item with the collection links that update_collection gives it, so publishing it
    does not rewrite it (the item JSON, ~30 KB with the densified footprint, was serialised twice per target); a
    second update_collection leaves the file alone too, and the collection lists the item."""
    import os

    from cloudfree.stages.publish import update_collection

    (folder,) = _batch(tmp_path, 1)
    item = next(folder.glob("*/*.json"))
    d = json.loads(item.read_text())
    assert d["collection"] == "cloudfree-outputs"
    assert [lk["href"] for lk in d["links"] if lk["rel"] in ("root", "parent", "collection")] == [
        "../catalog.json", "../collection.json", "../collection.json"]
    before = os.stat(item)
    update_collection(folder, item, "cloudfree-outputs")
    after = os.stat(item)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    coll = json.loads((folder / "collection.json").read_text())
    assert [lk["href"] for lk in coll["links"] if lk["rel"] == "item"] == [f"./{item.parent.name}/{item.name}"]


def _misregistered_copy(folder: Path, dx_m: float, dy_m: float) -> Path:
    """The 29RKH files with their geotransform moved by ``(dx_m, dy_m)`` metres: a SIMULATED misregistration of
    real pixels (same values, geolocated off by a fraction of a 100 m pixel), for a reference the co-registration
    must find and shift."""
    import shutil

    import rasterio
    from affine import Affine

    from cloudfree.pipeline.evaluation.bench import FILES

    folder.mkdir()
    shutil.copy(DATA / "S2A_29RKH_20200219_0_L2A.json", folder)
    for name in FILES:
        with rasterio.open(DATA / f"{name}.tif") as src:
            profile, data = src.profile, src.read()
        profile["transform"] = Affine.translation(dx_m, dy_m) * profile["transform"]
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(data)
    return folder


def test_a_target_read_whole_gives_the_lazy_paths_bytes(tmp_path, monkeypatch):
    """A 1098 x 1098 px target (3 x 3 chunks, larger than the co-registration window; phyvlm-cr: 3 x 3 tiles with a
    123 px halo, blended) with two references, one of them misregistered by (0.4, -0.3) px (simulated,
    :func:`_misregistered_copy`): read whole before the estimate (``runner.read_whole``: nothing read twice) it
    writes every COG byte for byte as when it is read lazily (the estimate's window read, then the main pass), and
    the shift is applied in both."""
    import cloudfree.pipeline.runner as runner
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.bench import _config, local_29rkh_item, scene_plan
    from cloudfree.pipeline.runner import dask_context, process_target

    model_name = "phyvlm-cr"
    moved = _misregistered_copy(tmp_path / "moved", 40.0, 30.0)
    items = [local_29rkh_item(DATA), local_29rkh_item(DATA, item_id="S2A_29RKH_REF_D1", shift_days=-5.0),
             local_29rkh_item(moved, item_id="S2A_29RKH_REF_MOVED_D2", shift_days=-10.0)]
    plan = scene_plan(items, "test")
    whole = []
    real = runner.read_whole
    monkeypatch.setattr(runner, "read_whole", lambda ctx: whole.append(real(ctx)) or whole[-1])
    outs = {}
    for mode in ("whole", "lazy"):
        if mode == "lazy":
            monkeypatch.setattr(runner, "read_whole", lambda ctx: False)
        cfg = _config(100.0, tmp_path / mode / "out", model_name)
        with dask_context(cfg):
            res = process_target(plan, build_model(model_name, {}), cfg, "test-run")
        assert res.status == "done", res.error
        status = {c["id"]: c["status"] for c in res.coregistration}
        assert status["S2A_29RKH_REF_MOVED_D2"] == "applied", res.coregistration
        outs[mode] = tmp_path / mode / "out"
    assert whole == [True]  # the target was read whole in the first run
    assert _same_outputs(outs["whole"], outs["lazy"]) >= 8
