"""Evaluation SAR is never simulated from the truth it is scored against (issue 20, "SAR models honest about SAR").

``generative_steps`` gives CM-CR SIMULATED Sentinel-1 on the evaluation cases (none has real S1). It must come from
another date of the case (its clearest reference), as a real S1 scene days away would, not from ``case.truth``.
Real clear pixels: the 29RKH L2A tile (../shared/data); clouds and references SIMULATED (cases.simulated_case).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import rasterio

from tests.conftest import shared

BANDS = ("B02", "B03", "B04", "B08")


def _case():
    from cloudfree.pipeline.evaluation.cases import simulated_case

    d = shared("s2-l2a-tile-29RKH-100m")
    clear = []
    for b in BANDS:
        with rasterio.open(d / f"{b}.tif") as ds:
            clear.append(ds.read(1, window=((300, 396), (300, 396))).astype(np.float32) / 10000.0)
    return simulated_case(np.stack(clear), BANDS, seed=3)


def test_case_sar_is_independent_of_the_truth_and_comes_from_the_clearest_reference() -> None:
    from cloudfree.pipeline.evaluation.generative_steps import case_sar_db, reference_sar_db
    from cloudfree.pipeline.training.datasets import simulate_sar

    case = _case()
    assert case.reference_masks[0].any() and not case.reference_masks[1].any()  # ref0 partly cloudy, ref1 clear
    sar = case_sar_db(case, seed=5)
    assert sar.shape == (1, 2) + case.truth.shape[1:]
    assert -26.0 <= float(sar.min()) and float(sar.max()) <= 0.0 and np.median(sar[0, 0]) < -5  # dB, VV
    # another truth, same inputs: the same SAR (the truth never reaches it)
    other = dataclasses.replace(case, truth=case.truth[:, ::-1, ::-1].copy() * 0.5)
    np.testing.assert_array_equal(case_sar_db(other, seed=5), sar)
    # it is the SAR of the clear reference (ref1), and differs from what the truth's own SAR would be
    _, order = reference_sar_db(case.references, case.reference_masks, case.reference_dt_days, BANDS, 5)
    assert order[0] == 1
    from_ref = simulate_sar(case.references[1], BANDS, np.random.default_rng(5)) * 25.0 - 25.0
    np.testing.assert_allclose(sar[0], from_ref, atol=1e-5)
    from_truth = simulate_sar(case.truth, BANDS, np.random.default_rng(5)) * 25.0 - 25.0
    assert np.abs(sar[0] - from_truth).max() > 0.1


def test_masked_reference_pixels_are_filled_from_the_next_reference() -> None:
    from cloudfree.pipeline.evaluation.generative_steps import reference_sar_db
    from cloudfree.pipeline.training.datasets import simulate_sar

    case = _case()
    masks = case.reference_masks.copy()
    masks[1, :10] = True  # the clear reference gets a gap of 10 rows
    masks[0, :10] = False  # where ref0 is clear
    sar, order = reference_sar_db(case.references, masks, case.reference_dt_days, BANDS, 1)
    assert order == [1, 0]
    surface = case.references[1].copy()
    surface[:, :10] = case.references[0][:, :10]
    expected = simulate_sar(surface, BANDS, np.random.default_rng(1)) * 25.0 - 25.0
    np.testing.assert_allclose(sar[0], expected, atol=1e-5)


def test_bigearthnet_cases_carry_the_real_sar_and_the_evaluation_scores_sar_models(tmp_path) -> None:
    """`cloudfree evaluate --cases bigearthnet-sar`: the 6 real co-located S1+S2 patches with real Romania cloud masks
    transplanted; the SAR models run on REAL SAR (the files' dB), models needing references are left out."""
    import json

    from click.testing import CliRunner

    from cloudfree.pipeline.cli import main
    from cloudfree.pipeline.evaluation.cases import bigearthnet_sar_cases

    ben = shared("s1s2-pairs-bigearthnet")
    shared("s2-l2a-stack-romania-nrt")
    cases = bigearthnet_sar_cases(ben.parent)
    assert len(cases) == 6 and len({c.meta["donor"] for c in cases}) == 6
    c = cases[0]
    with rasterio.open(next((ben / "s1" / c.meta["s1_patch"]).glob("*_VV.tif"))) as ds:
        vv = ds.read(1)[10:110, 10:110]
    np.testing.assert_allclose(c.tile_inputs().sar[0, 0], np.clip(vv, -25, 0))
    with rasterio.open(next((ben / "s2" / c.meta["s2_patch"]).glob("*_B04.tif"))) as ds:
        np.testing.assert_allclose(c.truth[2], ds.read(1)[10:110, 10:110] / 10000.0, rtol=1e-6)
    for case in cases:
        cloudy = case.regions["cloudy"]
        assert 0.2 < cloudy.mean() < 0.95 and case.references.shape[0] == 0
        assert np.abs(case.target - case.truth)[:, cloudy].mean() > 0.01  # the cloud is there
        assert "SIMULATED" in case.notes and "REAL co-located S1" in case.notes
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", "--models", "mean-fill,cm-cr,sar-optical-fusion,median-composite",
                                  "--cases", "bigearthnet-sar", "--out", str(out), "--no-speed", "--no-figures",
                                  "--no-mask-loss"])
    assert r.exit_code == 0, r.output
    payload = json.loads((out / "evaluation.json").read_text())
    scored = {(row["model"], row["case"]) for row in payload["rows"] if row["region"] == "cloudy"}
    for m in ("mean-fill", "cm-cr", "sar-optical-fusion"):
        assert {cs for mm, cs in scored if mm == m} == {c.name for c in cases}, m
    assert not any(m == "median-composite" for m, _ in scored)  # needs a reference date: none here
    assert all(np.isfinite(row["psnr"]) for row in payload["rows"])
    md = (out / "evaluation.md").read_text()
    assert "REAL SAR and SIMULATED clouds" in md and "| cm-cr | cloudy |" in md
