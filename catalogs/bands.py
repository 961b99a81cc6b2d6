"""Sentinel-2 band names across catalogs: the pipeline speaks ``B02``..``B12``, catalogs name assets differently.

* Planetary Computer, Earth Search v0 (``sentinel-s2-l2a-cogs``), Sentinel Hub: ``B04``, ``SCL``.
* Earth Search v1 (``sentinel-2-l2a``, ``sentinel-2-c1-l2a``) and stactools-sentinel2: common names ``red``,
  ``nir08``, ``scl``; Earth Search also repeats them as ``red-jp2``; stactools adds resampled ``red_20m``.

:func:`asset_key` resolves a pipeline band name to the asset key of one item, falling back on the assets'
``eo:bands`` names so that unknown layouts still work when they declare their bands.
"""

from __future__ import annotations

import pystac

from cloudfree.pipeline.errors import CatalogError

#: Sentinel-2 band -> STAC ``eo:bands`` common name (Earth Search v1 / stactools asset keys).
S2_COMMON_NAMES: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16",
    "B12": "swir22",
}
#: Auxiliary layers: pipeline name -> accepted asset keys, most common first.
AUX_KEYS: dict[str, tuple[str, ...]] = {
    "SCL": ("SCL", "scl"),
    "AOT": ("AOT", "aot"),
    "WVP": ("WVP", "wvp"),
    "CLD": ("CLD", "MSK_CLDPRB", "cloud_probability", "cld"),
}
S2_REFLECTANCE_BANDS: tuple[str, ...] = tuple(S2_COMMON_NAMES)


def candidate_keys(band: str) -> tuple[str, ...]:
    """Asset keys that may hold ``band`` (a Sentinel-2 band name or an auxiliary layer), in lookup order."""
    if band in AUX_KEYS:
        return AUX_KEYS[band]
    if band in S2_COMMON_NAMES:
        return (band, S2_COMMON_NAMES[band])
    raise CatalogError(f"unknown band {band!r}; valid: {sorted(S2_COMMON_NAMES) + sorted(AUX_KEYS)}")


def asset_key(item: pystac.Item, band: str) -> str | None:
    """The key of the asset holding ``band`` in ``item``, or None when the item has no such asset."""
    for key in candidate_keys(band):
        if key in item.assets:
            return key
    common = S2_COMMON_NAMES.get(band)
    for key, asset in item.assets.items():
        for b in asset.extra_fields.get("eo:bands", []) or []:
            if b.get("name") == band or (common is not None and b.get("common_name") == common
                                         and len(asset.extra_fields.get("eo:bands", [])) == 1
                                         and "-jp2" not in key and "_" not in key):
                return key
    return None


def band_assets(item: pystac.Item, bands: tuple[str, ...] | list[str] = S2_REFLECTANCE_BANDS) -> dict[str, str]:
    """Map each of ``bands`` that the item has to its asset key (bands the item lacks are left out)."""
    out: dict[str, str] = {}
    for b in bands:
        k = asset_key(item, b)
        if k is not None:
            out[b] = k
    return out
