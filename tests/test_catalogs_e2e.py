"""Every remote backend's items reach the pixels: ``cloudfree run`` against a local server (tests/backend_server.py)
that plays Earth Search, Planetary Computer and Sentinel Hub on 127.0.0.1, through each backend's own code path.

What is real: the items (Earth Search's 29RKH item, Planetary Computer's recorded sentinel-2-l2a search answer,
both in ../shared/data/stac), the pixels (the real 29RKH L2A tile, decimated 10x, in ../shared/data), pystac-client,
odc-stac/GDAL over HTTP with Range requests, the SAS token flow, the sentinelhub package's OAuth + Process API
client. What the tests change, and why: asset hrefs point at the server; every served file is the 29RKH tile's
(PC's recorded items are other tiles, so their footprint, projection and processing baseline are set to the served
tile's, which the pixels must agree with); the items' ``proj:transform``/``proj:shape`` are the decimated files'.
Sentinel Hub's catalog answer is built from the real 29RKH item's fields (no SH response was recorded), and its
CLD/CLP layers are SIMULATED from SCL by the server (the tile has no MSK_CLDPRB).

Each run's COGs are validated and their pixels compared with the source files: clear target pixels must hold the
source DN exactly.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import requests
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rio_cogeo.cogeo import cog_validate

from tests.backend_server import BackendServer
from tests.conftest import shared

AOI = [-11.62, 24.62, -11.38, 24.86]  # ~24 x 27 km inside 29RKH: 240 x 270 px at 100 m
BANDS = ["B02", "B03", "B04", "B08", "B11"]
SOURCE_TARGET = 1


@pytest.fixture(scope="module")
def rkh() -> Path:
    return shared("s2-l2a-tile-29RKH-100m")


def _rkh_file(rkh: Path, name: str) -> Path | None:
    """The 29RKH file a request path names: by band token (``B02.tif``, ``..._B02_10m.tif``, ``SCL``)."""
    import re

    m = re.search(r"(?:^|[_/])(B0[1-9]|B1[0-2]|B8A|SCL|AOT|WVP)(?:_\d+m)?\.tif$", name)
    return rkh / f"{m.group(1)}.tif" if m else None


def _decimated_grid(asset: dict, path: Path | None) -> None:
    """Set an asset's proj:transform/shape to the served (decimated) file's grid."""
    if path is None or "proj:transform" not in asset:
        return
    with rasterio.open(path) as ds:
        asset["proj:transform"] = list(ds.transform)[:6]
        asset["proj:shape"] = list(ds.shape)
    for rb in asset.get("raster:bands", []) or []:
        if "spatial_resolution" in rb:
            rb["spatial_resolution"] = abs(ds.transform.a)
    if "gsd" in asset:
        asset["gsd"] = abs(ds.transform.a)


def _check_outputs(res, rkh: Path, codes: tuple[int, ...] = (SOURCE_TARGET,), server_resamples: bool = False) -> dict:
    """The run's COGs are valid and hold the source DN at every pixel whose source code is in ``codes`` (clear
    target pixels; with identical served references, the pixels a reference filled too); returns the item.
    ``server_resamples``: the server delivered every band on the output grid (Sentinel Hub, nearest)."""
    assert res.status == "done", res.error
    for key in ("reflectance", "confidence", "source", "mask_provenance"):
        ok, errors, _ = cog_validate(res.outputs[key], quiet=True)
        assert ok, (key, errors)
    with rasterio.open(res.outputs["source"]) as ds:
        src_code = ds.read(1)
    with rasterio.open(res.outputs["reflectance"]) as ds:
        out = ds.read()
        names = list(ds.descriptions)
        grid = (ds.crs, ds.transform, ds.shape)
    clear = np.isin(src_code, codes)
    assert clear.mean() > 0.5, clear.mean()
    for i, band in enumerate(BANDS):
        assert names[i] in (band, None, ""), names
        expected = np.zeros(grid[2], np.float32)
        with rasterio.open(rkh / f"{band}.tif") as s:
            # 10 m bands: the served file's own pixels, unresampled; Sentinel Hub: the server's nearest warp
            native = server_resamples or abs(s.transform.a) == abs(grid[1].a)
            reproject(rasterio.band(s, 1), expected, dst_transform=grid[1], dst_crs=grid[0], src_nodata=0,
                      resampling=Resampling.nearest if native else Resampling.bilinear)
        diff = np.abs(out[i][clear].astype(np.float32) - expected[clear])
        if native:
            assert (diff == 0).mean() > 0.999, (band, (diff == 0).mean())
        else:  # 20 m bands upsampled bilinearly by the loader (GDAL): the same up to rounding and edge pixels
            assert np.median(diff) <= 1 and (diff <= 0.02 * expected[clear] + 2).mean() > 0.95, (band, np.median(diff))
    item = json.loads(Path(res.outputs["item"]).read_text())
    return item


def _cfg(tmp_path: Path, catalog: dict, **sections):
    from cloudfree.pipeline.config import load_config

    base = dict(search={"aoi": AOI, "target_cloud_cover": [0, 100]}, grid={"resolution": 100, "bands": BANDS},
                tile={"size": 128}, model={"name": "dcp"}, output={"dir": str(tmp_path / "out"), "report": False},
                run={"progress": False}, coregister={"enabled": False})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return load_config(None, env=False).replace(catalog=catalog, **base)


# -- Earth Search v1 (and any STAC API with common-name keys) ---------------------------------------------------------
def _earth_search_items(rkh: Path, url: str) -> list[dict]:
    item = json.loads((rkh / "S2A_29RKH_20200219_0_L2A.json").read_text())
    for key, asset in item["assets"].items():
        path = asset["href"].split("://", 1)[1].split("/", 1)[1]
        asset["href"] = f"{url}/files/{path}"
        _decimated_grid(asset, _rkh_file(rkh, path) if not key.endswith("-jp2") else None)
    item["links"] = []
    return [item]


@pytest.mark.parametrize("kind", ["earth-search", "stac-api"])
def test_earth_search_run_common_name_keys(kind, rkh, tmp_path) -> None:
    from cloudfree.pipeline.runner import run

    with BackendServer(lambda p: _rkh_file(rkh, p)) as srv:
        srv.items = _earth_search_items(rkh, srv.url)
        assert "blue" in srv.items[0]["assets"] and "B02" not in srv.items[0]["assets"]  # v1 layout
        cfg = _cfg(tmp_path, {"kind": kind, "url": srv.url + "/stac", "collection": "sentinel-2-l2a",
                              "allow_local_hrefs": True})
        [res] = run(cfg)
        item = _check_outputs(res, rkh)
        assert srv.blob_reads > 0
    assert item["properties"]["cloudfree:mask_methods"] == ["scl"]  # auto: the item carries SCL (key `scl`)


def test_earth_search_composite_and_scene(rkh, tmp_path) -> None:
    """``cloudfree composite`` and ``cloudfree scene`` (CLI) read the same remote items through the same path."""
    from click.testing import CliRunner

    from cloudfree.pipeline.cli import main
    from cloudfree.pipeline.composite import run_composite

    region = tmp_path / "region.geojson"
    x0, y0, x1, y1 = AOI
    region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}))
    with BackendServer(lambda p: _rkh_file(rkh, p)) as srv:
        srv.items = _earth_search_items(rkh, srv.url)
        catalog = {"kind": "earth-search", "url": srv.url + "/stac", "collection": "sentinel-2-l2a",
                   "allow_local_hrefs": True}
        [res] = run_composite(_cfg(tmp_path, catalog), region, "2020-02")
        assert res.status == "done", res.error
        item = json.loads(Path(res.item).read_text())
        assert item["properties"]["cloudfree:mask_methods"] == ["scl"]
        with rasterio.open(Path(res.item).parent / item["assets"]["reflectance"]["href"]) as ds:
            out = ds.read(1)
            expected = np.zeros(ds.shape, np.uint16)
            with rasterio.open(rkh / "B02.tif") as s:
                reproject(rasterio.band(s, 1), expected, dst_transform=ds.transform, dst_crs=ds.crs,
                          resampling=Resampling.nearest)
        valid = out > 0
        assert valid.mean() > 0.5 and (out[valid] == expected[valid]).mean() > 0.95  # one date: its clear pixels
        cfg_path = tmp_path / "scene.yaml"
        cfg_path.write_text(json.dumps({"catalog": catalog, **{k: v for k, v in _cfg(tmp_path, catalog).model_dump(
            mode="json").items() if k in ("search", "grid", "tile", "coregister")}}))
        r = CliRunner().invoke(main, ["scene", "S2A_29RKH_20200219_0_L2A", "--config", str(cfg_path), "--model",
                                      "dcp", "--out", str(tmp_path / "scene-out"), "--no-progress"])
        assert r.exit_code == 0, r.output
        assert list((tmp_path / "scene-out").rglob("*_reflectance.tif"))


def test_href_policy_refuses_loopback_without_the_config_key(rkh, tmp_path) -> None:
    from cloudfree.pipeline.runner import run

    with BackendServer(lambda p: _rkh_file(rkh, p)) as srv:
        srv.items = _earth_search_items(rkh, srv.url)
        [res] = run(_cfg(tmp_path, {"kind": "earth-search", "url": srv.url + "/stac",
                                    "collection": "sentinel-2-l2a"}))
        assert srv.blob_reads == 0  # nothing was read
    assert res.status == "failed"
    assert "S2A_29RKH_20200219_0_L2A" in res.error and "catalog.allow_local_hrefs" in res.error
    assert "loopback" in res.error and "'B02'" in res.error


# -- Planetary Computer: lazy signing, a token that expires during the run -------------------------------------------
def _pc_items(rkh: Path, url: str, stac_data: Path) -> list[dict]:
    """Two of PC's recorded sentinel-2-l2a items, made to describe the served 29RKH pixels (see module doc)."""
    es = json.loads((rkh / "S2A_29RKH_20200219_0_L2A.json").read_text())
    recorded = json.loads((stac_data / "stac-geoparquet" / "sentinel-2-l2a-pc.json").read_text())
    out = []
    for n, item in enumerate(copy.deepcopy(recorded[:2])):
        item["geometry"], item["bbox"] = es["geometry"], es["bbox"]
        item["properties"]["proj:epsg"] = 32629
        item["properties"]["s2:processing_baseline"] = es["properties"]["s2:processing_baseline"]
        item["properties"]["s2:mgrs_tile"] = "29RKH"
        item["properties"]["eo:cloud_cover"] = [es["properties"]["eo:cloud_cover"], 1.0][n]
        for key, asset in item["assets"].items():
            u = asset["href"]
            if ".blob.core.windows.net/" in u:
                account = u.split("://", 1)[1].split(".", 1)[0]
                asset["href"] = f"{url}/blob/{account}/{u.split('.blob.core.windows.net/', 1)[1]}"
            served = _rkh_file(rkh, asset["href"])
            if served is None:  # not served (TCI, metadata): its grid is the other tile's
                for k in ("proj:transform", "proj:shape", "proj:bbox"):
                    asset.pop(k, None)
            _decimated_grid(asset, served)
        item["links"] = []
        out.append(item)
    return out


def test_planetary_computer_run_signs_lazily_and_survives_token_expiry(rkh, stac_data, tmp_path) -> None:
    from cloudfree.pipeline.runner import run

    with BackendServer(lambda p: _rkh_file(rkh, p), require_sig=True, token_ttl=3.0, read_delay=0.02,
                       stall_after_reads=5, refresh_margin=1.0) as srv:
        srv.items = _pc_items(rkh, srv.url, stac_data)
        b02 = srv.items[0]["assets"]["B02"]["href"]
        assert requests.get(b02, headers={"Range": "bytes=0-15"}, timeout=5).status_code == 403  # unsigned
        srv.refused.clear()
        cfg = _cfg(tmp_path, {"kind": "planetary-computer", "url": srv.url + "/stac", "collection": "sentinel-2-l2a",
                              "allow_local_hrefs": True, "sas_url": srv.url + "/sas/token",
                              "blob_endpoint": srv.url + "/blob", "sas_refresh_margin": 1.0},
                   search={"targets": [srv.items[0]["id"]], "max_days": 1}, model={"name": "reference-replace"})
        t0 = time.time()
        [res] = run(cfg)
        t1 = time.time()
        item = _check_outputs(res, rkh, codes=(SOURCE_TARGET, 10))  # 10: reference 0 filled the pixel
        assert res.references == [srv.items[1]["id"]]
        assert srv.refused == []  # every blob read carried a valid, unexpired signature
        # the first token expired mid-run (the server holds reads past its expiry), and later reads were signed anew
        late = [t for t in srv.read_times if t > srv.token_expiries[0]]
        assert srv.tokens_issued >= 2 and len(late) >= 5, (srv.tokens_issued, len(late), srv.blob_reads, t1 - t0)
        print(f"PC run {t1 - t0:.1f} s, {srv.blob_reads} signed blob reads, {srv.tokens_issued} tokens of "
              f"{srv.token_ttl:.0f} s issued, {len(srv.refused)} refused")
        first = min(srv.sigs, key=srv.sigs.get)  # the first token, expired by now
        assert requests.get(f"{b02}?sp=rl&sig={first}", headers={"Range": "bytes=0-15"}, timeout=5).status_code == 403
    assert item["properties"]["cloudfree:mask_methods"] == ["scl"]
    assert not any("sig=" in json.dumps(v) for v in item["assets"].values())  # no token in the outputs


# -- Sentinel Hub: Process API, tiled and cached -----------------------------------------------------------------------
def _sh_items(rkh: Path) -> list[dict]:
    """The 29RKH acquisition as Sentinel Hub's Catalog API describes an item (fields of the real item, no assets)."""
    es = json.loads((rkh / "S2A_29RKH_20200219_0_L2A.json").read_text())
    p = es["properties"]
    return [{"type": "Feature", "stac_version": "1.0.0", "id": p["s2:product_uri"].removesuffix(".SAFE"),
             "geometry": es["geometry"], "bbox": es["bbox"], "links": [], "assets": {},
             "properties": {"datetime": p["datetime"], "eo:cloud_cover": p["eo:cloud_cover"], "proj:epsg": 32629,
                            "platform": p["platform"], "instruments": p["instruments"]}}]


def test_sentinel_hub_run_through_process_api(rkh, tmp_path, monkeypatch) -> None:
    from cloudfree.pipeline.runner import run

    monkeypatch.setenv("SH_CLIENT_ID", "local-client")
    monkeypatch.setenv("SH_CLIENT_SECRET", "local-secret")
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the local server speaks http
    files = {b: rkh / f"{b}.tif" for b in (*BANDS, "SCL")}
    with BackendServer(lambda p: None, sh_files=files) as srv:
        srv.items = _sh_items(rkh)
        cat = {"kind": "sentinel-hub", "url": srv.url + "/sh", "collection": "sentinel-2-l2a",
               "cache_dir": str(tmp_path / "sh-cache"), "sh_max_pixels": 128, "max_retries": 0}
        [res] = run(_cfg(tmp_path, cat))
        item = _check_outputs(res, rkh, server_resamples=True)
        reqs = list(srv.process_requests)
        sizes = [(r["output"]["width"], r["output"]["height"]) for r in reqs]
        assert max(max(s) for s in sizes) <= 128 and len(reqs) >= 4
        assert all("B02" in r["evalscript"] and '"SCL"' in r["evalscript"] for r in reqs)
        [again] = run(_cfg(tmp_path, cat, output={"overwrite": True}))
        assert again.status == "done" and len(srv.process_requests) == len(reqs)  # the cache answered
    assert item["properties"]["cloudfree:mask_methods"] == ["scl"]


@pytest.mark.parametrize("kind", ["earth-search", "planetary-computer", "sentinel-hub"])
def test_readme_backend_configs_are_valid(kind) -> None:
    from cloudfree.pipeline.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / f"{kind}.yaml", env=False)
    assert cfg.catalog.kind == kind and cfg.catalog.url.startswith("https://") and cfg.mask.methods == ["auto"]
    assert not cfg.catalog.allow_local_hrefs


def test_planetary_computer_sentinel1_rtc_is_signed(stac_data) -> None:
    """PC's recorded sentinel-1-rtc item (footprint and projection set to the served file's: real S1 backscatter
    from ../shared/data/s1-uk-10m, band 1 as `vv`) is read by the SAR loader through signed hrefs only."""
    from odc.geo.geobox import GeoBox
    from rasterio.warp import transform_bounds

    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.planetary_computer import PlanetaryComputerCatalog
    from cloudfree.pipeline.config import CatalogConfig
    from cloudfree.stages.load import load_sar

    s1 = next(shared("s1-uk-10m").glob("S1_*.tif"))
    with rasterio.open(s1) as ds:
        expected, crs, transform, shape = ds.read(1), ds.crs, ds.transform, ds.shape
        bbox = list(transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
    item = copy.deepcopy(json.loads((stac_data / "stac-geoparquet" / "sentinel-1-rtc-pc.json").read_text())[0])
    x0, y0, x1, y1 = bbox
    item["bbox"], item["geometry"] = bbox, {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1],
                                                                                 [x0, y1], [x0, y0]]]}
    item["properties"].update({"proj:epsg": crs.to_epsg(), "proj:transform": list(transform)[:6],
                               "proj:shape": list(shape)})
    item["links"] = []
    with BackendServer(lambda p: s1 if p.endswith(".rtc.tiff") else None, require_sig=True) as srv:
        for asset in item["assets"].values():
            if ".blob.core.windows.net/" in asset["href"]:
                account = asset["href"].split("://", 1)[1].split(".", 1)[0]
                asset["href"] = f"{srv.url}/blob/{account}/{asset['href'].split('.blob.core.windows.net/', 1)[1]}"
        srv.items = [item]
        cat = PlanetaryComputerCatalog(CatalogConfig(
            kind="planetary-computer", url=srv.url + "/stac", sas_url=srv.url + "/sas/token",
            blob_endpoint=srv.url + "/blob", allow_local_hrefs=True, max_retries=0))
        [found] = cat.search(SearchQuery(collections=("sentinel-1-rtc",)))
        assert "?" not in found.assets["vv"].href  # unsigned until read
        sar = load_sar([found], GeoBox(shape, transform, crs), chunk=128).compute()
        assert srv.refused == [] and srv.tokens_issued == 1 and srv.blob_reads > 0
    got = sar.sel(band="vv").values[0]
    ok = np.isfinite(got) & np.isfinite(expected)
    assert ok.mean() > 0.9 and np.allclose(got[ok], expected[ok], rtol=1e-5)
