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

from pipeline.composite import composite_kernel
from pipeline.contract import SOURCE_FUSED, SOURCE_NODATA, SOURCE_REFERENCE_BASE

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
    from catalogs.local import LocalCatalog
    from pipeline.cli import main
    from pipeline.composite import run_composite
    from pipeline.config import load_config
    from stages.publish import check_item

    base = LocalCatalog(demo_catalog)._load()
    ref = next(i for i in base if i.id == "S2A_T33UUU_20170206_SIMREF")
    uuv = _clone(ref, "S2A_T33UUV_20170207_SIMREF", "2017-02-07T10:21:01Z", **{"s2:mgrs_tile": "33UUV"})
    cat = _write_catalog([*base, uuv], tmp_path / "items.json")
    b = ref.bbox
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]}}))
    cfg = load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(cat)}, grid={"resolution": 40}, output={"dir": str(tmp_path / "out")},
        run={"progress": False}, composite={"method": "median"})

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
    assert item["properties"]["start_datetime"].startswith("2017-02-06")
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
    from catalogs.local import LocalCatalog
    from pipeline.composite import run_composite
    from pipeline.config import load_config

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
    b = ref.bbox
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]}}))
    cfg = load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(cat)}, grid={"resolution": 40}, output={"dir": str(tmp_path / "out")},
        run={"progress": False}, composite={"method": "median"})

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
    from pipeline.composite import run_composite
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(demo_catalog)}, grid={"resolution": 40}, output={"dir": str(tmp_path / "out")},
        run={"progress": False}, composite={"method": "model"}, model={"name": "reference-replace"})
    stale = tmp_path / "out" / "composites" / ".staging" / "S2B_T33UUU_20170226_SIMTHIN__reference-replace+killed"
    stale.mkdir(parents=True)
    [res] = run_composite(cfg, _region(demo_catalog, tmp_path), "2017-02")
    assert res.status == "done" and res.item.exists(), res.error
    assert not any((tmp_path / "out" / "composites" / ".staging").iterdir())


def _region(demo_catalog, tmp_path) -> Path:
    from catalogs.local import LocalCatalog

    b = next(i for i in LocalCatalog(demo_catalog)._load() if i.id == "S2A_T33UUU_20170206_SIMREF").bbox
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]}}))
    return region
