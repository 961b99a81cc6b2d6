"""Running models on evaluation cases and scoring them (no I/O): tiled prediction with the model's halo, scene
context as the runner computes it, one row per (case, model, region), summaries.

Models are named by registry name, optionally with parameters: ``"phyvlm-cr[prior=reference]"`` builds
``phyvlm-cr`` with ``{"prior": "reference"}`` (values parsed as YAML scalars), so any registered model and any
variant can be evaluated without code changes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from cloudfree.pipeline.contract import TileInputs, TileResult
from cloudfree.pipeline.errors import CloudfreeError, ConfigError
from cloudfree.pipeline.evaluation.cases import EvalCase
from cloudfree.pipeline.evaluation.metrics import METRICS, REGIONS, all_metrics

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name[key=value,key.sub=value]"`` -> ``(name, params)`` (dotted keys nest)."""
    import yaml

    spec = spec.strip()
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigError(f"model spec {spec!r}: use name[key=value,...]")
    name, _, body = spec[:-1].partition("[")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise ConfigError(f"model spec {spec!r}: {part!r} is not key=value")
        node = params
        *parents, leaf = key.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(val)
    return name.strip(), params


def build_spec(spec: str) -> Any:
    from cloudfree.models.registry import build_model

    name, params = parse_model_spec(spec)
    return build_model(name, params)


def predict_tiled(model: Any, tile: TileInputs, tile_size: int | None = None) -> TileResult:
    """``model.predict`` on the whole image, or on ``tile_size`` tiles padded by the model's halo (cores pasted)."""
    ny, nx = tile.shape
    if tile_size is None or (tile_size >= ny and tile_size >= nx):
        return model.predict(tile)
    halo = int(model.spec.halo)
    out = np.full(tile.target.shape, np.nan, np.float32)
    conf = np.zeros((ny, nx), np.float32)
    src = np.zeros((ny, nx), np.uint8)
    diags: dict[str, np.ndarray] = {}
    for y0 in range(0, ny, tile_size):
        for x0 in range(0, nx, tile_size):
            y1, x1 = min(y0 + tile_size, ny), min(x0 + tile_size, nx)
            ry, rx = slice(max(0, y0 - halo), min(ny, y1 + halo)), slice(max(0, x0 - halo), min(nx, x1 + halo))
            sub = TileInputs(
                bands=tile.bands, target=tile.target[:, ry, rx], cloud_prob=tile.cloud_prob[ry, rx],
                cloud_mask=tile.cloud_mask[ry, rx], references=tile.references[:, :, ry, rx],
                reference_masks=tile.reference_masks[:, ry, rx], reference_ids=tile.reference_ids,
                reference_dt_days=tile.reference_dt_days, halo=halo, target_id=f"{tile.target_id}@{y0},{x0}",
                context=tile.context, origin=(tile.origin[0] + ry.start, tile.origin[1] + rx.start),
                sar=None if tile.sar is None else tile.sar[..., ry, rx], sar_bands=tile.sar_bands,
            )
            res = model.predict(sub)
            cy, cx = slice(y0 - ry.start, y1 - ry.start), slice(x0 - rx.start, x1 - rx.start)
            out[:, y0:y1, x0:x1] = res.reflectance[:, cy, cx]
            conf[y0:y1, x0:x1] = res.confidence[cy, cx]
            src[y0:y1, x0:x1] = res.source[cy, cx]
            for k, v in res.diagnostics.items():
                d = diags.setdefault(k, np.full(v.shape[:-2] + (ny, nx), np.nan, np.float32))
                d[..., y0:y1, x0:x1] = v[..., cy, cx]
    return TileResult(out, conf, src, diags)


def with_scene_context(model: Any, tile: TileInputs) -> TileInputs:
    """``tile`` carrying ``model.fit_scene(tile)`` as context when the model asks for one (``spec.scene_context``),
    as :func:`cloudfree.pipeline.runner.scene_context` does with a coarse whole-scene sample."""
    if not getattr(model.spec, "scene_context", False):
        return tile
    return dataclasses.replace(tile, context=model.fit_scene(tile))


def describe_prior(model: Any) -> str | None:
    """Which prior a model uses (PhyVLM-CR and any model with a ``prior`` attribute), for the report; None if
    the model has no prior."""
    prior = getattr(model, "prior", None)
    if prior is None:
        return None
    name = getattr(prior, "name", type(prior).__name__)
    if name == "temporal":
        p = prior.params
        return (f"temporal (per-pixel interpolation in time of the clear references, {p.method} fit, "
                f"{'global + local (r=' + str(p.local_radius) + ') ' if p.align and p.local_radius else ''}"
                f"{'alignment' if p.align else 'no alignment'})")
    if name == "reference":
        return f"reference (aligned reference composite, {prior.combine}; dark-channel dehaze where none is clear)"
    if name == "model":
        return f"model (output of the registered model {prior.model_name!r})"
    return str(name)


def run_models(case: EvalCase, model_names: Sequence[str], model_params: Mapping[str, dict] | None = None,
               tile_size: int | None = None,
               priors: dict[str, str] | None = None, missed_cloud: bool = True,
               ) -> dict[str, tuple[TileResult, float]]:
    """Run each model on ``case``; returns ``{name: (result, seconds)}``; ``priors`` collects
    :func:`describe_prior` per model name. A model that needs what the case lacks (Sentinel-1, a reference) or
    raises a :class:`~cloudfree.pipeline.errors.CloudfreeError` is left out of that case (logged), so the evaluation stays
    generic over the registry (models added later, e.g. SAR fusion, are scored where they can run)."""
    from cloudfree.models.registry import build_model

    tile = case.tile_inputs()
    if missed_cloud and tile.references.shape[0]:
        # as `cloudfree run` does (mask.missed_cloud, on by default): cloud and shadow the case's mask missed are
        # added by the multi-temporal test before any model sees the tile
        from cloudfree.stages.missed_cloud import apply_to_tile

        tile = apply_to_tile(tile)[0]
    out = {}
    for name in model_names:
        base, params = parse_model_spec(name)
        params = {**params, **dict((model_params or {}).get(name, {}))}
        model = build_model(base, params)
        if priors is not None and describe_prior(model):
            priors[name] = describe_prior(model)
        if getattr(model.spec, "needs_sar", False) and tile.sar is None:
            log.warning("%s: %s needs Sentinel-1 and the case has none; not scored", case.name, name)
            continue
        if getattr(model.spec, "needs_reference", False) and tile.references.shape[0] == 0:
            log.warning("%s: %s needs a reference and the case has none; not scored", case.name, name)
            continue
        t0 = time.perf_counter()
        try:
            res = predict_tiled(model, with_scene_context(model, tile), tile_size)
        except CloudfreeError as exc:  # one model failing on one case never stops the evaluation
            log.warning("%s: %s failed: %s", case.name, name, exc)
            continue
        out[name] = (res, time.perf_counter() - t0)
    return out


def score(case: EvalCase, pred: np.ndarray, data_range: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    for region in REGIONS:
        m = case.regions.get(region)
        if m is None or not m.any():
            continue
        row = {"region": region, "n_pixels": int(m.sum()),
               "valid_fraction": float(np.isfinite(pred).all(axis=0)[m].mean())}
        row.update(all_metrics(pred, case.truth, m, data_range))
        rows.append(row)
    return rows


def evaluate_models(
    cases: Sequence[EvalCase],
    model_names: Sequence[str],
    model_params: Mapping[str, dict] | None = None,
    *,
    tile_size: int | None = None,
    data_range: float = 1.0,
    outputs: dict[str, dict[str, TileResult]] | None = None,
    priors: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Score every model on every case. Returns one row per (case, model, region) with the four metrics, the
    pixel count and the run time; ``outputs`` (if given) collects ``{case: {model: TileResult}}`` for figures."""
    rows: list[dict[str, Any]] = []
    for case in cases:
        results = run_models(case, model_names, model_params, tile_size, priors)
        if outputs is not None:
            outputs[case.name] = {k: v[0] for k, v in results.items()}
        for name, (res, secs) in results.items():
            for r in score(case, res.reflectance, data_range):
                row = {"case": case.name, "group": case.group, "model": name, "seconds": secs, **r}
                if "gap_days" in case.meta:
                    row["gap_days"] = case.meta["gap_days"]
                rows.append(row)
        log.info("evaluated %s (%d models)", case.name, len(model_names))
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric over cases per (group, model, region); PSNR averaged in dB."""
    keys: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        keys.setdefault((r["group"], r["model"], r["region"]), []).append(r)
    out = []
    for (group, model, region), rs in keys.items():
        row: dict[str, Any] = {"group": group, "model": model, "region": region, "n_cases": len(rs)}
        for m in METRICS:
            vals = [float(r[m]) for r in rs if np.isfinite(r[m])]
            row[m] = float(np.mean(vals)) if vals else float("nan")
        # metrics skip non-finite predictions: the share of the region a model actually filled travels with them
        row["valid_fraction"] = float(np.mean([float(r.get("valid_fraction", 1.0)) for r in rs]))
        out.append(row)
    return out
