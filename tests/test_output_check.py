"""Never a confident wrong answer (issue 18): targets whose output cannot be a cloud-free estimate of their date are
never published as ``done``, and ``--overwrite`` never replaces a ``done`` output with a worse one.

Fault cases from a probe: a target none of whose bands can be read, and a target with one band on another CRS than
its item, were published ``done`` with ~97 % reference pixels under the target's date. Hostile catalogs are
copies of the demo catalog (real T33UUU pixels) with absolute hrefs, as in tests/test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

CLOUDY = "S2A_T33UUU_20170216_SIMCLOUDY"
BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


def _config(demo_config, items: list[dict], tmp: Path, out: Path, **output):
    tmp.mkdir(parents=True, exist_ok=True)
    cat = tmp / "catalog.json"
    cat.write_text(json.dumps(items))
    x0, y0, x1, y1 = items[0]["bbox"]
    aoi = [x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.45 * (x1 - x0), y0 + 0.5 * (y1 - y0)]
    return demo_config.replace(catalog={"url": str(cat)}, search={"aoi": aoi, "targets": [items[0]["id"]]},
                               output={"dir": str(out), "quicklook": False, "overwrite": False, **output})


def _copy(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _others(demo_item_dicts: dict) -> list[dict]:
    return [d for k, d in demo_item_dicts.items() if k != CLOUDY]


def test_target_with_no_readable_band_is_never_done(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.runner import run

    broken = _copy(demo_item_dicts[CLOUDY])
    for b in BANDS:
        broken["assets"][b]["href"] = str(tmp_path / "gone" / f"{b}.tif")  # every band unreadable
    cfg = _config(demo_config, [broken, *_others(demo_item_dicts)], tmp_path / "cat", tmp_path / "out")
    (r,) = run(cfg)
    assert r.status in ("unrestored", "failed"), (r.status, r.error)
    if r.status == "unrestored":
        assert "no target pixel could be read" in r.error
        props = json.loads(r.outputs["item"].read_text())["properties"]
        assert props["cloudfree:status"] == "unrestored" and props["eo:cloud_cover"] == 100.0


def test_target_with_a_band_on_another_crs_is_never_done(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.runner import run

    broken = _copy(demo_item_dicts[CLOUDY])
    src = Path(broken["assets"]["B04"]["href"])
    moved = tmp_path / "B04_other_crs.tif"
    with rasterio.open(src) as ds:
        prof = ds.profile
        data = ds.read()
        assert ds.crs is not None and ds.crs.to_epsg() != 3857
    # the same pixels, labelled with another CRS (EPSG:3857): the item still declares the target's UTM zone
    prof.update(crs="EPSG:3857", driver="GTiff")
    with rasterio.open(moved, "w", **prof) as dst:
        dst.write(data)
    broken["assets"]["B04"]["href"] = str(moved)
    cfg = _config(demo_config, [broken, *_others(demo_item_dicts)], tmp_path / "cat", tmp_path / "out")
    (r,) = run(cfg)
    assert r.status in ("unrestored", "failed"), (r.status, r.error)
    assert "B04" in r.error and "EPSG:3857" in r.error and "proj:" in r.error


def test_overwrite_never_replaces_a_done_output_with_a_worse_one(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.runner import run

    good = _copy(demo_item_dicts[CLOUDY])
    out = tmp_path / "out"
    cfg = _config(demo_config, [good, *_others(demo_item_dicts)], tmp_path / "cat", out)
    (first,) = run(cfg)
    assert first.status == "done", first.error
    item_path = first.outputs["item"]
    before = item_path.read_bytes()
    with rasterio.open(first.outputs["reflectance"]) as ds:
        refl_before = ds.read()
    broken = _copy(good)
    for b in BANDS:
        broken["assets"][b]["href"] = str(tmp_path / "gone" / f"{b}.tif")
    cfg2 = _config(demo_config, [broken, *_others(demo_item_dicts)], tmp_path / "cat2", out, overwrite=True)
    (second,) = run(cfg2)
    assert second.status != "done"
    assert "existing `done` output was kept" in (second.error or "")
    assert item_path.read_bytes() == before  # the done output is untouched
    with rasterio.open(first.outputs["reflectance"]) as ds:
        np.testing.assert_array_equal(ds.read(), refl_before)


ROMANIA = "s2-l2a-stack-romania-nrt"


def test_romania_dates_scl_calls_clear_are_never_cloud_level_and_done(tmp_path):
    """The issue's case: the REAL Romania stack with SCL as the only mask, the default model, 2019-06-11 and
    2019-06-21 (88-92 % cloud; SCL calls part of the cloud snow). Before the fix the outputs had median B02
    0.69-1.05 over a forest whose clear neighbours have ~0.02, published `done`."""
    import yaml

    from cloudfree.pipeline.config import load_config
    from cloudfree.pipeline.runner import run
    from tests.conftest import ROOT, shared

    stac = shared(ROMANIA, "stac", "catalog.json")
    cfg_path = tmp_path / "romania.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "catalog": {"kind": "local", "url": str(stac), "collection": "s2-l2a-romania-nrt"},
        "search": {"period": "2019-06-01/2019-07-31",
                   "targets": ["S2_ROMANIA_20190611", "S2_ROMANIA_20190621"]},
        "grid": {"resolution": 10, "bands": ["B02", "B03", "B04", "B08", "B8A", "B11"]},
        "mask": {"methods": ["scl"]}, "output": {"dir": str(tmp_path / "out"), "quicklook": False},
        "run": {"progress": False}}))
    cfg = load_config(cfg_path, env=False)
    default = load_config(ROOT / "configs" / "demo.yaml", env=False).model.name
    assert cfg.model.name == default  # the config default is the model the demo runs
    results = run(cfg)
    assert len(results) == 2
    day_dir = stac.parent / "s2-l2a-romania-nrt"
    with rasterio.open(day_dir / "S2_ROMANIA_20190616" / "B02.tif") as a, \
            rasterio.open(day_dir / "S2_ROMANIA_20190701" / "B02.tif") as b:
        neighbours = np.stack([a.read(1), b.read(1)]).astype(np.float32) / 1e4
    hi = float(np.percentile(neighbours, 99))
    for r in results:
        assert r.status in ("done", "unrestored"), (r.target_id, r.status, r.error)
        props = json.loads(r.outputs["item"].read_text())["properties"]
        assert props["cloudfree:missed_cloud"]["share"] > 0.02  # SCL missed cloud there, the test found it
        with rasterio.open(r.outputs["reflectance"]) as ds:
            b02 = ds.read(1).astype(np.float32) / 1e4
        if r.status == "done":
            assert float(np.median(b02)) < 2 * float(np.median(neighbours)) + 0.01, (r.target_id, np.median(b02))
            assert float(np.mean(b02 > hi + 0.1)) < 0.005, r.target_id  # no cloud-level area left
        assert any("mask missed cloud" in w for w in r.warnings)
    report = next((tmp_path / "out" / "reports").glob("*/report.md")).read_text()
    assert "## Warnings" in report and "mask missed cloud" in report  # warnings reach the run report
