"""Score the mask methods against real labelled data; writes a Markdown table (``docs/masks.md``).

``python -m cloudfree.pipeline.evaluation.mask_scores --out docs/masks.md [--data ../shared/data]``

Datasets (real Sentinel-2 pixels, in ``../shared/data``; see its README):

* ``s2-l1c-cloudmask-labels``: 512x512 L1C TOA, 6 bands (B02 B03 B04 B08 B11 B12, ~30 m) with a reference
  label (4 = cloud). Only ``spectral`` applies (s2cloudless needs 10 bands incl. B10); without B01/B10 the score
  keeps its blue, visible and NDSI tests.
* ``s2-l1c-cloudy-s2cloudless``: 856x512 L1C TOA, 13 bands, with s2cloudless's own mask (s2cloudless 1.2.1) as the
  reference, so the s2cloudless row checks the wrapper and version drift, not independent accuracy.
* ``s2-l2a-tile-29RKH-100m``: a whole L2A tile (BOA, no B10) at 100 m; the reference is Sen2Cor's SCL
  (8/9 cloud, 10 cirrus): it scores the spectral score against Sen2Cor, not against a human label.

* ``s2-pair-slovakia``: 256x256 L2A (~10 m, 12 bands, B10 absent) with an upstream mask (1 = thick bright cloud,
  2 = dark region, by eye shadow or thin cloud); the spectral score is scored against class 1 (it does not look
  for shadow). At 10 m the config's morphology radii apply as they do in a run.
* ``s2-l2a-stack-romania-nrt``: the 12 real cloudy dates of the evaluation (``ROMANIA_REAL_CLOUDY``), 10 m, read
  through the catalog path; the reference is Sen2Cor's SCL 8/9/10, which misses some cloud (data README): a
  check of agreement with Sen2Cor, not an accuracy.

The first table scores the raw per-pixel decision. The refinement table (issue 24) scores the same decisions
after each ``mask.refinement`` (:func:`cloudfree.stages.masks.mask_codes`, the kernel every mask path runs) with
the config's radii (closing 2, opening 1, keep probability 0.65), with the config's dilation and without it.
Radii are in pixels: at 30-100 m they are 3-10x wider on the ground than in a 10 m run, so the 10 m sets
(Slovakia, Romania) are the ones that measure the refinement as a run applies it. The default refinement is
chosen by :func:`choose_refinement` from these rows. MSK_CLDPRB has no real labelled sample here (Planetary
Computer and the shared data carry none), so ``cldprb`` itself is not scored; its refinement is the same kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloudfree.stages.masks import S2CLOUDLESS_BANDS, s2cloudless_kernel, spectral_score_kernel

log = logging.getLogger(__name__)

L1C13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
SCL_CLOUD = [8, 9, 10]


@dataclass(frozen=True)
class Score:
    dataset: str
    method: str
    reference: str
    pixels: int
    cloud_fraction_ref: float
    cloud_fraction_pred: float
    accuracy: float
    precision: float
    recall: float
    f1: float


def score(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None, dataset: str, method: str,
          reference: str) -> Score:
    """Binary scores of ``pred`` against ``ref`` on ``valid`` pixels (pure numpy)."""
    v = np.ones(pred.shape, bool) if valid is None else valid
    p, r = pred[v].astype(bool), ref[v].astype(bool)
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return Score(dataset, method, reference, int(v.sum()), float(r.mean()), float(p.mean()), float((p == r).mean()),
                 prec, rec, f1)


def score_labels(data: Path, threshold: float = 0.2) -> list[Score]:
    d = np.load(data / "s2-l1c-cloudmask-labels" / "sentinel2.npz")
    img, ref = d["img"], d["msk"][..., 0] == 4
    refl = {b: img[..., i] for i, b in enumerate(("B02", "B03", "B04", "B08", "B11", "B12"))}
    s = spectral_score_kernel(refl)
    return [score(s > threshold, ref, None, "s2-l1c-cloudmask-labels", "spectral", "label 4 (cloud)")]


def score_s2cloudless_scene(data: Path, threshold: float = 0.2) -> list[Score]:
    e = np.load(data / "s2-l1c-cloudy-s2cloudless" / "input_arrays.npz")
    im, ref = e["s2_im"][0], e["cl_mask"][0] > 0
    refl = {b: im[..., i] for i, b in enumerate(L1C13)}
    out = [score(spectral_score_kernel(refl) > threshold, ref, None, "s2-l1c-cloudy-s2cloudless", "spectral",
                 "s2cloudless 1.2.1 mask")]
    _, m = s2cloudless_kernel(im[..., [L1C13.index(b) for b in S2CLOUDLESS_BANDS]])
    out.append(score(m, ref, None, "s2-l1c-cloudy-s2cloudless", "s2cloudless", "s2cloudless 1.2.1 mask"))
    return out


def _29rkh(data: Path):
    import rasterio
    from rasterio.enums import Resampling

    folder = data / "s2-l2a-tile-29RKH-100m"
    with rasterio.open(folder / "B02.tif") as ds:
        shape = ds.shape
    refl = {}
    for b in ("B01", "B02", "B03", "B04", "B11"):
        with rasterio.open(folder / f"{b}.tif") as ds:
            dn = ds.read(1, out_shape=shape, resampling=Resampling.bilinear).astype(np.float32)
        refl[b] = np.where(dn == 0, np.nan, dn / 1e4)  # Earth Search v0, baseline 02.14: no offset
    with rasterio.open(folder / "SCL.tif") as ds:
        scl = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    return refl, scl


def score_29rkh(data: Path, threshold: float = 0.2) -> list[Score]:
    refl, scl = _29rkh(data)
    valid = (scl > 0) & np.isfinite(refl["B02"])
    ref = np.isin(scl, SCL_CLOUD)
    s = spectral_score_kernel(refl)
    # (no score of the scl method here: its reference would be the same SCL layer, an F1 of 1 by construction)
    return [score(s > threshold, ref, valid, "s2-l2a-tile-29RKH-100m", "spectral", "Sen2Cor SCL 8/9/10")]


#: F-beta of the default choice: a missed cloud pixel is passed on as a clear observation (the mask-induced loss
#: of `cloudfree evaluate` shows what that costs), a false flag only replaces a clear pixel by an estimate.
CHOICE_BETA = 2.0


@dataclass(frozen=True)
class RefinementScore:
    dataset: str
    pixel_m: int
    reference: str
    variant: str  # "raw" or "<refinement>, dilation <n>"
    refinement: str | None
    dilation: int
    cloud_fraction_pred: float
    opened_fraction: float
    precision: float
    recall: float
    f1: float
    f2: float


def fbeta(precision: float, recall: float, beta: float) -> float:
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall) if precision + recall else 0.0


def _score_stack(decisions, refs, valids, probs, dataset, pixel_m, reference) -> list[RefinementScore]:
    """Raw and refined scores of one dataset (lists of 2-D planes pooled into one score per variant)."""
    from cloudfree.pipeline.config import MaskConfig
    from cloudfree.stages.masks import CODE_CLOUD, CODE_OPENED, REFINEMENTS, mask_codes, refinement_params

    base = MaskConfig()
    variants = [("raw", None, 0)] + [(f"{r}, dilation {d}", r, d) for d in (base.dilation, 0) for r in REFINEMENTS]
    out = []
    for name, refinement, dilation in variants:
        tp = fp = fn = n = n_pred = n_opened = 0
        for raw, ref, valid, prob in zip(decisions, refs, valids, probs):
            if refinement is None:
                pred, opened = raw, np.zeros_like(raw)
            else:
                kw = refinement_params(base.model_copy(update={"refinement": refinement, "dilation": dilation}))
                codes = mask_codes(raw, prob, **kw)
                pred, opened = codes == CODE_CLOUD, codes == CODE_OPENED
            p, r = pred[valid], ref[valid]
            tp, fp, fn = tp + int((p & r).sum()), fp + int((p & ~r).sum()), fn + int((~p & r).sum())
            n, n_pred, n_opened = n + int(valid.sum()), n_pred + int(p.sum()), n_opened + int(opened[valid].sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out.append(RefinementScore(dataset, pixel_m, reference, name, refinement, dilation, n_pred / max(n, 1),
                                   n_opened / max(n, 1), prec, rec, fbeta(prec, rec, 1.0),
                                   fbeta(prec, rec, CHOICE_BETA)))
    return out


def refinement_scores(data: Path, threshold: float = 0.2) -> list[RefinementScore]:
    """The spectral score's decision (``S_c > T_cloud``) raw and after each refinement, on every labelled set."""
    out = []
    d = np.load(data / "s2-l1c-cloudmask-labels" / "sentinel2.npz")
    img, ref = d["img"], d["msk"][..., 0] == 4
    s = spectral_score_kernel({b: img[..., i] for i, b in enumerate(("B02", "B03", "B04", "B08", "B11", "B12"))})
    out += _score_stack([s > threshold], [ref], [np.ones(ref.shape, bool)], [s], "s2-l1c-cloudmask-labels", 30,
                        "label 4 (cloud)")
    e = np.load(data / "s2-l1c-cloudy-s2cloudless" / "input_arrays.npz")
    im, ref = e["s2_im"][0], e["cl_mask"][0] > 0
    s = spectral_score_kernel({b: im[..., i] for i, b in enumerate(L1C13)})
    out += _score_stack([s > threshold], [ref], [np.ones(ref.shape, bool)], [s], "s2-l1c-cloudy-s2cloudless", 70,
                        "s2cloudless 1.2.1 mask")
    out += _score_stack(*_slovakia(data, threshold), "s2-pair-slovakia", 10, "mask class 1 (thick cloud)")
    out += _score_stack(*_romania(data, threshold), "s2-l2a-stack-romania-nrt (12 cloudy dates)", 10,
                        "Sen2Cor SCL 8/9/10")
    refl, scl = _29rkh(data)
    s = spectral_score_kernel(refl)
    out += _score_stack([s > threshold], [np.isin(scl, SCL_CLOUD)], [(scl > 0) & np.isfinite(refl["B02"])], [s],
                        "s2-l2a-tile-29RKH-100m", 100, "Sen2Cor SCL 8/9/10")
    return out


def _slovakia(data: Path, threshold: float):
    import rasterio

    from cloudfree.pipeline.evaluation.cases import SLOVAKIA_BANDS

    folder = data / "s2-pair-slovakia"
    with rasterio.open(folder / "cloudy.tif") as ds:
        img = ds.read().astype(np.float32) / 10.0
    with rasterio.open(folder / "mask.tif") as ds:
        cls = ds.read(1)
    s = spectral_score_kernel({b: img[i] for i, b in enumerate(SLOVAKIA_BANDS)})
    return [s > threshold], [cls == 1], [np.isfinite(s)], [s]


def _romania(data: Path, threshold: float):
    from cloudfree.pipeline.evaluation.romania import ROMANIA_REAL_CLOUDY, item_id, load_stack

    stack = load_stack(data, bands=("B02", "B03", "B04", "B11"))
    decisions, refs, valids, probs = [], [], [], []
    for day in ROMANIA_REAL_CLOUDY:
        k = stack.index[item_id(day)]
        refl = {b: stack.refl[k, i] for i, b in enumerate(("B02", "B03", "B04", "B11"))}
        s = spectral_score_kernel(refl)
        scl = np.nan_to_num(stack.scl[k], nan=0).astype(np.int16)
        decisions.append(s > threshold)
        refs.append(np.isin(scl, SCL_CLOUD))
        valids.append((scl > 0) & np.isfinite(s))
        probs.append(s)
    return decisions, refs, valids, probs


#: refinements whose mean F-beta is within this of the best are tied (the opening changes well under 1 % of the
#: pixels of these sets); ties go to the first of :data:`cloudfree.stages.masks.REFINEMENTS` (weak-opening,
#: paper, closing-only): weak-opening never drops a confident flag, which the pixel counts cannot weigh but the
#: mask-induced loss of `cloudfree evaluate` does.
CHOICE_TIE = 0.001


def choose_refinement(rows: list[RefinementScore]) -> tuple[str, dict[str, float]]:
    """The refinement with the best mean F-beta (:data:`CHOICE_BETA`) over the datasets, at the config's dilation
    (ties within :data:`CHOICE_TIE`: the first of :data:`cloudfree.stages.masks.REFINEMENTS`). Returns it and every
    refinement's mean."""
    from cloudfree.pipeline.config import MaskConfig
    from cloudfree.stages.masks import REFINEMENTS

    dil = MaskConfig().dilation
    means = {r: float(np.mean([x.f2 for x in rows if x.refinement == r and x.dilation == dil])) for r in REFINEMENTS}
    top = max(means.values())
    best = next(r for r in REFINEMENTS if means[r] >= top - CHOICE_TIE)
    return best, means


def refinement_markdown(rows: list[RefinementScore]) -> list[str]:
    best, means = choose_refinement(rows)
    lines = ["## Refinement: precision and recall with and without it (issue 24)", "",
             "The spectral score's decision (T_cloud 0.2) raw and after each `mask.refinement` with the config's radii "
             "(closing 2, opening 1, keep probability 0.65 for `weak-opening`), with the config's dilation and "
             "without it. `opened`: share of the pixels that the threshold flagged and the opening removed (never "
             "written as clear in a run: source 6). Radii are in pixels (see the module docstring for the scale).",
             "", "| dataset | px | reference | variant | pred cloud | opened | precision | recall | F1 | "
             f"F{CHOICE_BETA:g} |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.dataset} | {r.pixel_m} m | {r.reference} | {r.variant} | {r.cloud_fraction_pred:.1%} | "
                     f"{r.opened_fraction:.2%} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} | {r.f2:.3f} |")
    lines += ["", "### Default refinement (computed)", "",
              f"Mean F{CHOICE_BETA:g} over the {len({r.dataset for r in rows})} datasets at the config's dilation "
              "(recall weighted: a missed cloud pixel is passed on as a clear observation, a false flag only "
              "replaces a clear pixel by an estimate): " + ", ".join(f"`{k}` {v:.4f}" for k, v in means.items())
              + f". Within {CHOICE_TIE} of the best counts as a tie (the opening changes well under 1 % of these "
              "pixels), broken in the order weak-opening, paper, closing-only: weak-opening never drops a confident "
              "flag, a cost pixel counts cannot weigh and the mask-induced loss of `cloudfree evaluate` measures "
              f"(docs/evaluation.md). Chosen: **{best}** (`mask.refinement` default in pipeline/config.py; "
              "tests/test_mask_refinement.py checks that they agree).", ""]
    return lines


def all_scores(data: Path) -> list[Score]:
    return [*score_labels(data), *score_s2cloudless_scene(data), *score_29rkh(data)]


def sweep(data: Path) -> list[tuple[str, float, float]]:
    """F1 of the spectral score at several thresholds (T_cloud = 0.2 is the paper's)."""
    rows = []
    for t in (0.1, 0.2, 0.3, 0.4):
        for s in (*score_labels(data, t), score_s2cloudless_scene_spectral(data, t), *score_29rkh(data, t)[:1]):
            rows.append((s.dataset, t, s.f1))
    return rows


def score_s2cloudless_scene_spectral(data: Path, threshold: float) -> Score:
    e = np.load(data / "s2-l1c-cloudy-s2cloudless" / "input_arrays.npz")
    im, ref = e["s2_im"][0], e["cl_mask"][0] > 0
    s = spectral_score_kernel({b: im[..., i] for i, b in enumerate(L1C13)})
    return score(s > threshold, ref, None, "s2-l1c-cloudy-s2cloudless", "spectral", "s2cloudless 1.2.1 mask")


def to_markdown(scores: list[Score], sweep_rows: list[tuple[str, float, float]],
                refinement_rows: list[RefinementScore] | None = None) -> str:
    lines = [
        "# Cloud mask methods scored on real labelled Sentinel-2 data",
        "",
        "Generated by `python -m cloudfree.pipeline.evaluation.mask_scores --out docs/masks.md`; do not edit by hand. Datasets and caveats: "
        "see the docstring of `pipeline/evaluation/mask_scores.py` (raw per-pixel decisions, no morphology; spectral threshold "
        "T_cloud = 0.2 and NDSI snow limit 0.6 as in the paper; s2cloudless threshold 0.4, average_over 4, "
        "dilation 2).",
        "",
        "| dataset | method | reference | pixels | ref cloud | pred cloud | accuracy | precision | recall | F1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        lines.append(f"| {s.dataset} | {s.method} | {s.reference} | {s.pixels} | {s.cloud_fraction_ref:.1%} | "
                     f"{s.cloud_fraction_pred:.1%} | {s.accuracy:.3f} | {s.precision:.3f} | {s.recall:.3f} | "
                     f"{s.f1:.3f} |")
    if refinement_rows:
        lines += ["", *refinement_markdown(refinement_rows)]
    lines += ["", "## Spectral score: F1 against the threshold T_cloud", "",
              "| dataset | T_cloud | F1 |", "|---|---:|---:|"]
    lines += [f"| {d} | {t:.1f} | {f:.3f} |" for d, t, f in sweep_rows]
    lines += ["", "Notes:",
              "- `cldprb` (Sen2Cor MSK_CLDPRB, threshold 40, then the refinement) has no real labelled sample in "
              "the shared data; its refinement is the kernel scored above, and `cloudfree evaluate` measures what "
              "each refinement costs a model on exact binary layers (mask-induced loss).",
              "- `s2cloudless` refuses L2A items (no B10, BOA instead of TOA) with an InputDataError naming them.",
              "- On the 29RKH tile (Moroccan desert, L2A) the reference is Sen2Cor's SCL, itself a classifier. The "
              "brightness tests also fire on bright bare soil, and on L2A the cirrus term (B01 + B10) is skipped, "
              "so the score over-detects there: it is meant for items with no cloud layer, not to replace SCL.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/masks.md"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scores = all_scores(args.data)
    refined = refinement_scores(args.data)
    best, means = choose_refinement(refined)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(scores, sweep(args.data), refined))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"scores": [asdict(s) for s in scores], "refinement": [asdict(r) for r in refined],
         "default_refinement": {"chosen": best, f"mean_f{CHOICE_BETA:g}": means}}, indent=1))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
