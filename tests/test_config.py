import pytest

from cloudfree.pipeline.config import load_config, parse_config
from cloudfree.pipeline.errors import ConfigError


def test_defaults_are_valid():
    cfg = parse_config({})
    assert cfg.model.name == "median-composite" and cfg.mask.cldprb_threshold == 40  # docs/evaluation.md's pick


def test_default_model_is_the_rules_pick_in_the_committed_evaluation():
    """The config default (`model.name`, every shipped config) is the model the default-model rule picks from the
    committed evaluation (docs/evaluation.json), and the report says so: regenerate both together."""
    import json
    from pathlib import Path

    from cloudfree.pipeline.evaluation.report import choose_default

    root = Path(__file__).resolve().parents[1]
    payload = json.loads((root / "docs" / "evaluation.json").read_text())
    pick = choose_default(payload["summary"], payload["models"], payload["rows"])
    assert pick == parse_config({}).model.name
    assert f"Chosen: **{pick}**" in (root / "docs" / "evaluation.md").read_text()
    run_configs = [c for c in sorted((root / "configs").glob("*.yaml")) if not c.name.startswith("train-")]
    assert len(run_configs) >= 4
    for cfg in run_configs:  # the job configs (the train-*.yaml are `cloudfree train`'s)
        assert load_config(cfg, env=False).model.name == pick, cfg


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"mask\.treshold"):
        parse_config({"mask": {"treshold": 30}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="search.aoi"):
        parse_config({"search": {"aoi": [10, 10, 5, 20]}})
    with pytest.raises(ConfigError, match="B13"):
        parse_config({"grid": {"bands": ["B02", "B13"]}})
    with pytest.raises(ConfigError, match="target_cloud_cover"):
        parse_config({"search": {"target_cloud_cover": [50, 10]}})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_environment_override(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: reference-replace\n")
    monkeypatch.setenv("CLOUDFREE_TILE__SIZE", "256")
    cfg = load_config(f)
    assert cfg.tile.size == 256
    assert load_config(f, env=False).tile.size == 512


def test_config_is_frozen_and_replace_validates():
    cfg = parse_config({})
    with pytest.raises(Exception):
        cfg.tile.size = 3  # type: ignore[misc]
    assert cfg.replace(tile={"size": 128}).tile.size == 128
    with pytest.raises(ConfigError):
        cfg.replace(tile={"size": 1})
