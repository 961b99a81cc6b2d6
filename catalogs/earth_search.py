"""Element 84 Earth Search v1: ``sentinel-2-l2a``, ``sentinel-2-c1-l2a``, ``sentinel-1-grd``.

Asset keys differ from Planetary Computer and from the pipeline's band names:

===============  =============================  ====================================================
pipeline band    Earth Search v1 asset          notes
===============  =============================  ====================================================
B01 .. B12       coastal, blue, green, red,     common names (:data:`cloudfree.catalogs.bands.S2_COMMON_NAMES`);
                 rededge1-3, nir, nir08, nir09,  ``red-jp2`` etc. are the same data as JPEG2000 in
                 swir16, swir22                 ``sentinel-2-l2a`` (ignored here)
SCL              scl
AOT / WVP        aot / wvp
===============  =============================  ====================================================

Earth Search v0 (``sentinel-s2-l2a-cogs``) used ``B04`` / ``SCL`` like PC. :func:`to_band_names` returns a copy of
an item whose assets are keyed by pipeline band names (the original key is kept in ``cloudfree:asset_key``), so
the loader selects bands by name whatever the catalog.

Harmonisation: ``sentinel-2-l2a`` items carry ``earthsearch:boa_offset_applied`` and ``raster:bands`` offsets
that are known to be wrong for some 2022-2025 items (Element84/earth-search#66, #71); ``sentinel-2-c1-l2a``
(Collection 1) is the consistent one. :mod:`cloudfree.catalogs.harmonise` decides per item and says why.

``sentinel-1-grd`` assets are in a requester-pays S3 bucket: reading them needs AWS credentials and
``AWS_REQUEST_PAYER=requester`` in the loader's ``rasterio.Env``; nothing is signed here.
"""

from __future__ import annotations

import logging
from typing import Any

import pystac

from cloudfree.catalogs.bands import AUX_KEYS, S2_REFLECTANCE_BANDS, asset_key
from cloudfree.catalogs.stac_api import StacApiCatalog

log = logging.getLogger(__name__)

EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"
EARTH_SEARCH_COLLECTIONS = ("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-1-grd")


def to_band_names(item: pystac.Item, bands: tuple[str, ...] = S2_REFLECTANCE_BANDS + tuple(AUX_KEYS)) -> pystac.Item:
    """A copy of ``item`` with its band assets keyed by pipeline band names (``red`` -> ``B04``, ``scl`` -> ``SCL``).

    Assets that are not bands (thumbnail, metadata, ``*-jp2`` duplicates) keep their keys.
    """
    out = item.clone()
    renamed: dict[str, pystac.Asset] = {}
    used: set[str] = set()
    for band in bands:
        key = asset_key(item, band)
        if key is None:
            continue
        asset = out.assets[key].clone()
        asset.extra_fields["cloudfree:asset_key"] = key
        renamed[band] = asset
        used.add(key)
    rest = {k: a for k, a in out.assets.items() if k not in used and k not in renamed}
    out.assets = {**renamed, **rest}
    for asset in out.assets.values():
        asset.set_owner(out)
    return out


class EarthSearchCatalog(StacApiCatalog):
    """Earth Search v1 (public, no signing for Sentinel-2 COGs)."""

    name = "earth-search"
    default_url = EARTH_SEARCH_URL

    def search(self, query: Any) -> list[pystac.Item]:
        odd = [c for c in query.collections if c not in EARTH_SEARCH_COLLECTIONS]
        if odd:
            log.warning("Earth Search collection(s) %s are outside the supported %s", odd,
                        list(EARTH_SEARCH_COLLECTIONS))
        return super().search(query)

    def sign(self, item: pystac.Item) -> pystac.Item:
        return item
