"""The CLI through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cloudfree.pipeline.cli import main


def _yaml(tmp_path, demo_catalog, **extra):
    out = tmp_path / "out"
    body = f"""
catalog: {{kind: local, url: "{demo_catalog}", collection: demo-s2-l1c}}
search: {{target_cloud_cover: [20, 100], max_references: 2}}
mask: {{methods: [cldprb, scl]}}
output: {{dir: "{out}"}}
run: {{progress: false}}
"""
    for k, v in extra.items():
        body += f"{k}: {v}\n"
    p = tmp_path / "cfg.yaml"
    p.write_text(body)
    return p, out


def test_help_explains_jobs():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "batch job" in r.output and "make demo" in r.output
    r = CliRunner().invoke(main, ["run", "--help"])
    assert r.exit_code == 0 and "--overwrite" in r.output and "resume" in r.output


def test_models_lists_registered():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "reference-replace" in r.output and "needs: reference" in r.output


def test_search_table_and_json(tmp_path, demo_catalog):
    cfg, _ = _yaml(tmp_path, demo_catalog)
    out = tmp_path / "plans.json"
    r = CliRunner().invoke(main, ["search", "-c", str(cfg), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "S2A_T33UUU_20170216_SIMCLOUDY" in r.output and "S2A_T33UUU_20170206_SIMREF" in r.output
    rows = json.loads(out.read_text())
    text = json.dumps(rows)
    assert "S2A_T33UUU_20170216_SIMCLOUDY" in text and "S2A_T33UUU_20170206_SIMREF" in text
    r = CliRunner().invoke(main, ["search", "-c", str(cfg), "--out", str(out)])
    assert r.exit_code != 0 and "overwrite" in r.output


def test_run_dry_run_writes_nothing(tmp_path, demo_catalog):
    cfg, out = _yaml(tmp_path, demo_catalog)
    r = CliRunner().invoke(main, ["run", "-c", str(cfg), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.count("dry-run") == 2
    assert not out.exists() or not any(out.iterdir())


def test_scene_runs_one_target_and_prints_psnr(tmp_path, demo_catalog):
    cfg, out = _yaml(tmp_path, demo_catalog)
    r = CliRunner().invoke(main, ["scene", "S2B_T33UUU_20170226_SIMTHIN", "-c", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "PSNR vs simulated truth" in r.output
    from cloudfree.pipeline.config import ModelConfig

    assert (out / f"S2B_T33UUU_20170226_SIMTHIN__{ModelConfig().name}").is_dir()


def test_config_error_exit_code_and_message(tmp_path, demo_catalog):
    cfg, _ = _yaml(tmp_path, demo_catalog, tile="{size: 512, halo_px: 3}")
    r = CliRunner().invoke(main, ["run", "-c", str(cfg)])
    assert r.exit_code == 2 and "tile.halo_px" in r.output


def test_unknown_model_and_missing_item(tmp_path, demo_catalog):
    cfg, _ = _yaml(tmp_path, demo_catalog)
    r = CliRunner().invoke(main, ["run", "-c", str(cfg), "--model", "nope"])
    assert r.exit_code != 0 and "available" in r.output
    r = CliRunner().invoke(main, ["scene", "NO_SUCH_ITEM", "-c", str(cfg)])
    assert r.exit_code != 0 and "NO_SUCH_ITEM" in r.output


def test_run_compare_prints_both_models_per_target():
    """`cloudfree run --compare reference-replace` (the demo): one line per target with both PSNRs and the gain."""
    from cloudfree.pipeline.cli import comparison_table
    from cloudfree.pipeline.runner import TargetResult

    m = {"psnr_after_cloudy": 25.5, "psnr_after_all": 28.0}
    o = {"psnr_after_cloudy": 24.0, "psnr_after_all": 27.5}
    ours = [TargetResult("A", "done", metrics=m), TargetResult("B", "done"), TargetResult("C", "done", metrics=m)]
    theirs = [TargetResult("A", "done", metrics=o), TargetResult("B", "done"),
              TargetResult("C", "failed", error="an input failed mid-read")]
    text = comparison_table(ours, theirs, "temporal", "reference-replace")
    assert "A: temporal 25.50 / 28.00  reference-replace 24.00 / 27.50  (+1.50 dB on cloudy pixels)" in text
    assert "B: no truth to compare against" in text
    # a failed comparison run says so (it is not "no truth")
    assert "C: reference-replace failed (an input failed mid-read)" in text
