"""Diffusion Enhancement (DE) for cloud removal (Sui et al., "Diffusion Enhancement for Cloud Removal in
Ultra-Resolution Remote Sensing Imagery"), eqs. 1-15, on Sentinel-2 B02/B03/B04/B08.

Three branches (paper Fig. 3):

* **Diffusion branch**: the conditional noise predictor (CNP) ``ε_θ(x_t, t, y)`` of a DDPM (eqs. 1-7): linear
  ``β`` schedule from 1e-4 to 0.02 over ``T = 1000`` steps (guided diffusion's default, which the paper builds on),
  trained with the L2 loss of eq. 7 on ``ε``.
* **Reference branch**: any registered removal model ``E`` gives ``x_0,E = E(y)`` (eq. 11); PhyVLM-CR by default
  (``reference_model`` / ``reference_params``), or a learned one.
* **Weighting branch**: the Weight Allocation network (WA) takes ``[x_t, y, x_0,E]`` and ``t`` and outputs a
  per-pixel, per-band weight map ``W ∈ [0, 1]^{C×H×W}`` (sigmoid); eq. 13 fuses
  ``x_0,t = (1 - W) ⊙ x_0,ε,t + W ⊙ x_0,E`` with ``x_0,ε,t`` from eq. 9.

Inference (Sec. IV-B/V-B): DDIM (Song et al. 2021) over ``steps`` (the paper's 50; the default, 2, is the pick of the measured steps table, a config knob) evenly spaced
timesteps; at each step ``x_0,t`` of eq. 13 replaces the network's own ``x_0`` estimate, the noise direction is
re-derived from it (``ε̂ = (x_t - √ᾱ_t x_0,t) / √(1 - ᾱ_t)``) and
``x_{t'} = √ᾱ_{t'} x_0,t + √(1 - ᾱ_{t'} - σ²) ε̂ + σ z``. The paper's "η = 0.3" is the *limiting factor of W*
(Sec. V-B: "W confined within 0.3 to 1"), applied here as ``W <- max(W, w_floor)`` at inference only (training
uses ``η = 0``, as the paper says); the DDIM stochasticity ``ddim_eta`` (σ above) is not given in the paper and
defaults to 0 (deterministic DDIM). Training (Sec. IV-D), three stages run by ``cloudfree train
diffusion-enhancement``: (1) CNP alone with eq. 7 on small patches (the paper: 1/4 size; here 32 px), (2) WA with
the CNP frozen, L1 loss of eq. 14 with ``x_0,ε,t`` stop-gradient, (3) joint training on the full patch size
(64 px here) with eq. 15, ``λ = 1``.

Deviations (each for a reason):

* **Bands**: the networks see the four 10 m bands B02/B03/B04/B08 (the band set common to all optical data that
  the project can train on). Other bands of a tile are taken from ``x_0,E`` unchanged (the reference model's
  restoration), so DE enhances the 10 m bands and leaves the rest to the reference model.
* **Network size**: the paper's CNP is an ADM UNet with 96 channels, multipliers (1,1,2,2,3), attention at 4 and 8;
  WA 64 channels, (1,1,2). Here both are small local UNets (:class:`cloudfree.models._generative.UNet`, CNP base 24, WA base
  16, multipliers (1,2,2)), without attention and with per-pixel channel normalisation instead of GroupNorm: they
  must train in minutes on a shared 2-core CPU and tile seamlessly (global ops make a pixel depend on the tile).
* **Conditioning**: the CNP also receives the mask stage's cloud mask as one extra channel (cheap, and it tells the
  small network where ``y`` is already the answer). Cloudy inputs are encoded like the clean images
  (``x = 4 r - 1``) and clipped to reflectance [0, 1.5].
* ``x_0,ε,t`` is clipped to the reflectance range [0, 1] (``[-1, 3]`` encoded) before fusion, as guided diffusion's
  ``clip_denoised`` does.
* Clear pixels (mask stage says clear, finite) keep the observation (``keep_clear_target``), as PhyVLM-CR does.
* **Noise** is :func:`cloudfree.models._generative.coordinate_noise` of the scene seed and global pixel coordinates
  (``TileInputs.origin``), so the halos of neighbouring tiles see the same ``x_T`` and the same per-step noise.
* **Halo**: the UNets' 48 px plus the reference model's own halo (``x_0,E`` feeds the networks; PhyVLM-CR's is
  123 px with default parameters, so a DE instance declares 171 px).

Outputs: ``confidence`` = the reference model's confidence (DE refines its texture, it does not add evidence);
``source`` = ``SOURCE_TARGET`` where kept, else ``SOURCE_MODEL``; diagnostics ``W_mean`` (mean of ``W`` over bands
and steps) and ``x0_E`` (the reference restoration of the trained bands).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from cloudfree.models._generative import (
    GEN_BANDS,
    GenerativeParams,
    UNet,
    batch_noise,
    decode,
    encode,
    load_network,
    pad_to_multiple,
)
from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase, keep_target_and_mark_nodata
from cloudfree.models._weights import LazyWeights
from cloudfree.models.registry import build_model, register
from cloudfree.pipeline.contract import SOURCE_MODEL, TileInputs, TileResult
from cloudfree.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

N_BANDS = len(GEN_BANDS)
X0_MIN, X0_MAX = -1.0, 3.0  #: encoded reflectance range [0, 1] (clip of x_0,ε,t)
Y_MAX_REFLECTANCE = 1.5


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class DDPMSchedule:
    """Linear β schedule (eq. 1), ``ᾱ_t = Π (1 - β_s)`` (eq. 3)."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 4: ``x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε``."""
        ab = self.alphas_cumprod.to(x0.device)[t].float()[:, None, None, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def ddim_timesteps(steps: int, T: int = 1000) -> list[int]:
    """``steps`` evenly spaced timesteps from ``T - 1`` down to 0 (DDIM's "linear" skip)."""
    if steps < 1:
        raise ConfigError(f"diffusion-enhancement: steps must be >= 1, got {steps}")
    if steps > T:
        raise ConfigError(f"diffusion-enhancement: steps {steps} exceeds the {T} training timesteps")
    return [int(round(v)) for v in np.linspace(T - 1, 0, steps)] if steps > 1 else [T - 1]


# -------------------------------------------------------------------------------------------------- networks
class DENetworks(nn.Module):
    """CNP ``ε_θ([x_t, y, mask], t)`` and WA ``W([x_t, y, x_0,E], t)`` (sigmoid)."""

    def __init__(self, cnp_base: int = 24, wa_base: int = 16, mults: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        self.config = {"cnp_base": cnp_base, "wa_base": wa_base, "mults": list(mults)}
        self.cnp = UNet(2 * N_BANDS + 1, N_BANDS, base=cnp_base, mults=mults)
        self.wa = UNet(3 * N_BANDS, N_BANDS, base=wa_base, mults=mults)
        self.factor = self.cnp.factor

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cnp(torch.cat([x_t, y, mask], dim=1), t.float())

    def weight(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, x0e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.wa(torch.cat([x_t, y, x0e], dim=1), t.float()))


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 9."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def fuse(x0_eps: torch.Tensor, x0e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 13."""
    return (1 - w) * x0_eps + w * x0e


# -------------------------------------------------------------------------------------------------- losses
def loss_ddpm(nets: DENetworks, sched: DDPMSchedule, x0, y, mask, t, eps) -> torch.Tensor:
    """Eq. 7: ``|| ε - ε_θ(x_t, t, y) ||²``."""
    return F.mse_loss(nets.eps(sched.q_sample(x0, t, eps), t, y, mask), eps)


def loss_wa(nets: DENetworks, sched: DDPMSchedule, x0, y, mask, x0e, t, eps,
            eps_pred: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 14: ``| x̃_0 - ((1 - W) ⊙ sg(x_0,ε,t) + W ⊙ x_0,E) |`` (L1; only W receives gradients)."""
    x_t = sched.q_sample(x0, t, eps)
    if eps_pred is None:
        eps_pred = nets.eps(x_t, t, y, mask)
    ab = sched.alphas_cumprod.to(x0.device)[t].float()[:, None, None, None]
    x0_eps = x0_from_eps(x_t, eps_pred.detach(), ab).clamp(X0_MIN, X0_MAX)
    w = nets.weight(x_t, t, y, x0e)
    return F.l1_loss(fuse(x0_eps, x0e, w), x0)


# -------------------------------------------------------------------------------------------------- sampler
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, weight_fn: WeightFn | None, x0e: torch.Tensor | None, noise: NoiseFn,
                sched: DDPMSchedule, steps: int, *, w_floor: float = 0.3, ddim_eta: float = 0.0,
                clip: tuple[float, float] | None = (X0_MIN, X0_MAX),
                x_T: torch.Tensor | None = None, record: list | None = None) -> torch.Tensor:
    """DDIM with DE's reference fusion (eqs. 8, 9, 13 at every step).

    ``eps_fn(x_t, t)`` predicts the noise; ``weight_fn(x_t, t)`` gives ``W`` (None: plain DDIM, ``W = 0``);
    ``noise(k)`` returns the k-th standard-normal draw (k = 0 is ``x_T``, k >= 1 the per-step noise when
    ``ddim_eta > 0``). ``record`` (a list) receives ``(t, [mean W of each batch item])`` per step.
    """
    ab_all = sched.alphas_cumprod
    ts = ddim_timesteps(steps, sched.T)
    x = noise(0) if x_T is None else x_T
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < len(ts) else -1
        ab = torch.as_tensor(float(ab_all[t]), dtype=x.dtype)
        ab_prev = torch.as_tensor(float(ab_all[t_prev]) if t_prev >= 0 else 1.0, dtype=x.dtype)
        tt = torch.full((x.shape[0],), t, dtype=torch.float32)
        eps = eps_fn(x, tt)
        x0 = x0_from_eps(x, eps, ab)
        if clip is not None:
            x0 = x0.clamp(*clip)
        if weight_fn is not None and x0e is not None:
            w = weight_fn(x, tt).clamp(min=w_floor, max=1.0)
            x0 = fuse(x0, x0e, w)
            if record is not None:
                record.append((t, w.mean(dim=tuple(range(1, w.ndim))).tolist()))
        if t_prev < 0:
            x = x0
            break
        eps_hat = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = ddim_eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = ab_prev.sqrt() * x0 + torch.sqrt(torch.clamp(1 - ab_prev - sigma**2, min=0.0)) * eps_hat
        if ddim_eta > 0:
            x = x + sigma * noise(k + 1)
    return x


# -------------------------------------------------------------------------------------------------- weights
WEIGHTS_FILE = "diffusion_enhancement.safetensors"


def convention():
    from cloudfree.models._weights import InputConvention

    return InputConvention(bands=GEN_BANDS, level="L2A")


# -------------------------------------------------------------------------------------------------- model
class DEParams(GenerativeParams):
    #: the reference model E (any registered model name) and its parameters.
    reference_model: str = "phyvlm-cr"
    reference_params: dict[str, Any] = Field(default_factory=dict)
    #: DDIM steps. The paper uses 50; the default is the pick of the measured steps-vs-quality table
    #: (``pipeline.evaluation.generative_steps.pick_de_steps`` on ``docs/generative.json``: the fewest steps within
    #: 0.1 dB of the best mean cloudy-pixel PSNR; 2 steps, 25x fewer network evaluations than 50 for no loss there).
    steps: int = Field(2, ge=1, le=1000)
    #: the paper's limiting factor η: W is confined to [w_floor, 1] at inference.
    w_floor: float = Field(0.3, ge=0, le=1)
    #: DDIM stochasticity (0 = deterministic DDIM; 1 = DDPM-like); noise from the scene seed either way.
    ddim_eta: float = Field(0.0, ge=0, le=1)


@register
class DiffusionEnhancement(LazyWeights, RemovalModelBase):
    name = "diffusion-enhancement"
    spec = ModelSpec(
        bands=GEN_BANDS,
        level="L2A",
        needs_reference=False,
        max_references=4,
        halo=48,
        description="Diffusion Enhancement: DDIM CNP fused with a reference model (PhyVLM-CR) through WA, eqs. 1-15",
        weights=WEIGHTS_FILE,
        scene_context=True,
    )
    Params = DEParams
    weights_file = WEIGHTS_FILE  # loaded lazily once per worker process (LazyWeights)

    def load_network(self, path: Path, sha256: str | None) -> DENetworks:
        return load_network(self.name, path, sha256, convention(), lambda cfg: DENetworks(**network_kwargs(cfg)))

    def __init__(self, params: ModelParams | dict | None = None) -> None:
        super().__init__(params)
        if self.params.reference_model == self.name:
            raise ConfigError("diffusion-enhancement cannot be its own reference model; pick another registered model")
        self.reference = build_model(self.params.reference_model, dict(self.params.reference_params))
        # x_0,E feeds the networks, so the receptive fields add up: the instance's halo is the networks' (class
        # spec) plus the reference model's own (PhyVLM-CR's is larger than the UNets'); the instance's spec
        # shadows the class default, which the runner reads
        from dataclasses import replace

        # and the weights actually used (the runner records their sha256 in the output item)
        self.spec = replace(type(self).spec, halo=type(self).spec.halo + int(self.reference.spec.halo),
                            weights=str(self.weights_path))


    def fit_scene(self, sample: TileInputs) -> dict[str, Any]:
        """The reference model's scene context (DE itself has none)."""
        if getattr(self.reference.spec, "scene_context", False):
            return {"reference": self.reference.fit_scene(sample)}
        return {}

    def _reference(self, tile: TileInputs) -> TileResult:
        from dataclasses import replace

        ctx = dict(tile.context).get("reference", {})
        return self.reference.predict(replace(tile, context=ctx))

    def predict(self, tile: TileInputs) -> TileResult:
        return self.predict_batch([tile])[0]

    def predict_batch(self, tiles: Sequence[TileInputs]) -> list[TileResult]:
        refs = [self._reference(t) for t in tiles]
        out: list[TileResult | None] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tiles):
            groups.setdefault(t.shape, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.params.batch_size):
                chunk = idx[s:s + self.params.batch_size]
                samples, wmeans = self._sample([tiles[i] for i in chunk], [refs[i] for i in chunk])
                for j, i in enumerate(chunk):
                    out[i] = self._result(tiles[i], refs[i], samples[j], wmeans[j])
        return out  # type: ignore[return-value]

    def _inputs(self, tile: TileInputs, ref: TileResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gi = tile.band_index(*GEN_BANDS)
        x0e = np.asarray(ref.reflectance[gi], np.float32)
        x0e = np.where(np.isfinite(x0e), x0e, 0.0)
        y = np.asarray(tile.target[gi], np.float32)
        y = np.where(np.isfinite(y), y, x0e)
        y = np.clip(y, 0.0, Y_MAX_REFLECTANCE)
        mask = tile.cloud_mask.astype(np.float32)[None]
        return encode(np.clip(x0e, 0.0, 1.0)), encode(y), mask

    def _sample(self, tiles: Sequence[TileInputs], refs: Sequence[TileResult]) -> tuple[np.ndarray, list[float]]:
        p = self.params
        nets = self.network()
        dev = next(nets.parameters()).device
        arrays = [self._inputs(t, r) for t, r in zip(tiles, refs)]
        x0e = torch.from_numpy(np.stack([a[0] for a in arrays])).to(dev)
        y = torch.from_numpy(np.stack([a[1] for a in arrays])).to(dev)
        mask = torch.from_numpy(np.stack([a[2] for a in arrays])).to(dev)
        x0e, (h, w) = pad_to_multiple(x0e, nets.factor)
        y, _ = pad_to_multiple(y, nets.factor)
        mask, _ = pad_to_multiple(mask, nets.factor)
        shape = tuple(x0e.shape[-2:])
        noise = batch_noise(p, tiles, N_BANDS, shape, dev)

        record: list = []
        x = ddim_sample(lambda xt, tt: nets.eps(xt, tt.to(dev), y, mask),
                        lambda xt, tt: nets.weight(xt, tt.to(dev), y, x0e), x0e, noise, DDPMSchedule(), p.steps,
                        w_floor=p.w_floor, ddim_eta=p.ddim_eta, record=record)
        # per tile: the mean of W over its bands, pixels (incl. the padding) and the steps
        wmeans = np.mean([r[1] for r in record], axis=0).tolist() if record else [float("nan")] * len(tiles)
        return decode(x[..., :h, :w]).cpu().numpy(), [float(v) for v in wmeans]

    def _result(self, tile: TileInputs, ref: TileResult, sample: np.ndarray, wmean: float) -> TileResult:
        p = self.params
        gi = tile.band_index(*GEN_BANDS)
        valid = np.isfinite(tile.target).all(axis=0)
        out = np.array(ref.reflectance, np.float32, copy=True)
        out[gi] = np.maximum(sample, 0.0)
        source = np.full(tile.shape, SOURCE_MODEL, np.uint8)
        conf = np.array(ref.confidence, np.float32, copy=True)
        keep = ~tile.cloud_mask & valid if p.keep_clear_target else None
        keep_target_and_mark_nodata(out, source, conf, tile.target, keep, valid)
        diag = {"x0_E": np.asarray(ref.reflectance[gi], np.float32),
                "W_mean": np.full(tile.shape, wmean, np.float32)}
        return TileResult(out, conf, source, diag).validate(tile, self.name)


# -------------------------------------------------------------------------------------------------- training
class DETrainable:
    """``cloudfree train diffusion-enhancement``: the coarse-to-fine schedule of Sec. IV-D on the shared loop.

    Stages (fractions of ``steps``, overridable with ``network: {stage_fractions: [a, b, c]}``; the shipped weights
    used 0.6 / 0.15 / 0.25, configs/train-diffusion-enhancement.yaml):

    1. ``cnp`` (40 %): CNP alone, eq. 7, on a random ``patch / 2`` crop of each sample (the paper's "small images";
       it downsizes to 1/4, here half the side because the training patches are already small);
    2. ``wa`` (20 %): WA alone with the CNP frozen (only WA parameters in the optimiser), eq. 14 (L1,
       ``x_0,ε,t`` stop-gradient), full patches;
    3. ``joint`` (40 %): both, eq. 15 with ``λ = 1``, at half the learning rate.

    ``x_0,E`` is the reference model (PhyVLM-CR by default) run on every training sample with its references (the
    batch's ``references``), as at inference. Validation samples with ``val_steps`` DDIM steps (4) to stay cheap.
    """

    name = "diffusion-enhancement"
    n_references = 2
    val_steps = 4
    card_notes = [
        "DE refines the reference model's restoration of B02/B03/B04/B08; other bands are the reference model's.",
        "Trained minutes on a shared 2-core CPU: far from converged; the weights show the method works end to end, "
        "not the paper's quality.",
    ]

    def __init__(self, reference_model: str = "phyvlm-cr", reference_params: dict | None = None) -> None:
        self.convention = convention()
        self.reference_model = reference_model
        self.reference = build_model(reference_model, dict(reference_params or {}))
        self.sched = DDPMSchedule()
        self.fractions = (0.4, 0.2, 0.4)

    def build_network(self, config: dict[str, Any]) -> DENetworks:
        cfg = dict(config)
        if "stage_fractions" in cfg:
            self.fractions = tuple(float(f) for f in cfg.pop("stage_fractions"))
        return DENetworks(**network_kwargs(cfg))

    def stages(self, total_steps: int, lr: float) -> list:
        from cloudfree.models._weights import Stage

        a, b, _ = self.fractions
        n1, n2 = int(round(a * total_steps)), int(round(b * total_steps))
        n3 = max(total_steps - n1 - n2, 0)
        return [Stage("cnp", n1, lr, params=lambda n: n.cnp.parameters()),
                Stage("wa", n2, lr, params=lambda n: n.wa.parameters()),
                Stage("joint", n3, lr * 0.5)]

    def reference_outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x_0,E`` (reflectance) of every sample: the reference model on the sample as one tile."""
        tgt = batch["target"].detach().cpu().numpy()
        mask = batch["cloud_mask"].detach().cpu().numpy() > 0.5
        refs = batch["references"].detach().cpu().numpy()
        rmask = batch["ref_masks"].detach().cpu().numpy() > 0.5
        out = []
        for i in range(tgt.shape[0]):
            tile = TileInputs(bands=GEN_BANDS, target=tgt[i], cloud_prob=mask[i].astype(np.float32),
                              cloud_mask=mask[i], references=refs[i], reference_masks=rmask[i],
                              reference_dt_days=tuple(float(d) for d in batch["ref_dt"][i].cpu().numpy()),
                              target_id=f"train-{i}")
            r = self.reference.predict(tile).reflectance
            out.append(np.where(np.isfinite(r), r, tgt[i]))
        return torch.from_numpy(np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)).to(batch["target"].device)

    def loss(self, net: DENetworks, batch: dict[str, torch.Tensor], stage: str):
        x0 = encode(batch["truth"])
        y = encode(batch["target"].clamp(0.0, Y_MAX_REFLECTANCE))
        mask = batch["cloud_mask"][:, None].float()
        b = x0.shape[0]
        t = torch.randint(0, self.sched.T, (b,), device=x0.device)
        if stage == "cnp":
            size = max(net.factor, (x0.shape[-1] // 2) // net.factor * net.factor)
            oy = int(torch.randint(0, x0.shape[-2] - size + 1, (1,)))
            ox = int(torch.randint(0, x0.shape[-1] - size + 1, (1,)))
            sl = (Ellipsis, slice(oy, oy + size), slice(ox, ox + size))
            x0, y, mask = x0[sl], y[sl], mask[sl]
            eps = torch.randn_like(x0)
            loss = loss_ddpm(net, self.sched, x0, y, mask, t, eps)
            return loss, {"ddpm": float(loss.detach())}
        eps = torch.randn_like(x0)
        x0e = encode(self.reference_outputs(batch))
        if stage == "wa":
            loss = loss_wa(net, self.sched, x0, y, mask, x0e, t, eps)
            return loss, {"wa": float(loss.detach())}
        # eq. 15 with λ = 1: one CNP forward shared by L_DDPM and L_WA (whose x_0,ε,t is stop-gradient)
        x_t = self.sched.q_sample(x0, t, eps)
        eps_pred = net.eps(x_t, t, y, mask)
        l_ddpm = F.mse_loss(eps_pred, eps)
        l_wa = loss_wa(net, self.sched, x0, y, mask, x0e, t, eps, eps_pred)
        return l_ddpm + l_wa, {"ddpm": float(l_ddpm.detach()), "wa": float(l_wa.detach())}

    @torch.no_grad()
    def predict(self, net: DENetworks, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = encode(batch["target"].clamp(0.0, Y_MAX_REFLECTANCE))
        mask = batch["cloud_mask"][:, None].float()
        x0e = encode(self.reference_outputs(batch))
        x = ddim_sample(lambda xt, tt: net.eps(xt, tt.to(y.device), y, mask),
                        lambda xt, tt: net.weight(xt, tt.to(y.device), y, x0e), x0e,
                        lambda k: torch.randn_like(y), self.sched, self.val_steps, w_floor=DEParams().w_floor)
        return torch.where(mask > 0.5, decode(x), batch["target"])


def network_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The :class:`DENetworks` arguments among a training config's ``network`` keys."""
    keys = ("cnp_base", "wa_base", "mults")
    return {k: (tuple(v) if k == "mults" else v) for k, v in config.items() if k in keys}


DiffusionEnhancement.trainable = classmethod(lambda cls: DETrainable())  # type: ignore[attr-defined]
