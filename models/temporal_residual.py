"""``temporal-residual``: a full-resolution residual network on top of ``temporal``, shrunk per scene by its own
clear pixels.

**Network** (:func:`build_net`). Inputs per pixel: the base prediction (the registered ``temporal`` model), each
aligned reference minus the base with its cloud mask and its signed date offset, and the target's cloud mask. It is
**band-agnostic**: every band runs through the same weights (bands are folded into the batch), each band scaled by
its own mean over the tile, and the only cross-band input is each reference's spectral distance to the base (RMS over
the bands of the scaled difference). So it runs on any band set and level the base runs on (the 4-band simulated
cases as well as the 6-band Romania stack). A per-pixel temporal attention (query from the base, keys/values from
each reference, masked references excluded with a -1e4 logit) pools the references; UnCRtainTS-like MBConv blocks
(1x1 expand, depthwise 3x3 with growing dilation, 1x1 project, residual) follow, with no downsampling on the main
path. The last 1x1 convolution is zero-initialised, so an untrained network returns its base exactly, and the
residual is applied under the cloud only.

**Per-scene fine-tuning and shrinkage** (:meth:`TemporalResidual.scene_fit`, the self-supervised step): real cloud
shapes are moved onto really clear target pixels (:func:`cloudfree.models.self_supervised.pseudo_clouds`: the target's
own mask and the references' masks, rotated/flipped/shifted, ``margin`` px away from the real cloud); ``temporal``
and the network's body run blind on each pseudo-cloud. The network's head (a 1x1 convolution over the body's
features) is **refitted per band** on those pseudo-pixels by ridge regression towards the pretrained head
(``head_ridge``, relative to the mean feature energy; ``refit: false`` keeps the pretrained head). Cross-fitted
(leave-one-pseudo-mask-out, or 16 px blocks in 4 folds with fewer than 3 masks): the held-out residual predictions
give per band ``alpha = clip(<r_hat, r> / <r_hat, r_hat>, 0, 1)``, and a band whose held-out residual energy does not
drop by ``min_gain`` gets ``alpha = 0``, i.e. exactly its base. The residual applied under the real cloud is
``alpha * head_refit(features) * scale``. ``shrink: false`` runs the raw pretrained network.

**Offset-free, no extrapolation** (``offset_free``, ``clip``, both default on; the fix temporal-ssl needed, see
:mod:`cloudfree.models.self_supervised` "Deviations"). On REAL cloudy dates the SCL-clear pixels carry haze; the
refitted head (it has a bias) learned that scene-wide offset from the pseudo-pixels, the cross-fitted shrinkage kept
it (held-out pseudo-pixels share the haze) and it was copied under the cloud. Now the head is refitted on the
pseudo-pixel residual minus its per-band mean and its bias is re-centred so that its prediction has zero mean over
the pixels it was fitted on (each cross-fitting fold likewise); and, as temporal-ssl, the features under the real
cloud are clipped per band to the range the pseudo-pixels showed and the residual to the 0.5-99.5 percentiles of the
pseudo-pixel targets (a 38-92 % cloud puts features outside what the pseudo-pixels showed: the offset-free head
alone still shifted the cloud's mean by -0.035 in B08/B8A on romania-real 2018-08-20).

Chosen by a rule written before any per-case number of a candidate was seen: a candidate becomes the default and
the model stops being experimental iff, in one run of ``cloudfree evaluate --models temporal,temporal-residual
--cases romania,slovakia,simulated --no-mask-loss``, its mean cloudy-pixel PSNR is at or above temporal's on every
aggregate printed (romania-hidden, romania-real, slovakia, simulated, simulated-tuning); candidates in order:
offset-free, + clip, + the applied residual re-centred to zero mean under the real cloud. Measured (temporal ->
offset-free / + clip / + re-centred; the previous default ``offset_free: false, clip: false``): romania-hidden
35.57 -> 36.53 / 36.51 / 36.39 (36.91), romania-real 30.70 -> 30.62 / 30.79 / 30.11 (28.00), slovakia 41.97 ->
39.92 / 40.04 / 39.77 (36.43), simulated 35.86 -> 35.96 / 35.96 / 36.27 (36.38), simulated-tuning 35.58 -> 36.33 /
36.34 / 36.21 (36.12). None meets the rule: offset-free + clip (the default now) fails only on **Slovakia**, whose
"truth" is another acquisition than the cloudy date and whose one reference is simulated from that truth (what the
cloudy date's own clear pixels teach is there a difference from the truth; temporal-ssl loses 2.6 dB there for the
same reason). So the model stays experimental. Cost against the previous default: 0.4 dB on romania-hidden and on
simulated (both still above temporal), for +2.8 dB on romania-real and +3.6 dB on Slovakia. Romania-real still has
dates where it loses (2019-06-26 38.34 -> 33.68, 2018-08-20 31.80 -> 27.43): what remains is spatial, not an offset.

``head_ridge`` was chosen on the training-side validation pairs (own clear dates and donors, never the evaluation
dates): cloudy PSNR temporal 32.21 dB; refit with 1e-2 / 3e-3 / 1e-3 / 3e-4: 35.52 / 35.67 / 35.75 / 35.81 (a
40-step body); 1e-3 is where the curve flattens.

Training: :mod:`cloudfree.pipeline.training.temporal_residual` (``make train-temporal-residual``; training imports
models, never the reverse); what the shipped weights saw and how they score is in
``models/weights/temporal_residual.card.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from cloudfree.models._weights import LazyWeights
from cloudfree.models.base import ModelParams, ModelSpec, RemovalModelBase
from cloudfree.models.registry import register
from cloudfree.pipeline.contract import TileInputs, TileResult

log = logging.getLogger(__name__)

#: bands of the training stack (the evaluation's Romania bands); the network itself is band-agnostic.
BANDS = ("B02", "B03", "B04", "B08", "B8A", "B11")
#: references the network was trained with (the search stage's default ``max_references``); it takes any number.
N_REFS = 4
#: smallest tile side the network runs on directly (its largest dilation reflect-pads 4 px); smaller tiles are
#: edge-padded.
MIN_SIZE = 9
DEFAULT_NET = {"dim": 16, "blocks": 3, "dilations": [1, 2, 4]}


def build_net(c: int | None = None, dim: int = 16, blocks: int = 3, dilations: Sequence[int] = (1, 2, 4)):
    """The band-agnostic residual network (module docstring); ``c`` is accepted for old callers and ignored."""
    import torch
    from torch import nn

    class MBConv(nn.Module):
        def __init__(self, d: int, dilation: int, expand: int = 2) -> None:
            super().__init__()
            e = d * expand
            self.body = nn.Sequential(nn.Conv2d(d, e, 1), nn.GELU(),
                                      nn.Conv2d(e, e, 3, padding=dilation, dilation=dilation, groups=e,
                                                padding_mode="reflect"), nn.GELU(),
                                      nn.Conv2d(e, d, 1))

        def forward(self, x):
            return x + self.body(x)

    dil = list(dilations) + [1] * max(0, blocks - len(dilations))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Conv2d(2, dim, 1)  # base, cloud
            self.kv = nn.Conv2d(4, 2 * dim, 1)  # ref - base (this band), spectral distance, mask, dt
            self.stem = nn.Conv2d(2 + dim + 1, dim, 3, padding=1, padding_mode="reflect")
            self.blocks = nn.Sequential(*[MBConv(dim, dil[i]) for i in range(blocks)])
            self.head = nn.Conv2d(dim, 1, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, base, refs, ref_masks, ref_dt, cloud, bands=None):
            """``base`` (B, C, H, W), ``refs`` (B, T, C, H, W), ``ref_masks`` (B, T, H, W) 1 = unusable,
            ``ref_dt`` (B, T) days, ``cloud`` (B, H, W) 1 = cloudy -> (B, C, H, W); ``bands``: run only these
            band indices (training subsamples bands; the spectral distance still uses all), output (B, len, H, W)
            and the base of the others is not returned."""
            f, scale, base = self.features(base, refs, ref_masks, ref_dt, cloud, bands)
            b, ch, d, h, w = f.shape
            r = self.head(f.reshape(b * ch, d, h, w)).reshape(b, ch, h, w) * scale
            return base + r * cloud[:, None]

        def features(self, base, refs, ref_masks, ref_dt, cloud, bands=None):
            """``(features (B, C, dim, H, W), scale (B, C, 1, 1), base (B, C, H, W))``: what the head reads; the
            residual is ``head(features) * scale`` (per-scene refits of the head use it)."""
            clear = 1 - cloud[:, None]
            scale = ((base.abs() * clear).sum((2, 3)) / clear.sum((2, 3)).clamp(min=1)).clamp(min=0.01)
            scale = scale[:, :, None, None]  # (B, C, 1, 1): per band mean of the clear pixels
            diff = (refs / scale[:, None] - (base / scale)[:, None]) * (1 - ref_masks[:, :, None])  # (B, T, C, H, W)
            dist = diff.pow(2).mean(2, keepdim=True).add(1e-8).sqrt()  # (B, T, 1, H, W)
            if bands is not None:
                base, scale, diff = base[:, bands], scale[:, bands], diff[:, :, bands]
            xb = base / scale
            b, t, ch, h, w = diff.shape
            m = ref_masks[:, :, None].expand(b, t, 1, h, w)
            dt = (ref_dt / 30.0)[:, :, None, None, None].expand(b, t, 1, h, w)
            # fold bands into the batch: (B*C, T, 4, H, W)
            feats = torch.cat([diff[:, :, :, None], dist[:, :, :, None].expand(b, t, ch, 1, h, w),
                               m[:, :, :, None].expand(b, t, ch, 1, h, w), dt[:, :, :, None].expand(b, t, ch, 1, h, w)],
                              3)  # (B, T, C, 4, H, W)
            feats = feats.permute(0, 2, 1, 3, 4, 5).reshape(b * ch * t, 4, h, w)
            k, v = self.kv(feats).reshape(b * ch, t, 2, dim, h, w).unbind(2)
            cl = cloud[:, None].expand(b, ch, h, w).reshape(b * ch, 1, h, w)
            xq = xb.reshape(b * ch, 1, h, w)
            q = self.q(torch.cat([xq, cl], 1))[:, None]
            mm = ref_masks[:, None].expand(b, ch, t, h, w).reshape(b * ch, t, h, w)
            logit = (q * k).sum(2) / dim ** 0.5 - 1e4 * mm
            a = torch.softmax(logit, 1)
            pooled = (a[:, :, None] * v * (1 - mm[:, :, None])).sum(1)
            x = self.stem(torch.cat([xq, cl, pooled, (1 - mm).mean(1, keepdim=True)], 1))
            return self.blocks(x).reshape(b, ch, dim, h, w), scale, base

    return Net()


def reference_arrays(tile: TileInputs, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(refs (T, C, H, W), masks (T, H, W) 1 = unusable, dt (T,))`` of ``tile``'s references, bands ``idx``,
    aligned to the target by the scene alignment when the tile carries one (``context["alignment"]``, as the base
    aligns them), NaN -> 0 and masked."""
    from cloudfree.models._align import apply_linear

    n = tile.references.shape[0]
    refs = np.zeros((n, len(idx)) + tile.shape, np.float32)
    masks = np.ones((n,) + tile.shape, np.float32)
    align = tile.context.get("alignment") if tile.context else None
    for i in range(n):
        r = tile.references[i]
        if align is not None and i < len(align):
            r = apply_linear(r, np.asarray(align[i][0]), np.asarray(align[i][1]))
        r = r[list(idx)]
        ok = np.isfinite(r).all(0) & ~np.asarray(tile.reference_masks[i], bool)
        refs[i] = np.nan_to_num(r)
        masks[i] = ~ok
    dt = np.asarray(tile.reference_dt_days, np.float32).reshape(-1)[:n] if n else np.zeros(0, np.float32)
    return refs, masks, dt


class TemporalResidualParams(ModelParams):
    #: weights file; None = the shipped one (models/weights/temporal_residual.safetensors).
    weights: str | None = None
    #: expected sha256 of ``weights``; None = the manifest's (shipped) or the model card's next to the file.
    weights_sha256: str | None = None
    device: str = "cpu"
    #: parameters of the base ``temporal`` model.
    base: dict[str, Any] = Field(default_factory=dict)
    #: per-scene shrinkage of the residual by its held-out gain on pseudo-clouds (False = the raw network).
    shrink: bool = True
    #: pseudo-cloud masks for the shrinkage (one blind base + network run each).
    masks: int = Field(6, ge=1, le=16)
    #: pseudo-pixels keep this many pixels away from the real cloud.
    margin: int = Field(3, ge=0)
    #: a pixel is a pseudo-pixel candidate when its cloud probability is at most this.
    clear_prob: float = Field(0.1, ge=0, le=1)
    #: fewer pseudo-pixels than this: no evidence, the residual is dropped (the base is returned).
    min_pixels: int = Field(300, ge=10)
    #: a band keeps its residual only if the cross-fitted held-out residual energy drops by this share.
    min_gain: float = Field(0.02, ge=0, lt=1)
    #: refit the network's head per band on the tile's pseudo-clouds (ridge towards the pretrained head; the
    #: self-supervised fine-tuning), False = the pretrained head (only shrunk).
    refit: bool = True
    #: ridge strength of the refit towards the pretrained head, relative to the mean feature energy.
    head_ridge: float = Field(1e-3, gt=0)
    #: the refit sees at most this many pseudo-pixels (a random subset).
    max_pixels: int = Field(20000, ge=100)
    #: learn the pseudo-pixel residual minus its per-band mean, and centre the refitted head's bias so its
    #: prediction has zero mean over the pseudo-pixels it was fitted on: the scene-wide offset (haze on a real
    #: cloudy date, module docstring "Offset-free") is never copied under the cloud. False = the whole residual.
    offset_free: bool = True
    #: nothing is extrapolated (as temporal-ssl): the features under the real cloud are clipped per band to the
    #: range the pseudo-pixels showed, the residual to the 0.5-99.5 percentiles of the pseudo-pixel targets.
    clip: bool = True


def _alpha(rh: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.clip((rh * r).sum(0) / ((rh * rh).sum(0) + 1e-12), 0.0, 1.0)


def cross_fitted_gain(r_hat: np.ndarray, r: np.ndarray, folds: np.ndarray, min_gain: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per band ``(alpha, held-out gain)`` of a residual prediction ``r_hat`` (n, band) on the truth ``r``: alpha
    fitted on all pixels (clipped to [0, 1]); gain = share of the residual energy removed on each fold by the alpha
    fitted on the other folds (cross-fitted); alpha = 0 where gain < ``min_gain``."""
    err = np.zeros(r.shape[1])
    for f in np.unique(folds):
        te = folds == f
        if (~te).sum() == 0:
            continue
        a = _alpha(r_hat[~te], r[~te])
        err += ((r[te] - a * r_hat[te]) ** 2).sum(0)
    gain = 1.0 - err / ((r * r).sum(0) + 1e-12)
    alpha = np.where(gain >= min_gain, _alpha(r_hat, r), 0.0)
    return alpha, gain


@register
class TemporalResidual(LazyWeights, RemovalModelBase):
    name = "temporal-residual"
    weights_file = "temporal_residual.safetensors"
    spec = ModelSpec(
        bands=(),
        level="any",
        needs_reference=True,
        max_references=8,
        halo=81,
        description="temporal + a full-resolution residual network, head refitted per scene on pseudo-clouds and "
                    "shrunk by its cross-fitted gain",
        scene_context=True,
        experimental="at or above temporal on romania-hidden (36.51 vs 35.57 dB), romania-real (30.79 vs 30.70) and "
                     "simulated (35.96 vs 35.86) but 1.9 dB BELOW it on slovakia (40.04 vs 41.97 dB; cloudfree "
                     "evaluate --models temporal,temporal-residual --cases romania,slovakia,simulated)",
    )
    Params = TemporalResidualParams

    def __init__(self, params: ModelParams | dict | None = None) -> None:
        super().__init__(params)
        from cloudfree.models.temporal import Temporal

        self.base_model = Temporal(self.params.base)
        self.spec = dataclasses.replace(type(self).spec, halo=self.base_model.spec.halo + 16,
                                        weights=str(self.weights_path))

    def load_network(self, path: Path, sha256: str | None):
        from cloudfree.models._weights import InputConvention, read_weights
        from cloudfree.pipeline.errors import ModelError

        if sha256 is None and path.is_file():
            raise ModelError(f"{self.name}: no sha256 for {path} (no manifest entry, model card or weights_sha256); "
                             "weights are only loaded when their hash can be checked")
        state, meta = read_weights(path, sha256, InputConvention(BANDS, "L2A"))
        net = build_net(**json.loads(meta.get("cloudfree:network", "{}")))
        net.load_state_dict(state)
        return net

    def fit_scene(self, sample: TileInputs) -> dict[str, Any]:
        return self.base_model.fit_scene(sample)

    def features(self, tile: TileInputs, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's head inputs on ``tile`` given the base output: ``(features (band, dim, y, x), scale
        (band,))``; the pretrained residual is ``(head . features) * scale`` under the cloud."""
        import torch

        refs, masks, dt = reference_arrays(tile, list(range(len(tile.bands))))
        net = self.network()
        dev = next(net.parameters()).device
        cloud = (tile.cloud_mask | ~np.isfinite(tile.target).all(0)).astype(np.float32)
        b0 = np.nan_to_num(base).astype(np.float32)
        ny, nx = tile.shape
        pad = max(0, MIN_SIZE - min(ny, nx))  # the dilated reflect padding needs a few pixels: edge-pad tiny tiles
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, pad)], mode="edge") if pad else a
                  for a in (b0, refs, masks, cloud)]
        with torch.no_grad():
            x = [torch.from_numpy(np.ascontiguousarray(a))[None].to(dev) for a in arrays]
            f, scale, _ = net.features(x[0], x[1], x[2], torch.from_numpy(dt)[None].to(dev), x[3])
        return f[0, :, :, :ny, :nx].cpu().numpy(), scale[0, :, 0, 0].cpu().numpy()

    def head(self) -> np.ndarray:
        """The pretrained head as ``(dim + 1,)`` weights (last = bias)."""
        h = self.network().head
        return np.concatenate([h.weight.detach().cpu().numpy().reshape(-1), h.bias.detach().cpu().numpy()])

    def residual(self, tile: TileInputs, base: np.ndarray, weights: np.ndarray | None = None,
                 bounds: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """The residual ``(band, y, x)`` on ``tile`` given the base output, with the pretrained head or per-band
        head ``weights`` ``(band, dim + 1)``; 0 outside the cloud and where the base has no value. ``bounds``
        ``(lo, hi (band, dim + 1), rlo, rhi (band,))``: features clipped to [lo, hi], the scaled residual to
        [rlo, rhi] (:meth:`scene_fit`)."""
        if tile.references.shape[0] == 0:
            return np.zeros_like(base)
        f, scale = self.features(tile, base)
        w = np.broadcast_to(self.head(), (f.shape[0], f.shape[1] + 1)) if weights is None else weights
        if bounds is not None:
            f = np.clip(f, bounds[0][:, :-1, None, None], bounds[1][:, :-1, None, None])
        r = np.einsum("cdyx,cd->cyx", f, w[:, :-1]) + w[:, -1][:, None, None]
        if bounds is not None:
            r = np.clip(r, bounds[2][:, None, None], bounds[3][:, None, None])
        cloud = tile.cloud_mask | ~np.isfinite(tile.target).all(0)
        return (r * scale[:, None, None] * (cloud & np.isfinite(base).all(0))[None]).astype(np.float32)

    def scene_fit(self, tile: TileInputs) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
        """The self-supervised step (module docstring): per band head weights ``(band, dim + 1)`` refitted on the
        tile's pseudo-clouds (None: the pretrained head, ``refit`` off), the per band gain ``alpha`` and a
        summary (with ``clip``: its ``"bounds"`` for :meth:`residual`)."""
        from cloudfree.models.self_supervised import SelfSupervisedParams, pseudo_clouds

        p = self.params
        nb = len(tile.bands)
        sp = SelfSupervisedParams(masks=p.masks, margin=p.margin, clear_prob=p.clear_prob,
                                  min_train=max(p.min_pixels, 10))
        pcs = pseudo_clouds(tile, sp) if tile.references.shape[0] else []
        info: dict[str, Any] = {"masks": len(pcs), "pixels": 0, "alpha": [0.0] * nb}
        xs, ys, grp, blk, scales = [], [], [], [], []
        ny, nx = tile.shape
        yy, xx = np.mgrid[:ny, :nx]
        blocks = np.random.default_rng(0).integers(0, 4, (ny // 16 + 1, nx // 16 + 1))[yy // 16, xx // 16]
        for g, pc in enumerate(pcs):
            blind = dataclasses.replace(tile, cloud_mask=tile.cloud_mask | pc.mask,
                                        cloud_prob=np.where(pc.mask, 1.0, tile.cloud_prob).astype(np.float32))
            base = self.base_model.predict(blind).reflectance
            f, scale = self.features(blind, base)
            sel = pc.mask & np.isfinite(base).all(0) & np.isfinite(tile.target).all(0)
            xs.append(f[:, :, sel].transpose(0, 2, 1))  # (band, n, dim)
            ys.append(((tile.target[:, sel] - base[:, sel]) / scale[:, None]))  # (band, n), scaled
            scales.append(np.repeat(scale[:, None], int(sel.sum()), 1))
            grp.append(np.full(int(sel.sum()), g))
            blk.append(blocks[sel])
        n = sum(len(g) for g in grp)
        if n < p.min_pixels:
            return None, np.zeros(nb), info
        x = np.concatenate(xs, 1).astype(np.float64)
        x = np.concatenate([x, np.ones(x.shape[:2] + (1,))], 2)  # (band, n, dim + 1)
        y, sc = np.concatenate(ys, 1).astype(np.float64), np.concatenate(scales, 1)
        folds = np.concatenate(grp) if len(pcs) >= 3 else np.concatenate(blk)
        if n > p.max_pixels:
            keep = np.sort(np.random.default_rng(0).choice(n, p.max_pixels, replace=False))
            x, y, sc, folds = x[:, keep], y[:, keep], sc[:, keep], folds[keep]
        w0 = self.head()
        if p.offset_free:  # the scene-wide offset of the date (haze) is not learned: module docstring
            y = y - y.mean(1, keepdims=True)

        def apply(w, xt, xf, yf):  # prediction on xt of head w fitted on (xf, yf), clipped to their range
            if not p.clip:
                return np.einsum("cnd,cd->cn", xt, w)
            b = _bounds(xf, yf)
            return np.clip(np.einsum("cnd,cd->cn", np.clip(xt, b[0][:, None], b[1][:, None]), w),
                           b[2][:, None], b[3][:, None])

        if p.refit:
            held = np.zeros_like(y)
            for f in np.unique(folds):
                te = folds == f
                if (~te).sum() < p.min_pixels // 2:
                    continue
                w = _ridge_to_prior(x[:, ~te], y[:, ~te], w0, p.head_ridge)
                if p.offset_free:
                    w = _centred(w, x[:, ~te])
                held[:, te] = apply(w, x[:, te], x[:, ~te], y[:, ~te])
            weights = _ridge_to_prior(x, y, w0, p.head_ridge)
        elif p.offset_free or p.clip:
            weights, held = np.broadcast_to(w0, (nb, w0.size)).copy(), None
        else:
            held, weights = x @ w0, None
        if p.offset_free:
            weights = _centred(weights, x)
        if held is None:
            held = apply(weights, x, x, y)
        if p.clip:
            info["bounds"] = _bounds(x, y)
        alpha, gain = cross_fitted_gain((held * sc).T, (y * sc).T, folds, p.min_gain)
        info.update(pixels=int(y.shape[1]), alpha=[round(float(a), 3) for a in alpha],
                    heldout_gain=[round(float(v), 3) for v in gain])
        return weights, alpha, info

    def predict(self, tile: TileInputs) -> TileResult:
        res = self.base_model.predict(tile)
        base = res.reflectance
        if self.params.shrink:
            weights, alpha, info = self.scene_fit(tile)
            bounds = info.pop("bounds", None)
            log.debug("%s: %s per-scene fit %s", self.name, tile.target_id, info)
            r = self.residual(tile, base, weights, bounds) * alpha[:, None, None].astype(np.float32) \
                if alpha.any() else np.zeros_like(base)
        else:
            r = self.residual(tile, base)
        todo = (tile.cloud_mask | ~np.isfinite(tile.target).all(0)) & np.isfinite(base).all(0)
        out = base.copy()
        out[:, todo] = (base[:, todo] + r[:, todo]).astype(np.float32)
        return TileResult(out, res.confidence, res.source, res.diagnostics).validate(tile, self.name)


def _centred(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per band head weights ``w`` (band, d) with the bias (last) shifted so that ``x w`` has zero mean over the
    pixels ``x`` (band, n, d) (whose last feature is the constant 1)."""
    w = w.copy()
    w[:, -1] -= np.einsum("cnd,cd->cn", x, w).mean(1)
    return w


def _bounds(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(lo, hi, rlo, rhi)``: per band feature range of ``x`` (band, n, d) and 0.5-99.5 percentiles of the
    targets ``y`` (band, n), as temporal-ssl clips (models.self_supervised._Clipped)."""
    return x.min(1), x.max(1), np.percentile(y, 0.5, axis=1), np.percentile(y, 99.5, axis=1)


def _ridge_to_prior(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lam: float) -> np.ndarray:
    """Per band ``argmin |x w - y|^2 + lam' |w - w0|^2`` with ``lam' = lam * mean diag(x'x)``: ``x`` (band, n, d),
    ``y`` (band, n), prior ``w0`` (d,) -> (band, d)."""
    out = np.zeros((x.shape[0], x.shape[2]))
    for c in range(x.shape[0]):
        a = x[c].T @ x[c]
        reg = lam * max(float(np.trace(a)) / a.shape[0], 1e-12)
        out[c] = w0 + np.linalg.solve(a + reg * np.eye(a.shape[0]), x[c].T @ (y[c] - x[c] @ w0))
    return out
