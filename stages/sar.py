"""SAR for the models: one Sentinel-1 scene per optical date on the output grid, co-registered, in the model's units.

For a model whose spec ``needs_sar`` or ``accepts_sar``, :func:`prepare_model_sar` takes the target's chosen S1
scene (``TargetPlan.sar``, from the search stage) and, for multi-temporal models, searches the best S1 scene for each
reference date the same way (:func:`cloudfree.stages.search._sar`, same policy). Each distinct S1 item is co-registered once
to the target's optical band (:func:`cloudfree.stages.coregister.estimate_sar_shift`); an *applied* shift is honoured by
loading the scene on the shifted grid (:func:`cloudfree.stages.coregister.shifted_geobox`, one resampling, as for optical
references). The stack is converted to the model's convention (``spec.sar_units``: ``"db"`` = sigma0 dB clipped to
[-25, 0]; ``"linear"`` = linear power) and stays lazy; each tile's halo-padded window is cut from its chunks by
:class:`cloudfree.stages.remove.HaloWindows`, like the optical inputs.

A reference date without its own S1 repeats the target's scene (the model then sees "no change" there, not a
fake one). No S1 for the target: ``None`` (a model that ``needs_sar`` fails the target; see the runner).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import dask.array as dsa
import numpy as np
import rasterio.errors
import xarray as xr

from cloudfree.pipeline.errors import CloudfreeError, ReadError

log = logging.getLogger(__name__)

DB_RANGE = (-25.0, 0.0)


def linear_to_db_clipped(linear: np.ndarray) -> np.ndarray:
    """Linear power -> sigma0 dB clipped to [-25, 0] (NaN stays NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(np.where(linear > 0, linear, np.nan))
    return np.clip(db, *DB_RANGE).astype(np.float32)


def sar_items_per_date(plan, refs, catalog, cfg) -> list[Any]:
    """One S1 item (or None) per optical date: the target's chosen scene, then each reference's best scene."""
    target_sar = plan.sar[0].item if plan.sar else None
    out = [target_sar]
    for ref in refs:
        item = None
        if target_sar is not None and catalog is not None and cfg.catalog.sar_collection:
            from cloudfree.stages.search import _sar

            try:
                cands = _sar(catalog, ref, cfg.catalog.sar_collection, cfg.search.policy)
            except CloudfreeError as exc:
                log.warning("S1 search for reference %s failed: %s", ref.id, exc)
                cands = ()
            item = cands[0].item if cands else None
        out.append(item)
    return out


def prepare_model_sar(sar_items: Sequence[Any], target_band: xr.DataArray, target_mask: xr.DataArray, geobox,
                      cfg, units: str = "db") -> tuple[xr.DataArray | None, list]:
    """Lazy ``(time, pol, y, x)`` SAR on the output grid, one scene per optical date (target first), co-registered
    and in ``units``; plus the co-registration records. ``(None, [])`` when the target has no S1."""
    from cloudfree.stages.coregister import Coregistration, estimate_sar_shift, shifted_geobox
    from cloudfree.stages.load import load_sar

    if not sar_items or sar_items[0] is None:
        return None, []
    chunk = cfg.grid.chunk
    loaded: dict[str, xr.DataArray] = {}
    records = []
    for item in sar_items:
        if item is None or item.id in loaded:
            continue
        try:
            raw = load_sar([item], geobox, chunk=chunk)
        except (ReadError, CloudfreeError) as exc:
            if item is sar_items[0]:
                raise
            log.warning("S1 %s could not be loaded (%s); its date repeats the target's SAR", item.id, exc)
            continue
        pol = "vv" if "vv" in raw.band.values else str(raw.band.values[0])
        rec = None
        if cfg.coregister.enabled:
            try:
                rec = estimate_sar_shift(target_band, target_mask, raw.sel(band=pol)[0], item.id, cfg.coregister)
            except (ReadError, CloudfreeError) as exc:
                rec = Coregistration(item.id, "sar", "failed", reason=str(exc))
            except (rasterio.errors.RasterioError, OSError) as exc:  # e.g. a truncated file that passed the probe
                if item is sar_items[0]:  # the target's scene (or the optical window read with it): fail the target
                    raise
                log.warning("S1 %s failed mid-read (%s); its date repeats the target's SAR", item.id, exc)
                records.append(Coregistration(item.id, "sar", "failed", reason=f"read failed: {exc}"))
                continue
            records.append(rec)
        if rec is not None and rec.applied:
            raw = load_sar([item], shifted_geobox(geobox, rec.shift_px), chunk=chunk)
            raw = raw.assign_coords(y=target_band.y.values, x=target_band.x.values)
        loaded[item.id] = raw.isel(time=0)
    first = loaded[sar_items[0].id]
    pols = [str(p) for p in first.band.values]
    planes, ids = [], []
    for item in sar_items:
        da = loaded.get(item.id if item is not None else "", first)
        if [str(p) for p in da.band.values] != pols:
            da = first
        planes.append(da.data)
        # the id says whose pixels the plane holds: a date without its own (loadable, same-polarisation) scene
        # carries the target's
        ids.append(item.id if da is not first or item is sar_items[0] else f"{sar_items[0].id} (repeated)")
    data = dsa.stack(planes)
    if units == "db":
        data = dsa.map_blocks(linear_to_db_clipped, data, dtype=np.float32)
    out = xr.DataArray(data, dims=("time", "band", "y", "x"),
                       coords={"band": pols, "y": target_band.y.values, "x": target_band.x.values,
                               "id": ("time", ids)}, name="sar")
    out.attrs["units"] = units
    return out, records


def model_sar(plan, refs, catalog, target, target_mask, geobox, cfg, model):
    """SAR for a model that needs or accepts it (:mod:`cloudfree.stages.sar`): one scene per optical date on the output
    grid, co-registered, in the model's units. A model that *needs* SAR and gets none (or whose target S1 cannot
    be read) fails the target; a model that only accepts it runs without SAR when the target's S1 cannot be read."""
    from cloudfree.pipeline.errors import InputDataError, ModelError
    items = sar_items_per_date(plan, refs, catalog, cfg)
    band = cfg.coregister.band if cfg.coregister.band in target.band.values else str(target.band.values[-1])
    try:
        sar, records = prepare_model_sar(items, target.sel(band=band), target_mask, geobox, cfg, model.spec.sar_units)
    except (ReadError, InputDataError, rasterio.errors.RasterioError, OSError) as exc:
        if model.spec.needs_sar:
            raise
        # the model only accepts SAR: a broken S1 file costs the SAR, not the target
        from cloudfree.stages.coregister import Coregistration

        log.warning("%s: Sentinel-1 %s could not be read (%s); model %s runs without SAR", plan.target.id,
                    items[0].id, exc, model.name)
        return None, [Coregistration(items[0].id, "sar", "failed", reason=f"read failed: {exc}")]
    if sar is None and model.spec.needs_sar:
        why = ("no catalog.sar_collection is configured" if not cfg.catalog.sar_collection else
               f"no scene of {cfg.catalog.sar_collection} within {cfg.search.policy.sar_max_days} days covers it")
        raise ModelError(f"model {model.name} needs Sentinel-1 but target {plan.target.id} has none: {why}; set "
                         "catalog.sar_collection / widen search.policy.sar_max_days, or pick a model that runs "
                         "without SAR")
    if sar is None:
        log.info("%s: no Sentinel-1; model %s runs without SAR", plan.target.id, model.name)
    return sar, records


def sar_coregistration_record(plan, target, target_mask, geobox, cfg):
    """Estimate and record (not apply) the S1 -> S2 shift for a model that neither needs nor accepts SAR (those get
    theirs through :func:`model_sar`). The scene is only recorded here, so a read that fails (a truncated file
    that passed the probe) is recorded as a failed co-registration, not a failed target."""
    from cloudfree.stages.coregister import Coregistration, estimate_sar_shift
    from cloudfree.stages.load import load_sar

    sar_item = plan.sar[0].item
    band = cfg.coregister.band if cfg.coregister.band in target.band.values else str(target.band.values[-1])
    try:
        sar = load_sar([sar_item], geobox, chunk=cfg.grid.chunk)
        pol = "vv" if "vv" in sar.band.values else str(sar.band.values[0])
        return estimate_sar_shift(target.sel(band=band), target_mask, sar.sel(band=pol)[0], sar_item.id,
                                  cfg.coregister)
    except (ReadError, CloudfreeError, rasterio.errors.RasterioError, OSError) as exc:
        log.warning("%s: SAR co-registration with %s failed: %s", plan.target.id, sar_item.id, exc)
        return Coregistration(sar_item.id, "sar", "failed", reason=str(exc))
