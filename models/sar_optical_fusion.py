"""Cloud-attentive SAR-optical reconstruction network (Bui et al., "Cloud-Attentive Reconstruction Framework ...
via SAR Fusion"; the paper's code: github.com/thoailt/Cloud-Removal), mono-temporal.

Architecture (section III):

* **Spatial-channel reformat** (eqs. 1-2): space-to-channel (pixel unshuffle) by ``s = 2`` of the optical
  (``C -> 4C``) and SAR (``2 -> 8``) inputs.
* **LFE** (eqs. 3-5): per modality two 3x3 convolutions with ReLU, ``W2 σ(W1 X + b1) + b2``.
* **Attention-driven feature fusion** (eqs. 6-8), repeated for ``D`` stages: per modality a residual dense block
  (RDB), the two modalities concatenated and mixed by a 1x1 conv, then ``J`` Swin blocks (``F + MLP(LN(F +
  W-MSA(LN(F))))``, alternating shifted windows), then a 1x1 conv compressing channels (eq. 8). Each stage's
  optical output ``F_opt^(i)`` is kept.
* **GFF** (eq. 9): concat of the ``D`` intermediate features, 1x1 conv, 3x3 conv; plus the LFE optical feature
  (eq. 10).
* **IRN** (eq. 11): 3x3 conv, inverse reformat (pixel shuffle), 3x3 conv; **residual to the cloudy input** (eq. 12).
* **Cloud-aware loss** (eqs. 17-18): ``W = ω M + (1 - ω)(1 - M)``, ω = 0.8, ``L = W ⊙ (λ1 MSE + λ2 (1 - SSIM))``,
  λ1 = λ2 = 0.5, with ``M`` the cloud mask of the sample.

Deviations:

* **Mask M**: the paper derives ``M`` from its Sen2Cor-style spectral score (eqs. 13-16), which is
  :func:`cloudfree.stages.masks.spectral_score_kernel` in this project (mask method ``spectral``). The shipped network uses
  B02/B03/B04/B08 only (no B11/B10 for that score), so in training ``M`` is the sample's own cloud mask: the
  Sen2Cor SCL mask transplanted with the cloudy pixels (Romania stack); the SEN12MS-CR reader computes ``M`` with
  the spectral score itself. At inference the network does not use ``M`` (only the loss does) -- the pipeline's
  mask only decides which pixels keep the observation.
* **Sizes**: width 32, ``D = 2`` stages of 1 RDB + ``J = 2`` Swin blocks, window 8 (paper: unspecified, larger).
* **Optimiser**: Adam at 2e-4 (paper: 1e-5 for a long schedule; we have minutes of CPU).
* **Per-sample normalisation** (``normalise: true``, the shipped weights): the optical input is standardised per
  band with the mean/std of the sample's clear pixels, and the output (residual to the standardised cloudy input,
  eq. 12) mapped back; trained on one forest footprint, the network otherwise learns its absolute reflectance.
* **No SAR**: the model needs Sentinel-1 (``spec.needs_sar``, ``require_sar: true`` by default): without it the
  target fails with the fix named (set ``catalog.sar_collection``), because optical-only it inpaints below the
  mean-fill floor on the real Romania crops (tests/test_floors.py). ``require_sar: false`` runs it anyway: the SAR
  branch gets zeros (``sar_present = 0``, 30 % of training samples) and the network reconstructs from the optical
  context alone.
* **SAR in training**: SIMULATED (no co-located S1 exists in the shared data); see the model card.
"""

from __future__ import annotations

from typing import Any, Mapping

from cloudfree.models._learned import LearnedModel, LearnedParams, build_blocks, clear_stats, ssim_map
from cloudfree.models.base import BELOW_MEAN_FILL, ModelSpec
from cloudfree.models.registry import register
from cloudfree.models._weights import single_stage
from cloudfree.models._weights import InputConvention

BANDS = ("B02", "B03", "B04", "B08")
DEFAULTS = {"dim": 32, "stages": 2, "swin_per_stage": 2, "heads": 2, "window": 8, "scale": 2, "normalise": False}
OMEGA = 0.8


def build_network(config: Mapping[str, Any], n_bands: int = len(BANDS)):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    _, WindowAttention, RDB = build_blocks()
    cfg = {**DEFAULTS, **dict(config)}
    d, s = int(cfg["dim"]), int(cfg["scale"])

    def lfe(c_in):
        return nn.Sequential(nn.Conv2d(c_in, d, 3, padding=1), nn.ReLU(), nn.Conv2d(d, d, 3, padding=1))

    class FusionStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.rdb_opt, self.rdb_sar = RDB(d), RDB(d)
            self.mix = nn.Conv2d(2 * d, d, 1)
            self.swin = nn.ModuleList(WindowAttention(d, cfg["heads"], cfg["window"], shift=j % 2 == 1)
                                      for j in range(int(cfg["swin_per_stage"])))
            self.compress = nn.Conv2d(d, d, 1)

        def forward(self, f_opt, f_sar):
            o, r = self.rdb_opt(f_opt), self.rdb_sar(f_sar)
            f = self.mix(torch.cat([o, r], 1))
            for blk in self.swin:
                f = blk(f)
            return self.compress(f), r

    class CloudAttentiveNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lfe_opt, self.lfe_sar = lfe(n_bands * s * s), lfe(2 * s * s)
            self.stages = nn.ModuleList(FusionStage() for _ in range(int(cfg["stages"])))
            self.gff = nn.Sequential(nn.Conv2d(d * len(self.stages), d, 1), nn.Conv2d(d, d, 3, padding=1))
            self.irn_in = nn.Conv2d(d, n_bands * s * s, 3, padding=1)
            self.irn_out = nn.Conv2d(n_bands, n_bands, 3, padding=1)

        def forward(self, batch):
            x = batch["target"]
            mu = sd = None
            if cfg["normalise"]:  # per-sample band statistics of the clear target pixels (see docstring)
                mu, sd = clear_stats(x, 1 - batch["cloud_mask"][:, None])
                x = ((x - mu) / sd).clamp(-20, 20)
            sar = batch["sar"][:, 0] * batch["sar_present"].view(-1, 1, 1, 1)
            f0 = self.lfe_opt(F.pixel_unshuffle(x, s))
            f_sar = self.lfe_sar(F.pixel_unshuffle(sar, s))
            f, feats = f0, []
            for st in self.stages:
                f, f_sar = st(f, f_sar)
                feats.append(f)
            g = self.gff(torch.cat(feats, 1)) + f0
            out = self.irn_out(F.pixel_shuffle(self.irn_in(g), s)) + x
            return out * sd + mu if mu is not None else out

    return CloudAttentiveNet()


class CloudAttentiveTrainable:
    name = "sar-optical-fusion"
    convention = InputConvention(BANDS, "L2A", sar_pols=("vv", "vh"))
    n_references = 0
    card_notes = [
        "Loss mask M = the sample's cloud mask (transplanted Sen2Cor SCL); the paper's spectral M needs B11/B10.",
        "Width 32, 2 fusion stages of RDB + 2 Swin blocks; Adam 2e-4; minutes of CPU training.",
        "Validation samples always carry SAR; that SAR is SIMULATED from the clear truth (training.datasets."
        "simulate_sar), so validation PSNR includes a SAR input no real scene provides.",
        "Mono-temporal: under thick cloud without SAR it can only inpaint from the surroundings (confidence 0.3).",
        "One 1 km2 forest footprint (Romania) is all the optical it saw: other land covers, L1C inputs and other "
        "resolutions are out of domain.",
    ]

    def build_network(self, config):
        return build_network(config)

    def predict(self, net, batch):
        return net(batch)

    def loss(self, net, batch, stage):
        pred = net(batch)
        m = batch["cloud_mask"][:, None]
        w = OMEGA * m + (1 - OMEGA) * (1 - m)
        mse = (pred - batch["truth"]) ** 2
        dssim = 1 - ssim_map(pred, batch["truth"])
        loss = (w * (0.5 * mse + 0.5 * dssim)).mean()
        return loss, {"mse": float(mse.mean().detach()), "dssim": float(dssim.mean().detach())}

    def stages(self, total_steps: int, lr: float):
        return single_stage(total_steps, lr)


class SAROpticalParams(LearnedParams):
    #: a tile without Sentinel-1 fails with the fix named (default); false: run optical-only (below mean-fill).
    require_sar: bool = True


@register
class CloudAttentiveSAROptical(LearnedModel):
    name = "sar-optical-fusion"
    spec = ModelSpec(
        bands=BANDS,
        level="L2A",
        needs_sar=True,
        accepts_sar=True,
        sar_units="db",
        max_references=0,
        halo=16,
        description="Cloud-attentive SAR-optical fusion (RDB + Swin, GFF, IRN, cloud-weighted loss), learned",
        weights="models/weights/sar_optical_fusion.safetensors",
        experimental=BELOW_MEAN_FILL,
    )
    weights_file = "sar_optical_fusion.safetensors"
    Params = SAROpticalParams
    trainable_cls = CloudAttentiveTrainable
    multiple = 16
