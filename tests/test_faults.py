"""The fault suite: hostile input and broken data, each contained with a clear error or an honestly labelled output.

Every case is listed with its outcome in docs/reliability.md. Hostile catalogs are copies of the demo catalog
(tests/conftest.py ``demo_catalog``) written as JSON arrays of items in tmp dirs, with absolute asset hrefs into
the session's demo files; runs use a small AOI so each target computes in a few seconds. HTTP faults come from a
real server on 127.0.0.1 (tests/fault_server.py) talked to by the real pystac-client / requests / sentinelhub.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import yaml

from cloudfree.pipeline.contract import SOURCE_TARGET, SOURCE_UNFILLED
from cloudfree.pipeline.errors import CatalogError, ConfigError, InputDataError, NoItemsFoundError
from cloudfree.pipeline.safety import UnsafePathError, ensure_inside, safe_stem, target_lock
from tests.conftest import ROOT
from tests.fault_server import FaultServer

CLOUDY = "S2A_T33UUU_20170216_SIMCLOUDY"
THIN = "S2B_T33UUU_20170226_SIMTHIN"
#: the demo config's model (the measured default; output folders are named after it)
MODEL = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["name"]
SECRET = "s3cr3t-CLIENT-secret-value-4711"


# -- helpers --------------------------------------------------------------------------------------------------------
def _catalog(tmp: Path, items: list[dict]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / "catalog.json"
    p.write_text(json.dumps(items))
    return p


def _copy(d: dict, **changes) -> dict:
    c = json.loads(json.dumps(d))
    c.update(changes)
    return c


def _small_aoi(d: dict, frac=(0.3, 0.3, 0.42, 0.5)) -> list[float]:
    x0, y0, x1, y1 = d["bbox"]
    return [x0 + frac[0] * (x1 - x0), y0 + frac[1] * (y1 - y0), x0 + frac[2] * (x1 - x0), y0 + frac[3] * (y1 - y0)]


def _cfg(demo_config, cat: Path, out: Path, targets: list[str], aoi, **search):
    return demo_config.replace(catalog={"url": str(cat)}, search={"aoi": aoi, "targets": targets, **search},
                               output={"dir": str(out), "quicklook": False, "overwrite": False})


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _cli(args: list[str], env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cloudfree.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=kw.get("cwd", ROOT))


def _yaml(cfg, path: Path) -> Path:
    data = json.loads(cfg.model_dump_json())
    path.write_text(yaml.safe_dump(data))
    return path


# -- 1. path traversal ----------------------------------------------------------------------------------------------
HOSTILE = ["..", ".", "../../../evil", "/etc/passwd", "a/b\\c", "nul\x00byte", "x" * 5000, "évil id with spaces",
           "", ".hidden", "con.staging+1"]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_ids_map_to_safe_contained_stems(raw, tmp_path):
    stem = safe_stem(raw)
    assert stem and len(stem) <= 120 and not stem.startswith(".")
    assert not set(stem) & set("/\\\x00+ ") and stem not in (".", "..")
    assert ensure_inside(tmp_path, tmp_path / stem / f"{stem}_mask_provenance.tif").parent.parent == tmp_path.resolve()
    others = [safe_stem(h) for h in HOSTILE if h != raw]
    assert stem not in others  # two different ids never share a stem (hash suffix)


def test_ordinary_ids_keep_their_name_and_escapes_are_refused(tmp_path):
    assert safe_stem("S2A_MSIL2A_20240601T101031_R022_T32TQM_20240601T150000") == \
        "S2A_MSIL2A_20240601T101031_R022_T32TQM_20240601T150000"
    for bad in ("../x", "/etc", tmp_path / ".." / "y", tmp_path):
        with pytest.raises(UnsafePathError, match="outside the output folder"):
            ensure_inside(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)  # a symlink inside pointing outside is refused too
    with pytest.raises(UnsafePathError):
        ensure_inside(tmp_path, tmp_path / "link" / "z")


def test_hostile_item_ids_in_a_run_write_only_inside_output_dir(demo_config, demo_item_dicts, tmp_path):
    evil_ids = ["../../../evil", "/abs/" + "y" * 400 + "\x00"]
    items = [_copy(demo_item_dicts[CLOUDY], id=evil_ids[0]), _copy(demo_item_dicts[THIN], id=evil_ids[1])]
    items += [d for k, d in demo_item_dicts.items() if "SIMREF" in k]
    cat = _catalog(tmp_path / "cat", items)
    out = tmp_path / "deep" / "a" / "out"
    from cloudfree.pipeline.runner import output_stem, run

    before = _files(tmp_path)
    res = run(_cfg(demo_config, cat, out, evil_ids, _small_aoi(items[0])))
    assert [r.status for r in res] == ["done", "done"], [r.error for r in res]
    new = _files(tmp_path) - before
    assert new and all(f.startswith("deep/a/out/") for f in new), sorted(new)[:5]
    for rid in evil_ids:
        stem = output_stem(rid, MODEL)
        assert (out / stem / f"{stem}.json").is_file()
        item = json.loads((out / stem / f"{stem}.json").read_text())
        assert item["properties"]["cloudfree:target"] == rid  # the raw id is kept as data, never as a path
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())


# -- 2. secrets in logs, offline search -----------------------------------------------------------------------------
def test_redact_masks_every_credential_form(monkeypatch):
    from cloudfree.pipeline.redact import redact

    monkeypatch.setenv("SH_CLIENT_SECRET", SECRET)
    cases = [
        f"grant_type=client_credentials&client_id=abc&client_secret={SECRET}",
        f"{{'client_secret': '{SECRET}', 'grant_type': 'client_credentials'}}",
        '{"access_token": "eyJhbGciOiJSUzI1NiJ9.payload.sig", "token_type": "Bearer"}',
        "headers {'Authorization': 'Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig'}",
        "https://acc.blob.core.windows.net/c/x.tif?st=2024&se=2024-01-01&sp=rl&sig=AbC%2Bdef%3D",
        "https://user:hunter2pass@example.com/stac",
        f"plain text with the raw secret {SECRET} in it",
    ]
    for text in cases:
        out = redact(text)
        for leak in (SECRET, "eyJhbGciOiJSUzI1NiJ9", "AbC%2Bdef", "hunter2pass"):
            assert leak not in out, (text, out)
    assert "***" in redact(cases[4]) and "se=2024-01-01" in redact(cases[4])  # only the secret part goes


def test_sentinel_hub_secret_never_logged_at_vv_through_a_real_oauth_exchange(tmp_path):
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [[[10, 45], [11, 45], [11, 46], [10, 46], [10, 45]]]}))
    env = {"SH_CLIENT_ID": "fake-client-id-0815", "SH_CLIENT_SECRET": SECRET, "OAUTHLIB_INSECURE_TRANSPORT": "1",
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}  # (plain http to 127.0.0.1)
    with FaultServer() as srv:
        r = _cli(["-vv", "search", "--catalog", "sentinel-hub", "--url", srv.url, "--collection", "sentinel-2-l2a",
                  "--aoi", str(aoi), "--period", "2024-06-01/2024-06-30"], env=env, timeout=120)
        sent = b"".join(body for _, _, body in srv.requests)
    log = r.stdout + r.stderr
    assert SECRET.encode() in sent  # the secret really went over the wire (the OAuth token request) ...
    assert "openid-connect/token" in log and "DEBUG" in log  # ... with third-party DEBUG logging on ...
    assert SECRET not in log and "ACCESS-TOKEN-VALUE-123" not in log  # ... and never reached the output
    assert r.returncode == 1 and "no items in Sentinel Hub catalog" in r.stderr


def test_sentinel_hub_search_offline_fails_fast_and_clearly(tmp_path):
    env = {"SH_CLIENT_ID": "fake-client-id-0815", "SH_CLIENT_SECRET": SECRET,
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    t0 = time.monotonic()
    # the default deployment: on these machines its name does not resolve (no network)
    r = _cli(["-vv", "search", "--catalog", "sentinel-hub", "--url", "https://services.sentinel-hub.invalid",
              "--period", "2024-06"], env=env, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 1 and "is not reachable" in r.stderr and "local catalog" in r.stderr
    assert took < 20, f"offline search took {took:.0f} s"
    assert SECRET not in r.stdout + r.stderr


# -- 3. HTTP faults against the real pystac-client ------------------------------------------------------------------
def _api(srv, **kw):
    from cloudfree.catalogs.stac_api import StacApiCatalog

    return StacApiCatalog(url=srv.url, timeout=kw.pop("timeout", 5.0), max_retries=kw.pop("max_retries", 3),
                          backoff_factor=0.01, **kw)


def test_stac_api_429_and_500_are_retried_then_succeed():
    from cloudfree.catalogs.base import SearchQuery

    with FaultServer() as srv:
        srv.faults["/search"] = [429, 500, 503]
        items = _api(srv).search(SearchQuery(collections=("sentinel-2-l2a",), bbox=(10, 45, 11, 46)))
        assert [i.id for i in items] == ["S2A_FAULT_1"]
        assert srv.count("/search") == 4  # three injected failures, then the answer


def test_stac_api_timeouts_and_persistent_errors_give_a_clear_catalog_error():
    from cloudfree.catalogs.base import SearchQuery

    q = SearchQuery(collections=("sentinel-2-l2a",), bbox=(10, 45, 11, 46))
    with FaultServer(timeout_sleep=1.5) as srv:
        srv.faults["/search"] = ["timeout"] * 10
        t0 = time.monotonic()
        with pytest.raises(CatalogError, match=r"(?s)search of http://127\.0\.0\.1.*timeout 0\.5 s.*catalog\.url"):
            _api(srv, timeout=0.5, max_retries=2).search(q)
        assert srv.count("/search") == 3 and time.monotonic() - t0 < 10  # 1 + 2 retries, bounded
    with FaultServer() as srv:
        srv.faults["/search"] = [500] * 10
        with pytest.raises(CatalogError, match="after 2 retries"):
            _api(srv, max_retries=2).search(q)
        assert srv.count("/search") == 3


def test_stac_api_offline_fails_fast_naming_the_api():
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.stac_api import StacApiCatalog

    t0 = time.monotonic()
    with pytest.raises(CatalogError, match=r"cannot resolve the host of STAC API https://stac\.invalid/v1.*network"):
        StacApiCatalog(url="https://stac.invalid/v1", max_retries=4).search(SearchQuery(collections=("x",)))
    assert time.monotonic() - t0 < 5  # not 4 connection retries with backoff


def test_wrong_collection_lists_the_catalogs_collections(demo_catalog):
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.local import LocalCatalog

    with pytest.raises(NoItemsFoundError, match=r"\['sentinel-2-l2a'\] are not in local catalog.*demo-s2-l1c"):
        LocalCatalog(demo_catalog).search(SearchQuery(collections=("sentinel-2-l2a",)))
    with FaultServer() as srv:
        srv.collections = ["landsat-c2-l2", "sentinel-2-l2a"]
        with pytest.raises(NoItemsFoundError, match=r"\['sentinel-2-l1a'\] are not in STAC API.*landsat-c2-l2"):
            _api(srv).search(SearchQuery(collections=("sentinel-2-l1a",)))


def test_expired_sas_token_is_refreshed_with_retry():
    from cloudfree.catalogs.planetary_computer import SasTokenCache

    href = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B04.tif"
    # the server writes msft:expiry to the second (truncated): a token lives 3-4 s, so with a 2 s margin it is
    # certainly still cached right after, and certainly due for refresh 2.2 s later (a 2 s token with a 1 s margin
    # could be due at once when issued late in a second: flaky on a loaded machine)
    with FaultServer(token_ttl=4.0) as srv:
        srv.faults["/sas/token/"] = [500]  # the first token request fails once and is retried
        cache = SasTokenCache(f"{srv.url}/sas/token", timeout=2.0, max_retries=2, backoff_factor=0.01,
                              refresh_margin=2.0, subscription_key="")
        first = cache.sign_href(href)
        assert "sig=TOKEN1" in first and cache.fetches == 1 and srv.count("/sas/token/sentinel2l2a01/sentinel2-l2") == 2
        assert cache.sign_href(href) == first and cache.fetches == 1  # still valid: cached
        time.sleep(2.2)  # now within refresh_margin of its expiry
        again = cache.sign_href(first)  # an href already carrying the expiring token is re-signed
        assert "sig=TOKEN2" in again and "TOKEN1" not in again and cache.fetches == 2


# -- 4. antimeridian ------------------------------------------------------------------------------------------------
def test_antimeridian_aoi_bbox_and_polygon_match_both_sides_only(tmp_path, demo_config):
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.stages.search import load_aoi

    def item(i, lon):
        return {"type": "Feature", "stac_version": "1.0.0", "id": f"am-{i}", "collection": "c",
                "geometry": {"type": "Polygon", "coordinates": [[[lon - .5, -15], [lon + .5, -15], [lon + .5, -14],
                                                                 [lon - .5, -14], [lon - .5, -15]]]},
                "bbox": [lon - .5, -15, lon + .5, -14], "properties": {"datetime": "2024-01-01T00:00:00Z"},
                "links": [], "assets": {}}

    cat = LocalCatalog(_catalog(tmp_path, [item(0, 179.0), item(1, -179.0), item(2, 0.0)]))
    cfg = demo_config.replace(search={"aoi": [170.0, -20.0, -170.0, -10.0]})  # accepted: crosses the antimeridian
    got = cat.search(SearchQuery(collections=("c",), bbox=tuple(cfg.search.aoi)))
    assert sorted(i.id for i in got) == ["am-0", "am-1"]
    poly = tmp_path / "am.geojson"
    poly.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[170, -20], [-170, -20], [-170, -10], [170, -10], [170, -20]]]}}))
    got = cat.search(SearchQuery(collections=("c",), intersects=load_aoi(str(poly))[1]))
    assert sorted(i.id for i in got) == ["am-0", "am-1"]
    with pytest.raises(ConfigError, match="crosses the antimeridian"):
        demo_config.replace(search={"aoi": [10.0, 45.0, 10.0, 46.0]})


# -- 5. broken files: one target fails, the batch goes on -----------------------------------------------------------
def test_truncated_band_and_10x_too_small_target_fail_alone_and_the_batch_goes_on(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.runner import run

    cloudy = demo_item_dicts[CLOUDY]
    b04 = Path(cloudy["assets"]["B04"]["href"])
    trunc = tmp_path / "B04_truncated.tif"
    data = b04.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    broken = _copy(cloudy, id="TRUNCATED")
    broken["assets"]["B04"]["href"] = str(trunc)
    small = _copy(cloudy, id="TEN_X_TOO_SMALL")
    for k in ("B02", "B03", "B04", "B08", "B11", "B12"):
        small["assets"][k]["raster:bands"] = [{"scale": 1e-5, "offset": 0, "nodata": 0}]
    small["properties"].pop("s2:processing_baseline", None)
    items = [broken, small, demo_item_dicts[THIN], *[d for k, d in demo_item_dicts.items() if "SIMREF" in k]]
    out = tmp_path / "out"
    cfg = _cfg(demo_config, _catalog(tmp_path / "cat", items), out, ["TRUNCATED", "TEN_X_TOO_SMALL", THIN],
               _small_aoi(cloudy, (0.3, 0.3, 0.6, 0.7)))
    res = {r.target_id: r for r in run(cfg)}
    assert res[THIN].status == "done"  # the healthy target after two broken ones
    assert res["TRUNCATED"].status == "failed"
    assert all(w in res["TRUNCATED"].error for w in ("target TRUNCATED", "mid-read", "fetch them again"))
    assert res["TEN_X_TOO_SMALL"].status == "failed"
    assert all(w in res["TEN_X_TOO_SMALL"].error for w in ("TEN_X_TOO_SMALL", "band B", "x below", "scale/offset"))
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        f"{THIN}__{MODEL}", "collection.json", "catalog.json", "reports"}  # nothing half-written for the failures
    assert not any((out / ".staging").iterdir())
    report = (next((out / "reports").glob("*/report.md"))).read_text()
    assert "TRUNCATED" in report and "TEN\\_X" not in report and "TEN_X_TOO_SMALL" in report
    # and through the CLI: a `failed` line and a non-zero exit status at the end
    r = _cli(["--quiet", "run", "-c", str(_yaml(cfg, tmp_path / "cfg.yaml")), "--no-progress"])
    assert r.returncode == 1 and "failed   TRUNCATED" in r.stdout and "skipped  " + THIN in r.stdout


# -- 6. honest outputs ----------------------------------------------------------------------------------------------
def test_unrestorable_target_is_labelled_unrestored_and_retried(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.runner import run

    cat = _catalog(tmp_path / "cat", list(demo_item_dicts.values()))
    out = tmp_path / "out"
    cfg = _cfg(demo_config, cat, out, [CLOUDY], _small_aoi(demo_item_dicts[CLOUDY]), max_days=0.5)  # no reference
    (r,) = run(cfg)
    assert r.status == "unrestored" and "source code 5" in r.error and "max_days" in r.error
    item = json.loads(r.outputs["item"].read_text())["properties"]
    with rasterio.open(r.outputs["source"]) as s, rasterio.open(r.outputs["mask_provenance"]) as m:
        src, masked = s.read(1), (m.read(1) & 0x0F) > 0
    assert masked.any() and (src[masked] == SOURCE_UNFILLED).all()  # no cloudy pixel is called "clear"
    assert (src[~masked] == SOURCE_TARGET).all()
    assert item["cloudfree:status"] == "unrestored" and item["eo:cloud_cover"] >= 100 * masked.mean() - 0.5
    assert item["cloudfree:source_codes"]["5"] == "cloudy, not restored"
    (again,) = run(cfg)
    assert again.status == "unrestored"  # not skipped: a rerun retries it
    r2 = _cli(["-q", "run", "-c", str(_yaml(cfg, tmp_path / "c.yaml")), "--no-progress"])
    assert r2.returncode == 3 and "unrestored" in r2.stdout
    # a later search never takes it as a clear reference
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.stages.search import plan_targets

    items = LocalCatalog(out / "catalog.json").search(SearchQuery(collections=(cfg.output.collection,)))
    assert items and items[0].properties["cloudfree:status"] == "unrestored"
    outs = [_copy(i.to_dict(transform_hrefs=False), collection=cfg.catalog.collection,
                  properties={**i.properties, "eo:cloud_cover": 0.0}) for i in items]
    (plan,) = plan_targets(LocalCatalog(_catalog(tmp_path / "cat2", [demo_item_dicts[THIN], *outs])),
                           cfg.search.model_copy(update={"targets": [THIN], "max_days": 60}), cfg.catalog.collection)
    assert plan.references == ()


def test_all_nodata_output_is_not_clear(tmp_path):
    from cloudfree.stages.output_check import cover_stats, restoration_status
    from cloudfree.stages.masks import NODATA_BIT

    prof = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint8"}
    paths = {}
    for name, value in (("conf", 255), ("prov", NODATA_BIT), ("src", 0)):
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", **prof) as ds:
            ds.write(np.full((1, 32, 32), value, np.uint8))
    st = cover_stats(paths["conf"], paths["prov"], source_path=paths["src"])
    assert st["unusable_after"] == 1.0 and st["nodata_after"] == 1.0 and st["masked_before"] is None
    assert restoration_status(st)[0] == "unrestored"


def test_plausibility_names_item_band_and_fix(demo_item_dicts):
    from cloudfree.stages.plausibility import check_reflectance

    target = pystac.Item.from_dict(_copy(demo_item_dicts[THIN]))
    refs = [pystac.Item.from_dict(d) for k, d in demo_item_dicts.items() if "SIMREF" in k]
    assert check_reflectance(target, refs, ["B02", "B04", "B08"]) == []  # the healthy demo passes
    dark = _copy(demo_item_dicts[THIN], id="DARK")  # one band 4x too dark: a warning naming item, band and fix
    dark["properties"].pop("s2:processing_baseline", None)
    for b in ("B02", "B04", "B08"):
        dark["assets"][b]["raster:bands"] = [{"scale": 1e-4 / (4 if b == "B04" else 1), "offset": 0}]
    (warning,) = check_reflectance(pystac.Item.from_dict(dark), refs, ["B02", "B04", "B08"])
    assert "target DARK band B04" in warning and "scale/offset" in warning and "band order" in warning
    unscaled = _copy(demo_item_dicts[THIN], id="UNSCALED")
    unscaled["properties"].pop("s2:processing_baseline", None)
    unscaled["assets"]["B04"]["raster:bands"] = [{"scale": 1.0, "offset": 0}]
    with pytest.raises(InputDataError, match=r"item UNSCALED band B04: .*unscaled.*scale/offset"):
        check_reflectance(pystac.Item.from_dict(unscaled), refs, ["B04"])


# -- 7. concurrency, kills, staging ---------------------------------------------------------------------------------
def test_target_lock_serialises_processes(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from cloudfree.pipeline.safety import target_lock\n"
            "with target_lock(sys.argv[2], 'T'):\n    print('locked', flush=True); time.sleep(1.5)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    with target_lock(tmp_path, "T"):
        waited = time.monotonic() - t0
    p.wait(10)
    assert waited > 0.8  # blocked until the other process released it
    assert (tmp_path / ".locks" / "T.lock").exists()


@pytest.fixture(scope="module")
def kill_setup(demo_config, demo_item_dicts, tmp_path_factory):
    """A catalog copy, a config on a mid-size AOI and a clean reference run of it (in-process)."""
    from cloudfree.pipeline.runner import run

    tmp = tmp_path_factory.mktemp("kill")
    cat = _catalog(tmp / "cat", list(demo_item_dicts.values()))
    cfg = _cfg(demo_config, cat, tmp / "clean", [CLOUDY], _small_aoi(demo_item_dicts[CLOUDY], (0.05, 0.05, 0.95, 0.95)))
    (r,) = run(cfg)
    assert r.status == "done", r.error
    return tmp, cfg, r


def _cogs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tif"))}


def test_sigkill_mid_write_then_rerun_is_byte_identical_and_leaves_no_staging(kill_setup):
    tmp, cfg, clean = kill_setup
    out = tmp / "killed"
    cfg = cfg.replace(output={"dir": str(out)})
    path = _yaml(cfg, tmp / "kill.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "cloudfree.pipeline.cli", "-q", "run", "-c", str(path), "--no-progress"],
                         env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if any(f.is_file() for f in (out / ".staging").rglob("*")) if (out / ".staging").exists() else False:
            break
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    assert p.returncode == -signal.SIGKILL
    stem = f"{CLOUDY}__{MODEL}"
    assert any((out / ".staging").iterdir()) and not (out / stem / f"{stem}.json").exists()  # killed mid-write
    r = _cli(["-q", "run", "-c", str(path), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert _cogs(out / stem) == _cogs(clean.outputs["item"].parent)
    assert not any((out / ".staging").iterdir())


def test_stale_staging_is_removed_by_a_rerun_that_skips_the_target(kill_setup):
    from cloudfree.pipeline.runner import run

    tmp, cfg, clean = kill_setup
    out = Path(cfg.output.dir)
    stem = clean.outputs["item"].parent.name
    stale = [out / ".staging" / f"{stem}+deadbeef0000", out / f".staging-{stem}"]  # current and old layouts
    for d in stale:
        d.mkdir(parents=True)
        (d / "intermediate.tif").write_bytes(b"x" * 1000)
    (r,) = run(cfg)
    assert r.status == "skipped" and not any(d.exists() for d in stale)


def test_concurrent_runs_on_one_output_dir_do_not_collide(kill_setup):
    tmp, cfg, clean = kill_setup
    out = tmp / "concurrent"
    path = _yaml(cfg.replace(output={"dir": str(out)}), tmp / "conc.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "cloudfree.pipeline.cli", "run", "-c", str(path), "--no-progress"],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    statuses = sorted(o[0].split()[0] for o in outs)
    assert statuses == ["done", "skipped"]  # the second waited for the lock, then found the target done
    stem = clean.outputs["item"].parent.name
    assert _files(out / stem) == _files(clean.outputs["item"].parent)  # no stray rio-cogeo temporaries
    assert _cogs(out / stem) == _cogs(clean.outputs["item"].parent)
    assert not any((out / ".staging").iterdir())


# -- 8. config errors -----------------------------------------------------------------------------------------------
def test_aoi_feature_without_geometry_and_unclosed_ring_are_config_errors(tmp_path):
    from cloudfree.stages.search import load_aoi

    nogeom = tmp_path / "nogeom.geojson"
    nogeom.write_text(json.dumps({"type": "Feature", "properties": {}}))
    with pytest.raises(ConfigError, match="feature 0 has no geometry"):
        load_aoi(str(nogeom))
    open_ring = tmp_path / "open.geojson"
    open_ring.write_text(json.dumps({"type": "Polygon", "coordinates": [[[10, 45], [11, 45], [11, 46], [10, 46]]]}))
    with pytest.raises(ConfigError, match="unclosed.*repeat the first position"):
        load_aoi(str(open_ring))


def test_bad_period_exits_2_like_other_config_errors(tmp_path, demo_catalog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"catalog": {"url": str(demo_catalog), "collection": "demo-s2-l1c"},
                                   "search": {"period": "2024-13-45"}}))
    r = _cli(["run", "-c", str(cfg), "--dry-run"])
    assert r.returncode == 2 and "search.period" in r.stderr and "YYYY-MM-DD" in r.stderr
    r = _cli(["search", "--catalog", "local", "--url", str(demo_catalog), "--period", "2024-06-31/2024-06-01"])
    assert r.returncode == 2 and "2024-06-31" in r.stderr


def test_evaluate_never_writes_into_the_repositorys_docs_by_default():
    from cloudfree.pipeline.cli import main

    opt = next(p for p in main.commands["evaluate"].params if p.name == "out")
    assert opt.default == "evaluation" and not Path(opt.default).is_absolute()
