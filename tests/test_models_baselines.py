"""Baselines (none, dcp, median-composite) and the registry: every model file is registered."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from cloudfree.models.dcp import dcp_dehaze, dark_channel
from cloudfree.models.registry import BUILTIN_MODULES, available_models, build_model
from cloudfree.pipeline.contract import SOURCE_REFERENCE_BASE, SOURCE_TARGET, TileInputs
from cloudfree.pipeline.evaluation.metrics import psnr

BANDS = ("B02", "B03", "B04", "B08")
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def _tile(target, refs=None, ref_masks=None, cloud_mask=None, dts=()):
    nb, ny, nx = target.shape
    refs = np.zeros((0, nb, ny, nx), np.float32) if refs is None else refs.astype(np.float32)
    ref_masks = np.zeros(refs.shape[:1] + (ny, nx), bool) if ref_masks is None else ref_masks
    cm = np.zeros((ny, nx), bool) if cloud_mask is None else cloud_mask
    return TileInputs(bands=BANDS[:nb], target=target.astype(np.float32), cloud_prob=cm.astype(np.float32),
                      cloud_mask=cm, references=refs, reference_masks=ref_masks, reference_dt_days=tuple(dts))


def test_every_model_file_is_registered():
    registered = {cls.__module__ for cls in available_models().values()}
    for path in sorted(MODELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [
            node.name for node in tree.body if isinstance(node, ast.ClassDef)
            and {"name", "spec"} <= {getattr(t, "id", "") for s in node.body if isinstance(s, ast.Assign)
                                     for t in s.targets}
        ]
        if names:
            mod = f"cloudfree.models.{path.stem}"
            assert mod in BUILTIN_MODULES and mod in registered, f"{path.name} defines {names} but is not registered"
    assert {"none", "dcp", "median-composite", "reference-replace", "phyvlm-cr"} <= set(available_models())


def test_none_returns_target_and_mask_confidence():
    rng = np.random.default_rng(0)
    target = rng.random((4, 16, 16)).astype(np.float32)
    cm = np.zeros((16, 16), bool)
    cm[:8] = True
    res = build_model("none").predict(_tile(target, cloud_mask=cm))
    np.testing.assert_array_equal(res.reflectance, target)
    np.testing.assert_array_equal(res.confidence, 1 - cm)
    assert (res.source == SOURCE_TARGET).all()


def test_dcp_kernel_inverts_uniform_haze():
    """Haze with known A and t on a surface whose dark channel is ~0: DCP recovers t and improves PSNR."""
    rng = np.random.default_rng(1)
    from scipy import ndimage

    surface = np.clip(ndimage.gaussian_filter(rng.random((4, 96, 96)), (0, 3, 3)) * 0.5, 0, 1).astype(np.float32)
    surface[0, ::4, ::4] = 0.0  # dark pixels in every patch, as the prior assumes
    a = np.array([0.8, 0.8, 0.82, 0.82], np.float32)
    t_true = 0.6
    hazy = surface * t_true + a[:, None, None] * (1 - t_true)
    hazy[:, :12, :12] = a[:, None, None]  # an opaque cloud gives A
    j, t, a_est = dcp_dehaze(hazy, patch=7, omega=1.0, gf_radius=8)
    assert np.abs(a_est - a).max() < 0.02
    assert abs(float(np.median(t)) - t_true) < 0.05
    inner = (slice(None), slice(10, -10), slice(10, -10))
    assert psnr(j[inner], surface[inner]) > psnr(hazy[inner], surface[inner]) + 5
    assert dark_channel(surface, 7).max() < 0.05


def test_dcp_model_improves_thin_haze_case():
    from cloudfree.pipeline.evaluation.cases import simulated_case
    from cloudfree.pipeline.evaluation.simulate import CloudSpec

    from tests.test_models_phyvlm import _clear

    case = simulated_case(_clear(seed=8), BANDS, seed=2, spec=CloudSpec(cover=0.9, thick_fraction=0.0,
                                                                         shadow_strength=0.0, scale=64))
    tile = case.tile_inputs()
    res = build_model("dcp", {"keep_clear_target": False, "patch": 7}).predict(tile)
    thin = case.regions["thin"]
    assert psnr(res.reflectance, case.truth, thin) > psnr(case.target, case.truth, thin) + 2


def test_median_composite_ignores_masked_observations():
    ny = nx = 8
    target = np.full((4, ny, nx), 0.9, np.float32)  # all cloud
    cm = np.ones((ny, nx), bool)
    refs = np.stack([np.full((4, ny, nx), v, np.float32) for v in (0.1, 0.2, 0.3, 5.0)])
    masks = np.zeros((4, ny, nx), bool)
    masks[3] = True  # the outlier reference is cloudy everywhere: must not count
    masks[0, :4] = True  # ref 0 cloudy in the top half
    res = build_model("median-composite").predict(_tile(target, refs, masks, cm, dts=(-5, 10, 20, 1)))
    np.testing.assert_allclose(res.reflectance[:, :4], 0.25)  # median(0.2, 0.3)
    np.testing.assert_allclose(res.reflectance[:, 4:], 0.2)  # median(0.1, 0.2, 0.3)
    assert (res.source[4:] == SOURCE_REFERENCE_BASE + 1).all()
    best = build_model("median-composite", {"method": "best"}).predict(_tile(target, refs, masks, cm,
                                                                                 dts=(-5, 10, 20, 1)))
    np.testing.assert_allclose(best.reflectance[:, 4:], 0.1)  # ref 0 (5 days) is nearest; ref 3 (1 day) masked
    np.testing.assert_allclose(best.reflectance[:, :4], 0.2)
    assert (best.source[:4] == SOURCE_REFERENCE_BASE + 1).all()


def test_median_composite_keeps_clear_target():
    target = np.full((4, 6, 6), 0.4, np.float32)
    cm = np.zeros((6, 6), bool)
    cm[0] = True
    refs = np.full((1, 4, 6, 6), 0.1, np.float32)
    res = build_model("median-composite").predict(_tile(target, refs, cloud_mask=cm, dts=(3,)))
    np.testing.assert_allclose(res.reflectance[:, 1:], 0.4)
    np.testing.assert_allclose(res.reflectance[:, 0], 0.1)
