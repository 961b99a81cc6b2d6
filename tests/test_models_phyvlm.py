"""PhyVLM-CR: kernel equations, transmission recovery, fusion, priors (temporal / reference / model / diffusers adapter)."""

from __future__ import annotations

import dataclasses
import pickle
import warnings

import numpy as np
import pytest

from cloudfree.models._filters import block_mean, guided_filter, nanmedian_axis0, upsample_bilinear
from cloudfree.models.phyvlm import PhyVLMCR, atmospheric_light, brightness_saturation, paper_params, phyvlm_kernel
from cloudfree.models.priors import (
    DiffusersPrior,
    ModelPrior,
    PriorBackendMissingError,
    ReferencePrior,
    extend_rgb_to_bands,
    reflectance_to_rgb,
    rgb_to_reflectance,
)
from cloudfree.models.registry import build_model
from cloudfree.pipeline.contract import SOURCE_MODEL, SOURCE_REFERENCE_BASE, SOURCE_TARGET, TileInputs
from cloudfree.pipeline.errors import ModelError, WeightsError
from cloudfree.pipeline.evaluation.cases import simulated_case
from cloudfree.pipeline.evaluation.metrics import psnr
from cloudfree.pipeline.evaluation.simulate import CloudSpec

BANDS = ("B02", "B03", "B04", "B08")


def _clear(n: int = 128, seed: int = 3) -> np.ndarray:
    """Textured synthetic surface (smooth fields + edges), reflectance 0.03-0.45."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.standard_normal((n, n)), 6)
    fields = (ndimage.gaussian_filter(rng.standard_normal((n, n)), 2) > 0).astype(np.float32)
    spec = np.array([0.05, 0.08, 0.07, 0.30], np.float32)
    soil = np.array([0.12, 0.16, 0.20, 0.28], np.float32)
    img = spec[:, None, None] * fields + soil[:, None, None] * (1 - fields)
    return np.clip(img * (1 + 0.3 * base / base.std()), 0.01, 0.6).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    return simulated_case(_clear(), BANDS, seed=5, spec=CloudSpec(scale=48.0))


def test_fast_guided_filter_close_to_exact_and_upsampling():
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    g = (np.sin(5 * yy) + xx).astype(np.float32)
    src = np.stack([g, 2 * g + 1])
    exact, fast = guided_filter(g, src, 8, 1e-3), guided_filter(g, src, 8, 1e-3, subsample=4)
    assert np.abs(exact - fast).max() < 0.05
    smooth = (yy + 2 * xx).astype(np.float32)
    up = upsample_bilinear(block_mean(smooth, 4), smooth.shape)
    assert np.abs(up - smooth)[4:-4, 4:-4].max() < 1e-4
    # weighted filter: a zero-weight outlier does not move its neighbours
    flat = np.zeros((40, 40), np.float32)
    p = flat.copy()
    p[20, 20] = 10.0
    w = np.ones_like(p)
    w[20, 20] = 0.0
    assert np.abs(guided_filter(flat, p, 3, 1e-2, weights=w)).max() < 1e-3


def test_nanmedian_axis0_matches_numpy():
    rng = np.random.default_rng(0)
    for t in (1, 2, 3, 5):
        x = rng.random((t, 4, 5)).astype(np.float32)
        x[rng.random(x.shape) < 0.3] = np.nan
        with warnings.catch_warnings():  # all-NaN columns warn in numpy
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmedian(x, axis=0)
        np.testing.assert_allclose(nanmedian_axis0(x), ref, equal_nan=True, rtol=1e-6)


def test_atmospheric_light_from_bright_flat_cloud(case):
    v, s = brightness_saturation(case.target, [0, 1, 2])
    a, p, omega = atmospheric_light(case.target, v, s)
    # simulated cloud albedo is 0.83-0.84; A must sit near it, far above the surface
    assert np.all(np.abs(a - np.array([0.83, 0.83, 0.84, 0.84])) < 0.08)
    assert p.shape == v.shape and 0 <= p.min() and p.max() <= 1 and omega.shape == v.shape


def test_atmospheric_light_restricted_to_thick_cloud_region():
    """A bright cloud-free surface (snow-like) fools eq. 4 on the whole image; the cloud region does not."""
    rng = np.random.default_rng(0)
    img = np.full((3, 64, 64), 0.05, np.float32) + rng.normal(0, 0.002, (3, 64, 64)).astype(np.float32)
    img[:, :, :20] = 0.9  # bright flat surface, clear
    img[:, 40:, 30:] = np.array([0.3, 0.31, 0.32], np.float32)[:, None, None]  # the (dim) thick cloud
    cloud = np.zeros((64, 64), bool)
    cloud[40:, 30:] = True
    v, s = brightness_saturation(img, [0, 1, 2])
    a_all, _, _ = atmospheric_light(img, v, s)
    a_cloud, _, omega = atmospheric_light(img, v, s, cloud_region=cloud)
    assert a_all.min() > 0.8
    np.testing.assert_allclose(a_cloud, [0.3, 0.31, 0.32], atol=0.01)
    assert omega.any() and not omega[~cloud].any()
    # too small a region falls back to the whole image
    tiny = np.zeros_like(cloud)
    tiny[50, 50] = True
    np.testing.assert_allclose(atmospheric_light(img, v, s, cloud_region=tiny)[0], a_all)


def test_omega_floor_zeroes_weight_where_t_is_clamped(case):
    no_ref = np.zeros((0,) + case.target.shape, np.float32)
    k = phyvlm_kernel(case.target, case.truth, no_ref, np.zeros((0,) + case.target.shape[1:], bool),
                      paper_params(omega_t_floor=0.1), visible_idx=[0, 1, 2])
    low = k.t < 0.1
    assert low.any() and np.all(k.omega[low] == 0)
    np.testing.assert_allclose(k.omega[~low], np.exp(-4.0 * (1 - k.t[~low])), rtol=1e-5)


def test_scene_context_gives_same_statistics_to_every_tile(case):
    """fit_scene's A and alignments are used by every tile: no per-tile jumps, and whole-image predict with the
    context equals predict without it when the tile is the scene."""
    from dataclasses import replace

    from cloudfree.pipeline.evaluation.running import predict_tiled

    model = build_model("phyvlm-cr")
    assert model.spec.scene_context
    tile = case.tile_inputs()
    ctx = model.fit_scene(tile)
    assert set(ctx) == {"A", "alignment", "alignment_visible"}
    assert ctx["A"].shape == (4,) and len(ctx["alignment"]) == tile.references.shape[0]
    whole = model.predict(tile)
    with_ctx = model.predict(replace(tile, context=ctx))
    np.testing.assert_allclose(with_ctx.reflectance, whole.reflectance, atol=1e-5, equal_nan=True)
    tiled = predict_tiled(model, replace(tile, context=ctx), tile_size=64)
    a = tiled.diagnostics["A"]
    np.testing.assert_allclose(a[:, :64, :64], a[:, 64:, 64:])  # the same A on every tile
    np.testing.assert_allclose(a[:, 0, 0], ctx["A"])


def test_kernel_recovers_known_transmission_with_ideal_prior(case):
    """With J_VLM = the true surface, eq. 5 inverts eq. 1: t matches the simulated transmission."""
    no_ref = np.zeros((0,) + case.target.shape, np.float32)
    k = phyvlm_kernel(case.target, case.truth, no_ref, np.zeros((0,) + case.target.shape[1:], bool),
                      paper_params(), visible_idx=[0, 1, 2])
    shadowless = case.regions["thin"] | case.regions["thick"] | ~case.regions["cloudy"]
    err = np.abs(k.t - case.transmission)[shadowless]
    assert np.median(err) < 0.05 and np.mean(err) < 0.08
    assert k.omega.min() >= np.exp(-4.0) - 1e-6 and k.omega.max() <= 1.0
    np.testing.assert_allclose(k.omega, np.exp(-4.0 * (1 - k.t)), rtol=1e-5)
    assert 0 <= k.u.min() and k.u.max() <= 1


def test_phyvlm_model_beats_none_and_sets_provenance(case):
    tile = case.tile_inputs()
    res = build_model("phyvlm-cr").predict(tile)
    none = build_model("none").predict(tile)
    cloudy = case.regions["cloudy"]
    assert psnr(res.reflectance, case.truth, cloudy) > psnr(none.reflectance, case.truth, cloudy) + 10
    for key in ("A", "t", "U", "omega", "J_phy"):
        assert key in res.diagnostics
    assert res.diagnostics["A"].shape == tile.target.shape
    # clear & visible pixels are the target's own; thick cloud comes from a reference
    keep = res.source == SOURCE_TARGET
    np.testing.assert_array_equal(res.reflectance[:, keep], tile.target[:, keep])
    assert not tile.cloud_mask[keep].any()
    thick = case.regions["thick"]
    assert (res.source[thick] >= SOURCE_REFERENCE_BASE).mean() > 0.9
    assert res.confidence.min() >= 0 and res.confidence.max() <= 1


def test_halo_follows_configured_radii_and_prior():
    """The halo is computed from the configured params and the prior's own receptive field, not fixed at import."""
    ref = build_model("phyvlm-cr", {"prior": "reference"})
    assert ref.spec.halo == 2 * 8 + 2 * 8 + 8 + 2
    wide = build_model("phyvlm-cr", {"prior": "reference", "base_radius": 20, "lp_radius": 30})
    assert wide.spec.halo == 2 * 20 + 2 * 8 + 30 + 2
    temporal = build_model("phyvlm-cr", {"temporal_options": {"local_radius": 32}})
    assert temporal.spec.halo == ref.spec.halo + 5 * 32 + 1
    assert build_model("phyvlm-cr", {"temporal_options": {"local_radius": 0}}).spec.halo == ref.spec.halo
    # a model prior with a larger receptive field than the kernel's widens the halo
    assert build_model("phyvlm-cr", {"prior": "model", "prior_model": "dcp"}).spec.halo == \
        ref.spec.halo + build_model("dcp").spec.halo


def test_phyvlm_without_reference_uses_dark_channel_prior(case, caplog):
    t = case.tile_inputs()
    tile = TileInputs(bands=t.bands, target=t.target, cloud_prob=t.cloud_prob, cloud_mask=t.cloud_mask,
                      references=t.references[:0], reference_masks=t.reference_masks[:0], target_id="noref")
    with caplog.at_level("WARNING"):
        res = build_model("phyvlm-cr").predict(tile)
    assert "dark-channel" in caplog.text
    assert np.isfinite(res.reflectance).all()
    assert set(np.unique(res.source)) <= {SOURCE_TARGET, SOURCE_MODEL}


def test_model_prior_hook_calls_any_registered_model(case):
    tile = case.tile_inputs()
    prior = ModelPrior("reference-replace")
    got = prior(tile)
    expected = build_model("reference-replace").predict(tile).reflectance
    np.testing.assert_array_equal(got.image, expected)
    model = build_model("phyvlm-cr", {"prior": "model", "prior_model": "dcp"})
    res = model.predict(tile)
    assert np.isfinite(res.reflectance).all()
    pickle.loads(pickle.dumps(model))  # picklable handle, lazily rebuilt prior model
    with pytest.raises(ModelError, match="prior_model"):
        build_model("phyvlm-cr", {"prior": "model"})
    with pytest.raises(ModelError):
        ModelPrior("phyvlm-cr")
    # no learned model is registered: the wrapper is not called "learned"
    from cloudfree.models.priors import build_prior

    with pytest.raises(ModelError, match="renamed 'model'"):
        build_prior("learned", model_name="dcp")


def test_reference_prior_is_aligned_reference(case):
    got = ReferencePrior()(case.tile_inputs())
    assert got.valid.all()
    assert psnr(got.image, case.truth) > 25


def test_diffusers_adapter_missing_weights_and_package(tmp_path, case, monkeypatch):
    tile = case.tile_inputs()
    with pytest.raises(WeightsError, match="huggingface-cli download"):
        DiffusersPrior(tmp_path / "nope")(tile)
    # the package made unimportable whether or not it is installed (a None entry in sys.modules makes
    # `import diffusers` raise ImportError), so this checks the error path, not this machine's packages
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(PriorBackendMissingError, match="pip install diffusers"):
        DiffusersPrior(tmp_path)(tile)  # folder exists, package cannot be imported
    assert issubclass(PriorBackendMissingError, ModelError)


def test_diffusers_adapter_pre_and_post_processing_with_fake_pipeline(case):
    tile = case.tile_inputs()
    calls = {}

    class FakeOut:
        def __init__(self, images):
            self.images = images

    def fake_pipeline(image, prompt, **kw):
        calls["prompt"], calls["size"] = prompt, np.asarray(image).shape
        # "edits" by returning the truth's RGB at half resolution (the adapter must resize back)
        rgb = reflectance_to_rgb(case.truth, [2, 1, 0], 0.3, 2.2)[::2, ::2]
        return FakeOut([rgb])

    prior = DiffusersPrior(None, pipeline=fake_pipeline)
    got = prior(tile)
    assert calls["prompt"] == "去除云" and calls["size"] == tile.shape + (3,)
    assert got.image.shape == tile.target.shape
    rgb_err = np.abs(got.image[:3] - case.truth[:3])
    assert np.median(rgb_err) < 0.02  # 8-bit quantisation + half-resolution round trip
    # round trip of the reflectance <-> RGB mapping is exact up to quantisation
    x = np.clip(case.truth, 0, 0.3)
    back = rgb_to_reflectance(reflectance_to_rgb(x, [2, 1, 0], 0.3, 2.2), 0.3, 2.2)
    assert np.abs(back - x[[2, 1, 0]]).max() < 0.006
    # NIR predicted from RGB by the regression fitted on clear target pixels
    nir = extend_rgb_to_bands(case.truth, [2, 1, 0], case.truth[[2, 1, 0]], np.ones(tile.shape, bool))[3]
    assert np.corrcoef(nir.ravel(), case.truth[3].ravel())[0, 1] > 0.8
    model = PhyVLMCR({}, prior=prior)
    assert np.isfinite(model.predict(tile).reflectance).all()


def test_cloudy_reference_fallback_only_under_opaque_cloud(case):
    """No clear reference anywhere: pixels the kernel finds opaque (t < t0) take the masked reference as I_ref;
    pixels where the target shows through never do."""
    refs = case.references[1:2]
    none_clear = np.zeros((1,) + case.target.shape[1:], bool)
    fb = case.cloud_prob >= 0.5
    floor = paper_params(omega_t_floor=0.1)
    k = phyvlm_kernel(case.target, case.truth, refs, none_clear, floor, visible_idx=[0, 1, 2], fallback_region=fb)
    k0 = phyvlm_kernel(case.target, case.truth, refs, none_clear, floor, visible_idx=[0, 1, 2])
    thick = case.regions["thick"]
    used = k.reference_index >= 0
    assert not (k0.reference_index >= 0).any()
    assert used[thick].mean() > 0.8 and not used[k.t >= 0.1].any() and not used[~fb].any()
    assert psnr(k.restored, case.truth, thick) > psnr(k0.restored, case.truth, thick) + 3
    # through the model: where a clear reference covers every pixel the fallback changes nothing
    tile = case.tile_inputs()
    off = build_model("phyvlm-cr", {"fallback_prob": None}).predict(tile)
    np.testing.assert_array_equal(build_model("phyvlm-cr").predict(tile).reflectance, off.reflectance)


KERNEL_FIELDS = {"base_radius": 4, "base_eps": 1e-2, "base_subsample": 2, "t_radius": 4, "t_eps": 1e-2,
                 "t_subsample": 1, "t0": 0.3, "alpha": 0.5, "beta": 0.3, "lp_radius": 4, "gamma": 2.0,
                 "kappa_percentile": 70.0, "lambda_percentile": 50.0, "t_visible": 0.5,
                 "reference_combine": "median", "omega_t_floor": 0.2, "lp_weighted": True, "physics_subsample": 2,
                 "shadow_term": True}


def test_kernel_reads_every_parameter_from_its_params(case):
    """phyvlm_kernel takes the model's PhyVLMParams: changing any field it documents changes its outputs (no field
    silently ignored). The model's outputs were checked byte-identical before and after the kernel moved from 29
    keyword arguments to its Params (issue 23)."""
    refs, valid = case.references, np.ones((len(case.references),) + case.target.shape[1:], bool)
    valid[0, :40] = False  # the references differ where "first" and "median" choose

    def run(params):
        k = phyvlm_kernel(case.target, case.truth * 0.9, refs, valid, params, visible_idx=[0, 1, 2],
                          shadow_candidates=case.cloud_mask)
        return [np.asarray(getattr(k, f.name)) for f in dataclasses.fields(k)]

    base = run(paper_params())
    for name, value in KERNEL_FIELDS.items():
        other = run(paper_params(**{name: value}))
        assert any(a.shape != b.shape or not np.array_equal(a, b, equal_nan=True) for a, b in zip(base, other)), name
