"""Training and held-out scoring of the EXPERIMENTAL ``temporal-residual`` network
(:mod:`cloudfree.models.temporal_residual`, whose docstring has the measured numbers): ``make
train-temporal-residual`` = ``python -m cloudfree.pipeline.training.temporal_residual [OUT]``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloudfree.models.temporal_residual import BANDS, build_net

def _tile(s: dict[str, np.ndarray]):
    from cloudfree.pipeline.contract import TileInputs

    return TileInputs(bands=BANDS, target=s["target"], cloud_prob=s["cloud_mask"].astype(np.float32),
                      cloud_mask=s["cloud_mask"] > 0.5, references=s["references"],
                      reference_masks=s["ref_masks"] > 0.5,
                      reference_ids=tuple(f"r{i}" for i in range(len(s["ref_dt"]))),
                      reference_dt_days=tuple(float(x) for x in s["ref_dt"]))


def base_of(tile) -> np.ndarray:
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.running import with_scene_context

    m = build_model("temporal")
    return np.nan_to_num(m.predict(with_scene_context(m, tile)).reflectance).astype(np.float32)


def train(n_samples: int = 150, steps: int = 400, seconds: float = 150.0, patch: int = 48, n_refs: int = 4,
          seed: int = 0, out: str | Path = "/tmp/temporal_residual.safetensors") -> dict[str, Any]:
    import torch

    from cloudfree.pipeline.training.datasets import DataConfig, StacPairs

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    src = StacPairs(DataConfig(sar="none"), BANDS, n_refs, patch)
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n_samples):
        s = src.sample(rng, "train")
        s["base"] = base_of(_tile(s))
        data.append(s)
    t_data = time.perf_counter() - t0
    keys = ("base", "references", "ref_masks", "ref_dt", "cloud_mask", "truth")
    arr = {k: torch.from_numpy(np.stack([d[k] for d in data]).astype(np.float32)) for k in keys}
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    done, t1 = 0, time.perf_counter()
    while done < steps and time.perf_counter() - t1 < seconds:
        idx = torch.from_numpy(rng.integers(0, n_samples, 8))
        b = {k: v[idx] for k, v in arr.items()}
        pred = net(b["base"], b["references"], b["ref_masks"], b["ref_dt"], b["cloud_mask"])
        m = b["cloud_mask"][:, None]
        loss = ((pred - b["truth"]).abs() * m).sum() / m.sum().clamp(min=1) / pred.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    from cloudfree.models._weights import InputConvention, save_weights

    sha = save_weights(net.state_dict(), Path(out), InputConvention(BANDS, "L2A"))
    d = src.distinct("train")
    return {"sha256": sha, "steps": done, "batch": 8, "data_seconds": round(t_data, 1),
            "train_seconds": round(time.perf_counter() - t1, 1), "samples": n_samples,
            "distinct_truth_images": d["truth_images"], "distinct_truth_pixels": d["truth_pixels"],
            "donors": d["cloud_donors"], "last_loss": float(loss.detach())}


def evaluate_heldout(weights: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """Cloudy-pixel PSNR of base (temporal) and base + residual on every romania-hidden case."""
    import torch

    from cloudfree.models._weights import InputConvention, read_weights
    from cloudfree.pipeline.evaluation.metrics import psnr
    from cloudfree.pipeline.evaluation.romania import default_search_config, load_stack, romania_hidden_cases

    state, _ = read_weights(weights, None, InputConvention(BANDS, "L2A"))
    net = build_net()
    net.load_state_dict(state)
    cases = romania_hidden_cases(load_stack(Path(data_dir)), default_search_config())
    res = {"temporal": [], "temporal-residual": []}
    for case in cases:
        tile = case.tile_inputs()
        assert tuple(tile.bands) == BANDS, tile.bands
        base = base_of(tile)
        t = min(4, len(tile.references))
        refs = np.zeros((4, *tile.target.shape), np.float32)
        rm = np.ones((4, *tile.cloud_mask.shape), np.float32)
        dts = np.zeros(4, np.float32)
        refs[:t] = np.nan_to_num(tile.references[:t])
        rm[:t] = tile.reference_masks[:t] | ~np.isfinite(tile.references[:t]).all(1)
        dts[:t] = tile.reference_dt_days[:t]
        with torch.no_grad():
            out = net(*(torch.from_numpy(x)[None] for x in (base, refs, rm, dts,
                                                          tile.cloud_mask.astype(np.float32))))[0].numpy()
        res["temporal"].append(psnr(base, case.truth, case.regions["cloudy"]))
        res["temporal-residual"].append(psnr(out, case.truth, case.regions["cloudy"]))
    return {k: round(float(np.mean(v)), 2) for k, v in res.items()} | {
        "per_case_gain": [round(a - b, 2) for a, b in zip(res["temporal-residual"], res["temporal"])]}


if __name__ == "__main__":
    import sys

    r = train(out=sys.argv[1] if len(sys.argv) > 1 else "/tmp/temporal_residual.safetensors")
    print(json.dumps(r))
    print(json.dumps(evaluate_heldout(sys.argv[1] if len(sys.argv) > 1 else "/tmp/temporal_residual.safetensors",
                                      Path(__file__).resolve().parents[2] / ".." / "shared" / "data")))
