"""Load stage: STAC items -> lazy ``(time, band, y, x)`` float32 reflectance on one output grid (odc-stac).

DN -> reflectance uses each item's own harmonisation (scale, and the baseline-04.00 offset where it applies), so
items from different baselines mix correctly. Reflectance bands are resampled bilinearly; class and probability
layers (SCL, MSK_CLDPRB) with nearest/mode, never interpolated. Nothing is computed here.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import odc.stac
import pystac
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox

from pipeline.config import GridConfig
from pipeline.contract import validate_scene
from pipeline.errors import ContractError, InputDataError

log = logging.getLogger(__name__)

#: Layers that hold classes or probabilities: resampled with nearest, never averaged or interpolated.
CATEGORICAL = {"SCL": "nearest", "CLDPRB": "nearest", "MSK_CLDPRB": "nearest", "CLD": "nearest", "CLM": "nearest",
               "CLP": "nearest"}


def item_harmonisation(item: pystac.Item, band: str) -> tuple[float, float]:
    """``(scale, offset)`` turning ``band``'s DN into reflectance: ``refl = DN * scale + offset``.

    Delegates to :mod:`catalogs.harmonise` when available (processing baseline, catalog flags, raster:bands).
    """
    from catalogs.harmonise import harmonise

    h = harmonise(item)
    return h.scale[band], h.offset[band]


def output_geobox(target: pystac.Item, grid: GridConfig, bbox4326: Sequence[float] | None = None) -> GeoBox:
    """The output grid: the AOI (or the target's footprint) in the configured CRS (default: the target's UTM)."""
    crs = grid.crs or _item_crs(target)
    if crs is None:
        raise InputDataError(f"item {target.id} has no proj:epsg/proj:code; set grid.crs in the config")
    bbox = bbox4326 or target.bbox
    if bbox4326 is not None and target.bbox is not None:
        a, b = bbox4326, target.bbox
        bbox = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
        if bbox[0] >= bbox[2] or bbox[1] >= bbox[3]:
            raise InputDataError(f"item {target.id} does not overlap the AOI {list(bbox4326)}; check search.aoi")
    if bbox4326 is None and "proj:transform" in target.properties and _item_crs(target) == crs:
        # exact native grid of the target: no resampling of its 10 m bands at all
        tr = target.properties["proj:transform"]
        ny, nx = target.properties["proj:shape"]
        from affine import Affine

        native = GeoBox((ny, nx), Affine(*tr[:6]), crs)
        if abs(native.resolution.x) == grid.resolution:
            return native
    from odc.geo.geom import BoundingBox

    return GeoBox.from_bbox(BoundingBox(*bbox, crs="EPSG:4326").to_crs(crs), crs=crs, resolution=grid.resolution,
                            tight=False)


def _item_crs(item: pystac.Item) -> str | None:
    p = item.properties
    if p.get("proj:code"):
        return p["proj:code"]
    if p.get("proj:epsg"):
        return f"EPSG:{p['proj:epsg']}"
    return None


def load_reflectance(items: Sequence[pystac.Item], bands: Sequence[str], geobox: GeoBox, chunk: int = 512,
                     name: str = "scene") -> xr.DataArray:
    """Lazily load ``bands`` of ``items`` as float32 reflectance ``(time, band, y, x)``, NaN nodata."""
    if not items:
        raise InputDataError(f"{name}: no items to load")
    for it in items:
        missing = [b for b in bands if b not in it.assets]
        if missing:
            raise InputDataError(f"item {it.id} has no assets {missing}; pick grid.bands among {sorted(it.assets)}")
    ds = odc.stac.load(
        items, bands=list(bands), geobox=geobox, chunks={"x": chunk, "y": chunk}, resampling="bilinear",
        dtype="float32", groupby="id", preserve_original_order=True, fail_on_error=True,
    )
    per_band = []
    for b in bands:
        so = np.array([item_harmonisation(it, b) for it in items], np.float32)  # (time, 2)
        scale = xr.DataArray(so[:, 0], dims="time")
        offset = xr.DataArray(so[:, 1], dims="time")
        per_band.append(ds[b] * scale + offset)
    da = xr.concat(per_band, dim=xr.DataArray(list(bands), dims="band", name="band"))
    da = da.transpose("time", "band", "y", "x").astype(np.float32)
    da = da.assign_coords(time=[np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items])
    da = da.assign_coords(id=("time", [it.id for it in items]))
    da.name = name
    da.attrs = {}
    da = da.rio.write_crs(geobox.crs.to_wkt())
    return validate_scene(da, name=name, bands=tuple(bands))


def load_layer(items: Sequence[pystac.Item], asset: str, geobox: GeoBox, chunk: int = 512) -> xr.DataArray | None:
    """Lazily load a class/probability layer ``(time, y, x)`` as float32 (NaN nodata), nearest resampling.

    Returns None when no item carries the asset (the mask stage then needs another method).
    """
    if not all(asset in it.assets for it in items):
        have = [it.id for it in items if asset in it.assets]
        if have:
            raise ContractError(f"asset {asset!r} present on {have} but not on all items; mask each item alike")
        return None
    ds = odc.stac.load(items, bands=[asset], geobox=geobox, chunks={"x": chunk, "y": chunk},
                       resampling=CATEGORICAL.get(asset, "nearest"), dtype="float32", groupby="id",
                       preserve_original_order=True)
    da = ds[asset]
    return da.assign_coords(time=[np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items])
