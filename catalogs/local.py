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

from cloudfree.catalogs.base import SearchQuery, SkippedItems, dedupe, matches, parse_items, screen_items
from cloudfree.pipeline.errors import CatalogError, NoItemsFoundError

log = logging.getLogger(__name__)

GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")


def read_geoparquet(path: str | Path, skipped: SkippedItems | None = None) -> list[pystac.Item]:
    """Items of a stac-geoparquet file (malformed ones skipped and recorded in ``skipped``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import stac_geoparquet.arrow as sga

    try:
        table = pq.read_table(str(path))
        dicts = list(sga.stac_table_to_items(table))
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise CatalogError(
            f"stac-geoparquet file {path} could not be read: {exc}; write it with "
            "stac_geoparquet.arrow.to_parquet (or catalogs.local.write_geoparquet)"
        ) from exc
    return parse_items(dicts, str(path), skipped if skipped is not None else SkippedItems())


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
        #: malformed or duplicate items, skipped and recorded (id, reason): the search goes on without them.
        self.skipped = SkippedItems()

    def _read_json(self, p: Path) -> list[pystac.Item]:
        """A bare JSON array of items, a FeatureCollection, one Item, or a static catalog (walked link by link), each
        item parsed on its own: one that pystac cannot parse is skipped and recorded, not fatal."""
        import json

        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CatalogError(f"local catalog {p} could not be read: {exc}; point catalog.url at a valid catalog.json "
                               "/ item array / .parquet file") from exc
        if isinstance(doc, list):  # a bare JSON array of items (as some exports and the shared fixtures hold)
            return parse_items([d for d in doc if not (isinstance(d, dict) and d.get("type") not in ("Feature", None))],
                               self.url, self.skipped)
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
            return parse_items(doc.get("features") or [], self.url, self.skipped)
        if isinstance(doc, dict) and doc.get("type") == "Feature":
            return parse_items([doc], self.url, self.skipped)
        try:
            root = pystac.read_file(str(p))
        except Exception as exc:  # pystac raises several types for malformed JSON
            raise CatalogError(f"local catalog {p} could not be read: {exc}") from exc
        if not isinstance(root, pystac.Catalog):
            raise CatalogError(f"local catalog {p} is a {type(root).__name__}, not a catalog, collection or items")
        items: list[pystac.Item] = []
        self._walk(root, items, set())
        return items

    def _walk(self, cat: pystac.Catalog, items: list[pystac.Item], seen: set[str]) -> None:
        """Items of ``cat`` and its children; an item (or child) link that does not resolve to a valid object is
        skipped and recorded."""
        for link in cat.get_links(pystac.RelType.ITEM):
            href = link.get_absolute_href() or link.href
            try:
                it = link.resolve_stac_object(root=cat.get_root()).target
                if not isinstance(it, pystac.Item):
                    raise TypeError(f"it is a {type(it).__name__}")
            except Exception as exc:  # noqa: BLE001 - one broken item file never stops the catalog
                self.skipped.add(Path(str(href)).stem, f"item file {href} is not a valid STAC Item "
                                 f"({type(exc).__name__}: {exc})", self.url)
                continue
            it.make_asset_hrefs_absolute()
            items.extend(screen_items([it], self.url, self.skipped))
        for link in cat.get_links(pystac.RelType.CHILD):
            href = str(link.get_absolute_href() or link.href)
            if href in seen:
                continue
            seen.add(href)
            try:
                child = link.resolve_stac_object(root=cat.get_root()).target
            except Exception as exc:  # noqa: BLE001
                log.warning("local catalog %s: child %s could not be read (%s: %s); its items are skipped", self.url,
                            href, type(exc).__name__, exc)
                self.skipped.add(Path(href).parent.name or href, f"child catalog {href} could not be read "
                                 f"({type(exc).__name__}: {exc})", self.url)
                continue
            if isinstance(child, pystac.Catalog):
                self._walk(child, items, seen)

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
            items = read_geoparquet(p, self.skipped)
        else:
            items = self._read_json(p)
        from cloudfree.catalogs.access import AssetAccess, prepare_items

        # the user's own files: local hrefs are allowed; an export of remote items keeps its signer
        self._items = prepare_items(dedupe(items, self.url, self.skipped), AssetAccess(), overwrite=False)
        log.debug("local catalog %s: %d items (%d skipped)", p, len(self._items), len(self.skipped))
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
        if not out and not self._load():  # an empty catalog is not a wrong collection name
            if query.allow_empty:
                return out
            bad = f" ({len(self.skipped)} malformed item(s) skipped: see the warnings)" if self.skipped else ""
            raise NoItemsFoundError(f"local catalog {self.url} holds no usable items{bad}; point catalog.url at a "
                                    "catalog with items (the demo: `make demo-catalog`)")
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
