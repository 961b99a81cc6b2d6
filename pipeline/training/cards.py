"""Correct and complete the model cards of shipped weights: honest counts of what training saw, the leaks of the
run that produced them, and held-out scores next to the floors (mean-fill, reference-replace).

``python -m cloudfree.pipeline.training.cards --eval EVAL/evaluation.json models/weights/*.card.json`` reads a
``cloudfree evaluate`` result (it must score the card's model, ``mean-fill`` and ``reference-replace``; ``temporal``
is reported when present) and rewrites each card (JSON and Markdown). The weights file and its sha256 are untouched.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from cloudfree.models._weights import InputConvention, ModelCard, write_model_card

FLOORS = ("mean-fill", "reference-replace")
GROUPS = ("romania-hidden", "romania-real")

#: what the runs before the honest split did (datasets.StacPairs before validation got its own donors).
LEGACY_LEAKS = (
    "LEAKY VALIDATION (found after training): the validation truth dates were fed as reference inputs in training "
    "and both splits drew from the same cloud donors, so the validation metrics above over-state the model; the "
    "held-out rows below are the honest measure. `cloudfree train` now keeps validation dates out of every "
    "training role and gives validation its own donors.")


def legacy_seen(card: dict[str, Any]) -> dict[str, Any]:
    """Distinct images/pixels for a card written before ``seen`` existed, from its config and split text."""
    cfg, data = card["config"], card.get("data", {})
    m = re.search(r"(\d+) clear truth dates for training", str(data.get("split", "")))
    n = int(m.group(1)) if m else 0
    px = re.search(r"(\d+)x(\d+) px", str(data.get("optical", "")))
    h, w = (int(px.group(1)), int(px.group(2))) if px else (0, 0)
    donors = re.search(r"(\d+) cloudy mask-source dates", str(data.get("split", "")))
    transplant = cfg.get("data", {}).get("clouds") == "transplant"
    n_donors = int(donors.group(1)) if donors and transplant else 0
    steps, batch, patch = card["steps"], cfg["batch_size"], cfg["patch"]
    return {"truth_images": n, "truth_pixels": n * h * w, "image_px": f"{h}x{w}", "cloud_donors": n_donors,
            "truth_x_donor_pairs": n * max(1, n_donors), "samples_drawn": steps * batch,
            "pixel_samples": steps * batch * patch * patch}


def heldout_rows(evaluation: dict[str, Any], model: str) -> dict[str, Any]:
    """Cloudy-pixel PSNR of ``model`` and the floors per Romania group, and the verdict against the floors."""
    s = {(r["group"], r["model"], r["region"]): r for r in evaluation["summary"]}
    out: dict[str, Any] = {}
    for g in GROUPS:
        if (g, model, "cloudy") not in s:
            continue
        row = {m: round(s[(g, m, "cloudy")]["psnr"], 2) for m in (model, *FLOORS, "temporal")
               if (g, m, "cloudy") in s}
        row["n_cases"] = s[(g, model, "cloudy")]["n_cases"]
        missing = [f for f in FLOORS if f not in row]
        if missing:
            raise ValueError(f"evaluation has no {g} rows for floors {missing}: rerun cloudfree evaluate with "
                             f"--models {model},mean-fill,reference-replace")
        row["verdict"] = ("above both floors" if row[model] > max(row[f] for f in FLOORS) else
                          "BELOW mean-fill: not usable" if row[model] <= row["mean-fill"] else
                          "above mean-fill, below reference-replace")
        out[f"{g} (cloudy-pixel PSNR dB)"] = row
    if not out:
        raise ValueError(f"evaluation has no romania rows for {model!r}")
    out["source"] = ("cloudfree evaluate --cases romania (romania-hidden: real clear dates held out from training, "
                     "behind real cloud shapes; romania-real: real clouds against a proxy truth)")
    return out


def update_card(path: Path, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    d = json.loads(Path(path).read_text())
    legacy = not d.get("seen")
    d["seen"] = d.get("seen") or legacy_seen(d)
    notes = [n for n in d.get("notes", []) if not n.startswith("LEAKY VALIDATION")]
    if legacy and "disjoint" not in str(d.get("data", {}).get("split", "")):
        notes.append(LEGACY_LEAKS)
    md = Path(path).with_name(Path(path).name.replace(".card.json", ".card.md"))
    caveat = md.read_text().split("## Hold-out caveat (added after training)", 1) if md.is_file() else []
    if len(caveat) == 2 and not any(n.startswith("Hold-out caveat") for n in notes):
        notes.append("Hold-out caveat (added after training): " + " ".join(caveat[1].split()))
    d["notes"] = notes
    if evaluation is not None:
        d["heldout"] = heldout_rows(evaluation, d["model"])
    d["convention"] = InputConvention(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in d["convention"].items()})
    card = ModelCard(**d)
    weights = Path(path).parent / d["weights_file"]
    write_model_card(card, weights)
    return card.to_dict()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cards", nargs="+", type=Path)
    ap.add_argument("--eval", type=Path, help="evaluation.json of cloudfree evaluate --cases romania")
    args = ap.parse_args(argv)
    evaluation = json.loads(args.eval.read_text()) if args.eval else None
    for p in args.cards:
        d = update_card(p, evaluation)
        print(p, json.dumps({k: d[k] for k in ("seen", "heldout") if k in d}))


if __name__ == "__main__":
    main()
