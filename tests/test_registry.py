"""Every model file is registered, and the registry fails helpfully (torchgeo tests/models/test_api.py)."""

import ast
from pathlib import Path

import pytest

from cloudfree.models.registry import available_models, build_model
from cloudfree.pipeline.errors import ConfigError, UnknownModelError

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def _model_names_in_files():
    names = {}
    for f in MODELS_DIR.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list
            ):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "name" for t in stmt.targets):
                        names[stmt.value.value] = f.name
    return names


def test_every_model_file_is_registered():
    in_files = _model_names_in_files()
    assert in_files, "no @register'ed model classes found under models/"
    registered = available_models()
    missing = set(in_files) - set(registered)
    assert not missing, f"models defined but not registered (add to BUILTIN_MODULES): {missing}"
    # the name -> module map builds one model by importing its module only: it must name the right module
    from cloudfree.models.registry import BUILTIN

    assert set(BUILTIN) == set(in_files)
    assert {name: f"cloudfree.models.{in_files[name][:-3]}" for name in BUILTIN} == BUILTIN


def test_building_a_physics_model_does_not_import_torch():
    """Building phyvlm-cr (or any model without a network) imports its own module, not every model's: the learned
    models' modules import torch, ~1.3 s of every process and every dask worker."""
    import subprocess
    import sys

    code = ("import sys; from cloudfree.models.registry import build_model; build_model('phyvlm-cr'); "
            "build_model('temporal'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_unknown_model_lists_available():
    with pytest.raises(UnknownModelError, match="reference-replace"):
        build_model("does-not-exist")


def test_bad_params_rejected():
    with pytest.raises(ConfigError, match="reference-replace"):
        build_model("reference-replace", {"no_such_param": 1})


def test_specs_are_sane():
    for name, cls in available_models().items():
        s = cls.spec
        assert s.halo >= 0 and s.level in ("L1C", "L2A", "any") and s.description, name
        if s.needs_reference:
            assert s.max_references >= 1, name


def _s2_item(item_id: str):
    import datetime

    import pystac

    return pystac.Item(item_id, {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0],
                       datetime.datetime(2020, 1, 1), {"platform": "sentinel-2a"})


def test_level_mismatch_refused_with_item_level_and_fix(caplog):
    """spec.level is checked at run time: an L2A model on an L1C item (or the reverse) fails naming the item, both
    levels and the fixes; model.allow_level_mismatch turns it into a warning; 'any' models and items whose level
    cannot be told pass."""
    from cloudfree.models.registry import check_level
    from cloudfree.pipeline.errors import ModelError

    l1c, l2a = _s2_item("S2A_MSIL1C_20200101T000000_N0209_R000_T33UUU"), _s2_item("S2A_MSIL2A_20200101_T33UUU")
    l2a_model = build_model("ca-mtcr")
    assert l2a_model.spec.level == "L2A"
    check_level(l2a_model, [l2a])
    with pytest.raises(ModelError) as err:
        check_level(l2a_model, [l2a, l1c])
    msg = str(err.value)
    assert l1c.id in msg and "L1C" in msg and "L2A" in msg and "model.allow_level_mismatch" in msg
    assert "catalog.collection" in msg
    with caplog.at_level("WARNING"):
        check_level(l2a_model, [l1c], allow_mismatch=True)
    assert l1c.id in caplog.text
    check_level(build_model("temporal"), [l1c, l2a])  # level "any"


def test_run_refuses_an_l2a_model_on_the_l1c_demo(demo_config):
    """The demo catalog is L1C: an L2A-trained model fails every target before any read, with the fix named."""
    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(model={"name": "ca-mtcr", "allow_experimental": True},
                              output={"dir": str(demo_config.output.dir) + "-level"})
    results = run(cfg)
    assert results and all(r.status == "failed" for r in results)
    assert all("L1C" in r.error and "allow_level_mismatch" in r.error for r in results)
