"""The catalog interface: every backend turns a :class:`SearchQuery` into a list of ``pystac.Item``.

Backends: ``local`` (static catalog folder / catalog.json, or a stac-geoparquet file), and the API backends in
their own modules. :func:`open_catalog` picks one from the config's ``catalog`` section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Protocol, runtime_checkable

import pystac

from cloudfree.pipeline.errors import CatalogError, ConfigError

log = logging.getLogger(__name__)


class PeriodError(CatalogError, ConfigError):
    """A period (``search.period``, ``--period``) that is not an ISO 8601 date or interval; a config error."""


@dataclass(frozen=True)
class SearchQuery:
    """A backend-neutral search: what pystac-client's ``search`` takes, typed.

    ``query`` uses the STAC query extension form, e.g. ``{"eo:cloud_cover": {"lt": 20}}``.
    """

    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    ids: tuple[str, ...] = ()
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_items: int | None = None
    #: sort keys, ``"-eo:cloud_cover"`` for descending (STAC sort extension); ignored by backends without it.
    sortby: tuple[str, ...] = ()
    #: False: a search that matches nothing raises :class:`~cloudfree.pipeline.errors.NoItemsFoundError`; True: returns [].
    allow_empty: bool = False

    def describe(self) -> str:
        parts = [f"collections={list(self.collections)}"]
        for k in ("bbox", "datetime", "ids", "query", "sortby", "intersects", "max_items"):
            v = getattr(self, k)
            if v:
                parts.append(f"{k}={v}")
        return ", ".join(parts)


@runtime_checkable
class Catalog(Protocol):
    name: str

    def search(self, query: SearchQuery) -> list[pystac.Item]: ...

    def sign(self, item: pystac.Item) -> pystac.Item: ...


def parse_interval(value: str | None) -> tuple[datetime | None, datetime | None]:
    """Parse an ISO 8601 interval ``start/end`` (either side may be ``..`` or empty) or a single date/datetime."""
    if not value:
        return None, None

    def one(s: str, end: bool) -> datetime | None:
        s = s.strip()
        if s in ("", ".."):
            return None
        try:
            if len(s) == 4 and s.isdigit():  # YYYY
                y = int(s)
                return datetime(y + 1, 1, 1, tzinfo=timezone.utc) - _EPS if end else datetime(y, 1, 1, tzinfo=timezone.utc)
            if len(s) == 7:  # YYYY-MM
                y, m = map(int, s.split("-"))
                if end:
                    m2, y2 = (1, y + 1) if m == 12 else (m + 1, y)
                    return datetime(y2, m2, 1, tzinfo=timezone.utc).replace(microsecond=0) - _EPS
                return datetime(y, m, 1, tzinfo=timezone.utc)
            d = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise PeriodError(f"cannot parse date {s!r} in period {value!r}; use YYYY-MM-DD/YYYY-MM-DD, YYYY-MM or "
                              "YYYY") from None
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        if len(s) == 10 and end:
            d = d.replace(hour=23, minute=59, second=59)
        return d

    if "/" in value:
        a, b = value.split("/", 1)
        start, end = one(a, False), one(b, True)
    else:
        start, end = one(value, False), one(value, True)
    if start and end and start > end:
        raise PeriodError(f"period {value!r} ends before it starts; write start/end with start <= end")
    return start, end


_EPS = __import__("datetime").timedelta(seconds=1)


def _cmp(op: str, a: Any, b: Any) -> bool:
    if a is None:
        return False
    try:
        return _ops(op, a, b)
    except TypeError:  # e.g. a string property compared with a number: that item does not match
        return False


def _ops(op: str, a: Any, b: Any) -> bool:
    return {
        "lt": a < b, "lte": a <= b, "gt": a > b, "gte": a >= b, "eq": a == b, "neq": a != b,
        "in": a in b if isinstance(b, (list, tuple)) else False,
    }[op]


def matches(item: pystac.Item, q: SearchQuery) -> bool:
    """Client-side evaluation of a :class:`SearchQuery` (used by backends without server-side search)."""
    if q.collections and item.collection_id not in q.collections:
        return False
    if q.ids and item.id not in q.ids:
        return False
    if q.bbox is not None and item.bbox is not None:
        b = item.bbox
        # a bbox with minx > maxx crosses the antimeridian: it is the union of an east and a west part
        parts = [q.bbox] if q.bbox[0] <= q.bbox[2] else [
            (q.bbox[0], q.bbox[1], 180.0, q.bbox[3]), (-180.0, q.bbox[1], q.bbox[2], q.bbox[3])]
        if all(a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1] for a in parts):
            return False
    if q.intersects is not None and item.geometry is not None:
        from shapely.geometry import shape

        from cloudfree.catalogs.stac_api import split_antimeridian_geometry

        # a polygon whose longitudes span > 180 degrees crosses the antimeridian (as in the STAC API backend)
        if not any(shape(g).intersects(shape(item.geometry)) for g in split_antimeridian_geometry(q.intersects)):
            return False
    if q.datetime:
        start, end = parse_interval(q.datetime)
        dt = item.datetime or item.common_metadata.start_datetime
        if dt is not None:
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            if (start and dt < start) or (end and dt > end):
                return False
    for prop, ops in q.query.items():
        val = item.properties.get(prop)
        for op, ref in ops.items():
            if not _cmp(op, val, ref):
                return False
    return True


def dedupe(items: Iterable[pystac.Item], source: str = "", skipped: "SkippedItems | None" = None,
           warn_identical: bool = True) -> list[pystac.Item]:
    """Drop repeated (collection, id) pairs, keeping the first. A dropped duplicate is logged as a warning and
    recorded in ``skipped``; with ``warn_identical=False`` (API paging, which can repeat an item) only a duplicate
    whose content differs from the first is."""
    first: dict[tuple[str | None, str], pystac.Item] = {}
    out = []
    for it in items:
        key = (it.collection_id, it.id)
        if key not in first:
            first[key] = it
            out.append(it)
            continue
        if not warn_identical and it.to_dict(transform_hrefs=False) == first[key].to_dict(transform_hrefs=False):
            continue
        reason = "duplicate id: another item of the same collection has this id; the first one is kept"
        if skipped is not None:
            skipped.add(it.id, reason, source)
        else:
            log.warning("item %s in %s: %s", it.id, source or "the catalog", reason)
    return out


@dataclass(frozen=True)
class SkippedItem:
    """A catalog item the search could not use: its id (as the catalog wrote it) and why."""

    id: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


class SkippedItems(list):
    """The items a catalog skipped (malformed, duplicate), each logged once as a warning and kept for the plan and
    the run report. A malformed item never stops a search: it is skipped and recorded, and the batch goes on."""

    def add(self, item_id: Any, reason: str, source: str = "") -> None:
        rec = SkippedItem(str(item_id), reason)
        if rec not in self:
            log.warning("skipped item %s of %s: %s", rec.id, source or "the catalog", reason)
            self.append(rec)


def _number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def item_problem(item: pystac.Item) -> str | None:
    """Why ``item`` cannot be searched, ranked or loaded (None: usable). Checks what the search stage relies on:
    an id, a datetime (or start_datetime), a numeric ``eo:cloud_cover`` in [0, 100] when present, a footprint
    (a valid geometry or a 4/6-number bbox)."""
    if not isinstance(item.id, str) or not item.id:
        return f"id {item.id!r} is not a non-empty string"
    if (item.datetime or item.common_metadata.start_datetime) is None:
        return "it has neither datetime nor start_datetime"
    cc = item.properties.get("eo:cloud_cover")
    if cc is not None and not (_number(cc) and 0 <= cc <= 100):
        return f"eo:cloud_cover {cc!r} is not a number in [0, 100]"
    if item.bbox is not None and not (isinstance(item.bbox, (list, tuple)) and len(item.bbox) in (4, 6)
                                      and all(_number(v) for v in item.bbox)):
        return f"bbox {item.bbox!r} is not 4 (or 6) numbers"
    if item.geometry is not None:
        from shapely.geometry import shape

        try:
            g = shape(item.geometry)
            bad = g.is_empty
        except Exception as exc:  # noqa: BLE001 - shapely raises several types for malformed GeoJSON
            return f"geometry is not valid GeoJSON ({type(exc).__name__}: {exc})"
        if bad:
            return "geometry is empty"
    elif item.bbox is None:
        return "it has neither geometry nor bbox"
    return None


def parse_items(dicts: Iterable[Any], source: str, skipped: SkippedItems, root: Any = None) -> list[pystac.Item]:
    """Features as ``pystac.Item``; a Feature pystac cannot parse or :func:`item_problem` rejects is skipped and
    recorded in ``skipped`` (id and reason), the others are returned."""
    out = []
    for i, d in enumerate(dicts):
        iid = d.get("id", f"#{i}") if isinstance(d, dict) else f"#{i}"
        if not isinstance(d, dict):
            skipped.add(iid, f"not a JSON object (got {type(d).__name__})", source)
            continue
        try:
            it = pystac.Item.from_dict(d, preserve_dict=False, root=root) if root is not None else \
                pystac.Item.from_dict(d, preserve_dict=False)
        except Exception as exc:  # noqa: BLE001 - pystac raises STACError, STACTypeError, KeyError, ValueError ...
            skipped.add(iid, f"not a valid STAC Item ({type(exc).__name__}: {exc})", source)
            continue
        out.extend(screen_items([it], source, skipped))
    return out


def screen_items(items: Iterable[pystac.Item], source: str, skipped: SkippedItems) -> list[pystac.Item]:
    """``items`` without those :func:`item_problem` rejects (recorded in ``skipped``)."""
    out = []
    for it in items:
        why = item_problem(it)
        if why is None:
            out.append(it)
        else:
            skipped.add(it.id, why, source)
    return out


def open_catalog(cfg) -> Catalog:
    """Build the backend the ``catalog`` config section asks for."""
    from cloudfree.catalogs.local import LocalCatalog

    if cfg.kind == "local":
        return LocalCatalog(cfg.url)
    backends = _api_backends()
    if cfg.kind in backends:
        return backends[cfg.kind](cfg)
    raise CatalogError(
        f"catalog kind {cfg.kind!r} is not available in this build; available: local, {', '.join(backends)}"
    )


def _api_backends() -> dict[str, Any]:
    """API backends, imported lazily so the local path needs no network libraries."""
    import importlib

    out: dict[str, Any] = {}
    for kind, target in {
        "stac-api": "cloudfree.catalogs.stac_api:StacApiCatalog",
        "planetary-computer": "cloudfree.catalogs.planetary_computer:PlanetaryComputerCatalog",
        "earth-search": "cloudfree.catalogs.earth_search:EarthSearchCatalog",
        "sentinel-hub": "cloudfree.catalogs.sentinel_hub:SentinelHubCatalog",
    }.items():
        mod, _, attr = target.partition(":")
        try:
            out[kind] = getattr(importlib.import_module(mod), attr)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    return out
