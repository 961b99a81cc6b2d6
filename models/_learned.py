"""Shared parts of the learned removal models: the tile <-> tensor adapter, lazy hash-checked weights, batching,
and network blocks several papers use (window attention, MBConv, residual dense block).

:class:`LearnedModel` turns :class:`~cloudfree.pipeline.contract.TileInputs` into the training batch layout
(:mod:`cloudfree.pipeline.training.api`), runs the network on CPU or CUDA (``device: auto``), several tiles at once in
``predict_batch`` (grouped by shape), and maps the prediction back:

* clear target pixels are returned unchanged (``SOURCE_TARGET``, confidence 1); cloudy ones take the network's
  prediction (``SOURCE_MODEL``) with confidence ``cloudy_confidence`` (0.6) where the network had support -- a clear
  reference at the pixel (multi-temporal) or SAR (mono-temporal) -- and ``unsupported_confidence`` (0.3) where it
  only inpainted; fixed priors, these networks give no per-pixel uncertainty;
* bands the network was not trained on (e.g. B05..B12 of a 12-band scene) are predicted under cloud by a per-tile
  linear regression on the network's bands, fitted on the tile's clear pixels (``SPECTRAL EXTENSION``, not learned);
* weights are read lazily, once per process, checked against the sha256 of their model card (or ``weights_sha256``)
  and against the input convention (bands, level, scaling): a mismatch raises :class:`~cloudfree.pipeline.errors.WeightsError`;
* SAR: ``tile.sar`` arrives in the convention the spec declares (``sar_units="db"``: sigma0 dB clipped to [-25, 0],
  one scene per optical date, target first) and is mapped to [0, 1]; a model configured with ``require_sar: true``
  (or whose spec says ``needs_sar``) fails a tile without SAR with :class:`~cloudfree.pipeline.errors.ModelError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from cloudfree.models._weights import LazyWeights
from cloudfree.models.base import ModelParams, RemovalModelBase
from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_MODEL, SOURCE_TARGET, TileInputs, TileResult
from cloudfree.pipeline.errors import ContractError, ModelError

log = logging.getLogger(__name__)

MIN_REGRESSION_PIXELS = 64


class LearnedParams(ModelParams):
    #: weights file; None = the shipped one (models/weights/).
    weights: str | None = None
    #: expected sha256 of the weights; None = the one recorded in the model card next to the file.
    weights_sha256: str | None = None
    device: str = "auto"
    #: fail tiles that carry no Sentinel-1 (otherwise the network runs with its "no SAR" input, as trained).
    require_sar: bool = False
    #: confidence written for pixels the network filled where it had support (a clear reference at the pixel for
    #: multi-temporal models, SAR for mono-temporal ones): a fixed prior, these networks give no uncertainty.
    cloudy_confidence: float = 0.6
    #: confidence where it had none (pure inpainting): below 0.5, so such pixels count as still cloudy in the
    #: cover statistics and ``output.confidence_floor`` can drop them.
    unsupported_confidence: float = 0.3
    #: tiles per forward pass in predict_batch.
    batch_size: int = 4
    #: torch threads (None = torch default).
    threads: int | None = None


def fit_band_extension(pred_bands: np.ndarray, extra: np.ndarray, clear: np.ndarray) -> np.ndarray | None:
    """Least squares ``extra_b ~ [pred_bands, 1]`` on ``clear`` pixels; ``(n_extra, n_pred + 1)`` or None."""
    if clear.sum() < MIN_REGRESSION_PIXELS:
        return None
    x = np.concatenate([pred_bands[:, clear], np.ones((1, int(clear.sum())), np.float32)]).T
    y = extra[:, clear].T
    coef, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    return coef.T.astype(np.float32)


class LearnedModel(LazyWeights, RemovalModelBase):
    """Base of the learned models (see module docstring). Subclasses set ``weights_file``, ``trainable_cls``."""

    Params: ClassVar[type[ModelParams]] = LearnedParams
    trainable_cls: ClassVar[type] = object
    #: spatial size the network input must be a multiple of (tiles are reflect-padded up to it).
    multiple: ClassVar[int] = 16

    def __init__(self, params=None) -> None:
        super().__init__(params)
        # instance-level spec (the runner reads it): the weights actually used (their sha256 goes into the output
        # item), and needs_sar when the user requires SAR
        self.spec = dataclasses.replace(type(self).spec, weights=str(self.weights_path),
                                        needs_sar=self.params.require_sar)

    @classmethod
    def trainable(cls):
        return cls.trainable_cls()

    def load_network(self, path: Path, sha256: str | None):
        """The trainable's network with the weights in ``path`` (:class:`~cloudfree.models._weights.LazyWeights`)."""
        from cloudfree.models._weights import read_weights

        if sha256 is None and path.is_file():
            raise ModelError(f"{self.name}: no sha256 for {path} (no model card next to it and no weights_sha256 "
                             "parameter); weights are only loaded when their hash can be checked")
        tr = self.trainable()
        state, meta = read_weights(path, sha256, tr.convention)
        net = tr.build_network(json.loads(meta.get("cloudfree:network", "{}")))
        net.load_state_dict(state)
        log.info("%s: loaded %s (sha256 %s)", self.name, path.name, sha256[:12])
        return net

    # -- tiles -> batch ---------------------------------------------------------------------------------------
    def _check(self, tile: TileInputs) -> None:
        missing = [b for b in self.trainable_cls.convention.bands if b not in tile.bands]
        if missing:
            raise ContractError(f"{self.name}: tile {tile.target_id} lacks bands {missing} the network was trained "
                                f"on (has {list(tile.bands)}); add them to grid.bands")
        if tile.sar is not None:
            names = [str(b).lower() for b in tile.sar_bands]
            if (names and not {"vv", "vh"} <= set(names)) or (not names and tile.sar.shape[1] < 2):
                raise ContractError(f"{self.name}: tile {tile.target_id} SAR has polarisations "
                                    f"{names or tile.sar.shape[1]}; the network was trained on VV and VH (give "
                                    "both, e.g. a dual-pol IW GRD/RTC collection)")
        if self.spec.needs_sar and tile.sar is None:
            raise ModelError(f"{self.name} needs Sentinel-1 but target {tile.target_id} got none: set "
                             "catalog.sar_collection (e.g. sentinel-1-rtc) and check search.policy.sar_max_days, "
                             "or run with require_sar: false")

    def _arrays(self, tile: TileInputs) -> dict[str, np.ndarray]:
        tr = self.trainable_cls
        idx = tile.band_index(*tr.convention.bands)
        tgt = tile.target[idx]
        valid = np.isfinite(tgt).all(0)
        mask = tile.cloud_mask | ~valid
        t_refs = tr.n_references
        ny, nx = tile.shape
        refs = np.zeros((t_refs, len(idx), ny, nx), np.float32)
        rmask = np.ones((t_refs, ny, nx), np.float32)
        dt = np.zeros(t_refs, np.float32)
        k = min(t_refs, tile.references.shape[0])
        if k:
            r = tile.references[:k][:, idx]
            refs[:k] = np.clip(np.nan_to_num(r), 0, 1)
            rmask[:k] = tile.reference_masks[:k] | ~np.isfinite(r).all(1)
            dt[:k] = np.asarray(tile.reference_dt_days[:k], np.float32) if tile.reference_dt_days else 0
        sar = np.zeros((t_refs + 1, 2, ny, nx), np.float32)
        present = np.float32(tile.sar is not None)
        if tile.sar is not None:
            s = np.asarray(tile.sar, np.float32)
            names = [str(b).lower() for b in tile.sar_bands]
            if names and names[:2] != ["vv", "vh"]:
                s = s[:, [names.index(p) for p in ("vv", "vh")]]
            s = (np.clip(np.nan_to_num(s, nan=-25.0), -25, 0) + 25) / 25
            n = min(len(s), t_refs + 1)
            sar[:n] = s[:n, :2]
            if n < t_refs + 1:  # a date without its own SAR: repeat the target's (no change seen)
                sar[n:] = s[:1, :2]
        return {"target": np.clip(np.nan_to_num(tgt), 0, 1), "cloud_mask": mask.astype(np.float32),
                "references": refs, "ref_masks": rmask, "ref_dt": dt, "sar": sar, "sar_present": present}

    def predict(self, tile: TileInputs) -> TileResult:
        return self.predict_batch([tile])[0]

    def predict_batch(self, tiles: Sequence[TileInputs]) -> list[TileResult]:
        import torch

        if self.params.threads:
            torch.set_num_threads(self.params.threads)
        for t in tiles:
            self._check(t)
        net = self.network()
        device = next(net.parameters()).device
        tr = self.trainable()
        preds: list[np.ndarray | None] = [None] * len(tiles)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tiles):
            groups.setdefault(t.shape, []).append(i)
        m = self.multiple
        for shape, ids in groups.items():
            ny, nx = shape
            py, px = (-ny) % m, (-nx) % m
            for start in range(0, len(ids), max(1, self.params.batch_size)):
                chunk = ids[start:start + self.params.batch_size]
                arrays = [self._arrays(tiles[i]) for i in chunk]
                batch = {k: torch.from_numpy(np.stack([a[k] for a in arrays])).to(device) for k in arrays[0]}
                if py or px:
                    for k in ("target", "cloud_mask", "references", "ref_masks", "sar"):
                        v = batch[k]
                        if v.numel() == 0:
                            batch[k] = v.new_zeros(*v.shape[:-2], ny + py, nx + px)
                            continue
                        flat = v.reshape(-1, 1, *v.shape[-2:]) if v.ndim != 4 else v
                        mode = "reflect" if min(ny, nx) > max(py, px) else "replicate"
                        padded = torch.nn.functional.pad(flat, (0, px, 0, py), mode=mode)
                        batch[k] = padded.reshape(*v.shape[:-2], ny + py, nx + px)
                with torch.inference_mode():
                    out = tr.predict(net, batch).clamp(0, 1)[..., :ny, :nx].float().cpu().numpy()
                for j, i in enumerate(chunk):
                    preds[i] = out[j]
        return [self._result(t, p) for t, p in zip(tiles, preds)]

    def supported(self, tile: TileInputs) -> np.ndarray:
        """``(y, x)`` True where the network had more than the cloudy pixel's surroundings to go on."""
        n = self.trainable_cls.n_references
        if n > 0:
            k = min(n, tile.references.shape[0])
            refs_ok = ~tile.reference_masks[:k] & np.isfinite(tile.references[:k]).all(1)
            return refs_ok.any(0) if k else np.zeros(tile.shape, bool)
        return np.full(tile.shape, tile.sar is not None)

    def _result(self, tile: TileInputs, pred: np.ndarray) -> TileResult:
        tr = self.trainable_cls
        idx = tile.band_index(*tr.convention.bands)
        valid = np.isfinite(tile.target).all(0)
        cloudy = tile.cloud_mask & valid
        out = tile.target.astype(np.float32, copy=True)
        for j, b in enumerate(idx):
            out[b][cloudy] = pred[j][cloudy]
        extra = [i for i in range(len(tile.bands)) if i not in idx]
        if extra and cloudy.any():
            coef = fit_band_extension(tile.target[idx], tile.target[extra], ~tile.cloud_mask & valid)
            if coef is not None:
                est = np.tensordot(coef[:, :-1], pred, axes=1) + coef[:, -1:, None]
                for j, b in enumerate(extra):
                    out[b][cloudy] = np.maximum(est[j][cloudy], 0)
            elif (~tile.cloud_mask & valid).any():  # too few clear pixels to regress: their median, not the cloud
                for b in extra:
                    out[b][cloudy] = np.median(tile.target[b][~tile.cloud_mask & valid])
        support = self.supported(tile)
        filled = np.where(support, np.float32(self.params.cloudy_confidence),
                          np.float32(self.params.unsupported_confidence))
        conf = np.where(cloudy, filled, np.float32(1)).astype(np.float32)
        src = np.where(cloudy, SOURCE_MODEL, SOURCE_TARGET).astype(np.uint8)
        out[:, ~valid] = np.nan
        conf[~valid] = 0
        src[~valid] = SOURCE_NODATA
        return TileResult(out, conf, src, {}).validate(tile, self.name)


# -- network blocks ---------------------------------------------------------------------------------------------
def _torch():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    return torch, nn, F


def build_blocks():
    """Network blocks (defined lazily so importing the model modules does not import torch)."""
    torch, nn, F = _torch()

    class MBConv(nn.Module):
        """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

        def __init__(self, c: int, expand: int = 2):
            super().__init__()
            h = c * expand
            self.body = nn.Sequential(nn.Conv2d(c, h, 1), nn.GELU(), nn.Conv2d(h, h, 3, padding=1, groups=h),
                                      nn.GELU(), nn.Conv2d(h, c, 1))

        def forward(self, x):
            return x + self.body(x)

    class WindowAttention(nn.Module):
        """(Shifted-)window multi-head self-attention + MLP, Swin-style, on ``(B, C, H, W)`` maps; H, W must be
        multiples of ``window``. Returns the block output (pre-norm residual)."""

        def __init__(self, c: int, heads: int = 2, window: int = 8, shift: bool = False, mlp: int = 2):
            super().__init__()
            self.heads, self.window, self.shift = heads, window, shift
            self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.mlp = nn.Sequential(nn.Linear(c, mlp * c), nn.GELU(), nn.Linear(mlp * c, c))

        def forward(self, x):
            b, c, h, w = x.shape
            win = min(self.window, h, w)
            s = win // 2 if self.shift and win < min(h, w) else 0
            t = x.permute(0, 2, 3, 1)
            if s:
                t = torch.roll(t, (-s, -s), (1, 2))
            t = t.reshape(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
            q, k, v = self.qkv(self.norm1(t)).reshape(t.shape[0], -1, 3, self.heads, c // self.heads) \
                .permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t.shape)
            t = t + self.proj(a)
            t = t + self.mlp(self.norm2(t))
            t = t.reshape(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
            if s:
                t = torch.roll(t, (s, s), (1, 2))
            return t.permute(0, 3, 1, 2)

    class RDB(nn.Module):
        """Residual dense block (Zhang et al. 2018): ``layers`` densely connected 3x3 convs, 1x1 fusion, residual."""

        def __init__(self, c: int, growth: int = 16, layers: int = 3):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c + i * growth, growth, 3, padding=1) for i in range(layers))
            self.fuse = nn.Conv2d(c + layers * growth, c, 1)

        def forward(self, x):
            feats = [x]
            for conv in self.convs:
                feats.append(F.relu(conv(torch.cat(feats, 1))))
            return x + self.fuse(torch.cat(feats, 1))

    return MBConv, WindowAttention, RDB


def ssim_map(x, y, window: int = 7, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2):
    """Per-pixel SSIM ``(B, C, H, W)`` with a uniform ``window`` (data range 1)."""
    torch, nn, F = _torch()
    pad = window // 2
    mu_x = F.avg_pool2d(F.pad(x, (pad,) * 4, mode="replicate"), window, 1)
    mu_y = F.avg_pool2d(F.pad(y, (pad,) * 4, mode="replicate"), window, 1)
    sxx = F.avg_pool2d(F.pad(x * x, (pad,) * 4, mode="replicate"), window, 1) - mu_x ** 2
    syy = F.avg_pool2d(F.pad(y * y, (pad,) * 4, mode="replicate"), window, 1) - mu_y ** 2
    sxy = F.avg_pool2d(F.pad(x * y, (pad,) * 4, mode="replicate"), window, 1) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def log_days(dt) -> Any:
    """Signed log-compressed day offsets (for temporal encodings)."""
    torch, _, _ = _torch()
    return torch.sign(dt) * torch.log1p(dt.abs()) / math.log(366.0)


def per_date_stats(x, clear, eps: float = 0.01, min_pixels: int = 64):
    """Per-sample, per-date, per-band mean/std ``(B, T, C, 1, 1)`` of ``x`` ``(B, T, C, H, W)`` over each date's
    ``clear`` ``(B, T, 1, H, W)`` pixels; a date with fewer than ``min_pixels`` clear pixels takes the statistics
    pooled over every clear pixel of every date (:func:`clear_stats`)."""
    pooled_mu, pooled_sd = clear_stats(x, clear, eps, min_pixels)
    n = clear.sum((3, 4), keepdim=True)
    mu = (x * clear).sum((3, 4), keepdim=True) / n.clamp_min(1)
    sd = ((((x - mu) ** 2) * clear).sum((3, 4), keepdim=True) / n.clamp_min(1)).sqrt().clamp_min(eps)
    ok = n >= min_pixels
    return mu.where(ok, pooled_mu[:, None]), sd.where(ok, pooled_sd[:, None])


def clear_stats(x, clear, eps: float = 0.01, min_pixels: int = 16):
    """Per-sample, per-band mean and std of ``x`` ``(B, [T,] C, H, W)`` over ``clear`` ``(B, [T,] 1, H, W)`` pixels
    (all pixels when fewer than ``min_pixels`` are clear); std floored at ``eps``. Shapes ``(B, C, 1, 1)``."""
    if x.ndim == 5:  # pool the dates
        x = x.transpose(1, 2).flatten(2, 3)  # (B, C, T*H, W)
        clear = clear.transpose(1, 2).flatten(2, 3)
    n = clear.sum((2, 3), keepdim=True)
    mu_c = (x * clear).sum((2, 3), keepdim=True) / n.clamp_min(1)
    var_c = (((x - mu_c) ** 2) * clear).sum((2, 3), keepdim=True) / n.clamp_min(1)
    mu_a, var_a = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True, unbiased=False)
    use_clear = n >= min_pixels
    mu = mu_c.where(use_clear, mu_a)
    sd = var_c.where(use_clear, var_a).sqrt().clamp_min(eps)
    return mu, sd
