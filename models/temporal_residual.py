"""``temporal-residual`` network (EXPERIMENTAL, not registered, no shipped weights): a full-resolution residual on
top of ``temporal``.

Measured on the shared 2-core CPU (25 distinct clear 100x100 training images x 28 real donors), romania-hidden
cloudy PSNR against its base ``temporal`` on the same 16 cases: ``make train-temporal-residual`` (150 samples, 68
steps of batch 8 in 152 s) 34.24 vs 35.47; ``train(n_samples=300, steps=2000, seconds=400)`` (691 steps in 400 s)
35.20 vs 35.47 (7 of 16 better). Under-trained and BELOW its base, so it is neither
registered nor shipped; the numbers are the script's own output, not a claim of this docstring's code.

Inputs per pixel: the base prediction (``temporal``), each aligned reference minus the base with its mask and its
date offset, and the target's cloud mask. A per-pixel temporal attention (query from the base, keys/values from each
reference, masked references excluded) pools the references; UnCRtainTS-like MBConv blocks (1x1 expand, depthwise
3x3, 1x1 project, residual) follow, with no downsampling on the main path. The last 1x1 convolution is
zero-initialised, so an untrained network returns its base exactly; the residual is applied under the cloud only.
Training: :func:`cloudfree.pipeline.training.temporal_residual.train` (``python -m
cloudfree.pipeline.training.temporal_residual``; training imports models, never the reverse) on Romania (clear date x real donor x
flip/rotation) samples from :class:`cloudfree.pipeline.training.datasets.StacPairs` (evaluation dates held out).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BANDS = ("B02", "B03", "B04", "B08", "B8A", "B11")


def build_net(c: int = len(BANDS), dim: int = 24, blocks: int = 2):
    import torch
    from torch import nn

    class MBConv(nn.Module):
        def __init__(self, d: int, expand: int = 2) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(d, d * expand, 1), nn.GELU(),
                                      nn.Conv2d(d * expand, d * expand, 3, padding=1, groups=d * expand), nn.GELU(),
                                      nn.Conv2d(d * expand, d, 1))

        def forward(self, x):
            return x + self.body(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Conv2d(c, dim, 1)
            self.kv = nn.Conv2d(c + 2, 2 * dim, 1)  # ref - base, mask, dt
            self.stem = nn.Conv2d(c + dim + 1, dim, 3, padding=1)
            self.blocks = nn.Sequential(*[MBConv(dim) for _ in range(blocks)])
            self.head = nn.Conv2d(dim, c, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, base, refs, ref_masks, ref_dt, cloud):
            b, t, ch, h, w = refs.shape
            diff = (refs - base[:, None]) * (1 - ref_masks[:, :, None])
            dt = (ref_dt / 100.0)[:, :, None, None, None].expand(b, t, 1, h, w)
            kv = self.kv(torch.cat([diff, ref_masks[:, :, None], dt], 2).reshape(b * t, ch + 2, h, w))
            k, v = kv.reshape(b, t, 2, dim, h, w).unbind(2)
            q = self.q(base)[:, None]
            logit = (q * k).sum(2) / dim ** 0.5 - 1e4 * ref_masks  # (b, t, h, w)
            a = torch.softmax(logit, 1)
            pooled = (a[:, :, None] * v).sum(1)
            x = self.stem(torch.cat([base, pooled, cloud[:, None]], 1))
            return base + self.head(self.blocks(x)) * cloud[:, None]

    return Net()
