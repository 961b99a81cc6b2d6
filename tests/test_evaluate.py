"""Metrics against known values, tiled prediction, writers and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.evaluate import (
    evaluate_models,
    figure,
    mae,
    predict_tiled,
    psnr,
    sam,
    simulated_case,
    slovakia_arrays_to_case,
    ssim,
    summarise,
    to_markdown,
    write_json,
)
from models.registry import build_model
from pipeline.evaluation.simulate import CloudSpec

from tests.test_models_phyvlm import BANDS, _clear

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_metrics_known_values():
    truth = np.full((3, 10, 10), 0.5, np.float32)
    pred = truth + 0.1
    assert psnr(pred, truth) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert psnr(pred, truth, data_range=0.5) == pytest.approx(20 * np.log10(0.5 / 0.1), abs=1e-4)
    assert psnr(truth, truth) == float("inf")
    assert mae(pred, truth) == pytest.approx(0.1, abs=1e-6)
    # spectra [1, 0, 0] vs [1, 1, 0]: 45 degrees
    p = np.zeros((3, 2, 2), np.float32)
    g = np.zeros((3, 2, 2), np.float32)
    p[0], g[0], g[1] = 1, 1, 1
    assert sam(p, g) == pytest.approx(45.0, abs=1e-4)
    assert sam(2 * g, g) == pytest.approx(0.0, abs=1e-3)  # scale-invariant
    rng = np.random.default_rng(0)
    img = rng.random((2, 32, 32)).astype(np.float32)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = img + rng.normal(0, 0.2, img.shape).astype(np.float32)
    from skimage.metrics import structural_similarity

    # our SSIM averages the full SSIM map over the region (borders included, unlike skimage's cropped mean)
    expected = np.mean([structural_similarity(img[b].astype(np.float64), noisy[b].astype(np.float64),
                                              data_range=1.0, full=True)[1].mean() for b in range(2)])
    assert ssim(noisy, img) == pytest.approx(expected, abs=1e-6) and ssim(noisy, img) < 0.9
    m = np.zeros((10, 10), bool)
    m[:5] = True
    pred2 = truth.copy()
    pred2[:, 5:] += 0.3  # errors only outside the mask
    assert psnr(pred2, truth, m) == float("inf") and mae(pred2, truth, m) == 0.0


@pytest.fixture(scope="module")
def case():
    return simulated_case(_clear(96, seed=4), BANDS, seed=3, spec=CloudSpec(scale=40.0))


def test_evaluate_models_table_phyvlm_beats_none_on_cloudy(case, tmp_path):
    outputs = {}
    rows = evaluate_models([case], ["none", "reference-replace", "phyvlm-cr"], outputs=outputs)
    assert {r["region"] for r in rows} == {"overall", "cloudy", "thin", "thick"}
    get = {(r["model"], r["region"]): r for r in rows}
    assert get[("phyvlm-cr", "cloudy")]["psnr"] > get[("none", "cloudy")]["psnr"] + 10
    assert get[("phyvlm-cr", "cloudy")]["sam"] < get[("none", "cloudy")]["sam"]
    summary = summarise(rows)
    md = to_markdown(summary, "simulated", ["none", "phyvlm-cr"])
    assert md.count("\n") == 1 + 2 * 4 and "phyvlm-cr" in md
    write_json(tmp_path / "e.json", {"rows": rows})
    assert len(json.loads((tmp_path / "e.json").read_text())["rows"]) == len(rows)
    figure(case, outputs[case.name], tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_predict_tiled_matches_whole_image_for_pointwise_model(case):
    tile = case.tile_inputs()
    model = build_model("reference-replace")
    whole = model.predict(tile)
    tiled = predict_tiled(build_model("none"), tile, tile_size=40)
    np.testing.assert_array_equal(tiled.reflectance, tile.target)
    assert whole.reflectance.shape == tiled.reflectance.shape
    phy = predict_tiled(build_model("phyvlm-cr"), tile, tile_size=48)
    assert np.isfinite(phy.reflectance).all() and "t" in phy.diagnostics


def test_slovakia_case_builder_and_real_data():
    rng = np.random.default_rng(0)
    clean = rng.random((12, 32, 32)).astype(np.float32) * 0.3
    mask = np.zeros((32, 32), np.float32)
    mask[:10], mask[10:20] = 1, 2
    c = slovakia_arrays_to_case(clean + 0.2, clean, mask)
    assert c.regions["thick"].sum() == 320 and c.regions["thin"].sum() == 320
    assert not np.array_equal(c.references[0], clean)  # the reference is simulated, never the truth
    if (DATA / "s2-pair-slovakia" / "cloudy.tif").exists():
        from pipeline.evaluation.evaluate import slovakia_case

        real = slovakia_case(DATA)
        assert real.target.shape == (12, 256, 256) and 0.4 < real.cloud_mask.mean() < 0.6


@pytest.mark.skipif(not (DATA / "s2-l2a-tile-29RKH-100m").is_dir(), reason="shared sample data not found")
def test_bench_models_reports_models_and_io(tmp_path):
    from pipeline.evaluation.bench_models import bench_models, main, read_window

    res = bench_models(["none", "phyvlm-cr"], DATA, size=128, repeats=1)
    assert set(res["models"]) == {"none", "phyvlm-cr"}
    assert all(m["mpx_per_s"] > 0 for m in res["models"].values())
    assert res["models"]["phyvlm-cr"]["fit_scene_seconds"] is not None  # scene context fitted, timed apart
    assert res["models"]["none"]["fit_scene_seconds"] is None
    assert res["io_target_mpx_per_s"] > res["io_model_inputs_mpx_per_s"] > 0
    w = read_window(DATA, 128)
    assert w.shape == (6, 128, 128) and w.dtype == np.float32 and 0 < np.nanmedian(w) < 1
    assert main(["--out", str(tmp_path), "--models", "none", "--size", "64", "--repeats", "1"]) == 0
    assert "io_target_mpx_per_s" in json.loads((tmp_path / "bench_models.json").read_text())
