"""Training and held-out scoring of the ``temporal-residual`` network (:mod:`cloudfree.models.temporal_residual`):
``make train-temporal-residual`` = ``python -m cloudfree.pipeline.training.temporal_residual [OUT] [--seconds S]``.

Training pairs are built the way the evaluation builds ``romania-hidden`` (:mod:`cloudfree.pipeline.evaluation.romania`),
so training and inference see the same inputs:

* **split** from :class:`cloudfree.pipeline.training.datasets.StacPairs` (the honest split: every evaluation,
  mask-donor and proxy-truth date of :data:`ROMANIA_HELDOUT_DATES` is held out of every role; validation has its own
  truth dates and cloud donors, never training inputs);
* **pairs**: every (training clear date x training cloud donor); the donor's real SCL cloud is put on the clear date
  by the evaluation's own :func:`~cloudfree.pipeline.evaluation.romania.transplant` (eq. 1 of PhyVLM-CR) and the
  mask/probability are the mask stage's (:func:`scl_mask_and_prob`);
* **references** chosen by the search stage exactly as at inference (:func:`plan_targets` +
  :func:`select_references`: 4 best-scored, bracketing), with the held-out and validation dates removed from the
  candidates (training only);
* **base** = the registered ``temporal`` model with its scene context, run on the pair;
* **augmentation** at training time: the 8 rotations/flips of the square and random crops.

The loss is the mean over samples of ``log(MSE)`` on the cloud-mask pixels, i.e. minus the mean per-sample cloudy
PSNR the evaluation reports (up to a constant).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloudfree.models.temporal_residual import BANDS, DEFAULT_NET, N_REFS, build_net

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def base_of(tile) -> tuple[np.ndarray, Any]:
    """The registered ``temporal`` model's reflectance on ``tile`` with its scene context (as the runner computes
    it), and that context's reference alignment."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.running import with_scene_context

    m = build_model("temporal")
    tile = with_scene_context(m, tile)
    return np.nan_to_num(m.predict(tile).reflectance).astype(np.float32), tile.context["alignment"]


def _ref_arrays(tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (unaligned) reference arrays; the per-pair alignment is applied in :func:`_batch`."""
    from cloudfree.models.temporal_residual import reference_arrays

    refs, masks, dt = reference_arrays(tile, list(range(len(tile.bands))))
    k = min(len(dt), N_REFS)
    r = np.zeros((N_REFS,) + refs.shape[1:], np.float32)
    m = np.ones((N_REFS,) + masks.shape[1:], np.float32)
    d = np.zeros(N_REFS, np.float32)
    r[:k], m[:k], d[:k] = refs[:k], masks[:k], dt[:k]
    return r, m, d


def _pad_align(align, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    g, o = np.ones((N_REFS, n_bands), np.float32), np.zeros((N_REFS, n_bands), np.float32)
    for i, (gi, oi) in enumerate(list(align)[:N_REFS]):
        g[i], o[i] = gi, oi
    return g, o


def build_pairs(data_dir: str | Path = DATA_DIR, split: str = "train", limit: int | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Every (clear date x cloud donor) pair of ``split`` as evaluation-like cases (module docstring): arrays
    ``base, cloud, region`` per pair, ``refs, ref_masks, ref_dt, truth`` per truth date, ``truth_of`` pair -> date."""
    from cloudfree.pipeline.contract import TileInputs
    from cloudfree.pipeline.evaluation.romania import (_interp, _neighbours, _plan_references,
                                                       default_search_config, item_id, load_stack,
                                                       scl_mask_and_prob, stac_dir, transplant)
    from cloudfree.pipeline.holdout import ROMANIA_HELDOUT_DATES
    from cloudfree.pipeline.training.datasets import DataConfig, StacPairs

    t0 = time.perf_counter()
    src = StacPairs(DataConfig(path=str(stac_dir(data_dir) / "catalog.json"), sar="none"), BANDS, N_REFS, 48)
    stack = load_stack(data_dir, BANDS)
    held = {item_id(d) for d in ROMANIA_HELDOUT_DATES}
    banned = held | (src._val_ids if split == "train" else set())
    banned_idx = {stack.index[i] for i in banned if i in stack.index}
    truths = [d.id for d in src.split[split]]
    donors = [d.id for d in src.donors[split]]
    assert not (set(truths) | set(donors)) & held, "held-out dates in the training split"
    pairs = [(t, d) for t in truths for d in donors]
    if limit is not None and limit < len(pairs):
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), limit, replace=False))]
    clear = stack.clear()
    cfg = default_search_config()
    per_truth: dict[str, dict[str, Any] | None] = {}
    skipped: list[str] = []
    out = {"base": [], "gain": [], "offset": [], "cloud": [], "region": [], "truth_of": [], "target": [], "prob": []}
    for tid, did in pairs:
        kt, kd = stack.index[tid], stack.index[did]
        if tid not in per_truth:
            refs = _plan_references(stack, tid, cfg, banned - {tid})
            assert not {c.item.id for c in refs} & banned, (tid, [c.item.id for c in refs])
            if not refs:  # no reference the search stage would give: inference could not run either
                per_truth[tid] = None
                skipped.append(tid)
                continue
            idx = [stack.index[c.item.id] for c in refs]
            per_truth[tid] = {"idx": idx, "dt": tuple(float(c.offset_days) for c in refs),
                              "ids": tuple(c.item.id for c in refs)}
        pt = per_truth[tid]
        if pt is None:
            continue
        b, a = _neighbours(stack, kd, clear, {kt} | banned_idx, one_sided=True)
        truth = stack.refl[kt]
        hidden, t, s, _ = transplant(truth, stack.refl[kd], _interp(stack, kd, b, a), stack.scl[kd], BANDS)
        mask, prob = scl_mask_and_prob(stack.scl[kd])
        rmask = np.stack([scl_mask_and_prob(stack.scl[j])[0] | ~np.isfinite(stack.refl[j]).all(0)
                          for j in pt["idx"]])
        tile = TileInputs(bands=BANDS, target=hidden, cloud_prob=prob, cloud_mask=mask,
                          references=stack.refl[pt["idx"]], reference_masks=rmask, reference_ids=pt["ids"],
                          reference_dt_days=pt["dt"], target_id=f"{tid}-mask-{did}")
        if "refs" not in pt:
            pt["refs"], pt["ref_masks"], pt["ref_dt"] = _ref_arrays(tile)
            pt["truth"] = np.nan_to_num(truth).astype(np.float32)
        base, align = base_of(tile)
        out["base"].append(base)
        g, o = _pad_align(align, len(BANDS))
        out["gain"].append(g)
        out["offset"].append(o)
        out["cloud"].append(mask.astype(np.float32))
        out["region"].append(((t < 0.95) | (s < 0.95)).astype(np.float32))
        out["truth_of"].append(tid)
        out["target"].append(np.nan_to_num(hidden).astype(np.float32))
        out["prob"].append(prob.astype(np.float32))
    order = sorted(k for k, v in per_truth.items() if v is not None)
    pos = {k: i for i, k in enumerate(order)}
    d = src.distinct(split)
    return {"base": np.stack(out["base"]), "gain": np.stack(out["gain"]), "offset": np.stack(out["offset"]),
            "cloud": np.stack(out["cloud"]), "region": np.stack(out["region"]),
            "target": np.stack(out["target"]), "prob": np.stack(out["prob"]),
            "truth_index": np.array([pos[t] for t in out["truth_of"]], np.int64),
            "refs": np.stack([per_truth[k]["refs"] for k in order]),
            "ref_masks": np.stack([per_truth[k]["ref_masks"] for k in order]),
            "ref_dt": np.stack([per_truth[k]["ref_dt"] for k in order]),
            "truth": np.stack([per_truth[k]["truth"] for k in order]),
            "meta": {"split": split, "truth_dates": order, "donors": donors, "pairs": len(out["base"]),
                     "skipped_truth_dates_without_references": skipped,
                     "distinct": d, "describe": src.describe(), "seconds": round(time.perf_counter() - t0, 1)}}


def cached_pairs(split: str, cache_dir: str | Path = "/tmp/tr-pairs", **kw) -> dict[str, Any]:
    """:func:`build_pairs`, cached as ``<cache_dir>/<split>.npz`` (rebuilt when missing)."""
    p = Path(cache_dir) / f"{split}.npz"
    if p.is_file():
        z = np.load(p, allow_pickle=False)
        d = {k: z[k] for k in z.files if k != "meta"}
        d["meta"] = json.loads(str(z["meta"]))
        return d
    d = build_pairs(split=split, **kw)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v for k, v in d.items() if k != "meta"}, meta=json.dumps(d["meta"], default=str))
    tmp.replace(p)
    return d


def _dihedral(x, k: int):
    import torch

    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def _batch(data: dict[str, Any], idx: np.ndarray, rng: np.random.Generator, patch: int | None, augment: bool):
    import torch

    ti = data["truth_index"][idx]
    refs = data["refs"][ti] * data["gain"][idx][..., None, None] + data["offset"][idx][..., None, None]
    b = {"base": data["base"][idx], "cloud": data["cloud"][idx], "refs": refs,
         "ref_masks": data["ref_masks"][ti], "ref_dt": data["ref_dt"][ti], "truth": data["truth"][ti]}
    b = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in b.items()}
    if patch is not None:
        h, w = b["base"].shape[-2:]
        y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
        b = {k: (v if k == "ref_dt" else v[..., y:y + patch, x:x + patch]) for k, v in b.items()}
    if augment:
        k = int(rng.integers(8))
        b = {key: (v if key == "ref_dt" else _dihedral(v, k)) for key, v in b.items()}
    return b


def _loss(net, b, bands=None):
    import torch

    pred = net(b["base"], b["refs"], b["ref_masks"], b["ref_dt"], b["cloud"], bands)
    if bands is not None:
        b = {**b, "truth": b["truth"][:, bands]}
    m = b["cloud"][:, None]
    n = (m.sum((1, 2, 3)) * pred.shape[1]).clamp(min=1)
    mse = (((pred - b["truth"]) ** 2) * m).sum((1, 2, 3)) / n
    keep = m.sum((1, 2, 3)) >= 16
    return torch.log(mse[keep] + 1e-6).mean() if keep.any() else (pred * 0).sum()


def score(net, data: dict[str, Any]) -> dict[str, float]:
    """Mean per-pair PSNR on the pairs' cloudy region (as the evaluation scores), of the base and of the net."""
    import torch

    from cloudfree.pipeline.evaluation.metrics import psnr

    res = {"temporal": [], "temporal-residual": []}
    with torch.no_grad():
        for i in range(len(data["base"])):
            b = _batch(data, np.array([i]), np.random.default_rng(0), None, False)
            out = net(b["base"], b["refs"], b["ref_masks"], b["ref_dt"], b["cloud"])[0].numpy()
            truth, region = b["truth"][0].numpy(), data["region"][i] > 0.5
            res["temporal"].append(psnr(b["base"][0].numpy(), truth, region))
            res["temporal-residual"].append(psnr(out, truth, region))
    return {k: round(float(np.nanmean(v)), 3) for k, v in res.items()}


def train(out: str | Path = "/tmp/temporal_residual.safetensors", seconds: float = 1500.0, steps: int = 100000,
          batch: int = 4, patch: int = 100, lr: float = 5e-4, seed: int = 0, net_config: dict | None = None,
          cache_dir: str | Path = "/tmp/tr-pairs", validate_every: int = 250, band_subset: int | None = 2
          ) -> dict[str, Any]:
    """Train on every training pair for at most ``seconds`` (or ``steps``); keep the weights that score best on
    the validation pairs (own truth dates and donors); write them to ``out``. One CPU thread."""
    import torch

    from cloudfree.models._weights import InputConvention, save_weights

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t_all = time.perf_counter()
    tr, va = cached_pairs("train", cache_dir), cached_pairs("val", cache_dir)
    t_data = time.perf_counter() - t_all
    cfg = {**DEFAULT_NET, **(net_config or {})}
    net = build_net(**cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    best = {"score": score(net, va), "step": 0, "state": {k: v.clone() for k, v in net.state_dict().items()}}
    history = [{"step": 0, **best["score"]}]
    done, t1 = 0, time.perf_counter()
    n = len(tr["base"])
    while done < steps and time.perf_counter() - t1 < seconds:
        frac = (time.perf_counter() - t1) / seconds
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        b = _batch(tr, rng.integers(0, n, batch), rng, patch, True)
        loss = _loss(net, b, sorted(rng.permutation(len(BANDS))[:band_subset].tolist()) if band_subset else None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        done += 1
        if done % validate_every == 0:
            net.eval()
            s = score(net, va)
            net.train()
            history.append({"step": done, "loss": round(float(loss.detach()), 4), **s})
            print(json.dumps(history[-1]), flush=True)
            if s["temporal-residual"] > best["score"]["temporal-residual"]:
                best = {"score": s, "step": done, "state": {k: v.clone() for k, v in net.state_dict().items()}}
    net.eval()
    s = score(net, va)
    history.append({"step": done, **s})
    if s["temporal-residual"] > best["score"]["temporal-residual"]:
        best = {"score": s, "step": done, "state": net.state_dict()}
    sha = save_weights(best["state"], Path(out), InputConvention(BANDS, "L2A"),
                       {"cloudfree:network": json.dumps(cfg)})
    d = tr["meta"]["distinct"]
    return {"sha256": sha, "weights": str(out), "steps": done, "kept_step": best["step"], "batch_size": batch,
            "patch": patch, "lr": lr, "seed": seed, "band_subset": band_subset, "network": cfg, "data_seconds": round(t_data, 1),
            "train_seconds": round(time.perf_counter() - t1, 1), "wall_seconds": round(time.perf_counter() - t_all, 1),
            "train_pairs": int(n), "val_pairs": int(len(va["base"])), "truth_images": len(tr["meta"]["truth_dates"]),
            "truth_pixels": len(tr["meta"]["truth_dates"]) * int(np.prod(tr["base"].shape[-2:])), "image_px": d["image_px"], "cloud_donors": d["cloud_donors"],
            "val": best["score"], "history": history, "data": tr["meta"]["describe"]}


def evaluate_heldout(weights: str | Path, data_dir: str | Path = DATA_DIR, params: dict | None = None
                     ) -> dict[str, Any]:
    """Cloudy-pixel PSNR of ``temporal`` and the registered ``temporal-residual`` (weights ``weights``) on every
    romania-hidden case (the evaluation's cases and scoring; a quick check, ``cloudfree evaluate`` is the report)."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.metrics import psnr
    from cloudfree.pipeline.evaluation.romania import default_search_config, load_stack, romania_hidden_cases
    from cloudfree.pipeline.evaluation.running import with_scene_context
    from cloudfree.pipeline.fileio import file_sha256

    cases = romania_hidden_cases(load_stack(Path(data_dir)), default_search_config())
    models = {"temporal": build_model("temporal"),
              "temporal-residual": build_model("temporal-residual", {"weights": str(weights),
                                                                      "weights_sha256": file_sha256(weights),
                                                                      **(params or {})})}
    res: dict[str, list[float]] = {k: [] for k in models}
    for case in cases:
        tile = case.tile_inputs()
        for k, m in models.items():
            out = m.predict(with_scene_context(m, tile)).reflectance
            res[k].append(psnr(out, case.truth, case.regions["cloudy"]))
    return {k: round(float(np.mean(v)), 2) for k, v in res.items()} | {
        "per_case_gain": [round(a - b, 2) for a, b in zip(res["temporal-residual"], res["temporal"])]}


def validate_registered(variants: dict[str, dict[str, Any]], cache_dir: str | Path = "/tmp/tr-pairs"
                        ) -> dict[str, float]:
    """Mean cloudy PSNR of ``temporal`` and of registered ``temporal-residual`` variants (name -> params, e.g.
    ``{"weights": ..., "refit": False}``) on the VALIDATION pairs (own clear dates and donors, never evaluation
    dates): how the per-scene step and the pretrained body are chosen without looking at the evaluation."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.contract import TileInputs
    from cloudfree.pipeline.evaluation.metrics import psnr
    from cloudfree.pipeline.evaluation.running import with_scene_context
    from cloudfree.pipeline.fileio import file_sha256

    va = cached_pairs("val", cache_dir)
    models = {"temporal": build_model("temporal")}
    for name, p in variants.items():
        p = dict(p)
        if p.get("weights") and "weights_sha256" not in p:
            p["weights_sha256"] = file_sha256(p["weights"])
        models[name] = build_model("temporal-residual", p)
    res: dict[str, list[float]] = {k: [] for k in models}
    for i in range(len(va["base"])):
        ti = int(va["truth_index"][i])
        n = len(va["ref_dt"][ti])
        tile = TileInputs(bands=BANDS, target=va["target"][i], cloud_prob=va["prob"][i], cloud_mask=va["cloud"][i] > 0.5,
                          references=va["refs"][ti], reference_masks=va["ref_masks"][ti] > 0.5,
                          reference_ids=tuple(f"r{j}" for j in range(n)),
                          reference_dt_days=tuple(float(x) for x in va["ref_dt"][ti]), target_id=f"val-{i}")
        for k, m in models.items():
            out = m.predict(with_scene_context(m, tile)).reflectance
            res[k].append(psnr(out, va["truth"][ti], va["region"][i] > 0.5))
    return {k: round(float(np.mean(v)), 3) for k, v in res.items()}


def export(result: dict[str, Any], weights_dir: str | Path | None = None) -> Path:
    """Ship a training run: copy its weights into the weights folder as ``temporal_residual.safetensors`` (atomic),
    record the sha256 in the manifest, and write the model card (what training saw, config, wall time, validation
    scores). Held-out rows against the floors are added by ``python -m cloudfree.pipeline.training.cards --eval``."""
    import shutil

    from cloudfree.models._weights import (WEIGHTS_DIR, InputConvention, ModelCard, update_manifest,
                                           write_model_card)
    from cloudfree.models.temporal_residual import TemporalResidual
    from cloudfree.pipeline.fileio import atomic_target, file_sha256

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    dest = d / TemporalResidual.weights_file
    src = Path(result["weights"])
    if file_sha256(src) != result["sha256"]:
        raise ValueError(f"{src} changed since training (sha256 differs from the training result)")
    fd, tmp = atomic_target(dest)
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    if d.resolve() == WEIGHTS_DIR.resolve():
        update_manifest([dest], d)
    steps, batch, patch = result["steps"], result["batch_size"], result["patch"]
    seen = {"truth_images": result["truth_images"], "truth_pixels": result["truth_pixels"],
            "image_px": result["image_px"], "cloud_donors": result["cloud_donors"],
            "truth_x_donor_pairs": result["train_pairs"], "samples_drawn": steps * batch,
            "pixel_samples": steps * batch * patch * patch,
            "augmentation": f"8 rotations/flips of the square x {patch} px crops of the 100x100 pairs; "
                            f"{result.get('band_subset') or 'all'} of the 6 bands per step (the network is "
                            "band-agnostic)"}
    config = {"batch_size": batch, "patch": patch, "lr": result["lr"], "schedule": "AdamW, cosine over the time "
              "budget, grad-norm clip 1", "loss": "mean over samples of log MSE on the cloud-mask pixels",
              "seed": result["seed"], "network": result["network"], "n_refs": 4, "band_subset": result.get("band_subset"),
              "kept": f"weights of step {result['kept_step']} (best validation PSNR, checked every few hundred steps)",
              "threads": 1, "device": "cpu"}
    data = {**result["data"], "pairs": f"every (training clear date x training cloud donor): {result['train_pairs']} "
            f"pairs ({result['truth_images']} clear dates with a reference x {result['cloud_donors']} donors); "
            f"validation {result['val_pairs']} pairs of its own dates and donors",
            "references": "chosen by the search stage as at inference (plan_targets + select_references, 4 "
                          "bracketing; held-out and validation dates removed from the candidates)",
            "clouds_radiance": "the donor's real SCL cloud on the clear date by the evaluation's eq. 1 transplant "
                               "(pipeline.evaluation.romania.transplant), as romania-hidden builds its cases"}
    card = ModelCard(model="temporal-residual", weights_file=dest.name, sha256=file_sha256(dest),
                     size_bytes=dest.stat().st_size, convention=InputConvention(BANDS, "L2A"), data=data,
                     config=config, steps=steps, epochs_equivalent=round(steps * batch / result["train_pairs"], 2),
                     wall_seconds=result["wall_seconds"],
                     metrics={"validation cloudy PSNR dB (temporal / raw network, no shrinkage)":
                              f"{result['val']['temporal']} / {result['val']['temporal-residual']}",
                              "train seconds": result["train_seconds"], "data seconds": result["data_seconds"],
                              **({"validation cloudy PSNR dB of the registered model (per-scene step on)":
                                  result["val_shipped"]} if result.get("val_shipped") else {})},
                     seen=seen,
                     notes=["The registered model refits the network's head per scene on pseudo-clouds and shrinks "
                            "the residual by its cross-fitted gain (models/temporal_residual.py); the first "
                            "validation row is the raw network, the last the registered model.",
                            "Trained on ONE 1 km2 forest footprint (Romania): 24 clear dates; elsewhere the per-scene "
                            "shrinkage is what keeps it from falling below its base."])
    write_model_card(card, dest)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="/tmp/temporal_residual.safetensors")
    ap.add_argument("--seconds", type=float, default=1500.0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--cache", default="/tmp/tr-pairs")
    ap.add_argument("--validate-every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--patch", type=int, default=100, help="crop side (100 = the whole pair)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--band-subset", type=int, default=2)
    ap.add_argument("--result", type=Path, help="write the training result JSON here (for the model card)")
    ap.add_argument("--export", type=Path, metavar="RESULT_JSON",
                    help="ship the run of RESULT_JSON into models/weights (weights, manifest, card) and exit")
    ap.add_argument("--validate-model", metavar="WEIGHTS",
                    help="score the registered model with WEIGHTS (and its variants) on the validation pairs and exit")
    args = ap.parse_args(argv)
    if args.validate_model:
        print(json.dumps(validate_registered({"per-scene step (default)": {"weights": args.validate_model},
                                              "raw network": {"weights": args.validate_model, "shrink": False},
                                              "pretrained head, shrunk": {"weights": args.validate_model,
                                                                          "refit": False}}, args.cache)))
        return
    if args.export:
        print(export(json.loads(args.export.read_text())))
        return
    r = train(args.out, seconds=args.seconds, steps=args.steps, cache_dir=args.cache,
              validate_every=args.validate_every, lr=args.lr, patch=args.patch, batch=args.batch,
              band_subset=args.band_subset or None)
    if args.result:
        args.result.write_text(json.dumps(r, indent=1, default=str))
    print(json.dumps({k: v for k, v in r.items() if k not in ("history", "data")}))
    print(json.dumps(evaluate_heldout(args.out)))


if __name__ == "__main__":
    main()
