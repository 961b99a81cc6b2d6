"""STAC catalog backends behind one interface (:class:`catalogs.base.Catalog`)."""

from catalogs.base import Catalog, SearchQuery, open_catalog

__all__ = ["Catalog", "SearchQuery", "open_catalog"]
