"""SAR reaches the models: real Sentinel-1 (s1-uk-10m) loaded on the output grid, a known S1->S2 offset estimated and
applied, converted to dB in [-25, 0], and cut per tile with the halo; a model that needs SAR fails without it."""

from __future__ import annotations

from datetime import datetime, timezone

import dask
import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from scipy import ndimage

from cloudfree.models.base import ModelSpec, RemovalModelBase
from cloudfree.pipeline.config import Config
from cloudfree.pipeline.contract import SOURCE_TARGET, TileResult
from cloudfree.stages.remove import SceneInputs, remove_clouds
from cloudfree.stages.sar import linear_to_db_clipped, prepare_model_sar
from cloudfree.stages.tile import plan_tiles
from tests.conftest import shared

OFFSET = (1.3, -0.6)


def _item(path, item_id) -> pystac.Item:
    item = pystac.Item(item_id, None, None, datetime(2019, 6, 1, tzinfo=timezone.utc), {})
    item.add_asset("vv", pystac.Asset(str(path), media_type="image/tiff",
                                      extra_fields={"eo:bands": [{"name": "vh"}, {"name": "vv"}, {"name": "x"}]}))
    return item


def _sar_candidate(item: pystac.Item):
    from cloudfree.stages.search import Candidate

    return Candidate(item=item, dt_days=0.0, clear_fraction=1.0, overlap=1.0, same_orbit=True, same_tile=True,
                     score=1.0, reason="test")


@pytest.fixture(scope="module")
def s1_scene(tmp_path_factory):
    folder = shared("s1-uk-10m")
    src = next(folder.glob("*.tif"))
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read().astype(np.float32)
    moved = np.stack([np.clip(ndimage.shift(b, OFFSET, order=3, mode="nearest"), 1e-6, None) for b in data])
    out = tmp_path_factory.mktemp("s1") / "moved.tif"
    with rasterio.open(out, "w", **profile) as ds:
        ds.write(moved)
    geobox = GeoBox((profile["height"], profile["width"]), profile["transform"], "EPSG:32630")
    optical = np.load(folder / "2019_mean.npy")[..., 0].astype(np.float32)
    coords = {"y": geobox.coords["y"].values, "x": geobox.coords["x"].values}
    target = xr.DataArray(optical[None], dims=("band", "y", "x"), coords={"band": ["B08"], **coords})
    mask = xr.DataArray(np.zeros(optical.shape, bool), dims=("y", "x"), coords=coords)
    cfg = Config().replace(coregister={"max_shift_px": 8.0}, grid={"chunk": 128})
    return {"orig": _item(src, "S1_ORIG"), "moved": _item(out, "S1_MOVED"), "geobox": geobox, "target": target,
            "mask": mask, "cfg": cfg}


def test_shift_estimated_applied_and_db_convention(s1_scene):
    s = s1_scene
    base, rec_b = prepare_model_sar([s["orig"]], s["target"][0], s["mask"], s["geobox"], s["cfg"], "db")
    moved, rec_m = prepare_model_sar([s["moved"]], s["target"][0], s["mask"], s["geobox"], s["cfg"], "db")
    assert rec_b[0].applied and rec_m[0].applied
    delta = np.subtract(rec_m[0].as_properties()["misregistration_px"], rec_b[0].as_properties()["misregistration_px"])
    assert np.allclose(delta, OFFSET, atol=0.15), delta
    b, m = (np.asarray(a.sel(band="vv")[0]) for a in (base, moved))
    assert np.nanmin(b) >= -25 and np.nanmax(b) <= 0 and list(base.band.values) == ["vv", "vh"]
    raw = s["cfg"].replace(coregister={"enabled": False})
    unaligned, _ = prepare_model_sar([s["moved"]], s["target"][0], s["mask"], s["geobox"], raw, "db")
    u = np.asarray(unaligned.sel(band="vv")[0])
    inner = (slice(16, -16), slice(16, -16))
    err_aligned = np.nanmean(np.abs(m[inner] - b[inner]))
    err_unaligned = np.nanmean(np.abs(u[inner] - b[inner]))
    assert err_aligned < 0.6 * err_unaligned, (err_aligned, err_unaligned)


def test_reference_dates_without_sar_repeat_the_target_scene(s1_scene):
    s = s1_scene
    sar, _ = prepare_model_sar([s["orig"], None, s["moved"]], s["target"][0], s["mask"], s["geobox"],
                               s["cfg"].replace(coregister={"enabled": False}), "linear")
    v = sar.values
    assert v.shape == (3, 2, 256, 256)
    np.testing.assert_array_equal(v[1], v[0])
    assert not np.allclose(v[2], v[0], equal_nan=True)
    np.testing.assert_allclose(linear_to_db_clipped(v[0]), np.clip(10 * np.log10(v[0]), -25, 0), rtol=1e-5)


SEEN: list = []


class RecordingModel(RemovalModelBase):
    name = "recording-sar"
    spec = ModelSpec(bands=("B08",), accepts_sar=True, sar_units="db", halo=8)

    def predict(self, tile):
        SEEN.append((tile.target_id, tile.shape, tile.sar, tile.sar_bands))
        return TileResult(tile.target.copy(), np.ones(tile.shape, np.float32),
                          np.full(tile.shape, SOURCE_TARGET, np.uint8))


def test_tiles_get_their_halo_window_of_sar(s1_scene):
    s = s1_scene
    sar, _ = prepare_model_sar([s["orig"]], s["target"][0], s["mask"], s["geobox"], s["cfg"], "db")
    inputs = SceneInputs(target=s["target"], cloud_mask=s["mask"], cloud_prob=s["mask"].astype(np.float32),
                         references=None, reference_masks=None, target_id="t", sar=sar)
    tiles = plan_tiles((256, 256), 100, 8)
    SEEN.clear()
    ds = remove_clouds(inputs, RecordingModel(), tiles, 8, blend="feather")
    with dask.config.set(scheduler="synchronous"):
        ds.reflectance.values
    full = sar.values
    assert len(SEEN) == len(tiles)
    for t in tiles:
        rec = [x for x in SEEN if x[1] == (t.read[0].stop - t.read[0].start, t.read[1].stop - t.read[1].start)]
        assert any(np.array_equal(x[2], full[:, :, t.read[0], t.read[1]], equal_nan=True) for x in rec), t
    interior = next(t for t in tiles if t.index == (1, 1))
    assert (interior.read[0].stop - interior.read[0].start) == 100 + 2 * 8  # halo on both sides
    assert all(x[3] == ("vv", "vh") for x in SEEN)


def test_model_that_needs_sar_fails_the_target_clearly(demo_config):
    """The demo catalog has no Sentinel-1: a model configured to require it fails each target with the fix named,
    and the batch goes on (every target reported)."""
    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(model={"name": "sar-optical-fusion", "allow_experimental": True,
                                     "allow_level_mismatch": True},
                              output={"dir": str(demo_config.output.dir) + "-needs-sar"})
    results = run(cfg)
    assert results and all(r.status == "failed" for r in results)
    for r in results:
        assert "needs Sentinel-1" in r.error and "sar_collection" in r.error


def _write_db(path, vv_db, vh_db, profile):
    prof = dict(profile, count=2, dtype="float32", nodata=None, driver="GTiff")
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(np.stack([vv_db, vh_db]).astype(np.float32))


def test_run_feeds_one_s1_scene_per_date_to_a_multi_temporal_model(demo_catalog, demo_config, tmp_path):
    """`cloudfree run` with a Sentinel-1 collection: each optical date gets its own S1 scene (searched per date),
    the target's known misregistration is estimated and applied, and a model that requires SAR runs (so every tile
    got it). The S1 here is SIMULATED (training.datasets.simulate_sar on the demo's real pixels): the shared data
    has no S1 co-located with any S2."""
    import json
    from datetime import timedelta

    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.runner import run
    from cloudfree.pipeline.training.datasets import simulate_sar

    target_id = "S2B_T33UUU_20170226_SIMTHIN"
    items = LocalCatalog(demo_catalog)._load()
    truth_href = next(it for it in items if it.id == target_id).assets["truth"].get_absolute_href()
    with rasterio.open(truth_href) as ds:
        profile, truth = ds.profile, ds.read().astype(np.float32) / 1e4  # B02 B03 B04 B08
    docs = [it.to_dict() for it in items]
    rng = np.random.default_rng(0)
    for it in items:
        scaled = simulate_sar(truth, ("B02", "B03", "B04", "B08"), rng)  # same surface every date: no change
        db = scaled * 25 - 25
        if it.id == target_id:
            db = np.stack([ndimage.shift(b, (1.0, -0.5), order=3, mode="nearest") for b in db])
        path = tmp_path / f"S1SIM_{it.id}.tif"
        _write_db(path, db[0], db[1], profile)
        s1 = pystac.Item(f"S1SIM_{it.id}", it.geometry, it.bbox, it.datetime + timedelta(hours=6),
                         {"cloudfree:simulated": True, "platform": "sentinel-1a"}, collection="demo-s1-simulated")
        s1.add_asset("vv", pystac.Asset(str(path), media_type="image/tiff",
                                        extra_fields={"eo:bands": [{"name": "vv"}, {"name": "vh"}],
                                                      "raster:bands": [{"unit": "dB"}, {"unit": "dB"}]}))
        docs.append(s1.to_dict())
    cat = tmp_path / "items.json"
    cat.write_text(json.dumps(docs))
    cfg = demo_config.replace(catalog={"url": str(cat), "sar_collection": "demo-s1-simulated"},
                              model={"name": "ca-mtcr", "params": {"require_sar": True},
                                     "allow_experimental": True, "allow_level_mismatch": True},
                              search={"targets": [target_id]}, output={"dir": str(tmp_path / "out")})
    [res] = run(cfg)
    # the SAR path, not the model's quality (SIMULATED S1, L2A weights on the L1C demo): written, and 'unrestored' only by the output check
    assert res.status == "done" or (res.status == "unrestored" and "output check" in res.error), (res.status, res.error)
    assert res.outputs["reflectance"].exists()
    sar = [c for c in res.coregistration if c["kind"] == "sar"]
    assert [c["id"] for c in sar] == [f"S1SIM_{i}" for i in (target_id, *res.references)]
    assert sar[0]["status"] == "applied"
    assert np.allclose(sar[0]["misregistration_px"], (1.0, -0.5), atol=0.3), sar[0]
    for c in sar[1:]:
        assert np.hypot(*c["misregistration_px"]) < 0.5, c  # unshifted scenes: no (large) shift found
    item = json.loads(res.outputs["item"].read_text())
    assert {c["id"] for c in item["properties"]["cloudfree:coregistration"]} >= {c["id"] for c in sar}


def test_truncated_reference_s1_is_dropped_not_failing_the_target(s1_scene, tmp_path):
    """A reference date's S1 file cut in half passes the one-pixel probe and breaks in the co-registration read:
    that date repeats the target's scene (recorded as failed) instead of failing the whole target."""
    s = s1_scene
    raw = open(s["orig"].assets["vv"].href, "rb").read()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(raw[: len(raw) // 2])
    sar, records = prepare_model_sar([s["orig"], _item(bad, "S1_TRUNCATED")], s["target"][0], s["mask"],
                                     s["geobox"], s["cfg"], "linear")
    v = sar.values
    np.testing.assert_array_equal(v[1], v[0])
    assert [r.status for r in records] == ["applied", "failed"] and "read failed" in records[1].reason
    assert list(sar.id.values) == ["S1_ORIG", "S1_ORIG (repeated)"]  # the plane is the target's, and says so


def test_truncated_s1_only_recorded_fails_only_the_coregistration_record(s1_scene, tmp_path):
    """For a model that does not use SAR the S1 scene is only co-registered for the record: a file cut in half
    gives a 'failed' record, not a failed target."""
    from cloudfree.stages.sar import sar_coregistration_record
    from cloudfree.stages.search import TargetPlan

    s = s1_scene
    raw = open(s["orig"].assets["vv"].href, "rb").read()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(raw[: len(raw) // 2])
    target = pystac.Item("S2_T", None, None, datetime(2019, 6, 1, tzinfo=timezone.utc), {})
    sar = _sar_candidate(_item(bad, "S1_TRUNCATED"))
    rec = sar_coregistration_record(TargetPlan(target, (), (sar,)), s["target"], s["mask"], s["geobox"], s["cfg"])
    assert rec.status == "failed" and rec.id == "S1_TRUNCATED"


def test_unreadable_target_s1_costs_an_sar_accepting_model_only_its_sar(s1_scene, tmp_path):
    """A model that accepts (not needs) SAR: the target's S1 cut in half gives no SAR and a failed record; the
    same file for a model that needs SAR still fails the target."""
    from cloudfree.models.registry import build_model
    from cloudfree.stages.sar import model_sar
    from cloudfree.stages.search import TargetPlan

    s = s1_scene
    raw = open(s["orig"].assets["vv"].href, "rb").read()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(raw[: len(raw) // 2])
    target = pystac.Item("S2_T", None, None, datetime(2019, 6, 1, tzinfo=timezone.utc), {})
    plan = TargetPlan(target, (), (_sar_candidate(_item(bad, "S1_TRUNCATED")),))
    accepts = build_model("sar-optical-fusion", {"require_sar": False})
    assert accepts.spec.accepts_sar and not accepts.spec.needs_sar
    sar, records = model_sar(plan, [], None, s["target"], s["mask"], s["geobox"], s["cfg"], accepts)
    assert sar is None and [(r.id, r.status) for r in records] == [("S1_TRUNCATED", "failed")]
    needs = build_model("sar-optical-fusion")
    with pytest.raises(rasterio.errors.RasterioError):
        model_sar(plan, [], None, s["target"], s["mask"], s["geobox"], s["cfg"], needs)
