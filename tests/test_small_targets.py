"""Small targets (issue 22's batch of 104 px targets): the shortcuts they take give the general path's bytes.

Real data: the decimated 29RKH L2A tile in ../shared/data (the bench's local items: the target and two dated
copies as references), the bench's own target windows.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-tile-29RKH-100m"

pytestmark = pytest.mark.skipif(not (DATA / "B02.tif").exists(), reason="../shared/data 29RKH tile not available")

#: item properties that hold the time of the run (not the data): left out of the comparison.
VOLATILE = {"created", "updated", "processing:datetime", "cloudfree:tile_seconds"}


def _stable(d):
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_stable(x) for x in d]
    return d


def _batch(out: Path, n: int, model_name: str = "reference-replace") -> list[Path]:
    """``n`` targets of the bench's small-target batch through ``process_target`` into ``out``; their folders."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.bench import _config, batch_windows, dated_items
    from cloudfree.pipeline.runner import dask_context, process_target
    from cloudfree.stages.search import Candidate, TargetPlan

    items = dated_items(DATA, 3)
    plan = TargetPlan(items[0], tuple(Candidate(item=it, dt_days=-5.0 * k, clear_fraction=1.0, overlap=1.0,
                                                same_orbit=True, same_tile=True, score=1.0, reason="test")
                                      for k, it in enumerate(items[1:], 1)), ())
    cfg0 = _config(100.0, out, model_name, 2).replace(output={"quicklook": True})
    model = build_model(model_name, {})
    folders = []
    with dask_context(cfg0):
        for i, aoi in enumerate(batch_windows(items[0], 100, n)):
            cfg = cfg0.replace(search={"aoi": list(aoi)}, output={"dir": str(out / f"t{i}")})
            res = process_target(plan, model, cfg, "test-run")
            assert res.status == "done", res.error
            folders.append(out / f"t{i}")
    return folders


def _same_outputs(a: Path, b: Path) -> int:
    n = 0
    for f in sorted(p for p in a.rglob("*") if p.is_file() and ".staging" not in p.parts and "lock" not in p.name):
        g = b / f.relative_to(a)
        assert g.exists(), g
        if f.suffix == ".json":
            assert _stable(json.loads(f.read_text())) == _stable(json.loads(g.read_text())), f
        else:
            assert filecmp.cmp(f, g, shallow=False), f"{f.relative_to(a)} differs"
        n += 1
    return n


@pytest.mark.parametrize("model_name", ["reference-replace", "phyvlm-cr"])
def test_small_target_shortcuts_give_the_general_paths_bytes(tmp_path, monkeypatch, model_name):
    """Three targets of the bench's batch: as they run now (inputs read once and kept as numpy, the xarray steps
    eager) against the general path (the inputs persisted as dask blocks, so every step builds its graph): every COG, VRT and quicklook byte for
    byte the same, the STAC items the same apart from the run's timestamps."""
    import dask

    import cloudfree.stages.load as load

    fast = _batch(tmp_path / "fast", 3, model_name)
    monkeypatch.setattr(load, "read_small_once", lambda geobox, window, *arrays: dask.persist(*arrays))
    general = _batch(tmp_path / "general", 3, model_name)
    assert sum(_same_outputs(f, g) for f, g in zip(fast, general)) >= 3 * 12

