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
