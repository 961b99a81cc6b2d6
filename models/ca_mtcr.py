"""CA-MTCR: change-aware multi-temporal cloud removal (You, Xu, Pan, Dong, Yang & Xia, Sci China Inf Sci 2026).

Architecture (section 3), per date ``t`` (the target and each reference):

* **Region-selective optical encoder** (eq. 3, Fig. 3): patch embedding, then ``L`` transformer blocks; after each
  block a soft mask ``R`` suppresses cloudy regions before the next block: ``R1`` = spatial attention on the block
  output (sigmoid of a 7x7 conv over channel mean and max), ``R2`` = cosine distance between block input and output,
  ``[R1, R2]`` weighted by a channel-attention module (squeeze-excite), then conv + sigmoid -> ``R``.
* **SAR encoder** (eq. 4): three convolutions + two MBConv blocks, **pretrained as the encoder of a VQ-VAE
  denoiser with the Noise2Noise objective of eq. 9** ``||y2 - ŷ1||² + α||sg[z_e] - e||² + β||z_e - sg[e]||²``
  (α = 1, β = 0.1; ``y1``, ``y2`` = SAR of the target date and of the nearest reference, "pairs with minimal
  temporal variation"), then fine-tuned at 1/10 of the learning rate (paper: 1e-5 vs 1e-4).
* **Multi-modal fusion** (eq. 5): concat(optical, SAR) -> conv -> MBConv.
* **Change map** (eq. 10): ``c^t = cos(F_sar^t, F_sar^N)`` per pixel, 1 for the target date.
* **Change-aware temporal fusion** (eqs. 11-12): ``W^t = L-TAE(Conv(c^t || F_f^t))``, ``F_c = Σ F_f^t ⊙ W^t``;
  L-TAE (Garnot & Landrieu 2020): per-head learned master query, keys from the per-pixel features plus a
  positional encoding of the date, softmax over dates; each head's weights multiply its channel group.
* **Decoder** (eq. 8) and loss (eqs. 13-16): ``λ1 L1 + λ2 L_fr + λ3 L_sr`` with λ = 2, 1, 250.

Deviations (each for a reason that holds on this project's CPUs and data):

* **Perceptual network**: no VGG16 weights can be downloaded here (no network; torchvision does not import beside
  the pinned torch). ``L_fr``/``L_sr`` use a *frozen, randomly initialised* 5-stage conv net (fixed seed 0, He
  init, ReLU after each stage, 2x pooling between stages) over the model's bands; random CNN features carry usable
  texture/Gram statistics (Ustyuzhaninov et al., ICLR-W 2017). ``L_fr`` on all five stages (L1), ``L_sr`` on
  stages 4-5 (Gram matrices normalised by C*H*W, squared Frobenius as in the text). ``perceptual: none`` in the
  network config drops both terms.
* **Attention**: shifted-window self-attention (8x8 tokens) instead of global attention in the optical encoder,
  on a stride-4 patch embedding; global attention is quadratic in tile size (a 576 px tile = 20 736 tokens).
* **Sizes**: width 32, ``L = 3`` blocks (paper: 9), VQ codebook of 64 entries; trained for minutes on CPU.
* **Mask channel**: the optical encoder also gets the date's cloud mask as an input channel (the paper lets the
  region-selection learn it); with very little training this is what lets the network tell cloud from bright land.
* **Decoder**: pixel-shuffle upsampling of ``F_c`` with a full-resolution skip of the target and its mask (the paper
  does not detail its decoder).
* **Per-date normalisation** (``normalise: per-date``, the shipped weights): each date's optical input is
  standardised per band with the mean/std of its own clear pixels (a date with < 64 clear pixels takes the stats
  pooled over all clear pixels of all dates), and the output is mapped back with the target's. This is the
  per-band linear radiometric alignment of the references that reference replacement does, done before the
  network, and it keeps the network from learning the training footprint's absolute reflectance. Evaluation
  (cloudy PSNR, ``cloudfree evaluate``, report seeds / Slovakia): no normalisation 17.5 / 28.4 dB; pooled
  statistics (``normalise: true``) 27.5 / 32.1 dB; per-date 29.0 / 31.9 dB (the shipped weights).
* **No SAR**: when a tile has no Sentinel-1 (``sar_present = 0``, 30 % of training samples), SAR features are zeros
  and ``c^t = 1`` (no change information), so the model degrades to cloud-aware temporal fusion.

Training data of the shipped weights: see ``models/weights/ca_mtcr.card.md`` (real Romania L2A time series with
real transplanted cloud masks; the SAR branch saw SIMULATED SAR only -- no co-located S1 exists in the data).
"""

from __future__ import annotations

from typing import Any, Mapping

from cloudfree.models._learned import LearnedModel, build_blocks, clear_stats, log_days, per_date_stats
from cloudfree.models.base import BELOW_MEAN_FILL, ModelSpec
from cloudfree.models.registry import register
from cloudfree.models._weights import Stage
from cloudfree.models._weights import InputConvention

BANDS = ("B02", "B03", "B04", "B08")
DEFAULTS = {"dim": 32, "blocks": 3, "heads": 2, "window": 8, "codebook": 64, "ltae_heads": 4,
            "perceptual": "random", "normalise": False}


def build_network(config: Mapping[str, Any], n_bands: int = len(BANDS)):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    MBConv, WindowAttention, _ = build_blocks()
    cfg = {**DEFAULTS, **dict(config)}
    d, L = int(cfg["dim"]), int(cfg["blocks"])

    class RegionSelect(nn.Module):
        def __init__(self):
            super().__init__()
            self.spatial = nn.Conv2d(2, 1, 7, padding=3)
            self.cam = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid())
            self.out = nn.Conv2d(2, 1, 3, padding=1)

        def forward(self, f_in, f_out):
            r1 = torch.sigmoid(self.spatial(torch.cat([f_out.mean(1, keepdim=True), f_out.amax(1, keepdim=True)], 1)))
            r2 = 1 - F.cosine_similarity(f_in, f_out, dim=1, eps=1e-6)[:, None]
            r = torch.cat([r1, r2], 1)
            r = r * self.cam(r.mean((2, 3)))[:, :, None, None]
            soft = torch.sigmoid(self.out(r))
            return f_out * soft, soft

    class OpticalEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(n_bands + 1, d, 4, stride=4)
            self.blocks = nn.ModuleList(WindowAttention(d, cfg["heads"], cfg["window"], shift=i % 2 == 1)
                                        for i in range(L))
            self.select = nn.ModuleList(RegionSelect() for _ in range(L))

        def forward(self, x):
            f = self.embed(x)
            for blk, sel in zip(self.blocks, self.select):
                f, _ = sel(f, blk(f))
            return f

    class SAREncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(nn.Conv2d(2, d // 2, 3, padding=1), nn.GELU(),
                                       nn.Conv2d(d // 2, d, 3, stride=2, padding=1), nn.GELU(),
                                       nn.Conv2d(d, d, 3, stride=2, padding=1))
            self.mb = nn.Sequential(MBConv(d), MBConv(d))

        def forward(self, x):
            return self.mb(self.convs(x))

    class SARDecoder(nn.Module):  # Noise2Noise pretraining only (discarded afterwards, as in the paper)
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.ConvTranspose2d(d, d // 2, 4, 2, 1), nn.GELU(),
                                      nn.ConvTranspose2d(d // 2, d // 2, 4, 2, 1), nn.GELU(),
                                      nn.Conv2d(d // 2, 2, 3, padding=1))

        def forward(self, z):
            return self.body(z)

    class LTAE(nn.Module):
        def __init__(self, heads: int, dk: int = 8):
            super().__init__()
            self.heads, self.dk = heads, dk
            self.inp = nn.Conv2d(d + 1, d, 1)  # Conv(c^t || F_f^t), eq. 11
            self.pos = nn.Linear(8, d)
            self.key = nn.Linear(d, heads * dk)
            self.query = nn.Parameter(torch.randn(heads, dk) * 0.1)

        def forward(self, feats, change, dt):
            # feats (B, T, d, h, w), change (B, T, 1, h, w), dt (B, T)
            b, t, _, h, w = feats.shape
            x = self.inp(torch.cat([change, feats], 2).flatten(0, 1)).view(b, t, d, h, w)
            freqs = 2.0 ** torch.arange(4, device=dt.device, dtype=dt.dtype)
            ld = log_days(dt)[..., None] * freqs * 3.14159
            pe = self.pos(torch.cat([torch.sin(ld), torch.cos(ld)], -1))  # (B, T, d)
            x = x.permute(0, 3, 4, 1, 2) + pe[:, None, None]  # (B, h, w, T, d)
            k = self.key(x).view(b, h, w, t, self.heads, self.dk)
            att = torch.softmax((k * self.query).sum(-1) / self.dk ** 0.5, dim=3)  # (B, h, w, T, heads)
            att = att.permute(0, 3, 4, 1, 2)  # (B, T, heads, h, w)
            g = feats.view(b, t, self.heads, d // self.heads, h, w) * att[:, :, :, None]
            return g.sum(1).reshape(b, d, h, w), att

    class CAMTCR(nn.Module):
        def __init__(self):
            super().__init__()
            self.opt_enc, self.sar_enc, self.sar_dec = OpticalEncoder(), SAREncoder(), SARDecoder()
            self.codebook = nn.Embedding(int(cfg["codebook"]), d)
            self.fuse = nn.Sequential(nn.Conv2d(2 * d, d, 1), MBConv(d))
            self.ltae = LTAE(int(cfg["ltae_heads"]))
            self.up = nn.Sequential(nn.Conv2d(d, 16 * (d // 2), 3, padding=1), nn.PixelShuffle(4), nn.GELU())
            self.head = nn.Sequential(nn.Conv2d(d // 2 + n_bands + 1, d // 2, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(d // 2, n_bands, 3, padding=1))

        def quantize(self, z):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            idx = torch.cdist(flat, self.codebook.weight).argmin(1)
            e = self.codebook(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
            return e

        def forward(self, batch, return_aux: bool = False):
            tgt, m = batch["target"], batch["cloud_mask"][:, None]
            opt = torch.cat([tgt[:, None], batch["references"]], 1)  # (B, T, C, H, W), target first
            masks = torch.cat([m[:, None], batch["ref_masks"][:, :, None]], 1)  # (B, T, 1, H, W)
            mu = sd = None
            if cfg["normalise"] == "per-date":  # each date by its own clear pixels (see docstring)
                mu_t, sd_t = per_date_stats(opt, 1 - masks)
                opt = ((opt - mu_t) / sd_t).clamp(-20, 20)
                tgt, mu, sd = opt[:, 0], mu_t[:, 0], sd_t[:, 0]
            elif cfg["normalise"]:  # per-sample band statistics of every clear pixel of every date (see docstring)
                mu, sd = clear_stats(opt, 1 - masks)
                opt = ((opt - mu[:, None]) / sd[:, None]).clamp(-20, 20)
                tgt = opt[:, 0]
            b, t = opt.shape[:2]
            f_opt = self.opt_enc(torch.cat([opt, masks], 2).flatten(0, 1))
            f_sar = self.sar_enc(batch["sar"].flatten(0, 1))
            present = batch["sar_present"].view(b, 1, 1, 1, 1)
            f_sar = f_sar.view(b, t, *f_sar.shape[1:]) * present
            f_opt = f_opt.view(b, t, *f_opt.shape[1:])
            f_f = self.fuse(torch.cat([f_opt, f_sar], 2).flatten(0, 1)).view_as(f_opt)
            cos = F.cosine_similarity(f_sar, f_sar[:, :1].expand_as(f_sar), dim=2, eps=1e-6)[:, :, None]
            cos = torch.cat([torch.ones_like(cos[:, :1]), cos[:, 1:]], 1)
            change = present * cos + (1 - present) * torch.ones_like(cos)
            dt = torch.cat([torch.zeros_like(batch["ref_dt"][:, :1]), batch["ref_dt"]], 1)
            f_c, att = self.ltae(f_f, change, dt)
            out = self.head(torch.cat([self.up(f_c), tgt, m], 1))
            if mu is not None:
                out = out * sd + mu
            return (out, {"attention": att, "change": change}) if return_aux else out

    return CAMTCR()


def perceptual_net(n_bands: int):
    """Frozen random-feature perceptual network (see module docstring); returns a function image -> features."""
    import torch
    import torch.nn as nn

    gen = torch.Generator().manual_seed(0)
    widths = [n_bands, 16, 32, 32, 64, 64]
    convs = []
    for i in range(5):
        conv = nn.Conv2d(widths[i], widths[i + 1], 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * widths[i])) ** 0.5)
            conv.bias.zero_()
        conv.requires_grad_(False)
        convs.append(conv)

    def features(x):
        out = []
        for i, conv in enumerate(convs):
            conv.to(x.device)
            x = torch.relu(conv(x))
            out.append(x)
            if i < 4:
                x = nn.functional.avg_pool2d(x, 2)
        return out

    return features


def gram(f):
    b, c, h, w = f.shape
    f = f.flatten(2)
    return f @ f.transpose(1, 2) / (c * h * w)


class CAMTCRTrainable:
    """Training recipe: Noise2Noise VQ-VAE pretraining of the SAR encoder (eq. 9), then the whole network (eq. 16)."""

    name = "ca-mtcr"
    convention = InputConvention(BANDS, "L2A", sar_pols=("vv", "vh"))
    n_references = 2
    lambdas = (2.0, 1.0, 250.0)
    alpha, beta = 1.0, 0.1
    pretrain_fraction = 0.2
    card_notes = [
        "Perceptual network: frozen random-feature CNN (no VGG16 weights can be downloaded here).",
        "Windowed (8x8-token) attention instead of global attention; width 32, 3 blocks (paper: 9).",
        "Trained for minutes on 2 shared CPU cores: an under-trained small configuration, not the paper's model.",
        "Validation samples always carry SAR; that SAR is SIMULATED from the clear truth (training.datasets."
        "simulate_sar), so validation PSNR includes a SAR input no real scene provides.",
        "One 1 km2 forest footprint (Romania) is all the optical it saw: other land covers, seasons outside its "
        "dates, L1C inputs (e.g. the demo catalog) and other resolutions are out of domain.",
    ]

    def __init__(self) -> None:
        self._perc = None

    def build_network(self, config):
        net = build_network(config)
        net.perceptual_kind = dict({**DEFAULTS, **dict(config)})["perceptual"]
        return net

    def predict(self, net, batch):
        return net(batch)

    def _perceptual(self, pred, truth):
        if self._perc is None:
            self._perc = perceptual_net(pred.shape[1])
        fp, ft = self._perc(pred), self._perc(truth)
        l_fr = sum((a - b).abs().mean() for a, b in zip(fp, ft))
        l_sr = sum(((gram(a) - gram(b)) ** 2).sum((1, 2)).mean() for a, b in zip(fp[3:], ft[3:]))
        return l_fr, l_sr

    def loss(self, net, batch, stage):
        import torch.nn.functional as F

        if stage == "sar_pretrain":
            keep = batch["sar_present"] > 0.5
            if not bool(keep.any()):
                zero = sum(p.sum() * 0 for p in net.sar_enc.parameters())
                return zero, {"n2n": 0.0}
            y1, y2 = batch["sar"][keep, 0], batch["sar"][keep, 1]
            z = net.sar_enc(y1)
            e = net.quantize(z)
            zq = z + (e - z).detach()  # straight-through estimator
            rec = F.mse_loss(net.sar_dec(zq), y2)
            cb = F.mse_loss(e, z.detach())
            commit = F.mse_loss(z, e.detach())
            loss = rec + self.alpha * cb + self.beta * commit
            return loss, {"n2n": float(rec.detach()), "codebook": float(cb.detach()), "commit": float(commit.detach())}
        pred = net(batch)
        l1 = (pred - batch["truth"]).abs().mean()
        terms = {"l1": float(l1.detach())}
        loss = self.lambdas[0] * l1
        if getattr(net, "perceptual_kind", "random") != "none":
            l_fr, l_sr = self._perceptual(pred, batch["truth"])
            loss = loss + self.lambdas[1] * l_fr + self.lambdas[2] * l_sr
            terms.update(fr=float(l_fr.detach()), sr=float(l_sr.detach()))
        return loss, terms

    def stages(self, total_steps: int, lr: float) -> list[Stage]:
        pre = max(1, int(total_steps * self.pretrain_fraction))
        main = total_steps - pre

        def pretrain_params(net):
            return [*net.sar_enc.parameters(), *net.sar_dec.parameters(), *net.codebook.parameters()]

        def main_params(net):
            sar = set(id(p) for p in net.sar_enc.parameters())
            rest = [p for n, p in net.named_parameters() if id(p) not in sar and not n.startswith(("sar_dec",
                                                                                                      "codebook"))]
            return [{"params": rest, "lr_scale": 1.0}, {"params": list(net.sar_enc.parameters()), "lr_scale": 0.1}]

        return [Stage("sar_pretrain", pre, 2 * lr, pretrain_params),
                Stage("main", main, lr, main_params, lr_decay_after=main // 3, lr_decay_every=max(1, main // 6))]


@register
class CAMTCRModel(LearnedModel):
    name = "ca-mtcr"
    spec = ModelSpec(
        bands=BANDS,
        level="L2A",
        needs_reference=False,
        needs_sar=False,
        accepts_sar=True,
        sar_units="db",
        max_references=2,
        halo=32,
        description="CA-MTCR: change-aware multi-temporal fusion (SAR change map + L-TAE), learned, small",
        weights="models/weights/ca_mtcr.safetensors",
        experimental=BELOW_MEAN_FILL,
    )
    weights_file = "ca_mtcr.safetensors"
    trainable_cls = CAMTCRTrainable
    multiple = 32
