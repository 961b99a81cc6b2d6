"""The CLI as users of pystac-client / odc-stac expect it: --catalog/--collection/--bbox/--aoi/--period on run and
scene, config paths relative to the config file, a dry run that shows the plan, `cloudfree report`, batch
progress on a terminal and in logs, and `cloudfree models` without importing any model."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudfree.pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_models_lists_from_the_summary_without_importing_a_model():
    code = ("import sys; from click.testing import CliRunner; from cloudfree.pipeline.cli import main; "
            "r = CliRunner().invoke(main, ['models']); "
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('cloudfree.models.') "
            "and m not in ('cloudfree.models.summary',)); print(r.exit_code, heavy); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    first, listing = out.split("\n", 1)
    assert first == "0 []", first
    from cloudfree.models.summary import text_listing

    assert listing.strip() == text_listing().strip()
    from cloudfree.pipeline.config import ModelConfig

    assert f"{ModelConfig().name} (default)" in listing and listing.count("(default)") == 1


def test_model_summaries_match_every_models_spec():
    """The one source of `cloudfree models` and the README table says what each model's spec declares."""
    from cloudfree.models.registry import BUILTIN, build_model
    from cloudfree.models.summary import BUILTIN_SUMMARIES

    assert sorted(s.name for s in BUILTIN_SUMMARIES) == sorted(BUILTIN)
    for s in BUILTIN_SUMMARIES:
        spec = build_model(s.name).spec  # default parameters: the halo they give
        got = (spec.level, spec.halo, spec.needs_reference, spec.max_references, spec.needs_sar, spec.accepts_sar,
               bool(spec.experimental))
        assert got == (s.level, s.halo, s.needs_reference, s.max_references, s.needs_sar, s.accepts_sar,
                       bool(s.experimental)), s.name


def test_readme_model_table_is_the_generated_one():
    from cloudfree.models.summary import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text(), "regenerate: cloudfree models --markdown"
    res = CliRunner().invoke(main, ["models", "--markdown"])
    assert res.exit_code == 0 and res.output == markdown_table()


def test_dry_run_shows_grid_tiles_halo_and_model(demo_catalog, tmp_path):
    res = CliRunner().invoke(main, ["run", "-c", DEMO, "--catalog", str(demo_catalog), "--out", str(tmp_path / "o"),
                                    "--dry-run"])
    assert res.exit_code == 0, res.output
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.config import load_config

    name = load_config(DEMO, env=False).model.name  # the default model's receptive field is the halo
    assert f"grid EPSG:32633 768x1536 px at 10 m; 6 tile(s) of 512 px, halo {build_model(name).spec.halo} px; " \
           f"model {name} with 2 reference(s)" in res.output
    assert "2 planned (dry run)" in res.output and "nothing to do" not in res.output
    assert not (tmp_path / "o").exists()


def test_run_and_scene_take_catalog_collection_bbox_period(demo_catalog, tmp_path):
    from cloudfree.pipeline.config import load_config

    import pystac

    item = next(i for i in pystac.Catalog.from_file(str(demo_catalog)).get_items(recursive=True)
                if i.id == "S2A_T33UUU_20170216_SIMCLOUDY")
    bbox = [str(v) for v in item.bbox]
    cfg = tmp_path / "empty.yaml"  # nothing in the config: all from the flags, as with stac-client search
    cfg.write_text("mask: {methods: [cldprb, scl]}\nsearch: {target_cloud_cover: [20, 100]}\n")
    base = ["run", "-c", str(cfg), "--catalog", str(demo_catalog), "--collection",
            load_config(DEMO, env=False).catalog.collection, "--out", str(tmp_path / "o"), "--dry-run"]
    res = CliRunner().invoke(main, [*base, "--bbox", *bbox, "--period", "2017-02"])
    assert res.exit_code == 0, res.output
    assert res.output.count("dry-run ") == 2
    res = CliRunner().invoke(main, [*base, "--bbox", *bbox, "--period", "2017-02-20/2017-02-28"])
    assert [ln.split()[1] for ln in res.output.splitlines() if ln.startswith("dry-run")] == \
        ["S2B_T33UUU_20170226_SIMTHIN"]
    res = CliRunner().invoke(main, [*base, "--bbox", "0", "0", "1", "1"])
    assert res.exit_code != 0 and "bbox=(0.0, 0.0, 1.0, 1.0)" in res.output  # the search says what it searched
    res = CliRunner().invoke(main, ["scene", "S2B_T33UUU_20170226_SIMTHIN", *base[1:], "--period", "2017-02"])
    assert res.exit_code == 0 and "1 planned (dry run)" in res.output
    res = CliRunner().invoke(main, [*base, "--bbox", *bbox, "--aoi", str(cfg)])
    assert res.exit_code == 2 and "not both" in res.output


def test_a_copied_config_works_from_another_folder(demo_catalog, tmp_path, monkeypatch):
    """configs/demo.yaml copied into another project (catalog at ../data/demo beside it) and run from an
    unrelated working directory: its relative paths are relative to the config file."""
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    shutil.copy(DEMO, proj / "configs" / "mine.yaml")
    (proj / "data").mkdir()
    (proj / "data" / "demo").symlink_to(Path(demo_catalog).parent, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(main, ["run", "-c", "../proj/configs/mine.yaml", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "2 planned (dry run)" in res.output
    assert f"outputs in {proj / 'outputs' / 'demo'}" in res.output
    from cloudfree.pipeline.config import load_config

    cfg = load_config(proj / "configs" / "mine.yaml", env=False)
    assert cfg.catalog.url == str(proj / "data" / "demo" / "catalog.json")
    (proj / "data" / "demo").unlink()
    res = CliRunner().invoke(main, ["run", "-c", "../proj/configs/mine.yaml", "--dry-run"])
    assert res.exit_code != 0 and str(proj / "data" / "demo" / "catalog.json") in res.output  # the real path


def test_report_lists_and_rerenders(demo_run, demo_config):
    out = Path(demo_config.output.dir)
    res = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert res.exit_code == 0, res.output
    from cloudfree.pipeline.config import load_config

    assert f"model {load_config(DEMO, env=False).model.name}" in res.output and "2 done" in res.output
    run_id = res.output.split()[0]
    md = out / "reports" / run_id / "report.md"
    before = md.read_text()
    md.unlink()
    for png in (out / "reports" / run_id).glob("*_confidence.png"):
        png.unlink()
    res = CliRunner().invoke(main, ["report", "latest", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert md.read_text() == before and list((out / "reports" / run_id).glob("*_confidence.png"))
    res = CliRunner().invoke(main, ["report", "nope", "--out", str(out)])
    assert res.exit_code == 2 and run_id in res.output


def test_batch_progress_bar_on_a_tty_and_info_lines_otherwise(caplog):
    from cloudfree.pipeline.progress import BatchProgress

    with caplog.at_level(logging.INFO, logger="cloudfree.progress"):
        with BatchProgress(3, "targets", tty=False) as p:
            for name, status in (("a", "done"), ("b", "failed"), ("c", "done")):
                p.update(name, status)
    lines = [r.getMessage() for r in caplog.records if r.name == "cloudfree.progress"]
    assert len(lines) == 3 and lines[0].startswith("progress: targets 1/3 (1 done), elapsed ")
    assert "ETA 0:00:00 last: c done" in lines[-1] and "(2 done, 1 failed)" in lines[-1]
    stream = io.StringIO()
    with BatchProgress(2, "targets", stream=stream, tty=True) as p:
        p.update("a", "done")
        p.update("b", "done")
    assert "2/2" in stream.getvalue() and "targets" in stream.getvalue()


def test_a_run_without_a_terminal_logs_progress(demo_catalog, tmp_path):
    """Under cron or CI (no TTY) the batch progress goes to the log (stderr), one INFO line per target."""
    res = CliRunner().invoke(main, ["scene", "S2B_T33UUU_20170226_SIMTHIN", "-c", DEMO, "--catalog",
                                    str(demo_catalog), "--out", str(tmp_path / "o"), "--model", "none"])
    assert res.exit_code in (0, 3), res.output
    lines = [ln for ln in res.stderr.splitlines() if "cloudfree.progress" in ln]
    assert len(lines) == 1 and lines[0].startswith("INFO cloudfree.progress: progress: targets 1/1 ("), lines
