"""The main job end to end on the demo catalog: real S2 pixels, simulated clouds with a known truth."""

from __future__ import annotations

import json

import numpy as np
import pystac
import pytest
import rasterio
from rio_cogeo.cogeo import cog_info, cog_validate

from cloudfree.pipeline.contract import SOURCE_OPENED, SOURCE_REFERENCE_BASE, SOURCE_TARGET, SOURCE_UNFILLED

TARGET = "S2A_T33UUU_20170216_SIMCLOUDY"
THIN = "S2B_T33UUU_20170226_SIMTHIN"
BEFORE, AFTER = "S2A_T33UUU_20170206_SIMREF", "S2B_T33UUU_20170313_SIMREF"


def _result(demo_run, target=TARGET):
    return next(r for r in demo_run if r.target_id == target)


def test_demo_finds_both_targets_with_bracketing_references(demo_run):
    assert {r.target_id for r in demo_run} == {TARGET, THIN}
    for r in demo_run:
        assert r.status == "done", r.error
    # the reference policy brackets each target in time: one reference before and one after it
    # (SIMCLOUDY 2017-02-16: 02-06 and 03-13; SIMTHIN 2017-02-26: 03-13 and 02-06), best-scored first
    assert _result(demo_run, TARGET).references == [BEFORE, AFTER]
    assert _result(demo_run, THIN).references == [AFTER, BEFORE]


@pytest.mark.parametrize("target", [TARGET, THIN])
def test_cloudy_pixels_move_closer_to_truth(demo_run, target):
    m = _result(demo_run, target).metrics
    assert m["simulated"] is True
    # measured on the simulated-cloudy pixels (t < 0.95) against the real cloud-free pixels; the default model
    # (median-composite) measured 5.00 -> 19.55 dB (SIMCLOUDY) and 7.56 -> 22.14 dB (SIMTHIN) on cloudy pixels
    assert m["psnr_after_cloudy"] > m["psnr_before_cloudy"] + 10, m
    assert m["psnr_after_all"] > m["psnr_before_all"] + 10, m
    assert m["after_scored_fraction_cloudy"] > 0.999, m  # the PSNR is over (nearly) every cloudy pixel, not a subset


def test_outputs_are_valid_cogs(demo_run):
    out = _result(demo_run).outputs
    for key in ("reflectance", "confidence", "source"):
        ok, errors, warnings = cog_validate(out[key], quiet=True)
        assert ok, (key, errors)
        info = cog_info(out[key])
        assert info.IFD and len(info.IFD) > 1, f"{key}: no overviews"
        assert info.Profile.Tiled
    with rasterio.open(out["reflectance"]) as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0
        assert ds.compression.name.lower() == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        assert ds.scales[0] == 1e-4
        assert list(ds.descriptions) == ["B02", "B03", "B04", "B08", "B11", "B12"]
        assert ds.block_shapes[0] == (512, 512)
        assert ds.crs.to_epsg() == 32633 and ds.shape == (768, 1536)
    with rasterio.open(out["confidence"]) as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        conf = ds.read(1)
    with rasterio.open(out["source"]) as ds:
        src = ds.read(1)
    assert set(np.unique(src)) <= {SOURCE_TARGET, SOURCE_UNFILLED, SOURCE_OPENED, SOURCE_REFERENCE_BASE,
                                   SOURCE_REFERENCE_BASE + 1}
    # flagged specks the mask refinement's opening removed are kept as observed, never as clear (confidence < 1)
    assert (conf[src == SOURCE_OPENED] < 100).all()
    # kept target pixels are clear (100); masked (thin) cloud no reference could fill is labelled unfilled (0)
    assert set(np.unique(conf[src == SOURCE_TARGET])) == {100}
    assert set(np.unique(conf[src == SOURCE_UNFILLED])) <= {0} and (src == SOURCE_UNFILLED).mean() < 0.05
    assert (conf[src >= SOURCE_REFERENCE_BASE] < 100).all()
    assert 0.3 < (src >= SOURCE_REFERENCE_BASE).mean() < 0.8  # about the simulated cloud + shadow cover


def test_stac_item_links_every_input_and_records_processing(demo_run, demo_config):
    r = _result(demo_run)
    d = json.loads(r.outputs["item"].read_text())
    item = pystac.Item.from_dict(d)
    derived = {link.extra_fields.get("id") for link in item.links if link.rel == "derived_from"}
    assert derived == {TARGET, *r.references}
    assert any("processing" in e for e in item.stac_extensions)
    assert item.properties["processing:lineage"].startswith("cloud removal of")
    assert item.properties["cloudfree:model"]["name"] == demo_config.model.name
    assert item.properties["cloudfree:simulated_inputs"] is True
    assert [h["item"] for h in item.properties["cloudfree:harmonisation"]] == [TARGET, *r.references]
    assert set(item.assets) >= {"reflectance", "confidence", "source", "quicklook"}
    assert item.assets["reflectance"].extra_fields["file:checksum"].startswith("1220")
    assert r.outputs["quicklook"].stat().st_size > 10_000


def test_rerun_resumes_and_overwrite_redoes(demo_config, demo_run):
    from cloudfree.pipeline.runner import run

    again = run(demo_config)
    assert {r.status for r in again} == {"skipped"}
    item = _result(demo_run).outputs["item"]
    before = item.stat().st_mtime_ns
    redo = run(demo_config.replace(output={"overwrite": True}, search={"targets": [TARGET]}))
    assert [r.status for r in redo] == ["done"] and item.stat().st_mtime_ns > before
    out = item.parent.parent
    assert not list(out.glob(".staging-*")) and not list((out / ".staging").glob("*")), "staging left behind"


def test_relative_output_dir_as_make_demo_uses(demo_config, tmp_path, monkeypatch):
    """`make demo` runs with the config's relative `output.dir` (outputs/demo): outputs land there, not in a
    doubled outputs/demo/outputs/demo, and the item is where the runner reports it."""
    from cloudfree.pipeline.runner import run

    monkeypatch.chdir(tmp_path)
    res = run(demo_config.replace(output={"dir": "outputs/demo"}, search={"targets": [THIN]},
                                  model={"name": "reference-replace"}))
    assert [r.status for r in res] == ["done"], [r.error for r in res]
    item = res[0].outputs["item"]
    assert item.is_file() and item.resolve().parent.parent == (tmp_path / "outputs" / "demo").resolve()
    assert not (tmp_path / "outputs" / "demo" / "outputs").exists()
