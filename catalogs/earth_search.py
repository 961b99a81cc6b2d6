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

Earth Search v0 (``sentinel-s2-l2a-cogs``) used ``B04`` / ``SCL`` like PC. The search (any STAC API backend) returns
items whose band assets are keyed by pipeline band names (:func:`cloudfree.catalogs.access.map_band_assets`; the
original key is kept in ``cloudfree:asset_key``), so ``grid.bands: [B02, ...]`` works whatever the keys.

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

from cloudfree.catalogs.access import map_band_assets
from cloudfree.catalogs.stac_api import StacApiCatalog

log = logging.getLogger(__name__)

EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"
EARTH_SEARCH_COLLECTIONS = ("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-1-grd")


def to_band_names(item: pystac.Item) -> pystac.Item:
    """A copy of ``item`` with its band assets keyed by pipeline band names (``red`` -> ``B04``, ``scl`` -> ``SCL``);
    the original key is kept in ``cloudfree:asset_key``. Every STAC API backend's search returns items mapped so
    (:func:`cloudfree.catalogs.access.map_band_assets`)."""
    return map_band_assets(item.clone())


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
