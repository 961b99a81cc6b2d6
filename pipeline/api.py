"""The Python API: ``cloudfree.search``, ``cloudfree.remove`` and ``cloudfree.run`` (docs/api.md).

``remove`` works on xarray objects as users of odc-stac and stackstac hold them: an ``odc.stac.load`` Dataset (one
variable per band, ``(time, y, x)``) or a stackstac DataArray ``(time, band, y, x)``, with Sentinel-2 band names
(``B04``) or STAC common names (``red``, ``nir``, ``scl``), in any chunking. It builds the same lazy graph as the
runner (:func:`cloudfree.stages.remove.remove_clouds`: halo-padded tiles, blending, the ``unrestored`` marking)
and returns it unevaluated, so ``.compute()``, ``.to_zarr`` or ``odc.geo``'s ``.odc.write_cog`` run it on whatever
dask scheduler is active. Its only eager step is the coarse scene sample a model with scene statistics fits
(``model.fit_scene``, as the runner does; a whole-scene read only for scenes up to 1024 px a side).

What the runner does that ``remove`` leaves to the caller: the catalog search and the choice of references
(``search``), the per-item radiometric harmonisation (integer DN are scaled by ``scale``/``offset``: 1e-4 and 0 by
default, add ``offset=-0.1`` for processing baseline >= 04.00 DN that still carry the +1000 shift), the sub-pixel
co-registration of references, the read-failure bookkeeping, and writing COGs and STAC items (``run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: STAC common names (Earth Search v1, stactools) and lower-case aux keys -> the pipeline's band names.
_ALIASES: dict[str, str] = {}


def _aliases() -> dict[str, str]:
    if not _ALIASES:
        from cloudfree.catalogs.bands import AUX_KEYS, S2_COMMON_NAMES

        _ALIASES.update({common: band for band, common in S2_COMMON_NAMES.items()})
        _ALIASES.update({k: name for name, keys in AUX_KEYS.items() for k in keys})
        _ALIASES.update({"MSK_CLDPRB": "CLD", "CLDPRB": "CLD"})
    return _ALIASES


def band_name(name: str) -> str:
    """``B04`` for ``B04``, ``red`` or ``red-jp2``-style keys of one band; aux layers to ``SCL`` / ``CLD``."""
    from cloudfree.catalogs.bands import S2_COMMON_NAMES

    n = str(name)
    if n in S2_COMMON_NAMES or n in ("SCL", "CLD"):
        return n
    return _aliases().get(n, _aliases().get(n.split("-")[0], n))


def _as_stack(obj, what: str):
    """``(time, band, y, x)`` DataArray with pipeline band names from an odc-stac Dataset or a stackstac
    DataArray (a missing ``time`` dim is added); keeps the original names in ``original_band``."""
    import xarray as xr

    from cloudfree.pipeline.errors import ContractError

    if isinstance(obj, xr.Dataset):
        names = [str(v) for v in obj.data_vars]
        if not names:
            raise ContractError(f"{what}: the Dataset has no variables; load some bands (odc.stac.load(bands=...))")
        refl = [v for v in names if band_name(v) not in ("SCL", "CLD")] or names
        first = obj[refl[0]]
        da = xr.concat([obj[v] for v in names], dim="band", coords="minimal", compat="override",
                       join="override").assign_coords(band=names)
        # the bands' own dtype and nodata (concat with a float aux layer would promote integer DN to float)
        da.attrs = {"integer_dn": all(np.issubdtype(obj[v].dtype, np.integer) for v in refl),
                    "nodata": first.attrs.get("nodata")}
    elif isinstance(obj, xr.DataArray):
        if "band" not in obj.dims:
            raise ContractError(f"{what}: a DataArray needs a 'band' dim (as stackstac returns); got {obj.dims}")
        da = obj
    else:
        raise ContractError(f"{what}: expected an xarray Dataset (odc.stac.load) or DataArray (stackstac.stack), "
                            f"got {type(obj).__name__}")
    if "time" not in da.dims:
        da = da.expand_dims("time")
    extra = [d for d in da.dims if d not in ("time", "band", "y", "x")]
    if extra:
        raise ContractError(f"{what}: unexpected dims {extra}; select them away (e.g. .isel({extra[0]}=0))")
    da = da.transpose("time", "band", "y", "x")
    original = [str(b) for b in da.band.values]
    names = [band_name(b) for b in original]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ContractError(f"{what}: bands {original} name {dup} twice; load each band once")
    return da.assign_coords(band=names, original_band=("band", original))


def _reflectance(da, scale: float | None, offset: float):
    """float32 reflectance, NaN nodata: integer DN (odc-stac) are ``DN * scale + offset`` with DN 0 (or the
    array's ``nodata`` attribute) as nodata; floats (stackstac, already rescaled) are taken as reflectance unless
    ``scale`` is given."""
    import dask.array as dsa

    data = da.data if isinstance(da.data, dsa.Array) else dsa.from_array(np.asarray(da.data))
    integer = da.attrs.get("integer_dn", np.issubdtype(da.dtype, np.integer))
    if scale is None and not integer:
        out = data.astype(np.float32)
    else:
        nodata = da.attrs.get("nodata")
        nodata = (0 if integer else None) if nodata is None else nodata
        s, o = np.float32(1e-4 if scale is None else scale), np.float32(offset)
        # the runner's formula (cloudfree.stages.load._to_reflectance): float32 DN * scale + offset
        out = data.map_blocks(_scale_block, s, o, None if nodata is None else float(nodata), dtype=np.float32)
    return da.copy(data=out).astype(np.float32)


def _scale_block(dn: np.ndarray, scale, offset, nodata) -> np.ndarray:
    b = dn.astype(np.float32)
    v = b * scale + offset
    return v if nodata is None else np.where(b != np.float32(nodata), v, np.float32(np.nan))


def _days(t, t0) -> float:
    return float((np.datetime64(t, "ns") - np.datetime64(t0, "ns")) / np.timedelta64(1, "D"))


def _layer(stack, name: str):
    """One aux layer (``SCL``/``CLD``) of a ``(time, band, y, x)`` stack as ``(time, y, x)``."""
    return stack.sel(band=name).drop_vars(["band", "original_band"])


def _mask_from(layer, kind: str, cfg):
    """``(mask, prob, opened)`` of a layer; ``opened`` (flagged pixels the mask refinement's opening removed) is
    None for SCL (no opening)."""
    from cloudfree.stages.masks import cldprb_mask, scl_mask

    if kind == "scl":
        return (*scl_mask(layer, cfg), None)
    return cldprb_mask(layer.astype(np.float32), cfg, with_opened=True)


def remove(target, references=None, mask: Any = "scl", model: Any = None, sar=None, *,
           params: dict | None = None, reference_masks=None, scale: float | None = None, offset: float = 0.0,
           tile_size: int = 512, halo: int | None = None, blend: str = "feather", mask_config: Any = None,
           target_id: str = "target"):
    """Cloud-free reflectance, confidence and per-pixel source of ``target``, lazily.

    Args:
        target: one acquisition: an ``odc.stac.load`` Dataset or a stackstac DataArray (a ``time`` dim of length 1
            or none). Band names ``B02``.. or STAC common names (``blue``, ``red``, ``nir``...).
        references: clear(ish) acquisitions of the same grid, ``(time, ...)``, best first; None for a model that
            needs none.
        mask: the target's cloud mask: ``"scl"`` (from an ``SCL``/``scl`` band, Sen2Cor classes 3, 8, 9, 10),
            ``"cldprb"`` (from a ``CLD``/``MSK_CLDPRB`` band, percent), or a boolean ``(y, x)`` DataArray.
            With ``"scl"``/``"cldprb"`` the references are masked the same way.
        model: a registered model name (``cloudfree models``; default: the config default, ``model.name``) or a
            built model object; ``params`` its parameters.
        sar: optional Sentinel-1 ``(time, band, y, x)`` on the same grid, one per optical date (target first),
            in the model's units (``ModelSpec.sar_units``).
        reference_masks: boolean ``(time, y, x)`` masks of the references (default: from ``mask``'s layer).
        scale, offset: DN -> reflectance of integer inputs (default 1e-4 and 0); float inputs are taken as
            reflectance unless ``scale`` is given.
        tile_size, halo, blend: the tile plan (halo default: the model's receptive field) and how overlapping
            tiles are merged.

    Returns:
        ``xarray.Dataset`` with ``reflectance (band, y, x)`` float32 (the input's band names), ``confidence (y, x)``
        float32 0-1 and ``source (y, x)`` uint8 (codes in ``attrs["source_codes"]``), on the target's grid and
        CRS, backed by dask and not computed.
    """
    import xarray as xr

    from cloudfree.pipeline.config import MaskConfig, ModelConfig
    from cloudfree.pipeline.contract import SOURCE_LABELS, SOURCE_REFERENCE_BASE
    from cloudfree.pipeline.errors import ContractError
    from cloudfree.stages.remove import SceneInputs, remove_clouds
    from cloudfree.stages.tile import plan_tiles

    if model is None or isinstance(model, str):
        from cloudfree.models.registry import build_model

        model = build_model(model or ModelConfig().name, params or {})
    mcfg = mask_config if mask_config is not None else MaskConfig()
    tgt = _as_stack(target, "target")
    if tgt.sizes["time"] != 1:
        raise ContractError(f"target has {tgt.sizes['time']} time steps; pass one acquisition "
                            "(e.g. ds.isel(time=[i])) and the others as references")
    refs = _as_stack(references, "references") if references is not None else None
    aux = {"SCL", "CLD"}
    bands = [b for b in tgt.band.values if b not in aux]
    missing = [b for b in model.spec.bands if b not in bands]
    if missing:
        raise ContractError(f"model {model.name} needs bands {missing}; the target has {bands}: load them too")
    if refs is not None:
        lacking = [b for b in bands if b not in refs.band.values]
        if lacking:
            raise ContractError(f"references lack bands {lacking} the target has; load the same bands for both")
        if refs.sizes["y"] != tgt.sizes["y"] or refs.sizes["x"] != tgt.sizes["x"]:
            raise ContractError(f"references are {refs.sizes['y']}x{refs.sizes['x']} px, the target "
                                f"{tgt.sizes['y']}x{tgt.sizes['x']}: load both on one grid (odc.stac.load(like=...) "
                                "or one odc.stac.load of all items)")
    target_refl = _reflectance(tgt.sel(band=bands), scale, offset)[0]
    ref_refl = _reflectance(refs.sel(band=bands), scale, offset) if refs is not None else None

    if isinstance(mask, str):
        kind = {"scl": "SCL", "cldprb": "CLD"}.get(mask)
        if kind is None:
            raise ContractError(f"mask {mask!r} is unknown; use 'scl', 'cldprb' or a boolean (y, x) DataArray")
        if kind not in tgt.band.values:
            raise ContractError(f"mask={mask!r} needs the {kind} layer in the target (load the 'scl' / "
                                f"'{'SCL' if kind == 'SCL' else 'MSK_CLDPRB'}' asset too) or pass mask= as a "
                                "boolean (y, x) DataArray")
        cloud_mask, cloud_prob, opened = (None if a is None else a[0]
                                          for a in _mask_from(_layer(tgt, kind), mask, mcfg))
        if refs is not None and reference_masks is None:
            if kind not in refs.band.values:
                raise ContractError(f"mask={mask!r}: the references have no {kind} layer; load it or pass "
                                    "reference_masks=")
            rm, _, ropened = _mask_from(_layer(refs, kind), mask, mcfg)
            reference_masks = rm if ropened is None else rm | ropened  # opened specks are not clear observations
    elif isinstance(mask, xr.DataArray):
        cloud_mask = mask.squeeze(drop=True).astype(bool)
        cloud_prob = cloud_mask.astype(np.float32)
        opened = None
    else:
        raise ContractError(f"mask must be 'scl', 'cldprb' or a boolean (y, x) DataArray, got {type(mask).__name__}")
    ref_masks = None
    if ref_refl is not None:
        rm = reference_masks if reference_masks is not None else xr.zeros_like(ref_refl.isel(band=0), dtype=bool)
        ref_masks = rm.astype(bool) | ref_refl.isnull().any("band")  # as the runner: cloud or nodata
    t0 = tgt.time.values[0]
    ref_times = refs.time.values if refs is not None else []
    ref_ids = tuple(str(v) for v in (refs.id.values if refs is not None and "id" in refs.coords else
                                     [np.datetime_as_string(t, "D") for t in ref_times]))
    inputs = SceneInputs(
        target=target_refl, cloud_mask=cloud_mask, cloud_prob=cloud_prob, references=ref_refl,
        reference_masks=ref_masks, reference_ids=ref_ids,
        reference_dt_days=tuple(_days(t, t0) for t in ref_times), target_id=target_id,
        sar=_as_stack(sar, "sar") if sar is not None else None,
    )
    context = {}
    if model.spec.scene_context:  # from the masks as given (the sample gets its own missed-cloud test)
        context = _scene_context(model, inputs, mcfg.missed_cloud)
    if ref_refl is not None and mcfg.missed_cloud:  # cloud and shadow the mask missed, as the runner (lazy)
        from dataclasses import replace

        from cloudfree.stages.missed_cloud import add_missed_cloud

        cloud_mask, cloud_prob, ref_masks, _ = add_missed_cloud(target_refl, cloud_mask, cloud_prob, ref_refl,
                                                                ref_masks)
        inputs = replace(inputs, cloud_mask=cloud_mask, cloud_prob=cloud_prob, reference_masks=ref_masks)
    h = model.spec.halo if halo is None else halo
    tiles = plan_tiles((tgt.sizes["y"], tgt.sizes["x"]), tile_size, h)
    from cloudfree.stages.masks import mark_opened
    from cloudfree.stages.remove import mark_unfilled

    ds = remove_clouds(inputs, model, tiles, h, context, blend=blend)
    if opened is not None:  # flagged specks the mask refinement's opening removed: never "clear" (source 6)
        ds = mark_opened(ds, opened, cloud_prob)
    ds = mark_unfilled(ds, cloud_mask)
    ds = ds.assign(source=ds.source.astype(np.uint8))
    ds = ds.assign_coords(band=[str(b) for b in tgt.sel(band=bands).original_band.values])
    if "spatial_ref" in tgt.coords:
        ds = ds.assign_coords(spatial_ref=tgt.spatial_ref)
    codes = dict(SOURCE_LABELS)
    codes.update({SOURCE_REFERENCE_BASE + i: f"reference {r}" for i, r in enumerate(ref_ids)})
    ds.attrs.update(model=model.name, source_codes={str(k): v for k, v in sorted(codes.items())},
                    time=str(np.datetime_as_string(t0, "s")))
    return ds


#: longest side (pixels) of the coarse sample ``fit_scene`` gets (the runner's ``SCENE_SAMPLE_MAX``).
def _scene_context(model, inputs, missed_cloud: bool = True) -> dict:
    """``model.fit_scene`` on the scene decimated to at most 1024 px a side (the runner reads COG overviews for
    that; here every k-th pixel, which for scenes up to 1024 px is the whole scene, as in the runner)."""
    from dataclasses import replace

    from cloudfree.pipeline.runner import SCENE_SAMPLE_MAX
    from cloudfree.stages.remove import to_tile_inputs

    ny, nx = inputs.target.shape[-2:]
    k = max(1, int(np.ceil(max(ny, nx) / SCENE_SAMPLE_MAX)))
    if k > 1:
        sub = {"y": slice(None, None, k), "x": slice(None, None, k)}
        inputs = replace(inputs, target=inputs.target.isel(sub), cloud_mask=inputs.cloud_mask.isel(sub),
                         cloud_prob=inputs.cloud_prob.isel(sub),
                         references=None if inputs.references is None else inputs.references.isel(sub),
                         reference_masks=None if inputs.reference_masks is None else inputs.reference_masks.isel(sub))
    sample = to_tile_inputs(inputs)
    if missed_cloud and inputs.references is not None:  # as the runner: fits never see cloud the mask missed
        from cloudfree.stages.missed_cloud import apply_to_tile

        sample = apply_to_tile(sample)[0]
    return model.fit_scene(sample)


def _config(config: Any = None, **sections):
    from cloudfree.pipeline.config import Config, load_config, parse_config

    if config is None or isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = parse_config(config, source="config dict")
    else:
        raise TypeError(f"config must be a YAML path, a dict or a cloudfree Config, got {type(config).__name__}")
    sections = {k: _section(k, v) for k, v in sections.items() if v}
    return cfg.replace(**sections) if sections else cfg


#: the one-value shorthand of a section: ``run(catalog="data/demo/catalog.json", output="out", model="temporal")``
_SHORTHAND = {"output": lambda v: {"dir": str(v)}, "model": lambda v: {"name": str(v)},
              "catalog": lambda v: catalog_section(str(v))}


def _section(name: str, value: Any) -> dict:
    """A section override as a dict; a plain value is the section's main key (:data:`_SHORTHAND`)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, Path)) and name in _SHORTHAND:
        return _SHORTHAND[name](value)
    raise TypeError(f"section override {name}= must be a dict of that config section's keys (e.g. "
                    f"output={{'dir': 'out'}}); a plain value is accepted only for {', '.join(sorted(_SHORTHAND))}, "
                    f"got {type(value).__name__}")


_KINDS = ("local", "stac-api", "planetary-computer", "earth-search", "sentinel-hub")


def catalog_section(catalog: str | None = None, collection: str | None = None) -> dict:
    """``catalog`` as the config's ``catalog`` keys: a backend name (``planetary-computer``, ``earth-search``,
    ``sentinel-hub``), an API URL (``stac-api``) or a static catalog / stac-geoparquet path (``local``)."""
    out: dict = {}
    if catalog:
        if catalog in _KINDS:
            out["kind"] = catalog
        elif "://" in catalog:
            out.update(kind="stac-api", url=catalog)
        else:
            out.update(kind="local", url=str(catalog))
    if collection:
        out["collection"] = collection
    return out


def search_section(bbox: Sequence[float] | None = None, aoi: str | Path | None = None, period: str | None = None,
                   targets: Sequence[str] | None = None) -> dict:
    """The config's ``search`` keys from ``--bbox/--aoi/--period`` (a bbox wins over an AOI file)."""
    out: dict = {}
    if bbox is not None:
        out["aoi"] = [float(v) for v in bbox]
    elif aoi is not None:
        out["aoi"] = str(aoi)
    if period:
        out["period"] = period
    if targets:
        out["targets"] = list(targets)
    return out


def search(catalog: str | None = None, collection: str | None = None, *, bbox: Sequence[float] | None = None,
           aoi: str | Path | None = None, period: str | None = None, targets: Sequence[str] | None = None,
           config: Any = None, sar_collection: str | None = None):
    """Cloudy targets with their ranked clear references (and Sentinel-1), like ``cloudfree search``.

    ``catalog``: a backend name, a STAC API URL or a static catalog path (default: the config's); ``bbox``
    ``[minx, miny, maxx, maxy]`` in degrees or ``aoi`` a GeoJSON file; ``period`` ``2024-06`` or
    ``2024-06-01/2024-08-31``. Returns ``TargetPlan`` objects: ``.target`` (a pystac Item), ``.references``
    (candidates best first, each ``.item``, ``.score``, ``.offset_days``) and ``.sar``; pass
    ``[p.target, *(c.item for c in p.references)]`` to ``odc.stac.load`` and the result to :func:`remove`.
    """
    from cloudfree.catalogs.base import open_catalog
    from cloudfree.stages.search import plan_targets

    cat = catalog_section(catalog, collection)
    if sar_collection:
        cat["sar_collection"] = sar_collection
    cfg = _config(config, catalog=cat, search=search_section(bbox, aoi, period, targets))
    return plan_targets(open_catalog(cfg.catalog), cfg.search, cfg.catalog.collection, cfg.catalog.sar_collection)


def run(config: Any = None, *, dry_run: bool = False, targets: Sequence[str] | None = None, **sections):
    """The batch job of ``config`` (a YAML path, a dict or a Config; section overrides as keyword dicts, e.g.
    ``run("configs/demo.yaml", output={"dir": "out"})``; ``catalog=``, ``output=`` and ``model=`` also take a plain
    path, folder or name: ``run("configs/demo.yaml", catalog="cat.json", output="out")``), as ``cloudfree run`` does: COGs, STAC items, the run
    report. Returns one ``TargetResult`` per target (``.status``, ``.outputs``, ``.metrics``, ``.error``)."""
    from cloudfree.pipeline.runner import run as run_job

    return run_job(_config(config, **sections), dry_run=dry_run, targets=list(targets) if targets else None)
