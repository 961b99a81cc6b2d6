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
    "LEAKY VALIDATION (found after training): the validation truth dates were fed as reference inputs in training"
    "{donors}, so the validation metrics above over-state the model; the held-out section is the honest measure. "
    "`cloudfree train` now keeps validation dates out of every training role and gives validation its own donors.")


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


def reference_ablation(model: str, params: dict[str, Any] | None = None,
                       pairs: Sequence[tuple[str, str]] | None = None, data_dir: str | Path | None = None
                       ) -> dict[str, Any]:
    """Cloudy-pixel PSNR of ``model`` on romania-hidden crops with its references as the search stage chose them,
    with the TRUTH added as the nearest clear reference (dt 0), and with every reference removed (all masked,
    zeros). A model that uses its references gains several dB from the truth and loses without them."""
    import dataclasses

    import numpy as np

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.metrics import psnr
    from cloudfree.pipeline.evaluation.romania import (ROMANIA_HIDDEN, default_search_config, load_stack,
                                                       romania_hidden_cases)
    from cloudfree.pipeline.evaluation.running import with_scene_context

    root = Path(data_dir) if data_dir else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    pairs = tuple(pairs or ROMANIA_HIDDEN)
    cases = romania_hidden_cases(load_stack(root), default_search_config(), pairs)
    net = build_model(model, params or {"device": "cpu"})
    res: dict[str, list[float]] = {"as chosen": [], "truth as a reference": [], "no references": []}
    for case in cases:
        tile = case.tile_inputs()
        t = case.truth.astype(tile.target.dtype)
        variants = {
            "as chosen": tile,
            "truth as a reference": dataclasses.replace(
                tile, references=np.concatenate([t[None], tile.references]),
                reference_masks=np.concatenate([np.zeros_like(tile.cloud_mask)[None], tile.reference_masks]),
                reference_ids=("truth", *tile.reference_ids), reference_dt_days=(0.0, *tile.reference_dt_days)),
            "no references": dataclasses.replace(
                tile, references=np.zeros_like(tile.references),
                reference_masks=np.ones_like(tile.reference_masks)),
        }
        for k, v in variants.items():
            out = net.predict(with_scene_context(net, v)).reflectance
            res[k].append(psnr(out, case.truth, case.regions["cloudy"]))
    mean = {k: float(np.mean(v)) for k, v in res.items()}
    gain, loss = mean["truth as a reference"] - mean["as chosen"], mean["as chosen"] - mean["no references"]
    reading = (f"the truth as a reference changes it by {gain:+.2f} dB and removing every reference by {-loss:+.2f}"
               " dB: " + ("it uses its references" if gain >= 3.0 and loss > 0 else
                          "it barely uses its references (a model that did would gain several dB)"))
    return {**{f"{k} (mean cloudy PSNR dB)": round(v, 2) for k, v in mean.items()}, "reading": reading,
            "cases": len(cases), "source": f"python -m cloudfree.pipeline.training.cards --ablation {model}"}


def sar_ablation(card_path: str | Path, batches: int = 16) -> dict[str, Any]:
    """Cloudy-pixel PSNR of the shipped weights of ``card_path`` on its own validation split (the card's data config,
    ``batches`` fixed batches), with the split's SAR and with the SAR removed (zeros, ``sar_present`` 0): what SAR
    adds where the training data has it. The validation SAR is whatever the config says (SIMULATED for the Romania
    recipes, from each date's observed surface, never from the truth)."""
    import math

    import torch

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.training.datasets import build_source
    from cloudfree.pipeline.training.loop import TrainConfig, batch_at

    card = json.loads(Path(card_path).read_text())
    cfg = TrainConfig(**{k: v for k, v in card["config"].items() if k in TrainConfig.model_fields})
    model = build_model(card["model"], {"device": "cpu", "weights": str(Path(card_path).parent / card["weights_file"]),
                                        "weights_sha256": card["sha256"]})
    tr, net = model.trainable(), model.network()
    src = build_source(cfg.data, tr.convention.bands, tr.n_references, cfg.patch)
    se = {"with SAR": 0.0, "without SAR": 0.0}
    n = 0
    with torch.no_grad():
        for i in range(batches):
            b = batch_at(src, cfg.seed, 10**9 + i, cfg.batch_size, "val")
            m = b["cloud_mask"][:, None].expand_as(b["truth"]) > 0.5
            for k in se:
                bb = b if k == "with SAR" else {**b, "sar": torch.zeros_like(b["sar"]),
                                                "sar_present": torch.zeros_like(b["sar_present"])}
                err = tr.predict(net, bb).clamp(0, 1) - b["truth"]
                se[k] += float((err[m] ** 2).sum())
            n += int(m.sum())
    out = {f"{k} (validation cloudy PSNR dB)": round(-10 * math.log10(max(v / max(n, 1), 1e-12)), 2)
           for k, v in se.items()}
    out["sar"] = str(card.get("data", {}).get("sar", ""))[:200]
    out["source"] = f"python -m cloudfree.pipeline.training.cards --sar-ablation {card_path} ({batches} batches)"
    return out


def update_card(path: Path, evaluation: dict[str, Any] | None,
                ablation: dict[str, Any] | None = None, sar: dict[str, Any] | None = None) -> dict[str, Any]:
    d = json.loads(Path(path).read_text())
    d["seen"] = d.get("seen") or legacy_seen(d)
    notes = [n for n in d.get("notes", []) if not n.startswith("LEAKY VALIDATION")]
    if "disjoint" not in str(d.get("data", {}).get("split", "")):  # trained before the honest split
        transplant = d["config"].get("data", {}).get("clouds") == "transplant"
        notes.append(LEGACY_LEAKS.format(donors=" and both splits drew from the same cloud donors" if transplant
                                         else " (its clouds were SIMULATED, no donors)"))
    md = Path(path).with_name(Path(path).name.replace(".card.json", ".card.md"))
    caveat = md.read_text().split("## Hold-out caveat (added after training)", 1) if md.is_file() else []
    if len(caveat) == 2 and not any(n.startswith("Hold-out caveat") for n in notes):
        notes.append("Hold-out caveat (added after training): " + " ".join(caveat[1].split()))
    d["notes"] = notes
    if evaluation is not None:
        d["heldout"] = {**d.get("heldout", {}), **heldout_rows(evaluation, d["model"])}
    if ablation is not None:
        d.setdefault("heldout", {})["reference ablation (romania-hidden)"] = ablation
    if sar is not None:
        d.setdefault("heldout", {})["SAR ablation (validation split)"] = sar
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
    ap.add_argument("--ablation", metavar="MODEL",
                    help="also measure MODEL's reference ablation (truth as a reference / none) into its card")
    ap.add_argument("--sar-ablation", action="store_true",
                    help="also measure each card's validation PSNR with and without its (simulated) SAR")
    args = ap.parse_args(argv)
    evaluation = json.loads(args.eval.read_text()) if args.eval else None
    abl = reference_ablation(args.ablation) if args.ablation else None
    for p in args.cards:
        card_model = json.loads(Path(p).read_text())["model"]
        sar = sar_ablation(p) if args.sar_ablation else None
        d = update_card(p, evaluation, abl if abl and card_model == args.ablation else None, sar)
        print(p, json.dumps({k: d[k] for k in ("seen", "heldout") if k in d}))


if __name__ == "__main__":
    main()
