"""Local catalogs: a static STAC catalog on disk (walked with pystac) or a stac-geoparquet file.

pystac-client refuses to ``search`` a static catalog (it does not conform to ITEM_SEARCH), so the query is
evaluated client-side by :func:`cloudfree.catalogs.base.matches`.

stac-geoparquet (0.8 API): a ``.parquet`` / ``.geoparquet`` file is read with ``pyarrow.parquet.read_table`` and
turned back into item dicts by ``stac_geoparquet.arrow.stac_table_to_items``; :func:`write_geoparquet` writes
items with ``parse_stac_items_to_arrow`` + ``stac_geoparquet.arrow.to_parquet``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import pystac

from cloudfree.catalogs.base import SearchQuery, dedupe, matches
from cloudfree.pipeline.errors import CatalogError, NoItemsFoundError

log = logging.getLogger(__name__)

GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")


def read_geoparquet(path: str | Path) -> list[pystac.Item]:
    """Items of a stac-geoparquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import stac_geoparquet.arrow as sga

    try:
        table = pq.read_table(str(path))
        return [pystac.Item.from_dict(d, preserve_dict=False) for d in sga.stac_table_to_items(table)]
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise CatalogError(
            f"stac-geoparquet file {path} could not be read: {exc}; write it with "
            "stac_geoparquet.arrow.to_parquet (or catalogs.local.write_geoparquet)"
        ) from exc


def write_geoparquet(items: Iterable[pystac.Item], path: str | Path) -> Path:
    """Write items as a stac-geoparquet file (the format :class:`LocalCatalog` and the API exports share)."""
    import stac_geoparquet.arrow as sga

    dicts = [it.to_dict(transform_hrefs=False) for it in items]
    if not dicts:
        raise CatalogError(f"no items to write to {path}; a stac-geoparquet file needs at least one item")
    reader = sga.parse_stac_items_to_arrow(dicts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sga.to_parquet(reader, path)
    return path


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
        if p.suffix in GEOPARQUET_SUFFIXES:
            items = read_geoparquet(p)
        elif p.suffix == ".json" and p.read_text()[:200].lstrip().startswith("["):
            # a bare JSON array of items (as some exports and the shared fixtures hold)
            import json

            items = [pystac.Item.from_dict(d) for d in json.loads(p.read_text())
                     if isinstance(d, dict) and d.get("type") == "Feature"]
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
        from cloudfree.catalogs.access import AssetAccess, prepare_items

        # the user's own files: local hrefs are allowed; an export of remote items keeps its signer
        self._items = prepare_items(dedupe(items), AssetAccess(), overwrite=False)
        log.debug("local catalog %s: %d items", p, len(self._items))
        return self._items

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        out = [it for it in self._load() if matches(it, query)]
        out.sort(key=lambda it: (it.datetime or it.common_metadata.start_datetime, it.id))
        for key in reversed(query.sortby):
            prop, desc = key.lstrip("+-"), key.startswith("-")
            if prop in ("datetime", "properties.datetime"):
                out.sort(key=lambda it: it.datetime or it.common_metadata.start_datetime, reverse=desc)
            elif prop == "id":
                out.sort(key=lambda it: it.id, reverse=desc)
            else:
                prop = prop.removeprefix("properties.")
                out.sort(key=lambda it: (it.properties.get(prop) is None, it.properties.get(prop)), reverse=desc)
        out = out[: query.max_items] if query.max_items else out
        if not out and query.collections:
            have = sorted({it.collection_id for it in self._load() if it.collection_id})
            unknown = [c for c in query.collections if c not in have]
            if unknown:  # a wrong collection name is a config error, not an empty period
                raise NoItemsFoundError(
                    f"collection(s) {unknown} are not in local catalog {self.url}; its collections are {have}: "
                    "set catalog.collection (or --collection) to one of them")
        if not out and not query.allow_empty:
            raise NoItemsFoundError(
                f"no items in local catalog {self.url} for collection(s) {list(query.collections)} with "
                f"{query.describe()}; widen search.period / search.aoi or relax the eo:cloud_cover range"
            )
        return out

    def get(self, item_id: str) -> pystac.Item:
        for it in self._load():
            if it.id == item_id:
                return it
        raise CatalogError(f"item {item_id!r} is not in local catalog {self.url}; list ids with `cloudfree search`")

    def sign(self, item: pystac.Item) -> pystac.Item:
        return item
