"""Score the mask methods against real labelled data; writes a Markdown table (``docs/masks.md``).

``python -m pipeline.evaluation.mask_scores --out docs/masks.md [--data ../shared/data]``

Datasets (real Sentinel-2 pixels, in ``../shared/data``; see its README):

* ``s2-l1c-cloudmask-labels``: 512x512 L1C TOA, 6 bands (B02 B03 B04 B08 B11 B12, ~30 m) with a reference
  label (4 = cloud). Only ``spectral`` applies (s2cloudless needs 10 bands incl. B10); without B01/B10 the score
  keeps its blue, visible and NDSI tests.
* ``s2-l1c-cloudy-s2cloudless``: 856x512 L1C TOA, 13 bands, with s2cloudless's own mask (s2cloudless 1.2.1) as the
  reference, so the s2cloudless row checks the wrapper and version drift, not independent accuracy.
* ``s2-l2a-tile-29RKH-100m``: a whole L2A tile (BOA, no B10) at 100 m; the reference is Sen2Cor's SCL
  (8/9 cloud, 10 cirrus): it scores the spectral score against Sen2Cor, not against a human label.

Masks are scored as the raw per-pixel decision (no closing/opening/dilation: the data are at 30-100 m, where the
10 m morphology radii of the config would distort them). MSK_CLDPRB has no real labelled sample here (Planetary
Computer and the shared data carry none), so ``cldprb`` is not scored.
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


def score_29rkh(data: Path, threshold: float = 0.2) -> list[Score]:
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
    valid = (scl > 0) & np.isfinite(refl["B02"])
    ref = np.isin(scl, SCL_CLOUD)
    s = spectral_score_kernel(refl)
    # (no score of the scl method here: its reference would be the same SCL layer, an F1 of 1 by construction)
    return [score(s > threshold, ref, valid, "s2-l2a-tile-29RKH-100m", "spectral", "Sen2Cor SCL 8/9/10")]


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


def to_markdown(scores: list[Score], sweep_rows: list[tuple[str, float, float]]) -> str:
    lines = [
        "# Cloud mask methods scored on real labelled Sentinel-2 data",
        "",
        "Generated by `python -m pipeline.evaluation.mask_scores --out docs/masks.md`; do not edit by hand. Datasets and caveats: "
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
    lines += ["", "## Spectral score: F1 against the threshold T_cloud", "",
              "| dataset | T_cloud | F1 |", "|---|---:|---:|"]
    lines += [f"| {d} | {t:.1f} | {f:.3f} |" for d, t, f in sweep_rows]
    lines += ["", "Notes:",
              "- `cldprb` (Sen2Cor MSK_CLDPRB, threshold 40, closing then opening) has no real labelled sample in "
              "the shared data; it is tested on the demo's simulated layer only.",
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(scores, sweep(args.data)))
    args.out.with_suffix(".json").write_text(json.dumps([asdict(s) for s in scores], indent=1))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
