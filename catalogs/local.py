"""Local catalogs: a static STAC catalog on disk (walked with pystac) or a stac-geoparquet file.

pystac-client refuses to ``search`` a static catalog (it does not conform to ITEM_SEARCH), so the query is
evaluated client-side by :func:`catalogs.base.matches`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pystac

from catalogs.base import SearchQuery, dedupe, matches
from pipeline.errors import CatalogError

log = logging.getLogger(__name__)


class LocalCatalog:
    name = "local"

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self._items: list[pystac.Item] | None = None

    def _load(self) -> list[pystac.Item]:
        if self._items is not None:
            return self._items
        p = Path(self.url)
        if p.is_dir():
            p = p / "catalog.json"
        if not p.exists():
            raise CatalogError(
                f"local catalog {self.url} does not exist; build the demo catalog with `make demo-catalog` "
                "or point catalog.url at a catalog.json / .parquet file"
            )
        if p.suffix in (".parquet", ".geoparquet"):
            import stac_geoparquet.arrow as sga

            table = sga.parse_stac_parquet_to_arrow(str(p)).read_all() if hasattr(sga, "parse_stac_parquet_to_arrow") else None
            if table is None:
                import pyarrow.parquet as pq

                table = pq.read_table(p)
            items = [pystac.Item.from_dict(d) for d in sga.stac_table_to_items(table)]
        else:
            try:
                root = pystac.read_file(str(p))
            except Exception as exc:  # pystac raises several types for malformed JSON
                raise CatalogError(f"local catalog {p} could not be read: {exc}") from exc
            if isinstance(root, pystac.Item):
                items = [root]
            elif isinstance(root, pystac.ItemCollection):
                items = list(root)
            else:
                items = list(root.get_items(recursive=True))
                for it in items:
                    it.make_asset_hrefs_absolute()
        self._items = dedupe(items)
        log.debug("local catalog %s: %d items", p, len(self._items))
        return self._items

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        out = [it for it in self._load() if matches(it, query)]
        out.sort(key=lambda it: (it.datetime or it.common_metadata.start_datetime, it.id))
        return out[: query.max_items] if query.max_items else out

    def get(self, item_id: str) -> pystac.Item:
        for it in self._load():
            if it.id == item_id:
                return it
        raise CatalogError(f"item {item_id!r} is not in local catalog {self.url}; list ids with `cloudfree search`")

    def sign(self, item: pystac.Item) -> pystac.Item:
        return item
