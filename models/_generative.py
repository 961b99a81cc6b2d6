"""Shared pieces of the two generative removal models (:mod:`cloudfree.models.diffusion_enhancement`, :mod:`cloudfree.models.cm_cr`).

* :class:`UNet`: a small time-conditioned convolutional UNet (the "guided diffusion" family both papers build on),
  made *local* on purpose: normalisation is per pixel over channels (:class:`ChannelNorm`) instead of GroupNorm,
  and there is no global self-attention. GroupNorm and attention pool statistics over the whole tile, so the
  prediction at a pixel would depend on which tile it was cut from and the tile size (seams in a tiled scene,
  and a train/test gap between 64 px patches and 256+ px tiles); a purely convolutional net depends only on a
  bounded neighbourhood, which the tile halo covers.
* :func:`coordinate_noise`: standard-normal noise that is a pure function of ``(seed, step, band, global row,
  global column)`` (a counter-based hash, splitmix64 + Box-Muller). Two overlapping tiles of one scene therefore
  draw *the same* noise at the same ground pixel, whatever the tiling, so the halos agree and the feathered blend
  sees no seam from independent noise draws. Deterministic given the seed, byte for byte, on any machine.
* :func:`scene_seed`: the scene seed derived from the model seed and the target id (untrusted text is only hashed).
* :func:`encode` / :func:`decode`: reflectance <-> network space (``x = 4 r - 1``: reflectance 0 -> -1, 0.5 -> 1).
* :func:`extend_bands`: bands a network was not trained on are predicted from the restored trained bands by a
  per-band linear regression fitted on the tile's clear pixels (documented in each model).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from pydantic import Field
from torch.nn import functional as F

from cloudfree.models.base import ModelParams

#: The four 10 m bands the generative models are trained on (present in every optical data set here).
GEN_BANDS = ("B02", "B03", "B04", "B08")
#: reflectance -> network space: x = SCALE * r + SHIFT
SCALE, SHIFT = 4.0, -1.0


def encode(reflectance: np.ndarray | torch.Tensor):
    return reflectance * SCALE + SHIFT


def decode(x: np.ndarray | torch.Tensor):
    return (x - SHIFT) / SCALE


class GenerativeParams(ModelParams):
    """The parameters both generative models share: noise, weights, clear-target pass-through, device, batching."""

    seed: int = 0
    #: "scene": noise from the scene seed and global pixel coordinates (overlapping tiles agree; the default);
    #: "tile": an independent draw per tile (seeded by the tile's origin), only to measure what shared noise buys.
    noise: Literal["scene", "tile"] = "scene"
    #: weights file (None = the model's shipped file under models/weights/).
    weights: str | None = None
    keep_clear_target: bool = True
    device: Literal["cpu", "cuda", "auto"] = "auto"
    #: tiles per network batch in predict_batch (equal-shaped tiles only).
    batch_size: int = Field(8, ge=1)


# ----------------------------------------------------------------------------------------------------- noise
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def coordinate_noise(seed: int, step: int, n_bands: int, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``(n_bands, ny, nx)`` float32 standard-normal noise, a pure function of the seed, the step and the *global*
    pixel coordinates ``origin + (row, col)`` (so overlapping tiles draw identical noise where they overlap)."""
    ny, nx = shape
    with np.errstate(over="ignore"):
        rows = (np.arange(ny, dtype=np.int64) + int(origin[0])).astype(np.uint64)
        cols = (np.arange(nx, dtype=np.int64) + int(origin[1])).astype(np.uint64)
        base = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _splitmix64(np.uint64(step & 0xFFFFFFFF)))
        out = np.empty((n_bands, ny, nx), np.float32)
        for b in range(n_bands):
            kb = _splitmix64(base ^ np.uint64(b + 1))
            key = _splitmix64(kb ^ (rows[:, None] * np.uint64(0xD1B54A32D192ED03)))
            key = _splitmix64(key ^ (cols[None, :] * np.uint64(0xABC98388FB8FAC03)))
            k2 = _splitmix64(key ^ np.uint64(0x5851F42D4C957F2D))
            u1 = ((key >> np.uint64(11)).astype(np.float64) + 0.5) / 9007199254740992.0  # (0, 1)
            u2 = (k2 >> np.uint64(11)).astype(np.float64) / 9007199254740992.0
            out[b] = (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
    return out


def scene_seed(seed: int, target_id: str) -> int:
    """A 63-bit seed from the model seed and the scene (target) id; tiles of one scene share it."""
    digest = hashlib.sha256(f"{int(seed)}|{target_id}".encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def batch_noise(params: GenerativeParams, tiles, n_bands: int, shape: tuple[int, int], device):
    """``noise(step) -> (len(tiles), n_bands, *shape)`` tensor on ``device`` for a batch of tiles: per tile
    :func:`coordinate_noise` from the scene seed (``params.noise == "scene"``: tiles of a scene agree where they
    overlap) or a seed of its own (``"tile"``)."""
    seeds = [scene_seed(params.seed, tile_scene_key(t.target_id) if params.noise == "scene"
                        else f"{t.target_id}@{t.origin}") for t in tiles]

    def noise(k: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([coordinate_noise(s, k, n_bands, t.origin, shape)
                                          for s, t in zip(seeds, tiles)])).to(device)

    return noise


def tile_scene_key(target_id: str) -> str:
    """The scene part of a tile id: ``predict_tiled`` names sub-tiles ``scene@row,col``; the runner uses the scene
    id itself. Tiles of one scene must share the seed."""
    return target_id.split("@", 1)[0]


# ----------------------------------------------------------------------------------------------------- network
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (possibly fractional) time/noise-level value per batch item (DDPM/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel (no spatial pooling: tile-independent)."""

    def __init__(self, ch: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class ResBlock(nn.Module):
    """ADM residual block: norm-SiLU-conv, + time embedding (scale/shift), norm-SiLU-(dropout)-conv, skip."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.n1, self.c1 = ChannelNorm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = ChannelNorm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.e(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class UNet(nn.Module):
    """Time-conditioned UNet: ``forward(x, t) -> (out_ch, H, W)``; ``H, W`` divisible by ``2 ** (len(mults) - 1)``.

    ``in_ch`` counts every input channel (noisy state and conditions, concatenated by the caller).
    """

    def __init__(self, in_ch: int, out_ch: int, base: int = 32, mults: tuple[int, ...] = (1, 2, 2),
                 depth: int = 1) -> None:
        super().__init__()
        self.config = {"in_ch": in_ch, "out_ch": out_ch, "base": base, "mults": list(mults), "depth": depth}
        emb = base * 4
        self.emb_dim = base
        self.time = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        chans = [base]
        ch = base
        for i, m in enumerate(mults):
            blocks = nn.ModuleList()
            for _ in range(depth):
                blocks.append(ResBlock(ch, base * m, emb))
                ch = base * m
                chans.append(ch)
            self.down.append(blocks)
            if i < len(mults) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb), ResBlock(ch, ch, emb)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            blocks = nn.ModuleList()
            for _ in range(depth + 1):
                blocks.append(ResBlock(ch + chans.pop(), base * m, emb))
                ch = base * m
            self.up.append(blocks)
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = ChannelNorm(ch)
        self.out = nn.Conv2d(ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.factor = 2 ** (len(mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.emb_dim))
        h = self.inp(x)
        hs = [h]
        for i, blocks in enumerate(self.down):
            for b in blocks:
                h = b(h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for b in self.mid:
            h = b(h, emb)
        for i, blocks in enumerate(self.up):
            for b in blocks:
                h = b(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def pad_to_multiple(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``(..., H, W)`` at the bottom/right to multiples of ``k``; returns the padded tensor and (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        mode = "reflect" if h > ph and w > pw else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


# ----------------------------------------------------------------------------------------------------- bands
def extend_bands(restored: np.ndarray, target: np.ndarray, clear: np.ndarray) -> np.ndarray:
    """Predict extra bands ``(k, y, x)`` from the restored trained bands ``(4, y, x)`` with the learned models'
    per-tile spectral extension (:func:`cloudfree.models._learned.fit_band_extension`: least squares ``target_b ~ [restored,
    1]`` on the tile's clear pixels, where the restored bands equal the observed ones). With too few clear pixels
    each band is the median of its clear observed values (of all finite ones when none is clear): a constant."""
    from cloudfree.models._learned import fit_band_extension

    ok = clear & np.isfinite(target).all(axis=0) & np.isfinite(restored).all(axis=0)
    coef = fit_band_extension(restored, target, ok)
    if coef is not None:
        design = np.concatenate([restored.reshape(restored.shape[0], -1), np.ones((1, restored[0].size), np.float32)])
        out = (coef @ design).reshape((target.shape[0],) + restored.shape[1:])
    else:  # the median of the clear observations (a cloudy pixel's value is cloud, not surface), else of all
        src = [b[ok] if ok.any() else b[np.isfinite(b)] for b in target]
        out = np.stack([np.full(restored.shape[1:], np.median(v) if v.size else 0.0, np.float32) for v in src])
    return np.maximum(out, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- weights
def load_network(model_name: str, path: str | Path, sha256: str | None, convention, build) -> nn.Module:
    """The network in weights file ``path``, built by ``build(network_config)``, after checking the file's sha256
    (``sha256``: the manifest's or its model card's) and its recorded input convention against ``convention``.
    Called by :meth:`cloudfree.models._weights.LazyWeights.network`, which loads it once per process."""
    import json

    from cloudfree.models._weights import card_paths, read_weights
    from cloudfree.pipeline.errors import WeightsError

    p = Path(path)
    if p.is_file() and sha256 is None:
        raise WeightsError(f"{model_name}: weights {p} have no model card {card_paths(p)[0].name} (with their sha256) "
                           "next to them; restore the card or retrain with `cloudfree train`")
    state, meta = read_weights(p, sha256, convention)
    if meta.get("cloudfree:model", model_name) != model_name:
        raise WeightsError(f"{model_name}: {p} holds weights of {meta.get('cloudfree:model')!r}")
    net = build(json.loads(meta.get("cloudfree:network", "{}")))
    net.load_state_dict(state)
    return net
