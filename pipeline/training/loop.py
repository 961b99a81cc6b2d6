"""The training loop every learned model shares (``cloudfree train MODEL --config train.yaml``).

* **Determinism and resume**: the batch of step ``s`` is drawn from ``numpy.random.default_rng([seed, s])`` and torch's
  generator is reseeded with ``(seed, s)`` before the step, so a batch depends only on ``(seed, step)``. A checkpoint
  (``<out>/checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at the end) holds the network,
  optimiser state, step, stage and elapsed time; ``resume`` continues from it and reaches the same state as an
  uninterrupted run (tested within float tolerance).
* **Stages**: the model's :meth:`~cloudfree.pipeline.training.api.TrainableModel.stages` (e.g. CA-MTCR's SAR-encoder
  Noise2Noise pretraining, then the full network); a fresh optimiser per stage over that stage's parameters.
* **Metrics**: one JSON line per logged step in ``<out>/metrics.jsonl`` (``loss`` and the model's terms, ``lr``,
  ``stage``, ``seconds``) and a ``split: val`` line every ``val_every`` steps (L1, PSNR, PSNR on cloudy pixels over a
  fixed set of validation batches, next to two floors on the same pixels: the cloudy input itself and the cloudy
  pixels filled with the per-band mean of the sample's clear pixels). Lines after the checkpoint's step are dropped
  on resume.
* **Export**: the final weights as safetensors with the input convention in their metadata, and a model card.
* Progress bar (tqdm), ``--device auto`` (CUDA when present), thread count (``threads``) for shared CPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloudfree.models._weights import pick_device
from cloudfree.pipeline.errors import ConfigError
from cloudfree.pipeline.training.datasets import DataConfig, PairSource, build_source, collate

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """A training run. YAML keys mirror the fields; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    out: str = "runs/train"
    seed: int = 0
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0)
    patch: int = Field(64, ge=16)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(100, ge=1)
    val_batches: int = Field(4, ge=1)
    device: str = "auto"
    #: torch intra-op threads (None = torch's default); keep small on shared machines.
    threads: int | None = 1
    #: network hyper-parameters passed to the model's ``build_network`` (widths, depths...).
    network: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    #: copy the final weights (and card) here, e.g. ``models/weights/ca_mtcr.safetensors``.
    export: str | None = None


def load_train_config(path: str | None, **overrides: Any) -> TrainConfig:
    import yaml

    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"training config {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**raw)
    except Exception as exc:  # pydantic ValidationError -> our error with the file name
        raise ConfigError(f"training config {path}: {exc}") from None


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def batch_at(source: PairSource, seed: int, step: int, batch_size: int, split: str = "train"):
    """The batch of ``step``: a pure function of ``(seed, step)``."""
    rng = np.random.default_rng([seed, step])
    return collate([source.sample(rng, split) for _ in range(batch_size)])


def _to(batch: Mapping[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stage_at(stages, step: int) -> tuple[int, int]:
    """``(stage index, step within the stage)`` of global ``step``."""
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, step - start
        start += st.steps
    return len(stages) - 1, stages[-1].steps


def _optimizer(net, stage):
    import torch

    params = list(stage.params(net)) if stage.params is not None else list(net.parameters())
    if params and isinstance(params[0], dict):  # parameter groups, each with an optional "lr_scale"
        groups = [{"params": [p for p in g["params"] if p.requires_grad], "lr_scale": g.get("lr_scale", 1.0)}
                  for g in params]
        return torch.optim.Adam(groups, lr=stage.lr)
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=stage.lr)


def validate(trainable, net, source: PairSource, cfg: TrainConfig, device) -> dict[str, float]:
    """L1, PSNR and cloudy-pixel PSNR of the model's prediction on fixed validation batches."""
    import torch

    net.eval()
    se = ab = n = se_c = n_c = se_in = se_in_c = se_mean_c = 0.0
    with torch.no_grad():
        for i in range(cfg.val_batches):
            b = _to(batch_at(source, cfg.seed, 10**9 + i, cfg.batch_size, "val"), device)
            pred = trainable.predict(net, b).clamp(0, 1)
            err = pred - b["truth"]
            se += float((err ** 2).sum())
            ab += float(err.abs().sum())
            n += err.numel()
            m = b["cloud_mask"][:, None].expand_as(err) > 0.5
            se_c += float((err[m] ** 2).sum())
            n_c += int(m.sum())
            err_in = b["target"] - b["truth"]  # the cloudy input itself, as a floor to compare against
            se_in += float((err_in ** 2).sum())
            se_in_c += float((err_in[m] ** 2).sum())
            # trivial baseline: cloudy pixels filled with the per-band mean of the sample's clear pixels
            clear = (b["cloud_mask"] < 0.5)[:, None].float()
            mean = (b["target"] * clear).sum((2, 3), keepdim=True) / clear.sum((2, 3), keepdim=True).clamp_min(1)
            se_mean_c += float(((mean.expand_as(err) - b["truth"])[m] ** 2).sum())
    net.train()
    mse, mse_c = se / max(n, 1), se_c / max(n_c, 1)
    return {"l1": ab / max(n, 1), "psnr": -10 * math.log10(max(mse, 1e-12)),
            "psnr_cloudy": -10 * math.log10(max(mse_c, 1e-12)) if n_c else float("nan"),
            "input_psnr": -10 * math.log10(max(se_in / max(n, 1), 1e-12)),
            "input_psnr_cloudy": -10 * math.log10(max(se_in_c / max(n_c, 1), 1e-12)) if n_c else float("nan"),
            "clear_mean_fill_psnr_cloudy": -10 * math.log10(max(se_mean_c / max(n_c, 1), 1e-12)) if n_c
            else float("nan")}


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: TrainConfig, trainable=None, source: PairSource | None = None, *, resume: bool = False,
          progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg.model``; returns a summary (final step, last validation metrics, paths, wall seconds).

    ``stop_after`` ends the run after that many optimiser steps of *this call* (with a checkpoint), which is how the
    resume test interrupts a run; ``resume`` continues from ``<out>/checkpoint.pt``.
    """
    import torch
    from tqdm.auto import tqdm

    from cloudfree.models._weights import ModelCard, file_sha256, save_weights, write_model_card

    if trainable is None:
        from cloudfree.pipeline.training import get_trainable

        trainable = get_trainable(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, "cloudfree train")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = build_source(cfg.data, trainable.convention.bands, trainable.n_references, cfg.patch)
    torch.manual_seed(cfg.seed)
    net = trainable.build_network(cfg.network).to(device)
    stages = trainable.stages(cfg.steps, cfg.lr)
    total = sum(s.steps for s in stages)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    step, elapsed, opt, opt_stage = 0, 0.0, None, -1
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["config"] != cfg.model_dump(exclude={"steps", "out", "export"}):
            raise ConfigError(f"{ckpt_path} was written with another config; train into a fresh --out or "
                              "rerun without --resume")
        net.load_state_dict(ck["network"])
        step, elapsed, opt_stage = ck["step"], ck["elapsed"], ck["stage"]
        opt = _optimizer(net, stages[opt_stage])
        opt.load_state_dict(ck["optimizer"])
        _rewrite_metrics(metrics_path, step)
        log.info("resumed %s at step %d/%d", ckpt_path, step, total)
    elif metrics_path.exists():
        metrics_path.unlink()

    def checkpoint() -> None:
        _atomic_torch_save({"network": net.state_dict(), "optimizer": opt.state_dict() if opt else {},
                            "step": step, "stage": opt_stage, "elapsed": elapsed,
                            "config": cfg.model_dump(exclude={"steps", "out", "export"})}, ckpt_path)

    last_val: dict[str, float] = {}
    t_start = time.perf_counter()
    done_here = 0
    bar = tqdm(total=total, initial=step, desc=f"train {trainable.name}", unit="step", disable=not progress or None)
    with open(metrics_path, "a") as mlog:
        while step < total:
            si, in_stage = _stage_at(stages, step)
            st = stages[si]
            if si != opt_stage:
                opt, opt_stage = _optimizer(net, st), si
            for g in opt.param_groups:
                g["lr"] = st.lr_at(in_stage) * g.get("lr_scale", 1.0)
            torch.manual_seed(_step_seed(cfg.seed, step))
            batch = _to(batch_at(source, cfg.seed, step, cfg.batch_size), device)
            loss, terms = trainable.loss(net, batch, st.name)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            done_here += 1
            bar.update(1)
            bar.set_postfix(stage=st.name, loss=f"{float(loss.detach()):.4f}")
            now = elapsed + time.perf_counter() - t_start
            if step % cfg.log_every == 0 or step == total:
                mlog.write(json.dumps({"step": step, "split": "train", "stage": st.name, "loss": float(loss.detach()),
                                       **{k: float(v) for k, v in terms.items()}, "lr": st.lr_at(in_stage),
                                       "seconds": round(now, 2)}) + "\n")
                mlog.flush()
            if step % cfg.val_every == 0 or step == total:
                last_val = validate(trainable, net, source, cfg, device)
                mlog.write(json.dumps({"step": step, "split": "val", **last_val}) + "\n")
                mlog.flush()
            if step % cfg.checkpoint_every == 0 or step == total or (stop_after and done_here >= stop_after):
                elapsed_before, t0 = elapsed, t_start
                elapsed = elapsed_before + time.perf_counter() - t0
                t_start = time.perf_counter()
                checkpoint()
            if stop_after and done_here >= stop_after:
                break
    bar.close()
    summary: dict[str, Any] = {"step": step, "total": total, "val": last_val, "checkpoint": str(ckpt_path),
                               "metrics": str(metrics_path), "wall_seconds": round(elapsed, 1)}
    if step < total:
        return summary
    weights = out / f"{trainable.name.replace('-', '_')}.safetensors"
    sha = save_weights(net.state_dict(), weights, trainable.convention,
                       extra={"cloudfree:network": json.dumps(cfg.network, sort_keys=True),
                              "cloudfree:model": trainable.name})
    per_epoch = max(1, source.n_pairs("train"))
    card = ModelCard(model=trainable.name, weights_file=weights.name, sha256=sha, size_bytes=weights.stat().st_size,
                     convention=trainable.convention, data=source.describe(),
                     config=cfg.model_dump(exclude={"out", "export"}), steps=step,
                     epochs_equivalent=step * cfg.batch_size / per_epoch, wall_seconds=round(elapsed, 1),
                     metrics={k: round(v, 4) for k, v in last_val.items()},
                     notes=list(getattr(trainable, "card_notes", [])), seen=_seen(source, step, cfg))
    write_model_card(card, weights)
    summary.update(weights=str(weights), sha256=sha)
    if cfg.export:
        import shutil

        dst = Path(cfg.export)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, dst)
        card.weights_file = dst.name
        write_model_card(card, dst)
        summary["exported"] = str(dst)
        if file_sha256(dst) != sha:
            raise OSError(f"copy of {weights} to {dst} is corrupt (sha256 differs)")
        from cloudfree.models._weights import WEIGHTS_DIR, update_manifest

        if dst.resolve().parent == WEIGHTS_DIR.resolve():  # shipped weights: their sha256 goes into the manifest
            update_manifest([dst])
            summary["manifest"] = str(WEIGHTS_DIR / "MANIFEST.json")
    return summary


def _seen(source, step: int, cfg) -> dict[str, Any]:
    """Distinct images/pixels the training split holds and how many samples/pixels were drawn from them."""
    seen: dict[str, Any] = {}
    if hasattr(source, "distinct"):
        seen.update(source.distinct("train"))
    else:
        seen.update(truth_images=source.n_pairs("train"), truth_pixels=0, cloud_donors=0)
    seen["samples_drawn"] = step * cfg.batch_size
    seen["pixel_samples"] = step * cfg.batch_size * cfg.patch * cfg.patch
    return seen
