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
   ``base + alpha * f(features)``; with ``center_applied`` (``temporal-ssl``'s default) minus the per-band mean of
   ``alpha * f`` over those pixels ("Centred application" below). Clear target pixels are never touched. Fewer than
   ``min_train`` pseudo-pixels (a tile almost all cloud) -> the base output unchanged.
6. **Base selection** (option ``bases``, off by default: it did not pass its rule, below). Other registered models
   (e.g. ``median-composite``) run blind on the same pseudo-clouds; per band, their errors on the pseudo-pixels
   (offset-free by default, ``select_offset_free``: each candidate's mean error removed, so the haze of a real
   cloudy date's SCL-clear pixels does not decide) give convex weights (``select: blend``, least squares on the
   simplex) or a pick (``select: pick``); the residual is then learned on top of that blend and the blend replaces
   the base under the real cloud (:func:`base_weights`).

Measured (``cloudfree evaluate --models temporal,temporal-ssl,median-composite --cases romania,slovakia,simulated
--no-mask-loss``, mean cloudy-pixel PSNR, temporal -> temporal-ssl; the rows themselves are in docs/evaluation.md
and the note of issue 20, helper sslreal): romania-hidden 35.57 -> 37.30, romania-real 30.70 -> 30.77, simulated
(seeds 1-9) 35.86 -> 36.74, simulated-tuning 35.58 -> 36.93, Slovakia 41.97 -> 39.44 (a property of that case, not
a fault: "Slovakia" below). Against ``median-composite`` (the default-model rule's floor) it is more than 1 dB
below on 2 real cases (romania-real 2018-08-30 -3.3 dB, 2019-06-26 -1.9 dB; temporal: 2018-07-06 -1.0,
2018-08-30 -3.2). What it is not: a learned network with pretrained weights; every parameter is fitted on the
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
* **Centred application** (``center_applied``, on in ``temporal-ssl``; the ``ssl`` option of other models keeps it
  off, unmeasured there). The residual is learned offset-free on the pseudo-pixels, but the learned function,
  applied under the real cloud (deeper inside the mask, other land cover), still moved the filled region's mean:
  on romania-real 2018-08-20 B08 bias +0.012 -> -0.015, 2019-06-26 +0.010 -> +0.015 (vs the proxy truth). A shift
  of the whole filled region is the scene-wide offset the offset-free learner is meant not to make, so its
  per-band mean over the corrected pixels is removed (per tile). Rule written before its per-case numbers (note of
  issue 20, helper sslreal): adopt a variant only if it is more than 1 dB below median-composite on fewer real
  cases than the previous temporal-ssl (3: romania-real 2018-08-20 -1.22, 2018-08-30 -2.89, 2019-06-26 -2.52)
  and its romania-hidden, romania-real, simulated and Slovakia means each drop by at most 0.3 dB. Centred: 2 such
  cases; means 37.14 -> 37.30, 30.70 -> 30.77, 36.44 -> 36.74, 39.35 -> 39.44: adopted. It was designed after a
  look at four romania-real outputs of the evaluation (the biases quoted above); it has no parameter.
* **Base selection** (step 6; the issue's brief for this helper: score ``temporal`` and ``median-composite`` blind on
  the pseudo-clouds, per band). Same rule, before the numbers; measured (hidden / real / simulated / Slovakia;
  cases > 1 dB below median-composite), without centring: offset-free blend 36.83 / 30.86 / 36.11 / 39.14, 2
  cases; blend on full (haze-sensitive) errors 37.17 / 30.36 / 36.49 / 39.35, 3 cases (2019-06-26 -4.0 dB: the
  hazy target's level decides); offset-free pick 36.92 / 30.52 / 35.97 / 39.14, 3 cases; centred + offset-free
  blend 36.79 / 30.86 / 36.33 / 39.12, 2 cases (2018-08-30 and 2019-06-26, -1.05 dB each). None passes (the blends
  lose 0.3-0.35 dB on romania-hidden: the offset-free errors of ``median-composite`` on the pseudo-pixels are
  within a few % of ``temporal``'s, so weights fall on it on hidden dates where it is worse under the real
  cloud, e.g. 2017-06-21 33.70 -> 32.13), so it is an option, off by default. The haze-blind comparison matters:
  with full errors the selection follows the haze (romania-real 30.86 -> 30.36). Cost: one extra (cheap) run of
  each candidate per pseudo-cloud and on the tile.
* **Slovakia** (-2.5 dB against temporal) is a property of the case, not a fault. Its truth is another
  acquisition: on the target's clear pixels PSNR(target, truth) = 35.5 dB (visible bands +0.01 brighter), while
  its one reference is simulated from the truth (PSNR to the truth 41.9 dB, to the cloudy date 34.5 dB), so a base
  that copies the reference scores high and anything learned from the cloudy date's own clear pixels moves away
  from the truth. Measured by hiding 14,903 clear pixels (the cloud mask flipped, 5 px from the real cloud): the
  correction correlates 0.78-0.85 with (cloudy date - temporal) in B05-B8A/B11/B12 and -0.24..0.24 with (truth -
  temporal); against the truth those pixels go 42.08 -> 38.51 dB. Not all of it is the case: against the cloudy
  date itself temporal-ssl does not gain there either (34.05 -> 33.94 dB), while the cross-fitted shrinkage kept
  alpha 0.9-1.0, so its held-out estimate is optimistic on this scene (why is not established; a guess is the
  spatial correlation between held-out and training pseudo-masks; not fixed here). These hidden-pixel numbers
  are from before the centring.
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
from typing import Any, Callable, Literal, Sequence

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
    #: other registered models (default parameters, the tile's scene context) scored as candidate bases on the
    #: held-out pseudo-pixels next to the model's own base (module docstring, "base selection"); () = the base only.
    bases: tuple[str, ...] = ()
    #: how the candidates make the base: "blend" (per-band convex weights minimising the pseudo-pixel error) or
    #: "pick" (per band, the candidate with the smallest pseudo-pixel error).
    select: Literal["blend", "pick"] = "blend"
    #: compare candidates on offset-free errors (each candidate's per-band mean pseudo-pixel residual removed), so
    #: that the haze SCL-clear pixels carry on a real cloudy date does not decide (module docstring).
    select_offset_free: bool = True
    #: remove the applied correction's per-band mean over the pixels it corrects (the real cloud), so that the
    #: offset-free residual cannot become a shift of the whole filled region there (module docstring).
    center_applied: bool = False
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


# -- base selection --------------------------------------------------------------------------------------------------
def base_weights(errors: np.ndarray, select: str = "blend", offset_free: bool = True) -> np.ndarray:
    """Per-band weights ``(candidate, band)`` (each band's column sums to 1, all >= 0) of the candidate bases from
    their pseudo-pixel errors ``errors`` ``(candidate, pixel, band)`` (observed minus candidate). ``offset_free``:
    each candidate's per-band mean error is removed first. ``"pick"``: weight 1 on the smallest mean squared error
    (ties to the first, the model's own base); ``"blend"``: the convex combination with the smallest mean squared
    error (a least-squares fit on the simplex)."""
    from scipy.optimize import nnls

    e = np.asarray(errors, np.float64)
    if offset_free:
        e = e - e.mean(axis=1, keepdims=True)
    k, _, nb = e.shape
    w = np.zeros((k, nb))
    for b in range(nb):
        mse = (e[:, :, b] ** 2).mean(axis=1)
        if select == "pick" or k == 1:
            w[int(np.argmin(mse)), b] = 1.0
            continue
        # min_w ||sum_c w_c e_c||^2 with sum w = 1, w >= 0: the sum-to-one row weighted heavily (nnls)
        a = e[:, :, b].T / np.sqrt(e.shape[1])
        big = 1e3 * max(float(np.sqrt(mse.max())), 1e-9)
        sol, _ = nnls(np.vstack([a, np.full((1, k), big)]), np.concatenate([np.zeros(a.shape[0]), [big]]))
        if sol.sum() <= 0:
            sol = np.eye(k)[int(np.argmin(mse))]
        w[:, b] = sol / sol.sum()
    return w.astype(np.float32)


def _blend(preds: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``sum_c w[c, b] preds[c][b]``; where a candidate is not finite the first (the model's own base) stands in."""
    first = preds[0]
    out = np.zeros_like(first)
    for c, pr in enumerate(preds):
        pr = np.where(np.isfinite(pr), pr, first) if c else pr
        out += w[c][:, None, None] * pr
    return out.astype(np.float32)


# -- the procedure ---------------------------------------------------------------------------------------------------
def learn_residual(
    tile: TileInputs,
    base: np.ndarray,
    predict: Callable[[TileInputs], np.ndarray],
    p: SelfSupervisedParams,
    *,
    synthesise: bool = False,
    alignment=None,
    candidates: Sequence[Callable[[TileInputs], np.ndarray]] = (),
) -> tuple[np.ndarray, dict[str, Any]]:
    """``base`` (the base model's output on ``tile``) corrected under the real cloud by a residual learned on the
    tile's own clear pixels (module docstring). ``predict`` runs the base model on a tile and returns its
    reflectance; ``synthesise``: give the pseudo-pixels a cloud (bases that read the target under the cloud).
    ``candidates``: other bases (tile -> reflectance), scored with the model's own on the pseudo-pixels; the base
    becomes their per-band blend (or pick, ``p.select``) by :func:`base_weights` before the residual is learned.
    Returns the corrected reflectance and a summary (pseudo-masks, training pixels, per-band ``alpha``, the
    candidates' ``base_weights``)."""
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
    cand_vals: list[list[np.ndarray]] = []  # per pseudo-mask, (candidate, band, pixel) at its pseudo-pixels
    sels: list[tuple[np.ndarray, np.ndarray]] = []
    for g, pc in enumerate(pcs):
        if synthesise:
            target, prob = pseudo_cloud_radiance(tile, base, pc)
        else:
            target, prob = tile.target, np.where(pc.mask, 1.0, tile.cloud_prob).astype(np.float32)
        blind_tile = dataclasses.replace(tile, target=target, cloud_prob=prob, cloud_mask=tile.cloud_mask | pc.mask)
        blind = predict(blind_tile)
        sel = pc.mask & np.isfinite(blind).all(axis=0)
        if candidates:
            vals = [blind[:, sel]]
            for cand in candidates:
                cv = cand(blind_tile)[:, sel]
                vals.append(np.where(np.isfinite(cv), cv, blind[:, sel]))
            cand_vals.append(vals)
            sels.append((sel, blind_tile.cloud_mask))
        feats = features(tile, blind, blind_tile.cloud_mask, alignment)
        xs.append(feats[:, sel].T)
        ys.append((tile.target[:, sel] - blind[:, sel]).T)
        groups.append(np.full(int(sel.sum()), g))
        bgroups.append(blocks[sel])
    x, y, grp, bgrp = (np.concatenate(a) for a in (xs, ys, groups, bgroups))
    if candidates and len(x) >= p.min_train:
        # base selection (module docstring): score the candidates on every pseudo-pixel, then learn the residual of
        # their blend; the features of the blend are recomputed at the pseudo-pixels (they are per pixel there)
        obs = np.concatenate([tile.target[:, s_] for s_, _ in sels], axis=1)
        errs = np.stack([(obs - np.concatenate([v[c] for v in cand_vals], axis=1)).T
                         for c in range(len(candidates) + 1)])
        w = base_weights(errs, p.select, p.select_offset_free)
        info["base_weights"] = [[round(float(v), 3) for v in row] for row in w]
        info["base_rmse"] = [[round(float(v), 4) for v in
                              np.sqrt(((e - (e.mean(0) if p.select_offset_free else 0)) ** 2).mean(0))] for e in errs]
        if not np.all(w[0] == 1.0):
            xs, ys = [], []
            for vals, (sel, mask) in zip(cand_vals, sels):
                bl = sum(w[c][:, None] * vals[c] for c in range(len(vals)))
                img = np.zeros(base.shape, np.float32)
                img[:, sel] = bl
                xs.append(features(tile, img, mask, alignment)[:, sel].T)
                ys.append((tile.target[:, sel] - bl).T)
            x, y = np.concatenate(xs), np.concatenate(ys)
            base = _blend([base] + [np.where(real, cand(tile), base) for cand in candidates], w)
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
    corr = alpha[:, None] * fitted.predict(feats[:, todo].T).T
    info["applied_mean"] = [round(float(v), 4) for v in corr.mean(1)]
    if p.center_applied:
        corr = corr - corr.mean(1, keepdims=True)
    out[:, todo] += corr.astype(np.float32)
    return out, info


def predict_with_ssl(model: Any, tile: TileInputs, *, synthesise: bool = False):
    """``model.predict(tile)`` with its ``params.ssl`` residual learning on top (``model.params.ssl`` set): the base
    is the same model with ``ssl`` off; the reflectance under the real cloud is corrected by
    :func:`learn_residual`, confidence and provenance stay the base's (the correction is a per-pixel radiometric
    refinement of the same estimate, as the base's own local alignment is)."""
    from cloudfree.pipeline.contract import TileResult

    from cloudfree.models.registry import build_model

    plain = type(model)(model.params.model_copy(update={"ssl": None}))
    res = plain.predict(tile)
    cands = [build_model(name, {}) for name in model.params.ssl.bases]
    out, info = learn_residual(tile, res.reflectance, lambda t: plain.predict(t).reflectance, model.params.ssl,
                               synthesise=synthesise, alignment=tile.context.get("alignment"),
                               candidates=[(lambda t, m=m: m.predict(t).reflectance) for m in cands])
    log.debug("%s: self-supervised residual on %s: %s", model.name, tile.target_id, info)
    return TileResult(out, res.confidence, res.source, res.diagnostics).validate(tile, model.name)
