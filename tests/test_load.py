"""Load stage: failed reads are retried then reported (never silent nodata), SOURCE_FAILED reaches the output,
Sentinel-1 loads as linear power on the output grid, resampling keeps classes and picks average when coarser."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dask.array as dsa
import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox

from cloudfree.pipeline.contract import SOURCE_REFERENCE_BASE, SOURCE_FAILED, SOURCE_TARGET
from cloudfree.pipeline.errors import ReadError
from cloudfree.stages import load as load_mod
from cloudfree.stages.load import (check_assets, db_to_linear, load_reflectance, load_reflectance_checked, load_sar,
                         open_with_retry, output_geobox, reflectance_resampling)
from tests.conftest import shared

TARGET = "S2A_T33UUU_20170216_SIMCLOUDY"


@pytest.fixture(scope="module")
def demo_items(demo_catalog) -> dict[str, pystac.Item]:
    return {i.id: i for i in pystac.Catalog.from_file(str(demo_catalog)).get_items(recursive=True)}


def _broken_copy(item: pystac.Item, tmp_path: Path) -> pystac.Item:
    """The demo target with B04 pointing at a missing file and B11 at a corrupt one."""
    bad = item.clone()
    bad.id = item.id + "_BROKEN"
    for k, a in bad.assets.items():
        a.href = item.assets[k].get_absolute_href()
    corrupt = tmp_path / "B11.tif"
    corrupt.write_bytes(b"II*\x00 this is not a GeoTIFF")
    bad.assets["B04"].href = str(tmp_path / "missing" / "B04.tif")
    bad.assets["B11"].href = str(corrupt)
    return bad


def test_failed_assets_are_retried_reported_and_flagged(demo_items, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(load_mod.time, "sleep", sleeps.append)
    good, ref = demo_items[TARGET], demo_items["S2A_T33UUU_20170206_SIMREF"]
    bad = _broken_copy(good, tmp_path)
    gb = output_geobox(good, __import__("cloudfree.pipeline.config", fromlist=["GridConfig"]).GridConfig())[:256, :256]
    bands = ["B02", "B04", "B08", "B11"]
    stack, failed, failures = load_reflectance_checked([bad, ref], bands, gb, 128, retries=3, delay=0.01)
    assert {(f.item_id, f.band) for f in failures} == {(bad.id, "B04"), (bad.id, "B11")}
    assert all(f.attempts == 3 and bad.id in f.item_id for f in failures)
    assert len(sleeps) == 4  # 2 assets x (3 attempts - 1) backoffs
    assert isinstance(stack.data, dsa.Array) and isinstance(failed.data, dsa.Array)
    s, f = stack.values, failed.values
    assert f[0].all() and not f[1].any()  # the broken item is failed, the reference observed
    assert np.isnan(s[0, [1, 3]]).all() and np.isfinite(s[0, [0, 2]]).all()  # readable bands still loaded
    assert np.isfinite(s[1]).all()


def test_retry_recovers_from_a_transient_failure(demo_items, monkeypatch):
    href = demo_items[TARGET].assets["B02"].get_absolute_href()
    real, calls = rasterio.open, []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) < 3:
            raise rasterio.errors.RasterioIOError(f"{path}: HTTP 503 (simulated)")
        return real(path, *a, **kw)

    monkeypatch.setattr(load_mod.rasterio, "open", flaky)
    monkeypatch.setattr(load_mod.time, "sleep", lambda s: None)
    assert open_with_retry(href, retries=3) == (768, 1536)
    calls.clear()
    with pytest.raises(ReadError, match="after 2 attempts"):
        open_with_retry(href, retries=2)


def test_unchecked_load_raises_instead_of_nodata(demo_items, tmp_path):
    bad = _broken_copy(demo_items[TARGET], tmp_path)
    gb = GeoBox.from_bbox(rasterio.open(demo_items[TARGET].assets["B02"].get_absolute_href()).bounds,
                          "EPSG:32633", resolution=40)
    da = load_reflectance([bad], ["B11"], gb, 128)
    with pytest.raises(Exception, match="B11|not recognized|TIFF"):
        da.values
    assert check_assets([demo_items[TARGET]], ["B02", "SCL"], retries=1) == []


def test_failed_target_pixels_reach_the_output_as_source_failed(demo_config, demo_items, tmp_path):
    """End to end on a small AOI: a target whose B04 cannot be read is never written as its own (clear)
    observation: a pixel a clear reference supplies keeps the reference's code (all bands from it), any other
    pixel is SOURCE_FAILED with B04 nodata and the healthy bands kept."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.runner import process_target
    from cloudfree.stages.search import Candidate, TargetPlan

    good = demo_items[TARGET]
    bad = _broken_copy(good, tmp_path)
    bad.assets["B11"].href = good.assets["B11"].get_absolute_href()  # only B04 fails
    for k in ("truth", "truth_transmission"):  # no evaluation against the simulated truth here
        bad.assets.pop(k, None)
    ref = demo_items["S2A_T33UUU_20170206_SIMREF"]
    x0, y0, x1, y1 = good.bbox
    aoi = [x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.45 * (x1 - x0), y0 + 0.6 * (y1 - y0)]
    cfg = demo_config.replace(search={"aoi": aoi}, output={"dir": str(tmp_path / "out"), "quicklook": False})
    plan = TargetPlan(bad, (Candidate(item=ref, dt_days=-10.0, clear_fraction=0.9, overlap=1.0, same_orbit=True,
                                         same_tile=True, score=1.0, reason="test"),), ())
    model = build_model(cfg.model.name, cfg.model.params)
    res = process_target(plan, model, cfg, "test")
    # no target pixel is a complete observation (B04 failed everywhere): never 'done', and the reason names the band
    assert res.status == "unrestored" and "B04 could not be read" in res.error, (res.status, res.error)
    with rasterio.open(res.outputs["source"]) as ds:
        src = ds.read(1)
    with rasterio.open(res.outputs["reflectance"]) as ds:
        refl = ds.read()
    assert ((src == SOURCE_FAILED) | (src >= SOURCE_REFERENCE_BASE)).all() and SOURCE_TARGET not in src
    b04 = cfg.grid.bands.index("B04")
    assert (src == SOURCE_FAILED).any() and (src >= SOURCE_REFERENCE_BASE).any(), np.unique(src)  # no vacuous .all()
    assert (refl[b04][src == SOURCE_FAILED] == 0).all()  # the failed band: nodata
    assert (refl[b04][src >= SOURCE_REFERENCE_BASE] > 0).all()  # from the reference: every band valid
    others = np.delete(refl, b04, axis=0)
    assert (others[:, src == SOURCE_FAILED] > 0).all()  # healthy bands of failed pixels are kept
    item = json.loads(res.outputs["item"].read_text())
    assert [f["band"] for f in item["properties"]["cloudfree:read_failures"]] == ["B04"]


def test_mark_failed_sets_source_and_nan():
    from cloudfree.stages.load import mark_failed

    ds = xr.Dataset({"reflectance": (("band", "y", "x"), np.ones((2, 3, 3), np.float32)),
                     "confidence": (("y", "x"), np.ones((3, 3), np.float32)),
                     "source": (("y", "x"), np.full((3, 3), float(SOURCE_TARGET), np.float32))})
    failed = xr.DataArray(np.eye(3, dtype=bool), dims=("y", "x"))
    out = mark_failed(ds, failed)
    assert (out.source.values[np.eye(3, dtype=bool)] == SOURCE_FAILED).all()
    assert (out.source.values[~np.eye(3, dtype=bool)] == SOURCE_TARGET).all()
    assert np.isnan(out.reflectance.values[:, 0, 0]).all() and out.confidence.values[0, 0] == 0


def test_resampling_choice():
    assert reflectance_resampling(["B02", "B11", "B01"], 10) == {"B02": "bilinear", "B11": "bilinear",
                                                                 "B01": "bilinear"}
    assert reflectance_resampling(["B02", "B11", "B01"], 40) == {"B02": "average", "B11": "average",
                                                                 "B01": "bilinear"}


def _sar_item(path: Path, assets: dict, day: int = 1) -> pystac.Item:
    with rasterio.open(path) as ds:
        from odc.geo.geom import BoundingBox

        bbox = list(BoundingBox(*ds.bounds, crs=ds.crs).to_crs("EPSG:4326"))
    item = pystac.Item(f"S1_{path.stem[:20]}", None, bbox, datetime(2019, 6, day, tzinfo=timezone.utc),
                       {"platform": "sentinel-1a", "sar:polarizations": ["VV", "VH"]})
    for k, extra in assets.items():
        item.add_asset(k, pystac.Asset(str(path), extra_fields=extra))
    return item


def test_load_sar_linear_power_on_the_native_and_a_coarser_grid():
    path = next(shared("s1-uk-10m").glob("*.tif"))
    item = _sar_item(path, {"data": {"eo:bands": [{"name": "vh"}, {"name": "vv"}, {"name": "one"}]}})
    with rasterio.open(path) as ds:
        raw = ds.read().astype(np.float32)
        gb = GeoBox((ds.height, ds.width), ds.transform, ds.crs)
    sar = load_sar([item], gb, chunk=128)
    assert isinstance(sar.data, dsa.Array) and sar.dtype == np.float32
    assert sar.dims == ("time", "band", "y", "x") and list(sar.band.values) == ["vv", "vh"]
    np.testing.assert_allclose(sar.sel(band="vv").values[0], raw[1], rtol=1e-5)
    np.testing.assert_allclose(sar.sel(band="vh").values[0], raw[0], rtol=1e-5)
    coarse = load_sar([item], gb.zoom_out(4), chunk=64).values  # 40 m: average of 4x4 blocks
    expect = raw[1].reshape(64, 4, 64, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse[0, 0], expect, rtol=1e-3)


def test_load_sar_converts_db_to_linear_and_reprojects():
    path = next(shared("s1-vv-db-20m").glob("*.tif"))
    item = _sar_item(path, {"vv": {"raster:bands": [{"unit": "dB"}]}})
    with rasterio.open(path) as ds:
        db = ds.read(1, masked=True).astype(np.float32)
        gb = GeoBox((ds.height * 2, ds.width * 2), ds.transform * ds.transform.scale(0.5), ds.crs)
    sar = load_sar([item], gb, chunk=128).values[0, 0]  # 20 m dB -> 10 m linear, bilinear
    assert list(load_sar([item], gb).band.values) == ["vv"]
    ok = np.isfinite(sar)
    assert ok.mean() > 0.5 and (sar[ok] > 0).all()
    assert abs(np.median(10 * np.log10(sar[ok])) - np.ma.median(db)) < 0.5
    np.testing.assert_allclose(db_to_linear(np.array([-10.0, 0.0], np.float32)), [0.1, 1.0], rtol=1e-6)


def test_resampling_follows_declared_source_resolution(demo_catalog):
    """average only when the assets declare pixels finer than the grid; undeclared (decimated files) -> bilinear."""
    from cloudfree.catalogs.local import LocalCatalog

    demo = LocalCatalog(demo_catalog).get("S2A_T33UUU_20170206_SIMREF")  # assets declare proj:transform
    assert reflectance_resampling(["B02", "B11"], 40, [demo]) == {"B02": "average", "B11": "average"}
    assert reflectance_resampling(["B02", "B11"], 20, [demo]) == {"B02": "average", "B11": "bilinear"}
    bare = demo.clone()
    for a in bare.assets.values():
        a.extra_fields.clear()
    assert reflectance_resampling(["B02", "B11"], 40, [bare]) == {"B02": "bilinear", "B11": "bilinear"}


def test_outside_the_footprint_is_nan_not_zero(demo_catalog):
    """A grid larger than the item: pixels the item does not cover are nodata (NaN), never 0 reflectance."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from cloudfree.catalogs.local import LocalCatalog

    item = LocalCatalog(demo_catalog).get("S2A_T33UUU_20170206_SIMREF")
    # 100 m grid starting 1 km west and north of the item's top-left corner (330000, 5822040)
    grid = GeoBox((100, 100), Affine(100, 0, 329000, 0, -100, 5823040), "EPSG:32633")
    a = load_reflectance([item], ["B02"], grid).values[0, 0]
    assert np.isnan(a[:10, :]).all() and np.isnan(a[:, :10]).all()
    inside = a[20:80, 20:]  # the item is 7.68 km tall: rows 10-86 of this grid
    assert np.isfinite(inside).all() and (inside > 0).all() and np.isnan(a[90:]).all()


def test_probe_and_samples_are_read_once_per_file_until_it_changes(demo_items, tmp_path):
    """An asset's probe and plausibility sample are read once per process (a batch's targets share references);
    a file rewritten in place (new mtime/size) is read again, and a failed read is not remembered."""
    import os
    import shutil

    from cloudfree.stages.load import clear_read_memo, memo_read

    src = demo_items[TARGET].assets["B02"].get_absolute_href()
    href = str(tmp_path / "B02.tif")
    shutil.copy(src, href)
    clear_read_memo()
    reads = []

    def probe():
        reads.append(1)
        return open_with_retry(href, retries=1)

    assert memo_read(href, ("probe",), probe) == (768, 1536)
    assert memo_read(href, ("probe",), probe) == (768, 1536)
    assert len(reads) == 1
    st = os.stat(href)
    os.utime(href, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: read again
    assert memo_read(href, ("probe",), probe) == (768, 1536) and len(reads) == 2
    with open(href, "r+b") as fh:  # truncated in place: the probe fails and the failure is not kept
        fh.truncate(4096)
    with pytest.raises(ReadError):
        memo_read(href, ("probe",), probe)
    with pytest.raises(ReadError):
        memo_read(href, ("probe",), probe)
    assert len(reads) == 4
    assert memo_read("https://example.invalid/B02.tif", ("probe",), lambda: "remote") == "remote"  # never kept


def test_plausibility_check_reads_each_sample_once(demo_items, monkeypatch):
    """The second check of the same items opens no file: the samples come from the memo (same warnings)."""
    from cloudfree.stages import plausibility
    from cloudfree.stages.load import clear_read_memo

    ids = sorted(demo_items)
    target, refs = demo_items[TARGET], [demo_items[i] for i in ids if i != TARGET][:2]
    clear_read_memo()
    first = plausibility.check_reflectance(target, refs, ["B02", "B03", "B04", "B08"])
    real, opened = rasterio.open, []

    def counting(path, *a, **kw):
        opened.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(rasterio, "open", counting)
    again = plausibility.check_reflectance(target, refs, ["B02", "B03", "B04", "B08"])
    assert again == first
    assert opened == []


def test_plausibility_check_is_kept_per_items_files_and_scales(demo_items, monkeypatch, tmp_path):
    """A batch's targets share their items: the check (whole-item samples, not the target's grid) runs once for
    the same items, bands, files and scales. Another scale, a rewritten file or another band list checks again;
    an error is never kept (the next target raises it again)."""
    import os
    import shutil

    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages import plausibility

    ids = sorted(demo_items)
    target, refs = demo_items[TARGET], [demo_items[i] for i in ids if i != TARGET][:2]
    bands = ["B02", "B03", "B04", "B08"]
    plausibility._CHECK_MEMO.clear()
    real, runs = plausibility._check_reflectance, []

    def counting(*a, **kw):
        runs.append(a[0].id)
        return real(*a, **kw)

    monkeypatch.setattr(plausibility, "_check_reflectance", counting)
    first = plausibility.check_reflectance(target, refs, bands)
    assert plausibility.check_reflectance(target, refs, bands) == first
    assert len(runs) == 1
    assert plausibility.check_reflectance(target, refs, bands[:3]) == first  # other bands: checked again
    assert len(runs) == 2
    d = target.to_dict()  # the same files, the target's B04 4x too dark: a warning, not the kept result
    d["properties"].pop("s2:processing_baseline", None)
    for b in bands:
        d["assets"][b]["raster:bands"] = [{"scale": 1e-4 / (4 if b == "B04" else 1), "offset": 0}]
    dark = pystac.Item.from_dict(d)
    (warning,) = plausibility.check_reflectance(dark, refs, bands)
    assert "band B04" in warning and len(runs) == 3
    assert plausibility.check_reflectance(dark, refs, bands) == [warning] and len(runs) == 3
    d["assets"]["B04"]["raster:bands"] = [{"scale": 1.0, "offset": 0}]  # unscaled: an error, raised every time
    for _ in range(2):
        with pytest.raises(InputDataError, match="unscaled"):
            plausibility.check_reflectance(pystac.Item.from_dict(d), refs, ["B04"])
    assert len(runs) == 5
    copy = tmp_path / "B02.tif"  # a file rewritten in place (new mtime): checked again
    shutil.copy(target.assets["B02"].get_absolute_href(), copy)
    moved = target.clone()
    moved.assets["B02"].href = str(copy)
    plausibility.check_reflectance(moved, refs, bands)
    plausibility.check_reflectance(moved, refs, bands)
    assert len(runs) == 6
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))
    plausibility.check_reflectance(moved, refs, bands)
    assert len(runs) == 7
