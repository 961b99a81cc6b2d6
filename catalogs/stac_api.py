"""Any STAC API through pystac-client, with retries, paging de-duplication and antimeridian-safe AOIs.

* Retries: a urllib3 ``Retry`` on the pystac-client ``StacApiIO`` session, for 429 / 5xx, connection errors and
  read timeouts, on GET and POST (item search is a POST), with exponential backoff plus jitter and respect for
  ``Retry-After``. Every request has a timeout (``catalog.timeout``), so a dead API fails instead of hanging.
* Paging: pystac-client follows ``next`` links; items repeated across pages (APIs paging on a non-unique sort key
  can repeat them) are dropped by ``(collection, id)``.
* Antimeridian: a bbox with ``minx > maxx`` (e.g. ``[170, -20, -170, -10]``) or a polygon whose longitudes span
  more than 180 degrees is split into an east and a west part, searched separately and merged.
* Mixed CRS: items keep their own ``proj:epsg``; nothing here reprojects.
* No results: :class:`~cloudfree.pipeline.errors.NoItemsFoundError` naming the API URL, the collections and the query
  (unless ``SearchQuery.allow_empty``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pystac
import requests
from urllib3.util.retry import Retry

from cloudfree.catalogs.base import SearchQuery, SkippedItems, dedupe, parse_items
from cloudfree.pipeline.errors import CatalogError, NoItemsFoundError

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)


def make_retry(max_retries: int, backoff_factor: float = 0.5, backoff_jitter: float = 0.5,
               backoff_max: float = 30.0) -> Retry:
    """Exponential backoff with jitter: sleeps ``backoff_factor * 2**(n-1) + U(0, backoff_jitter)`` s, capped."""
    return Retry(
        total=max_retries,
        connect=max_retries,
        read=max_retries,
        status=max_retries,
        other=0,
        backoff_factor=backoff_factor,
        backoff_jitter=backoff_jitter,
        backoff_max=backoff_max,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # retry POST /search too: searches are read-only
        respect_retry_after_header=True,
        raise_on_status=False,  # hand the last error response to pystac-client, which raises APIError with it
    )


def check_resolvable(url: str, attempts: int = 2, delay: float = 1.0) -> None:
    """Fail at once with :class:`CatalogError` when the API's host name does not resolve (offline), instead of
    ``max_retries`` connection retries with backoff; a transient DNS error gets ``attempts`` tries."""
    import socket
    import time
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if not host:
        return
    for i in range(attempts):
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as exc:
            if i + 1 == attempts:
                raise CatalogError(f"cannot resolve the host of STAC API {url}: {exc}; check the network (offline "
                                   "runs need catalog.kind: local) or catalog.url") from None
            time.sleep(delay)


def split_antimeridian_bbox(bbox: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """A bbox crossing the antimeridian (``minx > maxx``) as two bboxes; any other bbox unchanged."""
    minx, miny, maxx, maxy = bbox
    if minx <= maxx:
        return [tuple(bbox)]  # type: ignore[list-item]
    return [(minx, miny, 180.0, maxy), (-180.0, miny, maxx, maxy)]


def split_antimeridian_geometry(geom: dict[str, Any]) -> list[dict[str, Any]]:
    """A (multi)polygon whose longitudes span > 180 degrees, read as crossing the antimeridian, split in two."""
    from shapely.affinity import translate
    from shapely.geometry import box, mapping, shape

    shp = shape(geom)
    minx, _, maxx, _ = shp.bounds
    if maxx - minx <= 180:
        return [geom]
    from shapely.geometry import MultiPolygon, Polygon

    def shift(poly: Polygon) -> Polygon:
        ext = [((x + 360.0) if x < 0 else x, y) for x, y in poly.exterior.coords]
        holes = [[((x + 360.0) if x < 0 else x, y) for x, y in r.coords] for r in poly.interiors]
        return Polygon(ext, holes)

    polys = list(shp.geoms) if isinstance(shp, MultiPolygon) else [shp]
    shifted = MultiPolygon([shift(p) for p in polys]).buffer(0)
    east = shifted.intersection(box(0, -90, 180, 90))
    west = translate(shifted.intersection(box(180, -90, 360, 90)), xoff=-360.0)
    return [mapping(g) for g in (east, west) if not g.is_empty]


class StacApiCatalog:
    """A STAC API (``conformsTo`` item-search) searched with pystac-client."""

    name = "stac-api"
    default_url: str | None = None

    def __init__(
        self,
        cfg: Any = None,
        *,
        url: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff_factor: float | None = None,
        page_size: int | None = None,
        headers: dict[str, str] | None = None,
        modifier: Callable[[Any], None] | None = None,
    ) -> None:
        cfg_url = getattr(cfg, "url", None)
        if cfg_url is not None and not str(cfg_url).startswith(("http://", "https://")):
            cfg_url = None  # the CatalogConfig default is a local path; API backends fall back on default_url
        self.url = (url or cfg_url or self.default_url or "").rstrip("/")
        if not self.url:
            raise CatalogError(
                f"catalog kind {self.name!r} needs an API root URL; set catalog.url to e.g. "
                "https://earth-search.aws.element84.com/v1"
            )
        self.timeout = float(timeout if timeout is not None else getattr(cfg, "timeout", 30.0))
        self.max_retries = int(max_retries if max_retries is not None else getattr(cfg, "max_retries", 4))
        self.backoff_factor = float(
            backoff_factor if backoff_factor is not None else getattr(cfg, "backoff_factor", 0.5)
        )
        self.page_size = int(page_size if page_size is not None else getattr(cfg, "page_size", 100))
        self.headers = dict(headers or {})
        self._modifier = modifier
        self._client: Any = None
        from cloudfree.catalogs.access import access_from_config

        #: how the load path reads this catalog's assets (href policy; subclasses add signing), stamped on items.
        self.access = access_from_config(cfg, self.name)
        #: malformed or conflicting duplicate items, skipped and recorded (id, reason): the search goes on.
        self.skipped = SkippedItems()

    # -- pystac-client plumbing ---------------------------------------------------------------------------------
    def stac_io(self) -> Any:
        from pystac_client.stac_api_io import StacApiIO

        return StacApiIO(
            headers=self.headers,
            timeout=self.timeout,
            max_retries=make_retry(self.max_retries, self.backoff_factor, backoff_jitter=self.backoff_factor),
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            from pystac_client import Client
            from pystac_client.exceptions import APIError

            check_resolvable(self.url)
            try:
                self._client = Client.open(self.url, stac_io=self.stac_io(), modifier=self._modifier,
                                           timeout=self.timeout)
            except ValueError as exc:  # orjson/json.JSONDecodeError: an HTML login page, a proxy error page ...
                raise CatalogError(
                    f"STAC API {self.url} did not answer JSON ({type(exc).__name__}: {exc}); it is not a STAC API "
                    "root (a login or proxy page?): check catalog.url"
                ) from exc
            except (APIError, requests.RequestException, pystac.STACError, OSError) as exc:
                raise CatalogError(
                    f"cannot open STAC API {self.url}: {exc}; check catalog.url and the network "
                    f"(timeout {self.timeout} s, {self.max_retries} retries)"
                ) from exc
            # pystac-client 0.9 matches only ``v1.0.0*/item-search#sort``; APIs announcing a newer version
            # (stac-fastapi-pgstac 7 says v1.1.0) would otherwise get a spurious DoesNotConformTo warning.
            conforms = self._client.get_conforms_to() if hasattr(self._client, "get_conforms_to") else []
            if any(str(c).endswith("/item-search#sort") for c in conforms):
                self._client.add_conforms_to("SORT")
        return self._client

    # -- search -------------------------------------------------------------------------------------------------
    def _parts(self, q: SearchQuery) -> list[dict[str, Any]]:
        base: dict[str, Any] = {
            "collections": list(q.collections) or None,
            "datetime": q.datetime,
            "ids": list(q.ids) or None,
            "query": dict(q.query) or None,
            "sortby": list(q.sortby) or None,
            "max_items": q.max_items,
            "limit": self.page_size,
        }
        if q.intersects is not None:
            return [{**base, "intersects": g} for g in split_antimeridian_geometry(q.intersects)]
        if q.bbox is not None:
            return [{**base, "bbox": list(b)} for b in split_antimeridian_bbox(q.bbox)]
        return [base]

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        from pystac_client.exceptions import APIError

        found: list[pystac.Item] = []
        pages = 0
        for kwargs in self._parts(query):
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            try:
                search = self.client.search(**kwargs)
                # page by page as dicts, each feature parsed on its own: a malformed item is skipped and recorded
                # (self.skipped), never the end of the search
                for page in search.pages_as_dicts():
                    pages += 1
                    feats = page.get("features") if isinstance(page, dict) else None
                    if not isinstance(feats, list):
                        raise CatalogError(f"search of {self.url} answered a page without a 'features' list; "
                                           "is catalog.url a STAC API root?")
                    found.extend(parse_items(feats, self.url, self.skipped, root=self.client))
            except ValueError as exc:  # orjson/json.JSONDecodeError: the answer was not JSON
                raise CatalogError(
                    f"search of {self.url} did not answer JSON ({type(exc).__name__}: {exc}); check catalog.url "
                    "(a login or proxy page?)") from exc
            except (APIError, requests.RequestException, pystac.STACError) as exc:
                raise CatalogError(
                    f"search of {self.url} failed for {query.describe()}: {exc}; the API refused or did not "
                    f"answer after {self.max_retries} retries (timeout {self.timeout} s); check the query "
                    "(collection ids, query properties) and catalog.url"
                ) from exc
        # paging can repeat an item: identical repeats are dropped quietly, a different item with a known id warns
        items = dedupe(found, self.url, self.skipped, warn_identical=False)
        if len(items) < len(found):
            log.info("%s: dropped %d duplicate items across %d pages", self.url, len(found) - len(items), pages)
        if query.max_items is not None:
            items = items[: query.max_items]
        items = self.prepare(items)
        log.debug("%s: %d items for %s (%d pages)", self.url, len(items), query.describe(), pages)
        if not items and query.collections:
            have = self.collection_ids()
            unknown = [c for c in query.collections if have and c not in have]
            if unknown:
                raise NoItemsFoundError(
                    f"collection(s) {unknown} are not in STAC API {self.url}; its collections are {have}: set "
                    "catalog.collection (or --collection) to one of them")
        if not items and not query.allow_empty:
            raise NoItemsFoundError(
                f"no items in STAC API {self.url} for collection(s) {list(query.collections)} with "
                f"{query.describe()}; widen search.period / search.aoi, relax the eo:cloud_cover range, or "
                f"check the collection id (list them at {self.url}/collections)"
            )
        return items

    def collection_ids(self) -> list[str]:
        """Ids of the API's collections (empty when they cannot be listed: then nothing is claimed)."""
        from pystac_client.exceptions import APIError

        try:
            return sorted(c.id for c in self.client.get_collections())
        except (APIError, requests.RequestException, pystac.STACError, CatalogError) as exc:
            log.debug("%s: collections could not be listed: %s", self.url, exc)
            return []

    def get(self, item_id: str, collection: str | None = None) -> pystac.Item:
        """One item by id: from ``/collections/{collection}/items/{id}`` when the collection is known, else via
        item search ``ids``."""
        if collection:
            from pystac_client.exceptions import APIError

            try:
                item = self.client.get_collection(collection).get_item(item_id)
            except (APIError, requests.RequestException, pystac.STACError) as exc:
                raise CatalogError(
                    f"cannot read item {item_id!r} of collection {collection!r} from {self.url}: {exc}; check the "
                    "id and collection"
                ) from exc
            if item is None:
                raise NoItemsFoundError(f"item {item_id!r} is not in collection {collection!r} of {self.url}")
            return self.prepare([item])[0]
        q = SearchQuery(collections=(collection,) if collection else (), ids=(item_id,), allow_empty=True)
        items = self.search(q)
        if not items:
            raise NoItemsFoundError(
                f"item {item_id!r} is not in STAC API {self.url}"
                + (f" collection {collection!r}" if collection else "")
                + "; check the id (cloudfree search lists them)"
            )
        return items[0]

    def prepare(self, items: list[pystac.Item]) -> list[pystac.Item]:
        """Items as the load path reads them: band assets keyed by pipeline band names (``red`` -> ``B04``, from
        the keys or ``eo:bands``) and stamped with this catalog's access (href policy, signing): see
        :mod:`cloudfree.catalogs.access`. A stamp the API sent is overwritten."""
        from cloudfree.catalogs.access import prepare_items

        return prepare_items(items, self.access)

    def sign(self, item: pystac.Item) -> pystac.Item:
        """Generic STAC APIs serve public hrefs: nothing to sign."""
        return item
