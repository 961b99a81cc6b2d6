"""Diffusion Enhancement and CM-CR: samplers, losses, noise and the model interface (untrained networks here; the
shipped weights are exercised in test_generative_trained.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloudfree.models._generative import GEN_BANDS, coordinate_noise, extend_bands, scene_seed
from cloudfree.models.cm_cr import (
    SIGMA_MIN,
    CMCRNetworks,
    EDMPrecond,
    heun_step,
    pseudo_huber,
    sample_consistency,
    sample_teacher,
)
from cloudfree.models.diffusion_enhancement import (
    DDPMSchedule,
    DENetworks,
    ddim_sample,
    ddim_timesteps,
    loss_wa,
)
from cloudfree.models.registry import build_model
from cloudfree.pipeline.contract import SOURCE_MODEL, SOURCE_TARGET, TileInputs
from cloudfree.pipeline.errors import ConfigError, ContractError, ModelError, WeightsError


# ---------------------------------------------------------------------------------------------------- noise
def test_coordinate_noise_same_seed_same_bytes_and_overlaps_agree():
    a = coordinate_noise(123, 0, 4, (100, 200), (64, 64))
    b = coordinate_noise(123, 0, 4, (100, 200), (64, 64))
    assert a.tobytes() == b.tobytes()
    # a tile shifted by (16, 24) sees the same noise where the two overlap
    c = coordinate_noise(123, 0, 4, (116, 224), (64, 64))
    np.testing.assert_array_equal(a[:, 16:, 24:], c[:, :48, :40])
    # another seed, step or band draws different noise
    assert not np.allclose(a, coordinate_noise(124, 0, 4, (100, 200), (64, 64)))
    assert not np.allclose(a, coordinate_noise(123, 1, 4, (100, 200), (64, 64)))
    assert not np.allclose(a[0], a[1])


def test_coordinate_noise_is_standard_normal():
    z = coordinate_noise(7, 3, 2, (0, 0), (256, 256)).ravel().astype(np.float64)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1) < 0.01
    assert abs(np.mean(z > 1.96) - 0.025) < 0.002  # tail mass of N(0, 1)
    # neighbouring pixels are uncorrelated
    img = z.reshape(2, 256, 256)[0]
    assert abs(np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]) < 0.02


def test_scene_seed_depends_on_seed_and_scene():
    assert scene_seed(0, "A") == scene_seed(0, "A")
    assert scene_seed(0, "A") != scene_seed(1, "A")
    assert scene_seed(0, "A") != scene_seed(0, "B")


# ---------------------------------------------------------------------------------------------------- DDIM
def _oracle(x0_star: torch.Tensor, sched: DDPMSchedule):
    ab = sched.alphas_cumprod

    def eps_fn(x, t):
        a = float(ab[int(t[0])])
        return (x - a**0.5 * x0_star) / (1 - a) ** 0.5

    return eps_fn


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_eta0_follows_a_known_trajectory(steps):
    """With the exact noise predictor of a point mass, deterministic DDIM maps a point of the trajectory
    x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε to the same trajectory at every step and ends exactly at x0."""
    g = torch.Generator().manual_seed(0)
    sched = DDPMSchedule()
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    ab = sched.alphas_cumprod
    ts = ddim_timesteps(steps)
    x_T = ab[ts[0]] ** 0.5 * x0 + (1 - ab[ts[0]]) ** 0.5 * eps
    seen = []

    def eps_fn(x, t):
        k = int(t[0])
        on_path = ab[k] ** 0.5 * x0 + (1 - ab[k]) ** 0.5 * eps
        seen.append(float((x - on_path).abs().max()))
        return _oracle(x0, sched)(x, t)

    out = ddim_sample(eps_fn, None, None, lambda k: x_T, sched, steps, ddim_eta=0.0, clip=None)
    assert len(seen) == steps
    assert max(seen) < 1e-9
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)


def test_ddim_fusion_and_w_floor():
    """Eq. 13 at every step with the W floor: an oracle CNP gives x0 exactly, so the output is (1-W) x0 + W x0E
    with W = max(W_net, w_floor)."""
    sched = DDPMSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x0e = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = lambda k: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(k), dtype=torch.float64)  # noqa: E731
    rec: list = []
    out = ddim_sample(_oracle(x0, sched), lambda x, t: torch.zeros_like(x), x0e, noise, sched, 10, w_floor=0.3,
                      clip=None, record=rec)
    torch.testing.assert_close(out, 0.7 * x0 + 0.3 * x0e, atol=1e-9, rtol=0)
    assert len(rec) == 10 and all(len(ws) == 2 and all(abs(w - 0.3) < 1e-7 for w in ws) for _, ws in rec)
    out1 = ddim_sample(_oracle(x0, sched), lambda x, t: torch.ones_like(x), x0e, noise, sched, 10, w_floor=0.3,
                       clip=None)
    torch.testing.assert_close(out1, x0e, atol=1e-9, rtol=0)


def test_ddim_stochastic_is_deterministic_given_noise():
    sched = DDPMSchedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8, generator=g)

    def noise(seed):
        return lambda k: torch.from_numpy(coordinate_noise(seed, k, 4, (0, 0), (8, 8)))[None]

    eps_fn = lambda x, t: 0.9 * _oracle(x0, sched)(x, t)  # noqa: E731  (imperfect predictor: noise matters)
    a = ddim_sample(eps_fn, None, None, noise(5), sched, 20, ddim_eta=1.0)
    b = ddim_sample(eps_fn, None, None, noise(5), sched, 20, ddim_eta=1.0)
    c = ddim_sample(eps_fn, None, None, noise(6), sched, 20, ddim_eta=1.0)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.allclose(a, c)


def test_wa_weights_in_unit_interval_and_wa_loss_only_trains_wa():
    torch.manual_seed(0)
    nets = DENetworks(cnp_base=8, wa_base=8)
    for p in nets.wa.out.parameters():  # make the WA output non-trivial
        torch.nn.init.normal_(p, std=5.0)
    x = torch.randn(2, 4, 16, 16) * 50
    with torch.no_grad():
        w = nets.weight(x, torch.tensor([0.0, 999.0]), x, -x)
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    assert float(w.max() - w.min()) > 0.5
    x0 = torch.randn(2, 4, 16, 16)
    loss = loss_wa(nets, DDPMSchedule(), x0, x0, torch.zeros(2, 1, 16, 16), x0 + 0.1, torch.tensor([10, 500]),
                   torch.randn(2, 4, 16, 16))
    loss.backward()
    assert all(p.grad is None for p in nets.cnp.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in nets.wa.parameters())


def test_ddim_timesteps():
    assert ddim_timesteps(1) == [999]
    ts = ddim_timesteps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 50
    with pytest.raises(ConfigError):
        ddim_timesteps(0)


# ---------------------------------------------------------------------------------------------------- CM-CR
def _nonzero(module: torch.nn.Module) -> None:
    torch.manual_seed(3)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)


def test_consistency_boundary_condition_is_exact():
    net = EDMPrecond(base=8, kind="cm")
    _nonzero(net)
    x = torch.randn(2, 4, 16, 16)
    cond = torch.randn(2, 8, 16, 16)
    out = net(x, torch.full((2,), SIGMA_MIN), cond)
    assert torch.equal(out, x)
    # away from the boundary the network does contribute
    assert not torch.allclose(net(x, torch.full((2,), 1.0), cond), x)


def test_heun_and_teacher_sampler_exact_for_a_point_mass():
    """For D(x, σ) = x0 the probability-flow ODE is linear in σ: Heun is exact and the sampler returns x0."""
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    s_from, s_to = torch.tensor([3.0], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    out = heun_step(lambda xx, s: x0.expand_as(xx), x, s_from, s_to)
    torch.testing.assert_close(out, x0 + 0.7 / 3.0 * (x - x0))

    class Point(torch.nn.Module):
        def forward(self, xx, s, cond):
            return x0.expand_as(xx).to(xx.dtype)

    got = sample_teacher(Point(), None, lambda k: torch.randn(1, 4, 8, 8, dtype=torch.float64), 5)
    torch.testing.assert_close(got, x0)


def test_consistency_sampler_steps_and_determinism():
    nets = CMCRNetworks(base=8)
    _nonzero(nets.student)
    cond = torch.randn(1, 8, 16, 16)
    calls = []

    def noise(k):
        calls.append(k)
        return torch.from_numpy(coordinate_noise(9, k, 4, (0, 0), (16, 16)))[None]

    a = sample_consistency(nets.student, cond, noise, 4)
    assert calls == [0, 1, 2, 3]
    b = sample_consistency(nets.student, cond, noise, 4)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.allclose(a, sample_consistency(nets.student, cond, noise, 1))


def test_pseudo_huber():
    a = torch.zeros(2, 4, 8, 8)
    assert float(pseudo_huber(a, a)) == 0.0
    b = a.clone()
    b[0, 0, 0, 0] = 1.0  # large error: ~L2 norm
    assert abs(float(pseudo_huber(a, b)) - 0.5 * (np.sqrt(1 + (0.00054 * 16) ** 2) - 0.00054 * 16)) < 1e-6


# ---------------------------------------------------------------------------------------------------- bands
def test_extend_bands_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    restored = rng.uniform(0, 0.4, (4, 32, 32)).astype(np.float32)
    coef = np.array([[0.2, 0.1, 0.5, 0.3], [0.0, 0.4, 0.1, 0.6]], np.float32)
    extra = np.einsum("kb,byx->kyx", coef, restored) + 0.02
    clear = np.zeros((32, 32), bool)
    clear[:16] = True
    target = extra.copy()
    target[:, ~clear] = 0.9  # "cloud" where not clear
    got = extend_bands(restored, target, clear)
    np.testing.assert_allclose(got[:, ~clear], extra[:, ~clear], atol=1e-5)



def test_extend_bands_fallback_uses_clear_pixels_not_cloud():
    """With too few clear pixels for the regression, the constant comes from the clear observations."""
    restored = np.full((4, 32, 32), 0.1, np.float32)
    target = np.full((1, 32, 32), 0.8, np.float32)  # cloud
    clear = np.zeros((32, 32), bool)
    clear[0, :10] = True
    target[0, clear] = 0.15
    np.testing.assert_allclose(extend_bands(restored, target, clear)[0, ~clear], 0.15)

# ---------------------------------------------------------------------------------------------------- models
def _weights(tmp_path, which: str):
    """Random small networks saved as the loop saves them (safetensors + convention + card with the sha256)."""
    import json

    from cloudfree.models import cm_cr, diffusion_enhancement
    from cloudfree.models._weights import card_paths, save_weights

    torch.manual_seed(4)
    if which == "de":
        nets, name, mod, cfg = DENetworks(cnp_base=8, wa_base=8), "diffusion-enhancement", diffusion_enhancement, \
            {"cnp_base": 8, "wa_base": 8}
    else:
        nets, name, mod, cfg = CMCRNetworks(base=8), "cm-cr", cm_cr, {"base": 8}
    for p in nets.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / f"{name}.safetensors"
    sha = save_weights(nets.state_dict(), path, mod.convention(),
                       extra={"cloudfree:network": json.dumps(cfg), "cloudfree:model": name})
    card_paths(path)[0].write_text(json.dumps({"sha256": sha, "note": "random test weights"}))
    return str(path)


def _tile(seed=0, origin=(0, 0), target_id="scene", with_sar=False, bands=GEN_BANDS + ("B11",)):
    rng = np.random.default_rng(seed)
    nb = len(bands)
    clear = rng.uniform(0.02, 0.3, (nb, 40, 40)).astype(np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:25] = True
    target = clear.copy()
    target[:, mask] = 0.8
    refs = clear[None] * 1.05
    sar = rng.uniform(-20, -5, (1, 2, 40, 40)).astype(np.float32) if with_sar else None
    return TileInputs(bands=bands, target=target, cloud_prob=mask.astype(np.float32), cloud_mask=mask,
                      references=refs, reference_masks=np.zeros((1, 40, 40), bool), sar=sar,
                      sar_bands=("vv", "vh") if with_sar else (), target_id=target_id, origin=origin)


def test_de_model_deterministic_keeps_clear_and_uses_reference_for_other_bands(tmp_path):
    w = _weights(tmp_path, "de")
    m = build_model("diffusion-enhancement", {"weights": w, "steps": 3, "reference_model": "reference-replace",
                                              "device": "cpu"})
    tile = _tile()
    a, b = m.predict(tile), m.predict(tile)
    assert a.reflectance.tobytes() == b.reflectance.tobytes()
    c = build_model("diffusion-enhancement", {"weights": w, "steps": 3, "reference_model": "reference-replace",
                                              "device": "cpu", "seed": 1}).predict(tile)
    cloudy = tile.cloud_mask
    assert not np.allclose(a.reflectance[:4, cloudy], c.reflectance[:4, cloudy])
    np.testing.assert_array_equal(a.reflectance[:, ~cloudy], tile.target[:, ~cloudy])
    assert (a.source[~cloudy] == SOURCE_TARGET).all() and (a.source[cloudy] == SOURCE_MODEL).all()
    ref = build_model("reference-replace", {}).predict(tile)
    np.testing.assert_array_equal(a.reflectance[4, cloudy], ref.reflectance[4, cloudy])  # B11 from x_0,E
    # batched prediction agrees with one-by-one
    batch = m.predict_batch([tile, _tile(seed=1)])
    np.testing.assert_allclose(batch[0].reflectance, a.reflectance, atol=1e-5)
    # the W_mean diagnostic is each tile's own, not the batch's
    alone = m.predict(_tile(seed=1))
    for got, want in ((batch[0], a), (batch[1], alone)):
        np.testing.assert_allclose(got.diagnostics["W_mean"], want.diagnostics["W_mean"], atol=1e-6)


def test_cmcr_model_with_and_without_sar(tmp_path):
    w = _weights(tmp_path, "cm")
    m = build_model("cm-cr", {"weights": w, "steps": 2, "device": "cpu", "require_sar": False})
    t_sar, t_none = _tile(with_sar=True), _tile(with_sar=False)
    a, b = m.predict(t_sar), m.predict(t_sar)
    assert a.reflectance.tobytes() == b.reflectance.tobytes()
    assert float(a.diagnostics["sar_used"].max()) == 1.0
    n = m.predict(t_none)
    assert float(n.diagnostics["sar_used"].max()) == 0.0
    assert not np.allclose(a.reflectance[:, t_sar.cloud_mask], n.reflectance[:, t_sar.cloud_mask])
    assert np.isfinite(n.reflectance).all()
    # by default SAR is required: a tile without it fails with the fix named
    strict = build_model("cm-cr", {"weights": w, "device": "cpu"})
    assert strict.spec.needs_sar and not m.spec.needs_sar
    with pytest.raises(ModelError, match="needs Sentinel-1.*catalog.sar_collection"):
        strict.predict(t_none)
    # default sampling: 1 step of the student's EMA (the distillation target network); ema false = online student
    one = strict.predict(t_sar).reflectance
    assert strict.params.steps == 1 and strict.params.ema
    online = build_model("cm-cr", {"weights": w, "device": "cpu", "ema": False}).predict(t_sar).reflectance
    assert one.shape == online.shape and np.isfinite(one).all()
    teacher = build_model("cm-cr", {"weights": w, "sampler": "teacher", "steps": 2, "device": "cpu"}).predict(t_sar)
    assert teacher.reflectance.shape == t_sar.target.shape


def test_weights_hash_checked(tmp_path):
    w = _weights(tmp_path, "cm")
    with open(w, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(WeightsError, match="sha256"):
        build_model("cm-cr", {"weights": w, "device": "cpu"}).predict(_tile(with_sar=True))
    with pytest.raises(WeightsError, match="not found"):
        build_model("cm-cr", {"weights": str(tmp_path / "none.safetensors"), "device": "cpu"}).predict(
            _tile(with_sar=True))


def test_cmcr_extra_bands_fitted_on_observed_clear_pixels(tmp_path):
    """A band that is an exact linear function of the four trained bands stays that function of the restored
    bands under cloud: the extension is fitted on the clear pixels' observations, not on the generated sample."""
    w = _weights(tmp_path, "cm")
    tile = _tile()
    t4 = tile.target[:4]
    target = tile.target.copy()
    target[4] = 0.3 * t4[0] + 0.5 * t4[2] + 0.2 * t4[3] + 0.05
    target[4, tile.cloud_mask] = 0.8
    from dataclasses import replace

    tile = replace(tile, target=target)
    r = build_model("cm-cr", {"weights": w, "steps": 1, "device": "cpu", "require_sar": False}).predict(tile)
    cl = tile.cloud_mask
    o = r.reflectance
    want = np.maximum(0.3 * o[0, cl] + 0.5 * o[2, cl] + 0.2 * o[3, cl] + 0.05, 0.0)
    np.testing.assert_allclose(o[4, cl], want, atol=1e-4)


def test_de_halo_covers_its_reference_model():
    """x_0,E feeds the networks: tiles need the UNets' halo plus the reference model's (PhyVLM-CR: > 100 px)."""
    ref = build_model("phyvlm-cr", {})
    de = build_model("diffusion-enhancement", {"reference_model": "phyvlm-cr"})
    assert de.spec.halo == type(de).spec.halo + ref.spec.halo > 100
    assert build_model("diffusion-enhancement", {"reference_model": "none"}).spec.halo == type(de).spec.halo


@pytest.mark.parametrize("name", ["diffusion-enhancement", "cm-cr"])
def test_spec_names_the_weights_file_actually_used(tmp_path, name):
    """The runner hashes ``model.spec.weights`` into the output item: it must be a path to the file in use."""
    from pathlib import Path

    from cloudfree.models._weights import card_sha256, file_sha256

    shipped = Path(build_model(name, {}).spec.weights)
    assert shipped.is_file() and file_sha256(shipped) == card_sha256(shipped)
    w = _weights(tmp_path, "de" if name == "diffusion-enhancement" else "cm")
    assert build_model(name, {"weights": w}).spec.weights == w
