"""Regional composites: the pure kernel, and incremental reruns on a copy of the demo catalog."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from click.testing import CliRunner
from rio_cogeo.cogeo import cog_validate

from cloudfree.pipeline.composite import composite_kernel
from cloudfree.pipeline.contract import SOURCE_FUSED, SOURCE_NODATA, SOURCE_REFERENCE_BASE

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_median_best_pixel_and_fallbacks():
    stack = np.stack([np.full((2, 1, 4), v, np.float32) for v in (0.1, 0.2, 0.9)])  # (t=3, b=2, y=1, x=4)
    cloudy = np.zeros((3, 1, 4), bool)
    cloudy[2] = True  # the bright one is cloud everywhere
    cloudy[:, 0, 1] = [False, True, True]  # only the first clear at x=1
    cloudy[:, 0, 2] = True  # nothing clear at x=2
    stack[:, :, 0, 3] = np.nan  # no data at all at x=3
    prob = np.where(cloudy, 0.9, 0.1).astype(np.float32)
    prob[1, 0, 2] = 0.5  # least cloudy of the all-cloudy pixel
    med = composite_kernel(stack, cloudy, prob, "median")
    assert med[0, 0, 0] == pytest.approx(0.15) and med[3, 0, 0] == SOURCE_FUSED
    assert med[0, 0, 1] == pytest.approx(0.1) and med[3, 0, 1] == SOURCE_REFERENCE_BASE
    assert med[0, 0, 2] == pytest.approx(0.2) and med[2, 0, 2] == 0 and med[3, 0, 2] == SOURCE_REFERENCE_BASE + 1
    assert np.isnan(med[0, 0, 3]) and med[3, 0, 3] == SOURCE_NODATA
    best = composite_kernel(stack, cloudy, prob, "best-pixel")
    assert best[0, 0, 0] == pytest.approx(0.1) and best[2, 0, 0] == pytest.approx(0.9)


def _reference_kernel(stack, cloudy, prob, method):
    """The composite kernel as it was before the speed-up (full-array fallback, ``np.nanmedian``): the oracle."""
    finite = np.isfinite(stack).all(axis=1) & ~(stack == 0).all(axis=1)
    clear = finite & ~cloudy.astype(bool)
    p = np.where(finite, np.nan_to_num(prob, nan=1.0), np.inf)
    least = np.argmin(p, axis=0)
    yy, xx = np.indices(least.shape)
    n_clear = clear.sum(axis=0)
    if method == "median":
        with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            refl = np.nanmedian(np.where(clear[:, None], stack, np.nan), axis=0)
        conf = 0.5 + 0.5 * np.minimum(n_clear, 3) / 3.0
        src = np.where(n_clear >= 2, SOURCE_FUSED, SOURCE_REFERENCE_BASE + np.argmax(clear, axis=0))
    else:
        best = np.argmin(np.where(clear, p, np.inf), axis=0)
        refl = stack[best, :, yy, xx].transpose(2, 0, 1)
        conf = np.where(n_clear > 0, 1.0 - np.clip(p[best, yy, xx], 0, 1), 0.0)
        src = SOURCE_REFERENCE_BASE + best
    none = n_clear == 0
    refl = np.where(none[None], stack[least, :, yy, xx].transpose(2, 0, 1), refl)
    src = np.where(none, SOURCE_REFERENCE_BASE + least, src)
    conf = np.where(none, 0.0, conf)
    any_finite = finite.any(axis=0)
    refl = np.where(any_finite[None], refl, np.nan)
    src = np.where(any_finite, src, SOURCE_NODATA)
    return np.concatenate([refl, conf[None], src[None]]).astype(np.float32)


@pytest.mark.parametrize("nt", [1, 2, 3, 5, 8, 12, 17])
@pytest.mark.parametrize("method", ["median", "best-pixel"])
def test_fast_kernel_equals_the_reference_kernel(nt, method):
    """The fast kernel (sorting-network median, fallback on the few pixels that need it) gives the same values as
    the straightforward one, on clouds, NaN, all-zero (outside the footprint) and all-cloudy pixels."""
    rng = np.random.default_rng(nt)
    stack = rng.random((nt, 3, 40, 50), dtype=np.float32)
    stack[rng.random(stack.shape) < 0.05] = np.nan  # one band missing
    stack[:, :, rng.random((40, 50)) < 0.1] = 0.0  # footprint edge: all bands 0 (nodata) for one date
    stack[:, :, :3] = np.nan  # no data at all
    cloudy = rng.random((nt, 40, 50)) < 0.6
    cloudy[:, 5:9] = True  # nothing clear: fallback to the least cloudy
    prob = rng.random((nt, 40, 50)).astype(np.float32)
    prob[rng.random(prob.shape) < 0.05] = np.nan
    fast, ref = composite_kernel(stack, cloudy, prob, method), _reference_kernel(stack, cloudy, prob, method)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    np.testing.assert_array_equal(fast, ref)


def test_sorting_network_median_equals_numpy():
    from cloudfree.models._filters import NETWORK_MAX, _oddeven_pairs, nanmedian_axis0

    rng = np.random.default_rng(0)
    for nt in range(1, NETWORK_MAX + 4):
        x = rng.normal(size=(nt, 30, 30)).astype(np.float32)
        x[rng.random(x.shape) < 0.3] = np.nan
        with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            want = np.nanmedian(x, axis=0).astype(np.float32)
        np.testing.assert_allclose(nanmedian_axis0(x), want, rtol=1e-6, equal_nan=True)
    for nt in range(2, 11):  # 0-1 principle: a network that sorts every 0/1 input sorts everything
        for bits in range(1 << nt):
            v = [(bits >> i) & 1 for i in range(nt)]
            for a, b in _oddeven_pairs(nt):
                if v[a] > v[b]:
                    v[a], v[b] = v[b], v[a]
            assert v == sorted(v), (nt, bits)


@pytest.mark.parametrize("methods,method", [(["scl"], "median"), (["cldprb"], "best-pixel"),
                                            (["cldprb", "scl"], "median")])
def test_fused_composite_equals_mask_stage_plus_kernel(demo_catalog, methods, method):
    """The composite computes its masks inside each block's task from halo windows of the mask layers
    (pipeline.composite.fused_composite); the values are those of the mask stage (map_overlap) + the kernel, on
    the demo catalog's 4 acquisitions (real pixels, SIMULATED clouds, SCL and CLDPRB) on a 64 px chunk grid, so
    many blocks have neighbours and the morphology crosses block edges."""
    import dask
    import dask.array as dsa

    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.composite import fused_composite
    from cloudfree.pipeline.config import GridConfig, MaskConfig
    from cloudfree.stages.load import load_reflectance, output_geobox
    from cloudfree.stages.masks import build_mask_layers, layer_masks

    items = LocalCatalog(demo_catalog)._load()[:4]
    mcfg = MaskConfig(methods=methods, dilation=3)
    gb = output_geobox(items[0], GridConfig(resolution=20, bands=["B02", "B03", "B04", "B08"]))
    stack = load_reflectance(items, ["B02", "B03", "B04", "B08"], gb, 64)
    specs = layer_masks(items, mcfg)
    assert [s.method for s in specs] == methods
    fused = fused_composite(stack, items, gb, 64, method, specs)
    layers = build_mask_layers(items, gb, mcfg, 64)
    mask, prob = layers.mask | layers.opened, layers.prob  # opened specks are never clear observations
    plain = dsa.blockwise(composite_kernel, "cyx", stack.data, "tbyx", mask.data, "tyx", prob.data.astype(np.float32),
                          "tyx", method, None, new_axes={"c": 6}, concatenate=True, dtype=np.float32)
    a, b = dask.compute(fused, plain)
    assert 0.01 < float(mask.mean()) < 0.9  # clouds to mask, clear pixels to composite
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a[5])) >= 3  # several sources: the dates differ


def _clone(item: pystac.Item, new_id: str, when: str, **props) -> pystac.Item:
    d = copy.deepcopy(item.to_dict(transform_hrefs=False))  # to_dict shares the properties dict
    d["id"] = new_id
    d["properties"].update({"datetime": when, **props})
    d["links"] = []
    return pystac.Item.from_dict(d)


def _write_catalog(items: list[pystac.Item], path: Path) -> Path:
    path.write_text(json.dumps([it.to_dict(transform_hrefs=False) for it in items]))
    return path


def test_composite_is_incremental(demo_catalog, tmp_path):
    """Run 1 builds both tiles; a rerun with nothing new processes zero; a new acquisition of 33UUU re-processes
    33UUU only. 33UUV is a SIMULATED second tile (a copy of a 33UUU reference relabelled)."""
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.cli import main
    from cloudfree.pipeline.composite import run_composite
    from cloudfree.stages.publish import check_item

    base = LocalCatalog(demo_catalog)._load()
    ref = next(i for i in base if i.id == "S2A_T33UUU_20170206_SIMREF")
    uuv = _clone(ref, "S2A_T33UUV_20170207_SIMREF", "2017-02-07T10:21:01Z", **{"s2:mgrs_tile": "33UUV"})
    cat = _write_catalog([*base, uuv], tmp_path / "items.json")
    region, cfg = _bbox_region(ref.bbox, tmp_path), _median_config(cat, tmp_path)

    first = run_composite(cfg, region, "2017-02")
    assert {(r.tile, r.status) for r in first} == {("33UUU", "done"), ("33UUV", "done")}
    uuu = next(r for r in first if r.tile == "33UUU")
    assert sorted(uuu.inputs) == ["S2A_T33UUU_20170206_SIMREF", "S2A_T33UUU_20170216_SIMCLOUDY",
                                  "S2B_T33UUU_20170226_SIMTHIN"]  # the March reference is outside the period
    assert check_item(uuu.item) == []
    out = uuu.item.parent
    for key in ("reflectance", "confidence", "source"):
        ok, errors, _ = cog_validate(next(out.glob(f"*_{key}.tif")), quiet=True)
        assert ok, errors
    with rasterio.open(next(out.glob("*_source.tif"))) as ds:
        src = ds.read(1)
    assert (src == SOURCE_FUSED).mean() > 0.3  # most pixels are clear in two or more acquisitions
    item = json.loads(uuu.item.read_text())
    # the requested period is the time range (the acquisitions used are listed in cloudfree:composite)
    assert item["properties"]["start_datetime"].startswith("2017-02-01T00:00:00")
    assert item["properties"]["end_datetime"].startswith("2017-02-28T23:59:59")
    assert item["properties"]["mgrs:grid_square"] == "UU" and "s2:mgrs_tile" not in item["properties"]
    from tests.stac_schemas import validate

    validate(uuu.item)  # STAC core + every declared extension (vendored schemas)
    # composites get a quicklook and a run report, like targets
    assert (uuu.item.parent / item["assets"]["quicklook"]["href"]).is_file()
    reports = list((tmp_path / "out" / "composites" / "reports").glob("*/report.md"))
    assert len(reports) == 1 and "33UUU 2017-02" in reports[0].read_text()
    assert (reports[0].parent / "results.json").is_file()
    cover = item["properties"]["cloudfree:cover"]
    assert 0 <= cover["low_confidence_after"] < 0.2
    # eo:cloud_cover counts what is not a usable clear estimate: low confidence and nodata (outside the footprints)
    assert item["properties"]["eo:cloud_cover"] == round(100 * cover["unusable_after"], 2)
    assert cover["unusable_after"] >= max(cover["low_confidence_after"] * (1 - cover["nodata_after"]),
                                          cover["nodata_after"])
    assert {lk["id"] for lk in item["links"] if lk["rel"] == "derived_from"} == set(uuu.inputs)

    res = CliRunner().invoke(main, ["composite", "--region", str(region), "--period", "2017-02",
                                    "--out", str(tmp_path / "out"), "--no-progress"],
                             env={"CLOUDFREE_CATALOG__URL": str(cat), "CLOUDFREE_GRID__RESOLUTION": "40",
                                  "CLOUDFREE_CATALOG__COLLECTION": "demo-s2-l1c",
                                  "CLOUDFREE_MASK__METHODS": "[cldprb, scl]"})
    assert res.exit_code == 0, res.output
    assert "0 tile(s) processed, 2 unchanged" in res.output

    new = _clone(ref, "S2A_T33UUU_20170219_SIMNEW", "2017-02-19T10:21:01Z",
                 updated=datetime.now(timezone.utc).isoformat())
    _write_catalog([*base, uuv, new], cat)
    third = run_composite(cfg, region, "2017-02")
    assert {(r.tile, r.status) for r in third} == {("33UUU", "done"), ("33UUV", "skipped")}
    state = json.loads((tmp_path / "out" / "composites" / "state.json").read_text())
    assert "S2A_T33UUU_20170219_SIMNEW" in state["tiles"]["33UUU/2017-02"]["inputs"]
    coll = json.loads((tmp_path / "out" / "composites" / "collection.json").read_text())
    assert len([lk for lk in coll["links"] if lk["rel"] == "item"]) == 2


def test_a_broken_file_fails_its_tile_only(demo_catalog, tmp_path):
    """One band of a 33UUU input with its tiles zeroed (opens, breaks mid-read): 33UUU is recorded as failed,
    naming the fix, the SIMULATED second tile 33UUV is still built, and no staging folder is left (neither this
    run's nor one a killed run left for 33UUV)."""
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.composite import run_composite

    base = LocalCatalog(demo_catalog)._load()
    ref = next(i for i in base if i.id == "S2A_T33UUU_20170206_SIMREF")
    uuv = _clone(ref, "S2A_T33UUV_20170207_SIMREF", "2017-02-07T10:21:01Z", **{"s2:mgrs_tile": "33UUV"})
    broken = _clone(ref, ref.id, ref.datetime.isoformat())
    src = Path(ref.assets["B04"].get_absolute_href())
    import tifffile

    with tifffile.TiffFile(src) as tif:  # keep the header, zero every tile (overviews included): reads fail
        first = min(min(p.dataoffsets) for p in tif.pages)
    raw = src.read_bytes()
    cut = tmp_path / "B04_zeroed.tif"
    cut.write_bytes(raw[:first] + bytes(len(raw) - first))
    broken.assets["B04"].href = str(cut)
    cat = _write_catalog([*(i for i in base if i.id != ref.id), broken, uuv], tmp_path / "items.json")
    region, cfg = _bbox_region(ref.bbox, tmp_path), _median_config(cat, tmp_path)

    stale = tmp_path / "out" / "composites" / ".staging" / "33UUV_2017-02_median+killedrun"
    stale.mkdir(parents=True)
    (stale / "33UUV_2017-02_median_reflectance.tif").write_bytes(b"half-written by a killed run")
    res = {r.tile: r for r in run_composite(cfg, region, "2017-02")}
    assert res["33UUU"].status == "failed" and "rerun" in res["33UUU"].error
    assert res["33UUV"].status == "done" and res["33UUV"].item.exists()
    staging = tmp_path / "out" / "composites" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_model_composite_goes_through_the_per_target_lock_and_cleans_stale_staging(demo_catalog, tmp_path):
    """composite.method model writes through the runner's per-target path: staging a killed run left for the
    target is removed and the output is published."""
    from cloudfree.pipeline.composite import run_composite
    from cloudfree.pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(demo_catalog)}, grid={"resolution": 40}, output={"dir": str(tmp_path / "out")},
        run={"progress": False}, composite={"method": "model"}, model={"name": "reference-replace"})
    stale = tmp_path / "out" / "composites" / ".staging" / "S2B_T33UUU_20170226_SIMTHIN__reference-replace+killed"
    stale.mkdir(parents=True)
    [res] = run_composite(cfg, _region(demo_catalog, tmp_path), "2017-02")
    assert res.status == "done" and res.item.exists(), res.error
    assert not any((tmp_path / "out" / "composites" / ".staging").iterdir())


def _region(demo_catalog, tmp_path) -> Path:
    from cloudfree.catalogs.local import LocalCatalog

    return _bbox_region(next(i for i in LocalCatalog(demo_catalog)._load() if i.id == "S2A_T33UUU_20170206_SIMREF").bbox,
                        tmp_path)


def _bbox_region(b, tmp_path) -> Path:
    """A region GeoJSON file: the polygon of bbox ``b``."""
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]}}))
    return region


def _median_config(cat, tmp_path):
    """The demo config on catalog ``cat`` at 40 m, median composites, outputs under ``tmp_path/out``."""
    from cloudfree.pipeline.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(cat)}, grid={"resolution": 40}, output={"dir": str(tmp_path / "out")},
        run={"progress": False}, composite={"method": "median"})
