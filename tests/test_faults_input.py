"""Fault probe, round two (issue 19): malformed items, log injection, unbounded grids, exit codes, reference faults.

Each test is one case of the probe (listed with its outcome in docs/reliability.md, cases 31 onwards); each fails
without its fix. Hostile catalogs are copies of the demo catalog written as JSON arrays of items (the helpers of
tests/test_faults.py); HTTP faults come from the real server on 127.0.0.1 (tests/fault_server.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pystac
import pytest
import yaml
from click.testing import CliRunner

from cloudfree.pipeline.errors import CatalogError, ConfigError, InputDataError, NoItemsFoundError
from tests.conftest import ROOT
from tests.fault_server import FaultServer
from tests.test_faults import CLOUDY, THIN, _catalog, _cfg, _cli, _copy, _small_aoi, _yaml  # noqa: F401

PASSWORD = "Pa55w0rd-4711"
SECRET = "s3cr3t-CLIENT-secret-value-4711"
ANSI = "\x1b[2K\x1b[1G\x1b[31m"


def _refs(demo_item_dicts) -> list[dict]:
    return [d for k, d in demo_item_dicts.items() if "SIMREF" in k]


# -- exit codes and config bounds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,key,value", [("grid", "resolution", 0), ("grid", "resolution", -10),
                                               ("grid", "chunk", 0), ("output", "blocksize", 0),
                                               ("catalog", "timeout", 0), ("search", "max_days", -1)])
def test_non_positive_numbers_are_config_errors(section, key, value):
    from cloudfree.pipeline.config import parse_config

    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*greater than"):
        parse_config({section: {key: value}})


def test_bad_numbers_and_unknown_model_exit_2_at_config_time(tmp_path, demo_catalog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"catalog": {"url": str(demo_catalog), "collection": "demo-s2-l1c"},
                                   "output": {"dir": str(tmp_path / "out"), "blocksize": 0}}))
    r = _cli(["run", "-c", str(cfg), "--no-progress"])
    assert r.returncode == 2 and "output.blocksize" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing computed
    r = _cli(["run", "-c", str(cfg), "--dry-run"], env={"CLOUDFREE_OUTPUT__BLOCKSIZE": "512",
                                                       "CLOUDFREE_GRID__RESOLUTION": "-10"})
    assert r.returncode == 2 and "grid.resolution" in r.stderr and "CLOUDFREE_GRID__RESOLUTION" in r.stderr
    r = _cli(["run", "-c", str(cfg), "--dry-run", "--model", "no-such-model"],
             env={"CLOUDFREE_OUTPUT__BLOCKSIZE": "512"})
    assert r.returncode == 2 and "no-such-model" in r.stderr and "Traceback" not in r.stderr


# -- environment overrides ---------------------------------------------------------------------------------------------
def test_nested_env_overrides_work_at_any_depth_and_errors_name_the_variable(monkeypatch, tmp_path):
    from cloudfree.pipeline.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"search": {"max_days": 30, "policy": {"w_time": 2.0}}}))
    monkeypatch.setenv("CLOUDFREE_SEARCH__POLICY__BRACKET", "false")
    monkeypatch.setenv("CLOUDFREE_SEARCH__PERIOD", "2024-06-01/2024-06-30")
    cfg = load_config(path)
    assert cfg.search.policy.bracket is False and cfg.search.policy.w_time == 2.0  # merged, not replaced
    assert cfg.search.max_days == 30 and cfg.search.period == "2024-06-01/2024-06-30"
    monkeypatch.setenv("CLOUDFREE_SEARCH__POLICY__W_TIME", "lots")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "search.policy.w_time" in msg and "CLOUDFREE_SEARCH__POLICY__W_TIME" in msg
    assert f"config file {path} is invalid" not in msg  # blamed on the variable, not on the YAML file
    monkeypatch.setenv("CLOUDFREE_SEARCH__POLICY__W_TIME", "[1, 2")
    with pytest.raises(ConfigError, match="environment variable CLOUDFREE_SEARCH__POLICY__W_TIME is not valid YAML"):
        load_config(path)


def test_invalid_yaml_in_an_env_password_url_names_the_variable_and_never_prints_the_password(tmp_path,
                                                                                           demo_catalog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"catalog": {"url": str(demo_catalog), "collection": "demo-s2-l1c"}}))
    for verbosity in ([], ["-vv"]):
        r = _cli([*verbosity, "run", "-c", str(cfg), "--dry-run"],
                 env={"CLOUDFREE_CATALOG__URL": f"[https://user:{PASSWORD}@x/api"})
        out = r.stdout + r.stderr
        assert r.returncode == 2 and "CLOUDFREE_CATALOG__URL" in r.stderr, out
        assert PASSWORD not in out and "Traceback" not in out


# -- the top-level guard -------------------------------------------------------------------------------------------------
@pytest.fixture
def boom_command():
    """A command on the real CLI group that fails the way an unforeseen bug would (an exception cloudfree does not
    raise on purpose, its text holding credentials), so the guard around every command is exercised."""
    from cloudfree.pipeline.cli import main

    @click.command("boom-test")
    @click.option("--interrupt", is_flag=True)
    def boom(interrupt):
        logging.getLogger("cloudfree.test").debug("about to fail")
        if interrupt:
            raise KeyboardInterrupt
        raise RuntimeError(f"cannot reach https://user:{PASSWORD}@x/api with {SECRET}")

    import threading

    root = logging.getLogger()
    saved = root.handlers[:], root.level, threading.excepthook
    main.add_command(boom)
    yield main
    main.commands.pop("boom-test")
    # the CLI configured logging for its (CliRunner) streams: give pytest its own back
    root.handlers[:], root.level, threading.excepthook = saved
    logging.captureWarnings(False)


def test_no_traceback_without_vv_and_every_message_redacted(boom_command, monkeypatch):
    monkeypatch.setenv("SH_CLIENT_SECRET", SECRET)
    for args, traceback in ((["boom-test"], False), (["-v", "boom-test"], False), (["-vv", "boom-test"], True)):
        r = CliRunner().invoke(boom_command, args)
        out = r.output  # stdout and stderr as a terminal shows them
        assert r.exit_code == 1 and "RuntimeError: cannot reach https://user:***@x/api" in out, out
        assert ("Traceback" in out) is traceback, out
        assert PASSWORD not in out and SECRET not in out
    r = CliRunner().invoke(boom_command, ["boom-test", "--interrupt"])
    assert r.exit_code == 130 and "interrupted" in r.output


def test_sigint_exits_130(tmp_path):
    """A real SIGINT while the CLI waits on a STAC API that does not answer: exit 130, no traceback."""
    with FaultServer(timeout_sleep=30) as srv:
        srv.faults["/"] = ["timeout"]
        e = {**os.environ, "PYTHONPATH": str(ROOT), "CLOUDFREE_CATALOG__TIMEOUT": "60"}
        p = subprocess.Popen([sys.executable, "-m", "cloudfree.pipeline.cli", "search", "--catalog", "stac-api",
                              "--url", srv.url, "--collection", "sentinel-2-l2a"], env=e, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not srv.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.requests, "the CLI never reached the server"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err


# -- bounds ---------------------------------------------------------------------------------------------------------------
def test_huge_declared_grid_fails_before_any_read_naming_item_and_key(demo_config, demo_item_dicts, tmp_path):
    from cloudfree.pipeline.config import default_max_pixels
    from cloudfree.pipeline.runner import run

    assert default_max_pixels() >= 10980 * 10980  # at least one full Sentinel-2 tile at 10 m
    huge = _copy(demo_item_dicts[THIN], id="HUGE")
    huge["properties"]["proj:shape"] = [1000000, 1000000]
    for a in huge["assets"].values():
        a["href"] = str(tmp_path / "never-read.tif")  # any read would fail differently
        if "proj:shape" in a:
            a["proj:shape"] = [1000000, 1000000]
    cat = _catalog(tmp_path / "cat", [huge, *_refs(demo_item_dicts)])
    cfg = _cfg(demo_config, cat, tmp_path / "out", ["HUGE"], None)
    (r,) = run(cfg)
    assert r.status == "failed"
    assert all(w in r.error for w in ("HUGE", "1000000 x 1000000", "proj:shape", "grid.max_pixels")), r.error
    # the configured bound, on an ordinary target
    (r,) = run(_cfg(demo_config, _catalog(tmp_path / "cat2", [demo_item_dicts[THIN], *_refs(demo_item_dicts)]),
                    tmp_path / "out2", [THIN], None).replace(grid={"max_pixels": 1000}))
    assert r.status == "failed" and "above grid.max_pixels 1,000" in r.error


# -- search-side isolation --------------------------------------------------------------------------------------------
def test_malformed_items_are_skipped_recorded_in_plan_and_report_and_the_batch_goes_on(demo_config, demo_item_dicts,
                                                                                        tmp_path, capsys):
    from cloudfree.pipeline.cli import search_command
    from cloudfree.pipeline.runner import run

    bad_cc = _copy(demo_item_dicts[CLOUDY], id="BAD_CLOUD_COVER")
    bad_cc["properties"]["eo:cloud_cover"] = "lots"  # was: TypeError in catalogs/base.py _cmp, batch aborted
    no_dt = _copy(demo_item_dicts[CLOUDY], id="NO_DATETIME")
    no_dt["properties"]["datetime"] = None  # was: STACError
    not_stac = {"type": "Feature", "id": "NOT_A_STAC_ITEM", "properties": {}}  # was: STACTypeError
    dup = _copy(demo_item_dicts[THIN])
    dup["properties"]["datetime"] = "2017-02-27T10:00:00Z"  # a second, different item with THIN's id
    items = [demo_item_dicts[THIN], bad_cc, no_dt, not_stac, dup, *_refs(demo_item_dicts)]
    cfg = _cfg(demo_config, _catalog(tmp_path / "cat", items), tmp_path / "out", [], _small_aoi(demo_item_dicts[THIN]))
    plans = search_command(cfg.catalog, cfg.search, out_path=tmp_path / "plans.json")
    table = capsys.readouterr().out
    assert [p.target.id for p in plans] == [THIN]
    reasons = {s.id: s.reason for s in plans.skipped}
    assert set(reasons) == {"BAD_CLOUD_COVER", "NO_DATETIME", "NOT_A_STAC_ITEM", THIN}
    assert "eo:cloud_cover 'lots'" in reasons["BAD_CLOUD_COVER"] and "duplicate id" in reasons[THIN]
    assert "not a valid STAC Item" in reasons["NOT_A_STAC_ITEM"] and "datetime" in reasons["NO_DATETIME"]
    assert "SKIPPED" in table and "BAD_CLOUD_COVER" in table and "4 catalog item(s) skipped" in table
    doc = json.loads((tmp_path / "plans.json").read_text())
    assert {s["id"] for s in doc["skipped"]} == set(reasons)  # recorded in the plan
    (r,) = run(cfg)
    assert r.status == "done", r.error
    report = next((tmp_path / "out" / "reports").glob("*/report.md")).read_text()
    assert "skipped by the search" in report and "**BAD_CLOUD_COVER**" in report and "NOT_A_STAC_ITEM" in report


def test_stac_api_malformed_feature_is_skipped_and_a_non_json_answer_names_the_url():
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.stac_api import StacApiCatalog
    from tests.fault_server import ITEM

    q = SearchQuery(collections=("sentinel-2-l2a",), bbox=(10, 45, 11, 46))
    with FaultServer() as srv:
        bad = _copy(ITEM, id="BAD_CC")
        bad["properties"] = {**ITEM["properties"], "eo:cloud_cover": "n/a"}
        srv.features = [ITEM, {"type": "Feature", "id": "BROKEN"}, bad]
        cat = StacApiCatalog(url=srv.url, timeout=5, max_retries=0)
        assert [i.id for i in cat.search(q)] == ["S2A_FAULT_1"]
        assert {s.id for s in cat.skipped} == {"BROKEN", "BAD_CC"}
        srv.faults["/search"] = ["html"]
        with pytest.raises(CatalogError, match=rf"search of {srv.url} did not answer JSON.*catalog\.url"):
            cat.search(q)
        srv.faults["/"] = ["html"]
        with pytest.raises(CatalogError, match=rf"STAC API {srv.url} did not answer JSON.*catalog\.url"):
            StacApiCatalog(url=srv.url, timeout=5, max_retries=0).search(q)


def test_static_catalog_with_a_broken_item_file_loads_the_others(demo_catalog, tmp_path):
    import shutil

    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.local import LocalCatalog

    root = tmp_path / "static"
    shutil.copytree(Path(demo_catalog).parent, root, ignore=lambda d, names: [n for n in names if n.endswith(".tif")])
    (broken,) = list(root.rglob(f"{THIN}.json"))
    broken.write_text('{"type": "Feature", "id": "' + THIN + '", "stac_version": "1.0.0"')  # truncated JSON
    cat = LocalCatalog(root / "catalog.json")
    got = cat.search(SearchQuery(collections=("demo-s2-l1c",)))
    assert THIN not in {i.id for i in got} and len(got) == 3
    (s,) = cat.skipped
    assert s.id == THIN and f"{THIN}.json is not a valid STAC Item" in s.reason


def test_empty_catalog_and_unknown_target_id_get_their_own_messages(tmp_path, demo_catalog, demo_config):
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.stages.search import plan_targets

    with pytest.raises(NoItemsFoundError) as e:
        LocalCatalog(_catalog(tmp_path, [])).search(SearchQuery(collections=("sentinel-2-l2a",)))
    assert "holds no usable items" in str(e.value) and "are not in" not in str(e.value)
    search = demo_config.search.model_copy(update={"targets": ["S2X_NO_SUCH_SCENE"]})
    with pytest.raises(NoItemsFoundError) as e:
        plan_targets(LocalCatalog(demo_catalog), search, demo_config.catalog.collection)
    assert "'S2X_NO_SUCH_SCENE'] are not in collection" in str(e.value) and "widen" not in str(e.value)


# -- control characters ---------------------------------------------------------------------------------------------------
def test_control_characters_in_catalog_strings_are_escaped_in_log_stdout_and_report(demo_config, demo_item_dicts,
                                                                                   tmp_path):
    evil = f"EVIL\nERROR cloudfree.pipeline.runner: forged line\r{ANSI}X"
    bad = _copy(demo_item_dicts[THIN], id=evil)  # fails (10x too small) so its id is also in an error line
    for k in ("B02", "B03", "B04", "B08", "B11", "B12"):
        bad["assets"][k]["raster:bands"] = [{"scale": 1e-5, "offset": 0, "nodata": 0}]
    bad["properties"].pop("s2:processing_baseline", None)
    ok = _copy(demo_item_dicts[CLOUDY], id=f"OK{ANSI}\nsecond")
    items = [bad, ok, *_refs(demo_item_dicts)]
    cfg = _cfg(demo_config, _catalog(tmp_path / "cat", items), tmp_path / "out", [evil, ok["id"]],
               _small_aoi(demo_item_dicts[THIN]))
    r = _cli(["run", "-c", str(_yaml(cfg, tmp_path / "c.yaml")), "--no-progress"])
    assert r.returncode == 1, r.stderr[-3000:]
    for stream in (r.stdout, r.stderr):
        assert "\x1b" not in stream and "\r" not in stream
        assert not any(line.startswith("ERROR cloudfree.pipeline.runner: forged") for line in stream.splitlines())
        assert not any(line.startswith("second") for line in stream.splitlines())
    assert "failed   EVIL\\nERROR cloudfree.pipeline.runner: forged line\\r\\x1b[2K" in r.stdout
    assert "done     OK\\x1b[2K\\x1b[1G\\x1b[31m\\nsecond" in r.stdout  # one parseable line per target
    report = next((tmp_path / "out" / "reports").glob("*/report.md")).read_text()
    assert "\x1b" not in report and "\r" not in report and "\nERROR cloudfree" not in report


def test_composite_without_mgrs_ids_exits_non_zero_and_tile_names_and_errors_are_escaped(demo_item_dicts, demo_catalog,
                                                                                        tmp_path):
    region = tmp_path / "region.geojson"
    x0, y0, x1, y1 = _small_aoi(demo_item_dicts[CLOUDY])
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                                      [x0, y0]]]}))
    untiled = []
    for i, d in enumerate(demo_item_dicts.values()):
        c = _copy(d, id=f"SCENE-{i}")  # no _Txxxxx in the id, no s2:mgrs_tile
        c["properties"].pop("s2:mgrs_tile", None)
        untiled.append(c)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"catalog": {"url": str(_catalog(tmp_path / "cat", untiled)),
                                               "collection": "demo-s2-l1c"},
                                   "output": {"dir": str(tmp_path / "out")}}))
    args = ["composite", "--region", str(region), "--period", "2017", "-c", str(cfg), "--no-progress"]
    r = _cli(args)
    assert r.returncode == 1 and "MGRS tile id" in r.stderr and "cloudfree run" in r.stderr  # was: exit 0, nothing
    # a hostile tile name and an error text holding a credential (a path named after the secret)
    tiled = []
    for d in demo_item_dicts.values():
        c = _copy(d)
        c["properties"]["s2:mgrs_tile"] = f"33UUU{ANSI}\nERROR forged"
        c["assets"]["B02"]["href"] = str(tmp_path / SECRET / "B02.tif")
        tiled.append(c)
    cfg.write_text(yaml.safe_dump({"catalog": {"url": str(_catalog(tmp_path / "cat2", tiled)),
                                               "collection": "demo-s2-l1c"},
                                   "output": {"dir": str(tmp_path / "out")}}))
    r = _cli(args, env={"SH_CLIENT_SECRET": SECRET})
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "failed   33UUU\\x1b[2K" in r.stdout, out[-3000:]
    assert "\x1b" not in out and SECRET not in out and "error: " in r.stderr
    assert not any(line.startswith("ERROR forged") for line in out.splitlines())


# -- reference faults, files without CRS ----------------------------------------------------------------------------
def test_failed_reference_read_drops_that_reference_and_the_target_goes_on(demo_config, demo_item_dicts, tmp_path):
    from pathlib import Path as P

    from cloudfree.pipeline.runner import run

    refs = _refs(demo_item_dicts)
    broken = _copy(refs[0])
    b04 = P(broken["assets"]["B04"]["href"])
    trunc = tmp_path / "ref_B04_truncated.tif"
    data = b04.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    broken["assets"]["B04"]["href"] = str(trunc)
    cfg = _cfg(demo_config, _catalog(tmp_path / "cat", [demo_item_dicts[THIN], broken, *refs[1:]]), tmp_path / "out",
               [THIN], _small_aoi(demo_item_dicts[THIN], (0.3, 0.3, 0.6, 0.7)))
    (r,) = run(cfg)
    assert r.status in ("done", "unrestored") and r.references == [refs[1]["id"]], (r.status, r.error)
    assert f"reference(s) dropped: {broken['id']}" in r.error
    item = json.loads(r.outputs["item"].read_text())["properties"]
    (d,) = item["cloudfree:dropped_references"]
    assert d["id"] == broken["id"] and "ref_B04_truncated.tif" in d["reason"]
    assert broken["id"] not in item["cloudfree:references"]


def test_band_file_without_crs_fails_with_a_clear_message(demo_config, demo_item_dicts, tmp_path):
    import rasterio

    from cloudfree.pipeline.runner import run

    t = _copy(demo_item_dicts[THIN], id="NO_CRS")
    with rasterio.open(t["assets"]["B04"]["href"]) as src:
        prof, arr = src.profile, src.read()
    prof.pop("crs", None)
    prof.update(driver="GTiff", transform=rasterio.Affine.identity())
    nocrs = tmp_path / "B04_nocrs.tif"
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        with rasterio.open(nocrs, "w", **prof) as dst:
            dst.write(arr)
    t["assets"]["B04"]["href"] = str(nocrs)
    cfg = _cfg(demo_config, _catalog(tmp_path / "cat", [t, *_refs(demo_item_dicts)]), tmp_path / "out", ["NO_CRS"],
               _small_aoi(demo_item_dicts[THIN]))
    (r,) = run(cfg)
    assert r.status == "failed" and "AssertionError" not in r.error
    # named by the runner's band-CRS check (issue 18) or, on paths without it, by the asset probe
    assert "NO_CRS" in r.error and "B04" in r.error and "no CRS" in r.error and "fix" in r.error, r.error


# -- band swaps -----------------------------------------------------------------------------------------------------------
def test_b02_b08_swap_is_caught_even_when_their_levels_are_alike(demo_item_dicts):
    from cloudfree.stages.plausibility import check_reflectance

    bands = ["B02", "B03", "B04", "B08", "B11", "B12"]
    refs = [pystac.Item.from_dict(d) for d in _refs(demo_item_dicts)]
    assert check_reflectance(pystac.Item.from_dict(_copy(demo_item_dicts[THIN])), refs, bands) == []
    swapped = _copy(demo_item_dicts[THIN], id="SWAPPED")
    a = swapped["assets"]
    a["B02"]["href"], a["B08"]["href"] = a["B08"]["href"], a["B02"]["href"]
    with pytest.raises(InputDataError, match=r"item SWAPPED bands B02 and B08: they look swapped.*eo:bands"):
        check_reflectance(pystac.Item.from_dict(swapped), refs, bands)


def test_band_swap_rule_on_the_real_romania_stack_has_no_false_alarm():
    """The numbers in stages/plausibility.py's docstring: every date of the shared Romania L2A stack, as it is and
    with B02/B08 swapped (run with -s to see them)."""
    import numpy as np

    from cloudfree.stages.plausibility import _read_sample, band_swap
    from tests.conftest import shared

    cat = pystac.Catalog.from_file(str(shared("s2-l2a-stack-romania-nrt", "stac", "catalog.json")))
    n = false_alarms = caught = 0
    for it in cat.get_items(recursive=True):
        it.make_asset_hrefs_absolute()
        got = {b: _read_sample(it, b, 100) for b in ("B02", "B03", "B04", "B08")}
        if any(v is None for v in got.values()):
            continue
        g = {b: v[0] for b, v in got.items()}
        n += 1
        false_alarms += band_swap(g) is not None
        caught += band_swap({**g, "B02": g["B08"], "B08": g["B02"]}) is not None
    print(f"romania: {n} dates, {false_alarms} false alarms, {caught} of {n} swaps caught")
    assert n >= 100 and false_alarms == 0 and caught >= 0.8 * n
    assert np.isfinite(caught)


# -- dask.distributed worker logs --------------------------------------------------------------------------------------
def _worker_log(text: str) -> str:
    logging.getLogger("distributed.worker").warning(text)
    return "logged"


def test_distributed_worker_logs_are_redacted(demo_config, capfd):
    from distributed import get_client

    from cloudfree.pipeline.runner import dask_context

    cfg = demo_config.replace(run={"scheduler": "distributed", "workers": 1})
    with dask_context(cfg):
        client = get_client()
        client.run(_worker_log, f"fetch of https://user:{PASSWORD}@x/B04.tif failed\n{ANSI}forged")
        time.sleep(0.5)  # the worker process writes its log to the inherited stderr
    err = capfd.readouterr().err
    assert "https://user:***@x/B04.tif" in err and PASSWORD not in err and "\x1b" not in err


# -- weights integrity -------------------------------------------------------------------------------------------------
def test_every_shipped_weights_file_matches_the_manifest_under_version_control():
    """When new weights are shipped: `python -m cloudfree.models._weights models/weights/X.safetensors`
    (or `cloudfree train --export models/weights/X.safetensors`) records them; commit the manifest."""
    from cloudfree.models._weights import WEIGHTS_DIR, file_sha256, read_manifest

    shipped = sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.suffix in (".safetensors", ".pt", ".pth"))
    manifest = read_manifest()
    assert shipped and sorted(manifest) == shipped
    for name in shipped:
        assert file_sha256(WEIGHTS_DIR / name) == manifest[name], f"{name} differs from models/weights/MANIFEST.json"


def test_weights_replaced_together_with_their_card_are_refused(tmp_path):
    import shutil

    from cloudfree.pipeline.errors import WeightsError
    from cloudfree.models._weights import (WEIGHTS_DIR, card_paths, expected_sha256, file_sha256,
                                                     read_weights, update_manifest)

    shipped = tmp_path / "weights"
    shipped.mkdir()
    w = shipped / "cm_cr.safetensors"
    shutil.copyfile(WEIGHTS_DIR / "cm_cr.safetensors", w)
    update_manifest([w], shipped)
    good = file_sha256(w)
    shutil.copyfile(WEIGHTS_DIR / "ca_mtcr.safetensors", w)  # an attacker swaps the file ...
    card = json.loads((WEIGHTS_DIR / "cm_cr.card.json").read_text())
    card["sha256"] = file_sha256(w)  # ... and the card beside it
    card_paths(w)[0].write_text(json.dumps(card))
    assert expected_sha256(w, shipped) == good  # the manifest decides, not the card
    with pytest.raises(WeightsError, match="the file is corrupt or was replaced"):
        read_weights(w, expected_sha256(w, shipped))
    (shipped / "new.safetensors").write_bytes(b"x")  # a shipped file the manifest does not list
    with pytest.raises(WeightsError, match="not in its MANIFEST.json"):
        expected_sha256(shipped / "new.safetensors", shipped)
    assert expected_sha256(tmp_path / "elsewhere.safetensors", shipped) is None  # user weights: their card
