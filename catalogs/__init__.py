"""STAC catalog backends behind one interface (:class:`cloudfree.catalogs.base.Catalog`)."""

from cloudfree.catalogs.base import Catalog, SearchQuery, open_catalog

__all__ = ["Catalog", "SearchQuery", "open_catalog"]
