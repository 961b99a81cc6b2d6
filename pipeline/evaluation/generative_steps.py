"""Speed/quality trade-off of the generative models: sampling steps vs PSNR/SSIM/SAM and seconds per tile.

For each configuration (Diffusion Enhancement with 1, 2, 4, 8, 50 DDIM steps; CM-CR's consistency student with
1, 2, 4, 8, 50 steps (1 + multistep resampling); CM-CR's diffusion teacher with 1, 2, 4, 8, 50 Heun steps) it runs
``predict`` on whole 256 x 256 tiles of the simulated evaluation cases (REAL clear pixels of 29RKH / 33UUU with
SIMULATED clouds, :func:`cloudfree.pipeline.evaluation.evaluate.simulated_set`) and scores the cloudy pixels. CM-CR gets
SIMULATED Sentinel-1 (:func:`cloudfree.pipeline.training.datasets.simulate_sar`, the simulator its training used) because
no evaluation case has co-located real S1. That SAR is simulated from **another date** of the case (the clearest
reference, nearest first; :func:`reference_sar_db`), **never from the truth** it is scored against: SAR simulated
from the truth carries the answer into the input, which no real scene provides. ``--no-sar`` runs CM-CR optical-only.

Seconds per tile are wall time of ``predict`` on this machine's CPU (threads as set by ``--threads``), the mean
over the cases (one untimed warm-up ``predict`` per generative model and set loads the weights first). DE's time includes its reference model (PhyVLM-CR), whose own
time is reported as a separate row. Writes ``generative.json``, ``generative_steps.md`` (the table) and
``figures/steps.png``.

Run: ``python -m pipeline.evaluation.generative_steps --out docs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cloudfree.pipeline.evaluation.cases import DEFAULT_DATA_DIR, SIM_BANDS, EvalCase, simulated_set
from cloudfree.pipeline.evaluation.metrics import all_metrics

log = logging.getLogger(__name__)

STEPS = (1, 2, 4, 8, 50)
SEEDS = (1, 2, 3, 4)


def reference_sar_db(references: np.ndarray, reference_masks: np.ndarray, reference_dt_days: Sequence[float],
                     bands: Sequence[str], seed: int) -> tuple[np.ndarray, list[int]]:
    """SIMULATED S1 VV/VH ``(1, 2, y, x)`` in dB for a target date, simulated from its REFERENCE dates, never from
    its truth: the clearest reference (then the nearest in time), its masked pixels filled from the next references
    in that order where they are clear. Returns the SAR and the reference indices used (the order of preference).

    What a model gets is therefore radar of another date, as a real S1 scene days away would be, not a simulated
    view of the answer. Labelled SIMULATED wherever it is reported."""
    from cloudfree.pipeline.training.datasets import simulate_sar

    refs = np.asarray(references, np.float32)
    masks = np.asarray(reference_masks, bool)
    if refs.ndim != 4 or refs.shape[0] == 0:
        raise ValueError("reference_sar_db needs at least one reference date (band, y, x) to simulate SAR from; "
                         "run without SAR (--no-sar) for a case with none")
    dts = list(reference_dt_days) + [0.0] * (refs.shape[0] - len(reference_dt_days))
    order = sorted(range(refs.shape[0]), key=lambda i: (round(float(masks[i].mean()), 3), abs(float(dts[i])), i))
    surface = refs[order[0]].copy()
    todo = masks[order[0]].copy()
    for i in order[1:]:
        fill = todo & ~masks[i]
        surface[:, fill] = refs[i][:, fill]
        todo &= ~fill
    scaled = simulate_sar(np.nan_to_num(surface), bands, np.random.default_rng(seed))
    return (scaled * 25.0 - 25.0)[None].astype(np.float32), order


def case_sar_db(case: EvalCase, seed: int) -> np.ndarray:
    """SIMULATED S1 VV/VH ``(1, 2, y, x)`` in dB for ``case``: simulated from its clearest reference date
    (:func:`reference_sar_db`), never from ``case.truth``."""
    return reference_sar_db(case.references, case.reference_masks, case.reference_dt_days, case.bands, seed)[0]


def romania_val_cases(n: int = 6, patch: int = 96, seed: int = 0) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
    """In-domain cases: ``n`` samples of the training source's VALIDATION split (Romania L2A stack, clear dates
    never trained on, every 5th clear date; SIMULATED clouds; real other dates as references; SIMULATED SAR of the
    clearest reference date, never of the truth: :func:`reference_sar_db`), as ``(name, TileInputs, truth, cloudy
    mask)``."""
    from cloudfree.models._generative import GEN_BANDS
    from cloudfree.pipeline.contract import TileInputs
    from cloudfree.pipeline.training.datasets import DataConfig, build_source

    src = build_source(DataConfig(clouds="simulate", sar="none", sar_dropout=0.0), GEN_BANDS, 2, patch)
    out = []
    for i in range(n):
        s = src.sample(np.random.default_rng([seed, 10**6 + i]), "val")
        mask = s["cloud_mask"] > 0.5
        tile = TileInputs(bands=GEN_BANDS, target=s["target"], cloud_prob=s["cloud_mask"], cloud_mask=mask,
                          references=s["references"], reference_masks=s["ref_masks"] > 0.5,
                          reference_dt_days=tuple(float(d) for d in s["ref_dt"]),
                          # not the sample's own target-date SAR: the source may simulate it from the truth
                          sar=reference_sar_db(s["references"], s["ref_masks"] > 0.5, s["ref_dt"], GEN_BANDS,
                                               seed * 1000 + i)[0], sar_bands=("vv", "vh"),
                          target_id=f"romania-val-{i}")
        out.append((f"romania-val-{i}", tile, s["truth"], mask))
    return out


def clear_mean_fill(tile: Any) -> np.ndarray:
    """Trivial baseline: every cloudy pixel gets the per-band mean of the tile's clear pixels."""
    out = np.array(tile.target, np.float32, copy=True)
    clear = ~tile.cloud_mask & np.isfinite(tile.target).all(axis=0)
    for b in range(out.shape[0]):
        out[b][~clear] = float(out[b][clear].mean()) if clear.any() else 0.0
    return out


def baseline_row(sets: dict[str, list]) -> dict[str, Any]:
    row: dict[str, Any] = {"label": "clear-pixel mean fill (trivial baseline)", "model": "-", "params": {}, "nfe": 0}
    for set_name, cases in sets.items():
        per_case = [{"case": n, "seconds": 0.0, **all_metrics(clear_mean_fill(t), g, m)} for n, t, g, m in cases]
        row[set_name] = {"seconds_per_tile": 0.0,
                         **{k: float(np.mean([c[k] for c in per_case])) for k in ("psnr", "ssim", "sam", "mae")},
                         "cases": per_case}
    return row


def configurations(steps: Sequence[int] = STEPS) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, model, params)`` of every row."""
    rows = [("phyvlm-cr (DE's reference)", "phyvlm-cr", {})]
    rows += [(f"diffusion-enhancement {s}", "diffusion-enhancement", {"steps": s}) for s in steps]
    rows += [(f"cm-cr student {s}", "cm-cr", {"sampler": "student", "steps": s}) for s in steps]
    rows += [(f"cm-cr teacher {s}", "cm-cr", {"sampler": "teacher", "steps": s}) for s in steps]
    return rows


def nfe(model: str, params: dict[str, Any]) -> int:
    """Network evaluations per tile (DE: CNP + WA per step; teacher Heun: 2 steps - 1)."""
    s = int(params.get("steps", 0))
    if model == "diffusion-enhancement":
        return 2 * s
    if model == "cm-cr":
        return s if params.get("sampler", "student") == "student" else 2 * s - 1
    return 0


def run(out: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR, seeds: Sequence[int] = SEEDS,
        steps: Sequence[int] = STEPS, sar: bool = True, threads: int | None = None,
        romania: bool = True) -> dict[str, Any]:
    import torch

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.running import with_scene_context

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[tuple[str, Any, np.ndarray, np.ndarray]]] = {"simulated-256": []}
    for case in simulated_set(data_dir, seeds):
        tile = case.tile_inputs()
        if sar:
            tile = dataclasses.replace(tile, sar=case_sar_db(case, case.meta["seed"]), sar_bands=("vv", "vh"))
        sets["simulated-256"].append((case.name, tile, case.truth, case.regions["cloudy"]))
    if romania:
        sets["romania-val-96"] = romania_val_cases()
        if not sar:
            sets["romania-val-96"] = [(n, dataclasses.replace(t, sar=None, sar_bands=()), g, m)
                                      for n, t, g, m in sets["romania-val-96"]]
    rows = [baseline_row(sets)]
    for label, name, params in configurations(steps):
        # cm-cr needs SAR by default; a run without SAR measures its optical-only path
        model = build_model(name, dict(params, **({"require_sar": False} if name == "cm-cr" and not sar else {})))
        row = {"label": label, "model": name, "params": params, "nfe": nfe(name, params)}
        for set_name, cases in sets.items():
            per_case = []
            for case_name, tile, truth, cloudy in cases:
                t = with_scene_context(model, tile)
                if name != "phyvlm-cr" and not per_case:
                    model.predict(t)  # warm-up: weights loaded once, not timed
                t0 = time.perf_counter()
                res = model.predict(t)
                secs = time.perf_counter() - t0
                per_case.append({"case": case_name, "seconds": secs, **all_metrics(res.reflectance, truth, cloudy)})
            row[set_name] = {"seconds_per_tile": float(np.mean([c["seconds"] for c in per_case])),
                             **{k: float(np.mean([c[k] for c in per_case])) for k in ("psnr", "ssim", "sam", "mae")},
                             "cases": per_case}
            log.info("%s on %s: %.2f dB, %.3f s/tile", label, set_name, row[set_name]["psnr"],
                     row[set_name]["seconds_per_tile"])
        rows.append(row)
    payload = {"rows": rows, "seeds": list(seeds), "sets": list(sets), "bands": list(SIM_BANDS),
               "sar": ("SIMULATED from the clearest reference date of each case (reference_sar_db), never from its "
                       "truth") if sar else "none",
               "threads": torch.get_num_threads(), "region": "cloudy", "de_default_steps_pick": pick_de_steps(rows)}
    (out / "generative.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    (out / "generative_steps.md").write_text(markdown(rows))
    figure(rows, out / "figures" / "steps.png")
    return payload


#: DE's default DDIM steps (``DEParams.steps`` in models/diffusion_enhancement.py) come from this table: the fewest
#: steps whose cloudy-pixel PSNR, averaged over the sets, is within this many dB of the best DE row (more steps
#: cost time linearly and buy nothing measurable below it). ``tests/test_de_default_steps.py`` checks the default
#: against the committed ``docs/generative.json``.
PICK_TOLERANCE_DB = 0.1


def pick_de_steps(rows: Sequence[dict[str, Any]], tolerance_db: float = PICK_TOLERANCE_DB) -> int:
    """The DE steps the table supports as the default (see :data:`PICK_TOLERANCE_DB`)."""
    de = [r for r in rows if r.get("model") == "diffusion-enhancement" and "steps" in r.get("params", {})]
    if not de:
        raise ValueError("the steps table has no diffusion-enhancement rows")
    sets = [k for k in ("simulated-256", "romania-val-96") if k in de[0]]
    mean = {int(r["params"]["steps"]): float(np.mean([r[k]["psnr"] for k in sets])) for r in de}
    best = max(mean.values())
    return min(s for s, v in mean.items() if v >= best - tolerance_db)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    sets = [k for k in ("simulated-256", "romania-val-96") if k in rows[0]]
    head = "| configuration | steps | network evals | " + " | ".join(
        f"{k}: PSNR (dB) | SSIM | SAM (deg) | s / tile" for k in sets) + " |"
    lines = [head, "|---|---:|---:|" + "---:|---:|---:|---:|" * len(sets)]
    for r in rows:
        name = r["label"].rsplit(" ", 1)[0] if r["params"] else r["label"]
        cells = [f"{r[k]['psnr']:.2f} | {r[k]['ssim']:.4f} | {r[k]['sam']:.2f} | {r[k]['seconds_per_tile']:.2f}"
                 for k in sets]
        lines.append(f"| {name} | {r['params'].get('steps', '-')} | {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [k for k in ("simulated-256", "romania-val-96") if k in rows[0]]
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(5.2 * (len(sets) + 1), 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["params"]:
            groups.setdefault(r["label"].rsplit(" ", 1)[0], []).append(r)
    for g, rs in groups.items():
        s = [r["params"]["steps"] for r in rs]
        for ax, k in zip(axes, sets):
            ax.plot(s, [r[k]["psnr"] for r in rs], "o-", label=g)
        axes[-1].plot([r[sets[0]]["seconds_per_tile"] for r in rs], [r[sets[0]]["psnr"] for r in rs], "o-", label=g)
        for r in rs:
            axes[-1].annotate(str(r["params"]["steps"]), (r[sets[0]]["seconds_per_tile"], r[sets[0]]["psnr"]),
                              fontsize=7)
    for r, style in zip((r for r in rows if not r["params"]), (("black", ":"), ("grey", "--"))):
        for ax, k in zip(axes, sets):
            ax.axhline(r[k]["psnr"], color=style[0], ls=style[1], lw=1, label=r["label"])
        axes[-1].axhline(r[sets[0]]["psnr"], color=style[0], ls=style[1], lw=1)
    for ax, k in zip(axes, sets):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("PSNR on cloudy pixels (dB)")
        ax.set_title(k)
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    axes[0].legend(fontsize=7)
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel(f"seconds per 256x256x4 tile (CPU) [{sets[0]}]")
    axes[-1].set_ylim(bottom=max(0.0, axes[-1].get_ylim()[0]))
    axes[-1].set_title("quality vs time (labels: steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Steps vs quality/speed of the generative models")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    ap.add_argument("--steps", default=",".join(str(s) for s in STEPS))
    ap.add_argument("--no-sar", action="store_true", help="run CM-CR without (simulated) SAR")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-romania", action="store_true", help="skip the in-domain Romania validation cases")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * a.verbose, format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(a.out, a.data_dir, [int(s) for s in a.seeds.split(",")], [int(s) for s in a.steps.split(",")],
            sar=not a.no_sar, threads=a.threads, romania=not a.no_romania)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
