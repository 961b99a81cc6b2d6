"""Outputs: mask provenance, STAC items (offline structural validation), the output collection searched as a
catalog (an output used as a later run's reference), the run report, and a real L2A tile (29RKH) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from tests.conftest import shared

TARGET = "S2A_T33UUU_20170216_SIMCLOUDY"
THIN = "S2B_T33UUU_20170226_SIMTHIN"


def _result(demo_run, target=TARGET):
    return next(r for r in demo_run if r.target_id == target)


def test_check_item_finds_missing_provenance_and_files(demo_run):
    """``check_item`` is the run-time check of what a JSON schema cannot see (provenance fields, asset files that
    exist); the schema validation of the same items is tests/test_stac_outputs.py."""
    from cloudfree.stages.publish import check_item

    path = _result(demo_run).outputs["item"]
    item = pystac.Item.from_file(str(path))
    for r in demo_run:
        assert check_item(r.outputs["item"]) == []
    broken = item.to_dict()
    broken["properties"].pop("cloudfree:run_id")
    broken["assets"]["source"]["href"] = "./missing.tif"
    bad = pystac.Item.from_dict(broken)
    bad.set_self_href(str(path))
    problems = check_item(bad)
    assert any("run_id" in p for p in problems) and any("asset source" in p for p in problems)


def test_mask_provenance_bits_match_the_mask_and_are_referenced(demo_run):
    from cloudfree.stages.masks import METHOD_BITS

    r = _result(demo_run)
    ok, errors, _ = cog_validate(r.outputs["mask_provenance"], quiet=True)
    assert ok, errors
    with rasterio.open(r.outputs["mask_provenance"]) as ds:
        bits = ds.read(1)
    with rasterio.open(r.outputs["source"]) as ds:
        src = ds.read(1)
    from cloudfree.stages.missed_cloud import MISSED_BIT

    # the methods' bits, and the multi-temporal test's on pixels no method flagged (cloud the mask missed)
    assert set(np.unique(bits)) <= {0, METHOD_BITS["cldprb"], METHOD_BITS["scl"],
                                    METHOD_BITS["cldprb"] | METHOD_BITS["scl"], MISSED_BIT}
    assert (bits & METHOD_BITS["cldprb"]).any() and (bits & METHOD_BITS["scl"]).any()
    # every pixel a reference filled was flagged by at least one method
    assert (bits[src >= 10] > 0).all()
    item = json.loads(r.outputs["item"].read_text())
    assert item["assets"]["mask_provenance"]["roles"] == ["data", "provenance", "cloud"]
    assert item["properties"]["cloudfree:mask_bits"] == {"1": "cldprb", "2": "scl", "16": "no valid data",
                                                          "32": "missed_cloud"}
    assert 0 <= item["properties"]["cloudfree:missed_cloud"]["share"] <= 1
    assert set(item["properties"]["cloudfree:cover"]) >= {"masked_before", "low_confidence_after"}
    assert item["properties"]["cloudfree:tile_seconds"] and r.tile_seconds


def test_output_collection_is_a_catalog_and_an_output_serves_as_a_reference(demo_config, demo_run, tmp_path):
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.pipeline.runner import run

    out_dir = Path(demo_config.output.dir)
    coll = json.loads((out_dir / "collection.json").read_text())
    assert coll["type"] == "Collection" and len([lk for lk in coll["links"] if lk["rel"] == "item"]) == 2
    outputs = LocalCatalog(out_dir).search(SearchQuery(collections=(demo_config.output.collection,)))
    name = demo_config.model.name
    assert {o.id for o in outputs} == {f"{TARGET}__{name}", f"{THIN}__{name}"}
    # a later run: the thin target, with the cloud-free output of the other date as its only candidate reference
    demo = LocalCatalog(demo_config.catalog.url)
    thin = demo.get(THIN)
    ref = next(o for o in outputs if o.id.startswith(TARGET))
    items = []
    for it in (thin, ref):
        d = it.to_dict(transform_hrefs=False)
        d["collection"] = "mixed"
        d["links"] = []
        items.append(d)
    cat = tmp_path / "mixed.json"
    cat.write_text(json.dumps(items))
    cfg = demo_config.replace(catalog={"url": str(cat), "collection": "mixed"}, mask={"methods": ["cldprb"]},
                              output={"dir": str(tmp_path / "out"), "report": False}, search={"targets": [THIN]})
    [res] = run(cfg)
    assert res.status == "done", res.error
    assert res.references == [ref.id]
    with rasterio.open(res.outputs["source"]) as ds:
        assert (ds.read(1) == 10).mean() > 0.2  # the output filled a good part of the thin target's clouds


def test_report_renders_with_images(demo_run, demo_config):
    from cloudfree.pipeline.run_report import markdown_to_html

    # other tests rerun the demo into the same folder (resume, overwrite): take the run that did both targets
    reports = [p for p in (Path(demo_config.output.dir) / "reports").glob("*/report.md")
               if p.read_text().count("| done |") == 2]
    assert reports
    md = reports[0].read_text()
    assert "| target | status |" in md and TARGET in md and "masked before" in md and "Model time per tile" in md
    html = (reports[0].parent / "report.html").read_text()
    assert html.count("<img") >= 6 and "<table" in html
    for png in reports[0].parent.glob("*.png"):
        assert png.stat().st_size > 5_000
        from PIL import Image

        with Image.open(png) as im:
            assert len(set(im.convert("L").getdata())) > 8  # more than a blank canvas
    assert "<h2>Failures</h2>" in markdown_to_html("## Failures\n\n- **x**: boom\n")


def _rkh_item() -> pystac.Item:
    """A local STAC item for the real L2A tile 29RKH (COGs in ../shared/data), properties from its real item."""
    folder = shared("s2-l2a-tile-29RKH-100m")
    src = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    with rasterio.open(folder / "B02.tif") as ds:
        transform, shape = list(ds.transform)[:6], list(ds.shape)
    props = dict(src["properties"])
    props.update({"proj:transform": transform, "proj:shape": shape, "s2:mgrs_tile": "29RKH"})
    item = pystac.Item(src["id"], src["geometry"], src["bbox"], pystac.utils.str_to_datetime(props["datetime"]),
                       props, collection="s2-l2a-29rkh")
    for b in ("B02", "B03", "B04", "B08", "B11", "B12", "SCL"):
        item.add_asset(b, pystac.Asset(str(folder / f"{b}.tif"), media_type=pystac.MediaType.COG,
                                       extra_fields={"eo:bands": [{"name": b}]} if b != "SCL" else {}))
    return item


def test_real_l2a_tile_29rkh_end_to_end(tmp_path):
    from cloudfree.catalogs.local import write_geoparquet
    from cloudfree.pipeline.config import load_config
    from cloudfree.pipeline.runner import run
    from cloudfree.stages.mosaic import seam_ratio
    from cloudfree.stages.publish import check_item

    item = _rkh_item()
    cat = write_geoparquet([item], tmp_path / "rkh.parquet")
    cfg = load_config(None, env=False).replace(
        catalog={"url": str(cat), "collection": "s2-l2a-29rkh"}, search={"targets": [item.id]},
        grid={"resolution": 100}, mask={"methods": ["scl"]}, tile={"size": 256, "blend": "feather"},
        model={"name": "dcp"}, output={"dir": str(tmp_path / "out")}, run={"progress": False})
    [res] = run(cfg)
    assert res.status == "done", res.error
    for key in ("reflectance", "confidence", "source", "mask_provenance"):
        ok, errors, _ = cog_validate(res.outputs[key], quiet=True)
        assert ok, (key, errors)
    assert check_item(res.outputs["item"]) == []
    with rasterio.open(res.outputs["reflectance"]) as ds:
        assert ds.shape == (1098, 1098) and ds.crs.to_epsg() == 32629
        refl = ds.read().astype(np.float32)
    refl[refl == 0] = np.nan
    ratio = seam_ratio(refl, 256)
    print(f"29RKH dcp feather seam ratio {ratio:.3f}")
    assert ratio < 1.1
    with rasterio.open(res.outputs["mask_provenance"]) as ds:
        bits = ds.read(1)
    assert 0.02 < (bits & 2 > 0).mean() < 0.2  # SCL flags ~4 % (cirrus + cloud), dilated
    assert res.stats["masked_before"] > 0.02
    assert len(res.tile_seconds) == 25
    assert (Path(cfg.output.dir) / "reports").is_dir()
