"""Mosaic stage: blend per-tile model outputs over their halo overlap into one seamless scene.

Each tile is predicted on its halo-padded *read* window (one dask task per tile). Every output block (a tile's
*core*) is then assembled by one more task from the (up to 9) neighbouring tile predictions that overlap it,
weighted by a separable partition-of-unity window:

* ``feather``: a linear ramp across each interior tile border, ``2 r`` pixels wide (``r = min(halo, half of each
  neighbouring core)``);
* ``hann``: the same ramp shaped as ``sin^2`` (a Hann taper); ``sin^2 + cos^2 = 1``, so it also sums to one;
* ``none``: the halo is discarded, each pixel comes from the tile whose core holds it (the old behaviour).

Ramps exist only at *interior* borders, so at the grid edges a single tile has weight 1: the weights of all tiles
sum to exactly 1 at every pixel (:func:`axis_weights` is tested for that). Reflectance and confidence are blended
(NaN contributions are dropped and the remaining weights renormalised); the categorical ``source`` band is taken
from the core owner.

:func:`seam_ratio` measures seams: the median absolute gradient across tile borders divided by the same in the
interior (1 = no seam). Pure numpy, no I/O.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import numpy as np

from cloudfree.pipeline.contract import TileWindow
from cloudfree.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

BlendKind = Literal["feather", "hann", "none"]


def _ramp(u: np.ndarray, kind: BlendKind) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return np.sin(0.5 * np.pi * u) ** 2 if kind == "hann" else u


def axis_weights(cores: Sequence[tuple[int, int]], reads: Sequence[tuple[int, int]], halo: int,
                 kind: BlendKind) -> list[np.ndarray]:
    """1-D weights of each tile along one axis, over its read window; they sum to 1 at every grid position.

    ``cores`` and ``reads`` are ``(start, stop)`` pairs of consecutive tiles along the axis.
    """
    if kind not in ("feather", "hann", "none"):
        raise ConfigError(f"tile.blend {kind!r} is unknown; use feather, hann or none")
    n = len(cores)
    # half-width of the transition at the border between tile k-1 and k
    radius = [0] * (n + 1)
    if kind != "none":
        for k in range(1, n):
            radius[k] = int(min(halo, (cores[k - 1][1] - cores[k - 1][0]) // 2, (cores[k][1] - cores[k][0]) // 2))
    out = []
    for k, ((c0, c1), (r0, r1)) in enumerate(zip(cores, reads)):
        p = np.arange(r0, r1, dtype=np.float64) + 0.5  # pixel centres
        w = np.ones(r1 - r0)
        if radius[k]:
            w *= _ramp((p - (c0 - radius[k])) / (2 * radius[k]), kind)
        else:
            w *= p >= c0
        if radius[k + 1]:
            w *= 1.0 - _ramp((p - (c1 - radius[k + 1])) / (2 * radius[k + 1]), kind)
        else:
            w *= p < c1
        out.append(w.astype(np.float32))
    return out


def grid_axis_weights(tiles: Sequence[TileWindow], halo: int,
                      kind: BlendKind) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """1-D weights per tile row (over its read rows) and per tile column (over its read columns)."""
    rows = sorted({t.index[0]: (t.core[0], t.read[0]) for t in tiles}.items())
    cols = sorted({t.index[1]: (t.core[1], t.read[1]) for t in tiles}.items())
    wy = axis_weights([(c.start, c.stop) for _, (c, _) in rows], [(r.start, r.stop) for _, (_, r) in rows], halo, kind)
    wx = axis_weights([(c.start, c.stop) for _, (c, _) in cols], [(r.start, r.stop) for _, (_, r) in cols], halo, kind)
    return {i: w for (i, _), w in zip(rows, wy)}, {j: w for (j, _), w in zip(cols, wx)}


def tile_weights(tiles: Sequence[TileWindow], halo: int, kind: BlendKind) -> dict[tuple[int, int], np.ndarray]:
    """2-D weights ``(y, x)`` over each tile's read window (outer product of the two axes' weights)."""
    wy, wx = grid_axis_weights(tiles, halo, kind)
    return {t.index: np.outer(wy[t.index[0]], wx[t.index[1]]) for t in tiles}


def neighbours(tile: TileWindow, tiles: Sequence[TileWindow]) -> list[TileWindow]:
    """Tiles whose read window overlaps ``tile``'s core (itself included; at most 9 when halo <= tile size)."""
    (cy, cx) = tile.core
    return [t for t in tiles
            if t.read[0].start < cy.stop and t.read[0].stop > cy.start
            and t.read[1].start < cx.stop and t.read[1].stop > cx.start]


def piece_of(tile: TileWindow, core: TileWindow) -> tuple[slice, slice]:
    """Where ``core``'s block lies in ``tile``'s read window (what :func:`blend_block` takes of its prediction)."""
    (cy, cx), (ry, rx) = core.core, tile.read
    ys = slice(max(cy.start, ry.start), min(cy.stop, ry.stop))
    xs = slice(max(cx.start, rx.start), min(cx.stop, rx.stop))
    return slice(ys.start - ry.start, ys.stop - ry.start), slice(xs.start - rx.start, xs.stop - rx.start)


def blend_block(core: TileWindow, parts: Sequence[tuple[TileWindow, np.ndarray, np.ndarray]], n_bands: int,
                kind: BlendKind, cropped: bool = False) -> np.ndarray:
    """One output block ``(n_bands + 2, y, x)`` from overlapping tile predictions.

    ``parts``: ``(tile, prediction (n_bands + 2, ry, rx) over tile.read, weights (ry, rx))``. Layers
    ``[:n_bands]`` are reflectance, ``n_bands`` confidence, ``n_bands + 1`` source (not blended). ``cropped``:
    each prediction is already its :func:`piece_of` for ``core`` (the same pixels, so the same values).
    """
    (cy, cx) = core.core
    shape = (cy.stop - cy.start, cx.stop - cx.start)
    acc = np.zeros((n_bands + 1,) + shape, np.float64)
    wsum = np.zeros((n_bands + 1,) + shape, np.float64)
    source = None
    for tile, pred, w in parts:
        ry, rx = tile.read
        ys = slice(max(cy.start, ry.start), min(cy.stop, ry.stop))
        xs = slice(max(cx.start, rx.start), min(cx.stop, rx.stop))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        src_sl = piece_of(tile, core)
        dst_sl = (slice(ys.start - cy.start, ys.stop - cy.start), slice(xs.start - cx.start, xs.stop - cx.start))
        if cropped:
            if pred.shape[1:] != (ys.stop - ys.start, xs.stop - xs.start):  # pragma: no cover - graph bug guard
                raise ConfigError(f"tile {tile.index}: its piece for block {core.index} has shape {pred.shape}")
            psl = (slice(None), slice(None))
        else:
            psl = src_sl
        if tile.index == core.index:
            source = pred[n_bands + 1][psl]
        if kind == "none" and tile.index != core.index:
            continue
        vals = pred[: n_bands + 1][(slice(None),) + psl].astype(np.float64)
        ww = np.broadcast_to(w[src_sl], vals.shape) if kind != "none" else np.ones(vals.shape)
        ok = np.isfinite(vals) & (ww > 0)
        acc[(slice(None),) + dst_sl] += np.where(ok, vals * ww, 0.0)
        wsum[(slice(None),) + dst_sl] += np.where(ok, ww, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        blended = np.where(wsum > 0, acc / np.where(wsum > 0, wsum, 1.0), np.nan)
    if source is None:  # pragma: no cover - the core owner is always among its own neighbours
        raise ConfigError(f"tile {core.index}: its own prediction is missing from the blend")
    return np.concatenate([blended.astype(np.float32), source[None].astype(np.float32)])


def seam_ratio(image: np.ndarray, tile_size: int, offset: tuple[int, int] = (0, 0)) -> float:
    """Gradient energy across tile borders over gradient energy in the interior (1 = no seam).

    ``image`` is ``(y, x)`` or ``(band, y, x)``; borders lie at multiples of ``tile_size`` (plus ``offset``).
    The absolute first difference between the two pixels straddling a border is compared with the absolute first
    differences of all other adjacent pixel pairs along the same axis, per band, by their *medians* (gradients of
    real scenes are heavy-tailed: a mean would be ruled by a few cloud edges); the band ratios are averaged. NaN
    pairs are ignored. Raises :class:`ConfigError` when the image holds no border.
    """
    a = np.asarray(image, np.float64)
    a = a[None] if a.ndim == 2 else a
    ratios = []
    for band in a:
        border, inner = [], []
        for axis, off in ((0, offset[0]), (1, offset[1])):
            d = np.abs(np.diff(band, axis=axis))
            n = band.shape[axis]
            is_border = np.zeros(n - 1, bool)
            idx = np.arange(off + tile_size - 1, n - 1, tile_size)
            is_border[idx[idx >= 0]] = True
            d = np.moveaxis(d, axis, 0)
            border.append(d[is_border].ravel())
            inner.append(d[~is_border].ravel())
        b, i = np.concatenate(border), np.concatenate(inner)
        b, i = b[np.isfinite(b)], i[np.isfinite(i)]
        if b.size == 0 or i.size == 0:
            continue
        ratios.append(np.median(b) / max(float(np.median(i)), 1e-12))
    if not ratios:
        raise ConfigError(f"image of shape {a.shape[1:]} holds no tile border for tile size {tile_size}")
    return float(np.mean(ratios))


def confidence_fallback(ds, inputs, floor: float, mode: str):
    """Where ``confidence < floor``: ``best-available`` writes the first clear reference pixel (best ranked
    first; the model's value stays where no reference is clear), ``nodata`` writes NaN (source ``nodata``),
    ``keep`` changes nothing. Lazy; confidence itself is left as the model reported it.
    """
    import dask.array as dsa

    from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_REFERENCE_BASE

    if mode not in ("best-available", "nodata", "keep"):
        raise ConfigError(f"output.low_confidence {mode!r} is unknown; use best-available, nodata or keep")
    if mode == "keep" or floor <= 0:
        return ds
    refl, conf, src = ds.reflectance.data, ds.confidence.data, ds.source.data
    # in-memory inputs (a small target, stages.remove.in_memory): the same element-wise steps in numpy, eagerly
    xp = np if all(isinstance(a, np.ndarray) for a in (refl, conf, src)) and (
        inputs.references is None or all(isinstance(a.data, np.ndarray)
                                         for a in (inputs.references, inputs.reference_masks))) else dsa
    low = conf < floor
    if mode == "nodata":
        refl = xp.where(low[None], np.float32(np.nan), refl)
        src = xp.where(low, np.float32(SOURCE_NODATA), src)
    elif inputs.references is not None:
        refs, rmask = inputs.references.data, inputs.reference_masks.data
        for i in reversed(range(refs.shape[0])):  # reversed: the best-ranked reference is applied last, wins
            ok = low & ~rmask[i] & xp.isfinite(refs[i]).all(axis=0)
            refl = xp.where(ok[None], refs[i].astype(np.float32), refl)
            src = xp.where(ok, np.float32(SOURCE_REFERENCE_BASE + i), src)
    out = ds.copy()
    out["reflectance"] = (ds.reflectance.dims, refl)
    out["source"] = (ds.source.dims, src)
    log.info("low-confidence fallback: confidence < %.2f -> %s", floor, mode)
    return out
