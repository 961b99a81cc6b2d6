"""Per-scene self-supervised learning of a base model's residual (no training set, no weights, no GPU).

A model such as ``temporal`` makes errors that are consistent across a scene (a phenology step between the
references and the target, a band whose local alignment is off, a reference that is systematically brighter). The
target's own clear pixels show those errors, if the base model is made to predict them blind. The procedure, per
tile at run time (:func:`learn_residual`):

1. **Pseudo-clouds.** Candidate masks are real cloud shapes: the target's own cloud mask and each reference's cloud
   mask, under the 8 rotations/flips of the square and cyclic shifts. A candidate keeps only pixels that are clear
   in the target (``cloud_prob <= clear_prob``, finite) and at least ``margin`` pixels away from the real cloud (so
   a pseudo-pixel never borders real cloud or its undetected fringe, and the base model's local alignment is not fed
   pixels next to the ones it is asked to predict). Up to ``masks`` candidates are chosen greedily, each adding the
   most uncovered pixels.
2. **Blind base predictions.** The base model runs once per pseudo-mask with the tile's mask extended by it
   (``cloud_prob`` 1 there). For a base that reads the target's radiance under the cloud (PhyVLM-CR inverts thin
   cloud), the pseudo-pixels are first given a cloud by the imaging model of PhyVLM-CR's eq. 1,
   ``I = J t + A (1 - t)``: ``J`` = the clear target, ``A`` = median of the brightest 5 % of the real thick cloud,
   ``t`` = the real cloud's transmission estimated by eq. 5 against the base prediction, moved with the mask
   (:func:`pseudo_cloud_radiance`).
3. **Residual learner.** Per pixel, features = the blind base prediction (every band), each reference aligned to
   the target (the scene alignment) minus that prediction where the reference is clear (0 elsewhere), each
   reference's clear flag, and ``log(1 + distance to the mask edge)``; the target = observed minus blind
   prediction, per band. ``learner``: ``"ridge"`` (standardised features, ``ridge_lambda``) or ``"lightgbm"``
   (per-band gradient-boosted trees, LightGBM, which the s2cloudless dependency already installs). At
   prediction, features are clipped to the range seen in training and residuals to the training residuals' 0.5-99.5
   percentiles, so nothing is extrapolated. **Offset-free** (``offset_free``, default on): the learner's target is the
   residual minus its per-band mean over the pseudo-pixels, so it learns where and how the base errs *within* the
   scene (spatial structure), never a scene-wide shift of the date (below, "Deviations").
4. **Shrinkage.** Held-out pseudo-pixels decide how much of the learned residual to keep: with three or more
   pseudo-masks, leave-one-mask-out; otherwise leave-one-block-out over 16 px blocks in 4 folds. Per band, the
   gain ``alpha = clip(<r_hat, r> / <r_hat, r_hat>, 0, 1)`` of the held-out prediction ``r_hat`` on the true
   residual ``r``, set to 0 when the held-out residual energy does not drop by at least ``min_gain`` (2 %). A
   scene where the pseudo-pixels disagree with the learner therefore gets the base model back.
5. **Application** under the real cloud (the tile's mask and its non-finite pixels where the base filled them):
   ``base + alpha * f(features)``. Clear target pixels are never touched. Fewer than ``min_train`` pseudo-pixels
   (a tile almost all cloud) -> the base output unchanged.

Measured (``cloudfree evaluate --models temporal,temporal-ssl --cases romania,slovakia,simulated``, mean
cloudy-pixel PSNR, temporal -> temporal-ssl; the rows themselves are in docs/evaluation.md and the note of issue 20):
romania-hidden 35.57 -> 37.14, romania-real 30.70 -> 30.70, simulated (seeds 1-9) 35.86 -> 36.44, simulated-tuning
35.58 -> 36.81, Slovakia 41.97 -> 39.35 (its "truth" is another acquisition than the cloudy date, and its one
reference is simulated from that truth: whatever the cloudy date's own clear pixels teach is, there, a difference
from the truth). What it is not: a learned network with pretrained weights; every parameter is fitted on the
tile at hand, so it works at any processing level and place, and it cannot learn what the tile's clear pixels do
not show (a cloud over a land-cover type absent from the clear part).

Deviations from issue 20 and why:

* **Offset-free residual** (the issue fits the whole observed-minus-base residual). On REAL cloudy dates (the
  romania-real cases, 38-92 % cloud) the pixels the SCL calls clear carry haze and thin cloud it missed: the
  pseudo-pixel residual has a positive mean in the visible bands on every such date (B02 +0.009 to +0.046, blue
  above red on most), while on the hidden clear dates it is within +-0.006 but for one. The cross-fitted shrinkage
  keeps that offset (held-out pseudo-pixels share the haze, so they agree), and the full residual copied the haze
  under the cloud: romania-real 30.70 -> 28.63 dB (2019-06-26: 38.34 -> 24.53). An output that carries the date's
  haze under the cloud is not cloud-free, so the scene-wide level stays the base's (whose alignment is fitted on
  the trusted, haze-free clear pixels only and bounded, models._align). Cost: the hidden dates where the offset was a
  real change of the date (2016-04-07, +11 dB with it, -0.3 dB without) keep only the spatial part: romania-hidden
  +1.57 dB instead of +2.76 dB over temporal. Chosen by a rule stated before the per-case numbers (note of issue 20,
  helper ssl2): of the candidates measured (offset-free; a scene haze gate, "pseudo-pixel mean B02 residual above
  models._align.HAZE_MARGIN and at least the B04 one", returning the base or the offset-free residual; learning on
  trusted-clear pixels only; weighting by their share; the alignment's bound on the correction), it is the only one
  that meets the issue's Done-when (beat temporal on romania-hidden, lose <= 0.5 dB on romania-real and simulated)
  with no threshold, and it still meets it with any one romania-real date left out. The haze gate scored higher on
  romania-hidden (38.33 dB, romania-real -0.15 dB) but lost 1.6 dB on romania-real with its threshold doubled
  (0.02): it rests on where one number (2019-06-26's B02 offset, +0.019) falls.
  ``offset_free: false`` gives the issue's procedure.
* **Learner**: LightGBM (gradient-boosted trees) is the default; ridge (``learner: ridge``) measured lower with the
  offset-free residual (romania-hidden 36.78, romania-real 30.36, simulated 35.97 dB), and so did a small per-pixel
  MLP (2 x 64, torch; measured outside the repository, note of issue 20, helper ssl2). HistGradientBoosting needs
  scikit-learn, which is not a dependency (LightGBM is the same histogram-boosting algorithm); a 3x3 CNN was not
  measured. The haze-gate numbers above also come from that note's harness (the same inputs as the evaluation).
* **Cost**: ``python -m cloudfree.pipeline.evaluation.bench_models`` times ``temporal-ssl`` and
  ``phyvlm-cr[ssl.learner=lightgbm]`` per 512x512 tile (``seconds``): tens of seconds on the shared 2-core CPU with
  LightGBM (one blind base run per pseudo-cloud, a cross-fitted fit per band), about 10x less with ridge.
* **Tiles**: each tile learns its own residual (the runner's 512 px tiles plus halo), so two adjacent tiles can
  differ slightly; the tile overlap (halo) and the remove stage's feathered blend smooth the boundary.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloudfree.models._align import apply_linear, reference_validity
from cloudfree.pipeline.contract import TileInputs

log = logging.getLogger(__name__)


class SelfSupervisedParams(BaseModel):
    """Parameters of :func:`learn_residual` (a model's ``ssl`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: residual learner: "lightgbm" (gradient-boosted trees per band, measured best) or "ridge" (linear, ~10x faster).
    learner: Literal["lightgbm", "ridge"] = "lightgbm"
    #: at most this many pseudo-cloud masks (one blind base run each).
    masks: int = Field(6, ge=1, le=16)
    #: pseudo-pixels keep this many pixels away from the real cloud.
    margin: int = Field(3, ge=0)
    #: a target pixel is clear enough to be a pseudo-pixel when its cloud probability is at most this.
    clear_prob: float = Field(0.1, ge=0, le=1)
    #: fewer pseudo-pixels than this and the base output is returned unchanged.
    min_train: int = Field(300, ge=10)
    #: the learner sees at most this many pseudo-pixels (a random subset).
    max_train: int = Field(20000, ge=100)
    #: a band keeps its learned residual only if it removes this share of the held-out residual energy.
    min_gain: float = Field(0.02, ge=0, lt=1)
    #: learn the residual minus its per-band mean over the pseudo-pixels (its spatial structure only, no scene-wide
    #: offset; module docstring, "offset-free"). False = the full residual, offset included.
    offset_free: bool = True
    ridge_lambda: float = Field(1e-3, gt=0)
    trees: int = Field(100, ge=1)
    leaves: int = Field(15, ge=2)
    learning_rate: float = Field(0.08, gt=0, le=1)
    seed: int = 0


# -- pseudo-clouds ---------------------------------------------------------------------------------------------------
def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4, axes=(-2, -1))
    return a[..., ::-1] if k >= 4 else a


def _fit_shape(a: np.ndarray, shape: tuple[int, int], fill: float | bool = False) -> np.ndarray:
    out = np.full(shape, fill, a.dtype)
    ny, nx = min(shape[0], a.shape[0]), min(shape[1], a.shape[1])
    out[:ny, :nx] = a[:ny, :nx]
    return out


@dataclasses.dataclass
class PseudoCloud:
    mask: np.ndarray  #: (y, x) bool, the pseudo-pixels
    source: int  #: -1 = the target's own mask, i = reference i's mask
    k: int  #: dihedral transform
    shift: tuple[int, int]  #: cyclic shift after the transform

    def move(self, field: np.ndarray, fill: float) -> np.ndarray:
        """``field`` (y, x) under the same transform and shift as the mask."""
        return np.roll(_fit_shape(_dihedral(field, self.k), self.mask.shape, fill), self.shift, axis=(0, 1))


def real_cloud(tile: TileInputs) -> np.ndarray:
    """The pixels a removal model restores: the cloud mask and non-finite target pixels."""
    return tile.cloud_mask | ~np.isfinite(tile.target).all(axis=0)


def pseudo_clouds(tile: TileInputs, p: SelfSupervisedParams) -> list[PseudoCloud]:
    """Real cloud shapes moved onto clear target pixels (step 1 of the module docstring)."""
    from scipy import ndimage

    rng = np.random.default_rng(p.seed)
    real = real_cloud(tile)
    shape = real.shape
    avail = ~ndimage.binary_dilation(real, iterations=p.margin) if p.margin > 0 and real.any() else ~real
    avail &= np.nan_to_num(np.asarray(tile.cloud_prob, np.float32), nan=1.0) <= p.clear_prob
    min_px = max(16, p.min_train // (2 * p.masks))
    cands: list[PseudoCloud] = []
    sources = [(-1, tile.cloud_mask)] + list(enumerate(tile.reference_masks))
    for si, src in sources:
        if src.mean() < 0.01:
            continue
        for k in range(8):
            moved = _fit_shape(_dihedral(src, k), shape)
            shifts = [] if (si == -1 and k == 0) else [(0, 0)]
            shifts += [tuple(int(v) for v in rng.integers(0, shape)) for _ in range(2)]
            for sh in shifts:
                m = np.roll(moved, sh, axis=(0, 1)) & avail
                if m.sum() >= min_px:
                    cands.append(PseudoCloud(m, si, k, sh))
    chosen: list[PseudoCloud] = []
    covered = np.zeros(shape, bool)
    while cands and len(chosen) < p.masks:
        gains = [int((c.mask & ~covered).sum()) for c in cands]
        i = int(np.argmax(gains))
        if gains[i] < min_px:
            break
        c = cands.pop(i)
        chosen.append(c)
        covered |= c.mask
    return chosen


def pseudo_cloud_radiance(tile: TileInputs, base: np.ndarray, pc: PseudoCloud) -> tuple[np.ndarray, np.ndarray]:
    """The target with a cloud synthesised on ``pc.mask`` by eq. 1 of PhyVLM-CR, and its cloud probability.

    ``A`` = per-band median of the brightest 5 % (mean of the first three bands) of the real cloud with
    ``cloud_prob >= 0.5``; ``t`` on the real cloud = eq. 5 with the base prediction as clear estimate, clipped to
    [0, 1], moved with the mask when the pseudo-cloud is the target's own mask (else the median ``t`` of the real
    cloud everywhere)."""
    real = real_cloud(tile) & np.isfinite(tile.target).all(axis=0) & np.isfinite(base).all(axis=0)
    prob = np.nan_to_num(np.asarray(tile.cloud_prob, np.float32), nan=1.0)
    thick = real & (prob >= 0.5)
    target = tile.target.copy()
    if thick.sum() < 20:
        return target, np.where(pc.mask, 1.0, tile.cloud_prob).astype(np.float32)
    if tile.context.get("A") is not None and len(tile.context["A"]) == target.shape[0]:
        a = np.asarray(tile.context["A"], np.float32)[:, None, None]  # the base's own scene A (PhyVLM-CR)
    else:
        v = tile.target[: min(3, tile.target.shape[0])].mean(axis=0)
        top = thick & (v >= np.percentile(v[thick], 95))
        a = np.median(tile.target[:, top], axis=1).astype(np.float32)[:, None, None]
    di, dj = tile.target - a, base - a
    t = np.clip((di * dj).sum(0) / np.maximum((dj * dj).sum(0), 1e-6), 0.0, 1.0)
    t = np.where(real, t, 1.0).astype(np.float32)
    if pc.source == -1:
        t_new = pc.move(t, 1.0)
        p_new = pc.move(prob, 0.0)
    else:
        t_new = np.full(t.shape, float(np.median(t[real])), np.float32)
        p_new = np.ones(t.shape, np.float32)
    m = pc.mask
    target[:, m] = (tile.target[:, m] * t_new[m] + a[:, :, 0] * (1 - t_new[m]))
    return target, np.where(m, np.maximum(p_new, 0.5), tile.cloud_prob).astype(np.float32)


# -- features and learners -------------------------------------------------------------------------------------------
def features(tile: TileInputs, base: np.ndarray, mask: np.ndarray, alignment) -> np.ndarray:
    """``(feature, y, x)``: base prediction, per reference (aligned reference - base where clear, clear flag),
    ``log1p`` distance to the edge of ``mask``."""
    from scipy import ndimage

    ok = reference_validity(tile)
    feats = [np.nan_to_num(base)]
    for i in range(tile.references.shape[0]):
        ref = tile.references[i]
        if alignment is not None and i < len(alignment):
            ref = apply_linear(ref, np.asarray(alignment[i][0]), np.asarray(alignment[i][1]))
        feats.append(np.where(ok[i][None], np.nan_to_num(ref - base), 0.0))
        feats.append(ok[i][None].astype(np.float32))
    feats.append(np.log1p(ndimage.distance_transform_edt(mask))[None])
    return np.concatenate(feats).astype(np.float32)


class _Ridge:
    def __init__(self, lam: float) -> None:
        self.lam = lam

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_Ridge":
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = np.hstack([(x - self.mu) / self.sd, np.ones((len(x), 1))]).astype(np.float64)
        reg = self.lam * len(z) * np.eye(z.shape[1])
        reg[-1, -1] = 0.0
        self.w = np.linalg.solve(z.T @ z + reg, z.T @ y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.hstack([(x - self.mu) / self.sd, np.ones((len(x), 1))]) @ self.w


class _Boosted:
    def __init__(self, p: SelfSupervisedParams) -> None:
        self.cfg = {"objective": "l2", "num_leaves": p.leaves, "learning_rate": p.learning_rate,
                    "min_data_in_leaf": 40, "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8,
                    "num_threads": 1, "verbose": -1, "seed": p.seed}
        self.trees = p.trees

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_Boosted":
        import lightgbm as lgb

        self.models = [lgb.train(self.cfg, lgb.Dataset(x, np.ascontiguousarray(y[:, b])), self.trees)
                       for b in range(y.shape[1])]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.stack([m.predict(x) for m in self.models], axis=1)


class _Clipped:
    """A fitted learner that clips features to the training range and residuals to their 0.5-99.5 percentiles."""

    def __init__(self, learner: Any, x: np.ndarray, y: np.ndarray) -> None:
        self.learner = learner.fit(x, y)
        self.lo, self.hi = x.min(0), x.max(0)
        self.rlo, self.rhi = np.percentile(y, 0.5, axis=0), np.percentile(y, 99.5, axis=0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.clip(self.learner.predict(np.clip(x, self.lo, self.hi)), self.rlo, self.rhi)


def _make(p: SelfSupervisedParams):
    return _Ridge(p.ridge_lambda) if p.learner == "ridge" else _Boosted(p)


# -- the procedure ---------------------------------------------------------------------------------------------------
def learn_residual(
    tile: TileInputs,
    base: np.ndarray,
    predict: Callable[[TileInputs], np.ndarray],
    p: SelfSupervisedParams,
    *,
    synthesise: bool = False,
    alignment=None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``base`` (the base model's output on ``tile``) corrected under the real cloud by a residual learned on the
    tile's own clear pixels (module docstring). ``predict`` runs the base model on a tile and returns its
    reflectance; ``synthesise``: give the pseudo-pixels a cloud (bases that read the target under the cloud).
    Returns the corrected reflectance and a summary (pseudo-masks, training pixels, per-band ``alpha``)."""
    real = real_cloud(tile)
    info: dict[str, Any] = {"masks": 0, "train_pixels": 0, "alpha": None}
    todo = real & np.isfinite(base).all(axis=0)
    if not todo.any():
        return base, info
    pcs = pseudo_clouds(tile, p)
    info["masks"] = len(pcs)
    if not pcs:
        return base, info
    ny, nx = real.shape
    block = 16
    yy, xx = np.mgrid[:ny, :nx]
    rng = np.random.default_rng(p.seed)
    blocks = rng.integers(0, 4, (ny // block + 1, nx // block + 1))[yy // block, xx // block]
    xs, ys, groups, bgroups = [], [], [], []
    for g, pc in enumerate(pcs):
        if synthesise:
            target, prob = pseudo_cloud_radiance(tile, base, pc)
        else:
            target, prob = tile.target, np.where(pc.mask, 1.0, tile.cloud_prob).astype(np.float32)
        blind_tile = dataclasses.replace(tile, target=target, cloud_prob=prob, cloud_mask=tile.cloud_mask | pc.mask)
        blind = predict(blind_tile)
        sel = pc.mask & np.isfinite(blind).all(axis=0)
        feats = features(tile, blind, blind_tile.cloud_mask, alignment)
        xs.append(feats[:, sel].T)
        ys.append((tile.target[:, sel] - blind[:, sel]).T)
        groups.append(np.full(int(sel.sum()), g))
        bgroups.append(blocks[sel])
    x, y, grp, bgrp = (np.concatenate(a) for a in (xs, ys, groups, bgroups))
    if len(x) > p.max_train:
        keep = np.sort(rng.choice(len(x), p.max_train, replace=False))
        x, y, grp, bgrp = x[keep], y[keep], grp[keep], bgrp[keep]
    info["train_pixels"] = int(len(x))
    info["residual_rms"] = [round(float(v), 4) for v in np.sqrt((y * y).mean(0))] if len(y) else None
    info["residual_mean"] = [round(float(v), 4) for v in y.mean(0)] if len(y) else None
    if len(x) < p.min_train:
        return base, info
    if p.offset_free:  # the scene-wide offset (haze on a real cloudy date, module docstring) is not learned
        y = y - y.mean(0)
    folds = grp if len(pcs) >= 3 else bgrp
    held = np.zeros_like(y)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        if tr.sum() >= p.min_train // 2 and te.any():
            held[te] = _Clipped(_make(p), x[tr], y[tr]).predict(x[te])
    alpha = np.clip((held * y).sum(0) / ((held * held).sum(0) + 1e-12), 0.0, 1.0)
    gain = 1.0 - ((y - alpha * held) ** 2).sum(0) / ((y * y).sum(0) + 1e-12)
    alpha = np.where(gain >= p.min_gain, alpha, 0.0)
    info["alpha"] = [round(float(a), 3) for a in alpha]
    info["heldout_gain"] = [round(float(g), 3) for g in gain]
    if not alpha.any():
        return base, info
    fitted = _Clipped(_make(p), x, y)
    feats = features(tile, base, real, alignment)
    out = base.copy()
    out[:, todo] += (alpha[:, None] * fitted.predict(feats[:, todo].T).T).astype(np.float32)
    return out, info


def predict_with_ssl(model: Any, tile: TileInputs, *, synthesise: bool = False):
    """``model.predict(tile)`` with its ``params.ssl`` residual learning on top (``model.params.ssl`` set): the base
    is the same model with ``ssl`` off; the reflectance under the real cloud is corrected by
    :func:`learn_residual`, confidence and provenance stay the base's (the correction is a per-pixel radiometric
    refinement of the same estimate, as the base's own local alignment is)."""
    from cloudfree.pipeline.contract import TileResult

    plain = type(model)(model.params.model_copy(update={"ssl": None}))
    res = plain.predict(tile)
    out, info = learn_residual(tile, res.reflectance, lambda t: plain.predict(t).reflectance, model.params.ssl,
                               synthesise=synthesise, alignment=tile.context.get("alignment"))
    log.debug("%s: self-supervised residual on %s: %s", model.name, tile.target_id, info)
    return TileResult(out, res.confidence, res.source, res.diagnostics).validate(tile, model.name)
