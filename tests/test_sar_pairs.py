"""`cloudfree train sar-pairs`: co-located S1 RTC + S2 L2A pairs with REAL SAR, end to end through the Planetary
Computer replay server of the real-catalogs work (tests/backend_server.py: STAC API, SAS token endpoint, blob store
with Range requests that refuses unsigned reads).

What is real: the items (Planetary Computer's recorded ``sentinel-2-l2a`` and ``sentinel-1-rtc`` items in
../shared/data/stac), the pixels (BigEarthNet's co-located S1 + S2 L2A patches in ../shared/data/s1s2-pairs-bigearthnet:
S2 DN per band, S1 VV/VH backscatter), pystac-client, GDAL /vsicurl with Range requests, the SAS token flow. What the
test changes, and why: each recorded item is made to describe one served patch (footprint, projection, per-asset
grids, acquisition time from the patch's metadata, processing baseline < 04.00 since the 2017 patches carry no
+1000 offset); asset hrefs point at the server; assets the patches do not have (SCL, AOT, WVP, previews) are
dropped from the S2 items. BigEarthNet's S1 patches store dB, PC's RTC assets linear gamma0: the server serves
``10 ** (dB / 10)`` of the real patch (written to tmp), so the item's own asset metadata (linear, no unit) stays true
and the builder's linear -> dB conversion must give the patch's dB back.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform as warp_transform

from tests.backend_server import BackendServer
from tests.conftest import shared

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: (S2 patch, role): "pair" = its S1 RTC item is in the catalog (linear gamma0 served); "grd" = PC's recorded
#: sentinel-1-grd item describing the patch's S1 as BigEarthNet holds it (GRD, terrain-corrected, dB: proj:* and
#: raster:bands unit dB set, the dB file served as is); "no-s1" = no S1 item; "no-vh" = its S1 RTC item lacks vh
PATCHES = {
    "S2A_MSIL2A_20170613T101031_87_48": "pair",   # Austria/Czechia 33UUP, S1 6.7 h later
    "S2A_MSIL2A_20170617T113321_36_85": "grd",    # Ireland 29UPU, S1 4.8 h earlier
    "S2A_MSIL2A_20171221T112501_56_35": "no-s1",  # Portugal 29SND
    "S2B_MSIL2A_20180204T94161_57_38": "no-vh",   # Finland 35VPK
}


def _recorded_grd(stac_data: Path) -> dict:
    """PC's recorded sentinel-1-grd item (the search cassette of stac-geoparquet's smoke test)."""
    import yaml

    for inter in yaml.safe_load((stac_data / "stac-geoparquet" / "test_smoke_sentinel-1-grd.yaml").read_text())[
            "interactions"]:
        try:
            feats = json.loads(inter["response"]["body"]["string"]).get("features") or []
        except (ValueError, TypeError):
            continue
        if feats:
            return feats[0]
    raise AssertionError("no recorded sentinel-1-grd item")


@pytest.fixture(scope="module")
def ben() -> Path:
    return shared("s1s2-pairs-bigearthnet")


def _s1_of(ben: Path) -> dict[str, tuple[Path, dict]]:
    """S2 patch name -> (S1 patch folder, its metadata)."""
    out = {}
    for d in sorted((ben / "s1").iterdir()):
        meta = json.loads(next(d.glob("*_labels_metadata.json")).read_text())
        out[meta["corresponding_s2_patch"]] = (d, meta)
    return out


def _footprint(path: Path) -> tuple[dict, list[float]]:
    with rasterio.open(path) as ds:
        b = ds.bounds
        xs, ys = warp_transform(ds.crs, "EPSG:4326", [b.left, b.right, b.right, b.left, b.left],
                                [b.top, b.top, b.bottom, b.bottom, b.top])
    return ({"type": "Polygon", "coordinates": [[list(p) for p in zip(xs, ys)]]},
            [min(xs), min(ys), max(xs), max(ys)])


def _grid(path: Path) -> dict:
    with rasterio.open(path) as ds:
        return {"proj:transform": list(ds.transform)[:6], "proj:shape": list(ds.shape), "epsg": ds.crs.to_epsg()}


def _iso(t: str) -> str:
    return datetime.fromisoformat(t.replace(" ", "T")).strftime("%Y-%m-%dT%H:%M:%SZ")


def _catalog_items(ben: Path, stac_data: Path, url: str, tmp: Path) -> tuple[list[dict], dict[str, Path]]:
    """The recorded PC items made to describe the served patches, and the blob path -> file map."""
    s2_rec = json.loads((stac_data / "stac-geoparquet" / "sentinel-2-l2a-pc.json").read_text())
    s1_rec = json.loads((stac_data / "stac-geoparquet" / "sentinel-1-rtc-pc.json").read_text())
    s1_of = _s1_of(ben)
    items, files = [], {}
    for i, (patch, role) in enumerate(PATCHES.items()):
        pdir = ben / "s2" / patch
        meta = json.loads(next(pdir.glob("*_labels_metadata.json")).read_text())
        geom, bbox = _footprint(pdir / f"{patch}_B02.tif")
        s2 = copy.deepcopy(s2_rec[i])
        s2.update(geometry=geom, bbox=bbox, links=[])
        s2["properties"].update({"datetime": _iso(meta["acquisition_date"]), "proj:epsg": _grid(pdir / f"{patch}_B02.tif")["epsg"],
                                 "s2:processing_baseline": "02.05", "platform": f"Sentinel-2{patch[2]}",
                                 "s2:mgrs_tile": re.search(r"_T(\d\d[A-Z]{3})_", meta["tile_source"]).group(1)})
        for key in list(s2["assets"]):
            if key not in S2_BANDS:
                del s2["assets"][key]
                continue
            a = s2["assets"][key]
            src = pdir / f"{patch}_{key}.tif"
            blob = f"sentinel2l2a01/sentinel2-l2/{patch}/{key}.tif"
            files[blob] = src
            a["href"] = f"{url}/blob/{blob}"
            a.pop("proj:bbox", None)
            g = _grid(src)
            a["proj:transform"], a["proj:shape"] = g["proj:transform"], g["proj:shape"]
            a["gsd"] = abs(g["proj:transform"][0])
        items.append(s2)
        if role == "no-s1":
            continue
        s1dir, s1meta = s1_of[patch]
        geom1, bbox1 = _footprint(next(s1dir.glob("*_VV.tif")))
        g = _grid(next(s1dir.glob("*_VV.tif")))
        if role == "grd":
            grd = copy.deepcopy(_recorded_grd(stac_data))
            grd.update(geometry=geom1, bbox=bbox1, links=[])
            grd["properties"].update({"datetime": _iso(s1meta["acquisition_time"]), "proj:epsg": g["epsg"],
                                      "proj:transform": g["proj:transform"], "proj:shape": g["proj:shape"]})
            for pol in ("vv", "vh"):
                blob = f"sentinel1euwest/s1-grd/{s1dir.name}/iw-{pol}.tiff"
                files[blob] = next(s1dir.glob(f"*_{pol.upper()}.tif"))
                grd["assets"][pol]["href"] = f"{url}/blob/{blob}"
                grd["assets"][pol]["raster:bands"] = [{"unit": "dB", "data_type": "float32"}]
            items.append(grd)
            continue
        s1 = copy.deepcopy(s1_rec[i])
        s1.update(geometry=geom1, bbox=bbox1, links=[])
        s1["properties"].update({"datetime": _iso(s1meta["acquisition_time"]), "proj:epsg": g["epsg"],
                                 "proj:transform": g["proj:transform"], "proj:shape": g["proj:shape"]})
        s1["properties"].pop("proj:bbox", None)
        for pol in ("vv", "vh"):
            with rasterio.open(next(s1dir.glob(f"*_{pol.upper()}.tif"))) as ds:
                prof, db = ds.profile, ds.read(1)
            lin = tmp / f"{s1dir.name}_{pol}_linear.tif"
            prof.update(dtype="float32", nodata=-32768)
            with rasterio.open(lin, "w", **prof) as out:
                out.write((10.0 ** (db / 10.0)).astype(np.float32), 1)
            blob = f"sentinel1euwestrtc/sentinel1-grd-rtc/{s1dir.name}/iw-{pol}.rtc.tiff"
            files[blob] = lin
            s1["assets"][pol]["href"] = f"{url}/blob/{blob}"
        if role == "no-vh":
            del s1["assets"]["vh"]
        items.append(s1)
    return items, files


@pytest.fixture()
def pc(ben, stac_data, tmp_path):
    """A running PC replay (signed blob reads only) and its catalog config."""
    files: dict[str, Path] = {}
    with BackendServer(lambda p: files.get(p), require_sig=True) as srv:
        items, fmap = _catalog_items(ben, stac_data, srv.url, tmp_path)
        files.update(fmap)
        srv.items = items
        cat = {"kind": "planetary-computer", "url": srv.url + "/stac", "sas_url": srv.url + "/sas/token",
               "blob_endpoint": srv.url + "/blob", "allow_local_hrefs": True, "max_retries": 0}
        yield srv, cat


def _open(cat: dict):
    from cloudfree.catalogs.base import open_catalog
    from cloudfree.pipeline.config import CatalogConfig

    return open_catalog(CatalogConfig(**cat))


def test_pairs_from_planetary_computer_replay(pc, ben, tmp_path) -> None:
    from cloudfree.pipeline.training.sar_pairs import PairSpec, build_sar_pairs

    srv, cat = pc
    out = tmp_path / "pairs"
    spec = PairSpec(period="2017-01-01/2018-12-31", max_days=1.0, sar_collection="sentinel-1-rtc,sentinel-1-grd")
    res = build_sar_pairs(_open(cat), spec, out)
    assert srv.refused == [] and srv.tokens_issued >= 1 and srv.blob_reads > 0  # every read signed
    pairs = [p for p, role in PATCHES.items() if role in ("pair", "grd")]
    s2_ids = {it["id"]: it for it in srv.items if it["collection"] == "sentinel-2-l2a"}
    patch_of = {i: p for i, p in zip(s2_ids, PATCHES)}
    assert sorted(patch_of[i] for i in res.built) == sorted(pairs)
    # bad input: named item, and the fix
    why = {patch_of[s.id]: s.reason for s in res.skipped}
    assert set(why) == {"S2A_MSIL2A_20171221T112501_56_35", "S2B_MSIL2A_20180204T94161_57_38"}
    no_s1 = why["S2A_MSIL2A_20171221T112501_56_35"]
    assert "no scene of sentinel-1-rtc,sentinel-1-grd" in no_s1 and "within 1 days" in no_s1 and "--max-days" in no_s1
    no_vh = why["S2B_MSIL2A_20180204T94161_57_38"]
    s1_d = next(it["id"] for it in srv.items if it["collection"] == "sentinel-1-rtc" and "vh" not in it["assets"])
    assert s1_d in no_vh and "['vh']" in no_vh and "--pols vv" in no_vh
    s1_of = _s1_of(ben)
    for s2_id in res.built:
        patch = patch_of[s2_id]
        folder = out / "pairs" / s2_id
        rec = json.loads((folder / "pair.json").read_text())
        # grid: the S2 patch's own 10 m grid, both rasters on it
        with rasterio.open(ben / "s2" / patch / f"{patch}_B02.tif") as ds:
            grid = (ds.crs.to_epsg(), tuple(ds.transform)[:6], ds.shape)
        for name in ("s2.tif", "s1.tif"):
            with rasterio.open(folder / name) as ds:
                assert (ds.crs.to_epsg(), tuple(ds.transform)[:6], ds.shape) == grid, name
        assert rec["grid"]["shape"] == [120, 120] and rec["grid"]["epsg"] == grid[0]
        # optical: the patch's DN / 10000 at 10 m, exactly
        with rasterio.open(folder / "s2.tif") as ds:
            refl, names = ds.read(), ds.descriptions
        assert names == S2_BANDS
        with rasterio.open(ben / "s2" / patch / f"{patch}_B04.tif") as src:
            np.testing.assert_allclose(refl[S2_BANDS.index("B04")], src.read(1) / 10000.0, rtol=1e-6)
        # SAR: real backscatter in dB, the patch's values back after linear -> dB, in a plausible range
        with rasterio.open(folder / "s1.tif") as ds:
            db, pols, units = ds.read(), ds.descriptions, ds.units
        assert pols == ("vv", "vh") and units == ("dB", "dB")
        s1dir, s1meta = s1_of[patch]
        for k, pol in enumerate(("VV", "VH")):
            with rasterio.open(next(s1dir.glob(f"*_{pol}.tif"))) as src:
                np.testing.assert_allclose(db[k], src.read(1), atol=1e-3)
        assert np.isfinite(db).all()
        vv, vh = np.median(db[0]), np.median(db[1])
        assert -25 < vv < 0 and -32 < vh < -5 and vh < vv, (vv, vh)  # land: VH several dB below VV
        # provenance: ids, time gap, hrefs unsigned and on the blob store
        s1_id = rec["s1"]["id"]
        assert rec["s2"]["id"] == s2_id and rec["s1"]["kind"] == ("GRD" if PATCHES[patch] == "grd" else "RTC")
        expected_gap = (datetime.fromisoformat(s1meta["acquisition_time"]) - datetime.fromisoformat(
            json.loads(next((ben / "s2" / patch).glob("*_labels_metadata.json")).read_text())["acquisition_date"])
        ).total_seconds() / 3600
        assert rec["time_gap_hours"] == pytest.approx(expected_gap, abs=0.01) and abs(expected_gap) < 24
        assert set(rec["s2"]["assets"]) == set(S2_BANDS) and set(rec["s1"]["assets"]) == {"vv", "vh"}
        assert all("/blob/" in h and "sig=" not in h and "?" not in h
                   for h in [*rec["s2"]["assets"].values(), *rec["s1"]["assets"].values()])
        assert s1_id in {it["id"] for it in srv.items}
        assert rec["sar_valid_fraction"] == 1.0 and rec["pixels"] == 120 * 120
        co = rec["coregistration"]  # estimated by the pipeline's estimator, recorded only
        assert co["applied"] is False and co["band"] == "B08" and co["status"] != "failed", co
        assert len(co["misregistration_px"]) == 2 and co["n_pixels"] > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and summary["distinct_s2_images"] == 2 and summary["distinct_s1_scenes"] == 2
    assert summary["pixels"] == 2 * 120 * 120 and summary["built_now"] == 2 and len(summary["skipped"]) == 2
    assert 4.0 < summary["time_gap_hours"]["min"] < summary["time_gap_hours"]["max"] < 7.0
    assert "sig=" not in (out / "summary.json").read_text()
    assert sorted(g["shape"] for g in summary["grids"]) == [[120, 120], [120, 120]]  # two places, one date each
    assert sorted(len(g["dates"]) for g in summary["grids"]) == [1, 1]
    # the SEN12MS-CR-TS layout (what `cloudfree train MODEL` reads with data.source: sen12ms-cr-ts)
    from cloudfree.pipeline.training.datasets import _TS_NAME
    from cloudfree.pipeline.training.sar_pairs import export_sen12ms_cr_ts

    info = export_sen12ms_cr_ts(out, tmp_path / "ts")
    small = export_sen12ms_cr_ts(out, tmp_path / "ts64", patch=64)  # 120 px: patches at 0 and 56 in each axis
    assert small["files"] == 2 * 2 * 4 and len(list((tmp_path / "ts64").glob("cloudfree/*/S2/*"))) == 2 * 4
    last = next((tmp_path / "ts64").glob("cloudfree/33UUP*/S2/3/*.tif"))  # the patch at (56, 56) of 87_48
    with rasterio.open(last) as ds, rasterio.open(ben / "s2" / "S2A_MSIL2A_20170613T101031_87_48" /
                                                  "S2A_MSIL2A_20170613T101031_87_48_B02.tif") as src:
        np.testing.assert_array_equal(ds.read(2), src.read(1)[56:, 56:])
        assert ds.transform.c == src.transform.c + 560 and ds.transform.f == src.transform.f - 560
    assert info["tiles"] == 2 and len(info["single_date_grids"]) == 2 and info["files"] == 4
    s2_files = sorted((tmp_path / "ts").glob("cloudfree/*/S2/0/*.tif"))
    assert len(s2_files) == 2 and all(_TS_NAME.match(f.name) for f in s2_files)
    for f in s2_files:
        m = _TS_NAME.match(f.name)
        rec = next(json.loads((out / "pairs" / i / "pair.json").read_text()) for i in res.built
                   if json.loads((out / "pairs" / i / "pair.json").read_text())["s2"]["datetime"][:10] == m["date"])
        patch = patch_of[rec["s2"]["id"]]
        with rasterio.open(f) as ds:
            dn = ds.read()
        assert dn.shape == (13, 120, 120) and dn.dtype == np.uint16 and not dn[10].any()  # B10 zeros
        with rasterio.open(ben / "s2" / patch / f"{patch}_B04.tif") as src:
            np.testing.assert_array_equal(dn[3], src.read(1))  # the patch's own DN back
        s1_file = f.parents[2] / "S1" / "0" / f.name.replace("s2_", "s1_", 1)
        with rasterio.open(s1_file) as ds, rasterio.open(out / "pairs" / rec["s2"]["id"] / "s1.tif") as pair:
            np.testing.assert_array_equal(ds.read(), pair.read())
    # resume: a rerun reads no pixel and keeps the files
    before = {p: p.read_bytes() for p in out.rglob("*.tif")}
    reads = srv.blob_reads
    again = build_sar_pairs(_open(cat), spec, out)
    assert sorted(again.existing) == sorted(res.built) and again.built == []
    assert srv.blob_reads == reads
    assert {p: p.read_bytes() for p in out.rglob("*.tif")} == before
    assert not (out / ".staging").exists() or not list((out / ".staging").iterdir())  # no half-written pair left


def test_no_pair_at_all_names_every_item_and_the_fix(pc, tmp_path) -> None:
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.pipeline.training.sar_pairs import PairSpec, build_sar_pairs

    srv, cat = pc
    with pytest.raises(InputDataError) as ei:  # 0.1 day: every S1 scene is 4.8 h or more away
        build_sar_pairs(_open(cat), PairSpec(period="2017-01-01/2018-12-31", max_days=0.1), tmp_path / "none")
    msg = str(ei.value)
    assert "no S1+S2 pair could be built from 4 S2 item(s)" in msg
    for it in srv.items:
        if it["collection"] == "sentinel-2-l2a":
            assert it["id"] in msg
    assert "--max-days" in msg
    assert srv.blob_reads == 0  # nothing was read for items that cannot be paired


def test_cli_sar_pairs_with_bbox_cuts_the_grid(pc, ben, tmp_path) -> None:
    """`cloudfree train sar-pairs` (CLI, catalog from a config file): a bbox inside one patch gives a pair on that
    window of the patch's grid (pixel edges kept), and the summary line reports it."""
    from click.testing import CliRunner

    from cloudfree.pipeline.cli import main

    srv, cat = pc
    patch = "S2A_MSIL2A_20170613T101031_87_48"
    s2 = next(it for it, p in zip((i for i in srv.items if i["collection"] == "sentinel-2-l2a"), PATCHES)
              if p == patch)
    with rasterio.open(ben / "s2" / patch / f"{patch}_B02.tif") as ds:
        t, crs = ds.transform, ds.crs
    # a window of rows 20-79, cols 30-89, as lon/lat (inside the patch)
    xs, ys = warp_transform(crs, "EPSG:4326", [t.c + 31 * 10, t.c + 89 * 10], [t.f - 79 * 10, t.f - 21 * 10])
    cfg = tmp_path / "pc.yaml"
    cfg.write_text(json.dumps({"catalog": cat}))
    out = tmp_path / "cli-pairs"
    r = CliRunner().invoke(main, ["train", "sar-pairs", "-c", str(cfg), "--bbox", str(xs[0]), str(ys[0]), str(xs[1]),
                                  str(ys[1]), "--period", "2017-06", "--max-days", "1", "--bands", "B02,B04,B08",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 pair(s)" in r.output and "1 distinct S2 image(s)" in r.output
    with rasterio.open(out / "pairs" / s2["id"] / "s2.tif") as ds:
        got_t, shape, b02 = ds.transform, ds.shape, ds.read(1)
    assert got_t.a == 10 and (got_t.c - t.c) % 10 == 0 and (got_t.f - t.f) % 10 == 0  # the patch's pixel edges
    assert 55 <= shape[0] <= 65 and 55 <= shape[1] <= 65
    r0, c0 = int(round((t.f - got_t.f) / 10)), int(round((got_t.c - t.c) / 10))
    with rasterio.open(ben / "s2" / patch / f"{patch}_B02.tif") as src:
        np.testing.assert_allclose(b02, src.read(1)[r0:r0 + shape[0], c0:c0 + shape[1]] / 10000.0, rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pixels"] == shape[0] * shape[1] and summary["catalog"]["kind"] == "planetary-computer"
    # the SEN12MS-CR-TS layout needs every L2A band: pairs of 3 bands are refused, naming the pair and the fix
    r = CliRunner().invoke(main, ["train", "sar-pairs", "-c", str(cfg), "--bbox", str(xs[0]), str(ys[0]), str(xs[1]),
                                  str(ys[1]), "--period", "2017-06", "--max-days", "1", "--bands", "B02,B04,B08",
                                  "--out", str(out), "--sen12ms-cr-ts", str(tmp_path / "ts")])
    assert r.exit_code == 2 and s2["id"] in r.output and "default --bands" in r.output
    # bad input through the CLI: an exit status 2 and one error line naming the items and the fix
    r = CliRunner().invoke(main, ["train", "sar-pairs", "-c", str(cfg), "--period", "2017-12", "--out",
                                  str(tmp_path / "none")])
    assert r.exit_code == 2 and "no S1+S2 pair could be built" in r.output and "--max-days" in r.output
    # a grid above --max-pixels: the item is skipped, naming it and the fix, before any pixel is read
    reads = srv.blob_reads
    r = CliRunner().invoke(main, ["train", "sar-pairs", "-c", str(cfg), "--period", "2017-06", "--max-days", "1",
                                  "--max-pixels", "1000", "--out", str(tmp_path / "big")])
    assert r.exit_code == 2 and "above grid.max_pixels 1,000" in r.output and s2["id"] in r.output
    assert "--max-pixels" in r.output
    assert srv.blob_reads == reads


def test_train_help_lists_sar_pairs_and_model_training_still_parses() -> None:
    from click.testing import CliRunner

    from cloudfree.pipeline.cli import main

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "sar-pairs" in r.output and "MODEL" in r.output
    r = CliRunner().invoke(main, ["train", "sar-pairs", "--help"])
    assert r.exit_code == 0 and "SEN12MS-CR-TS" in r.output and "--max-days" in r.output
    r = CliRunner().invoke(main, ["train", "no-such-model", "--steps", "1"])
    assert r.exit_code == 2 and "no-such-model" in r.output


def test_raw_grd_in_radar_geometry_is_refused_with_the_fix(stac_data) -> None:
    """PC's sentinel-1-grd as recorded (amplitude DN in radar geometry, no proj:*): never turned into 'dB'."""
    import pystac

    from cloudfree.pipeline.training.sar_pairs import backscatter_problem

    grd = pystac.Item.from_dict(_recorded_grd(stac_data))
    why = backscatter_problem(grd, ("vv", "vh"))
    assert why is not None and grd.id in why and "radar geometry" in why and "'vv'" in why


def test_choose_sar_names_the_raw_grd_scene_and_the_fix(ben, stac_data, tmp_path) -> None:
    """Through a real catalog backend (a local item collection): an S2 item whose only S1 within the window is a
    raw GRD scene gets the message naming both items and the fix; nothing is read."""
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.pipeline.training.sar_pairs import PairSpec, choose_sar

    items, _ = _catalog_items(ben, stac_data, "http://127.0.0.1:9", tmp_path)
    s2 = next(it for it in items if it["collection"] == "sentinel-2-l2a")
    grd = copy.deepcopy(_recorded_grd(stac_data))
    grd.update(geometry=s2["geometry"], bbox=s2["bbox"], links=[])
    grd["properties"]["datetime"] = s2["properties"]["datetime"]
    path = tmp_path / "items.json"
    path.write_text(json.dumps([s2, grd]))
    cat = LocalCatalog(path)
    [s2_item] = [it for it in cat._load() if it.id == s2["id"]]
    with pytest.raises(InputDataError) as ei:
        choose_sar(cat, s2_item, PairSpec(sar_collection="sentinel-1-grd"))
    msg = str(ei.value)
    assert s2["id"] in msg and grd["id"] in msg and "use sentinel-1-rtc" in msg and "geocode" in msg

