"""Sentinel Hub: Catalog API search (pystac Items out) and Process API requests for cloud layers.

* Search: ``sentinelhub.SentinelHubCatalog.search`` with the :class:`~cloudfree.catalogs.base.SearchQuery` turned into a
  bbox / time interval and a CQL2-text filter (the Catalog API 1.0 dropped ``query``); results become
  ``pystac.Item`` with our collection id.
* Cloud layers: :func:`cloud_layers_request` builds a ``SentinelHubRequest`` whose evalscript returns, as UINT8
  bands in this order, Sen2Cor's cloud probability ``CLD`` (= ``MSK_CLDPRB``, percent), the scene classification
  ``SCL``, s2cloudless' ``CLP`` (probability scaled 0-255) and ``dataMask``. Planetary Computer items have no
  ``MSK_CLDPRB`` asset, which is why this backend exists for the ``cldprb`` mask method.
* Credentials: ``SHConfig`` reads ``SH_CLIENT_ID`` / ``SH_CLIENT_SECRET`` from the environment (precedence) or
  the sentinelhub ``config.toml`` profile; they are never logged or put in messages. Without them a search fails
  at once with :class:`~cloudfree.pipeline.errors.CatalogError` instead of retrying.

Building a request needs no network; downloading it does (``request.get_data()``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import pystac

from cloudfree.catalogs.base import SearchQuery, dedupe, parse_interval
from cloudfree.pipeline.errors import CatalogError, NoItemsFoundError

log = logging.getLogger(__name__)

#: our collection id -> sentinelhub DataCollection attribute.
SH_COLLECTIONS = {
    "sentinel-2-l2a": "SENTINEL2_L2A",
    "sentinel-2-l1c": "SENTINEL2_L1C",
    "sentinel-1-grd": "SENTINEL1_IW",
}
CLOUD_LAYERS = ("CLD", "SCL", "CLP")
_CQL_OPS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "eq": "=", "neq": "<>"}


def query_to_cql2(query: dict[str, dict[str, Any]]) -> str | None:
    """``{"eo:cloud_cover": {"gte": 5, "lt": 95}}`` -> ``"eo:cloud_cover >= 5 AND eo:cloud_cover < 95"``."""
    parts = []
    for prop, ops in query.items():
        for op, val in ops.items():
            if op == "in":
                vals = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in val)
                parts.append(f"{prop} IN ({vals})")
            elif op in _CQL_OPS:
                v = f"'{val}'" if isinstance(val, str) else val
                parts.append(f"{prop} {_CQL_OPS[op]} {v}")
            else:
                raise CatalogError(f"query operator {op!r} on {prop!r} has no CQL2 equivalent; use one of "
                                   f"{sorted(_CQL_OPS) + ['in']}")
    return " AND ".join(parts) or None


def make_config(cfg: Any = None, **overrides: Any) -> Any:
    """An ``SHConfig``: credentials from SH_CLIENT_ID / SH_CLIENT_SECRET or the sentinelhub profile;
    ``max_download_attempts`` and timeout from the catalog config section."""
    from sentinelhub import SHConfig

    kwargs: dict[str, Any] = {
        "max_download_attempts": int(getattr(cfg, "max_retries", 4)) + 1,
        "download_timeout_seconds": float(getattr(cfg, "timeout", 30.0)),
        # sentinelhub sleeps download_sleep_time * 2**n between attempts (default 5 s): follow catalog.backoff_factor
        "download_sleep_time": float(getattr(cfg, "backoff_factor", 0.5)),
    }
    url = str(getattr(cfg, "url", "") or "")
    if url.startswith(("http://", "https://")):  # another deployment (or a local test server) than the default
        url = url.rstrip("/")
        kwargs.update(sh_base_url=url, sh_token_url=f"{url}{TOKEN_PATH}")
    kwargs.update(overrides)
    return SHConfig(**kwargs)


TOKEN_PATH = "/auth/realms/main/protocol/openid-connect/token"


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Fail at once with :class:`CatalogError` when the host of ``url`` cannot be resolved or connected to
    (offline), instead of sentinelhub's silent timeouts and growing retry sleeps."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise CatalogError(
            f"Sentinel Hub ({u.scheme}://{u.netloc}) is not reachable: {type(exc).__name__}: {exc}; check the network "
            "or proxy, or search a local catalog (catalog.kind: local) when offline"
        ) from None


def _evalscript(layers: Sequence[str]) -> str:
    bands = ", ".join(f'"{b}"' for b in (*layers, "dataMask"))
    values = ", ".join(f"s.{b}" for b in (*layers, "dataMask"))
    return (
        "//VERSION=3\n"
        "function setup() {\n"
        f"  return {{input: [{{bands: [{bands}]}}], output: {{bands: {len(layers) + 1}, sampleType: \"UINT8\"}}}};\n"
        "}\n"
        f"function evaluatePixel(s) {{ return [{values}]; }}\n"
    )


def cloud_layers_request(
    bbox: tuple[float, float, float, float],
    time_interval: tuple[str, str],
    *,
    layers: Sequence[str] = CLOUD_LAYERS,
    crs: int | str = 4326,
    resolution: float | None = None,
    size: tuple[int, int] | None = None,
    config: Any = None,
    data_folder: str | None = None,
) -> Any:
    """A Process API request for the cloud layers (CLD, SCL, CLP + dataMask, UINT8) of the least cloudy
    Sentinel-2 L2A acquisition in ``time_interval`` over ``bbox`` (in ``crs``; ``resolution`` in its units, e.g.
    20 for a UTM crs, or ``size`` in pixels, default 512 x 512). Nothing is downloaded until ``.get_data()``."""
    from sentinelhub import CRS, BBox, DataCollection, MimeType, MosaickingOrder, SentinelHubRequest

    bad = [b for b in layers if b not in CLOUD_LAYERS]
    if bad:
        raise CatalogError(f"unknown Sentinel Hub cloud layers {bad}; valid: {list(CLOUD_LAYERS)}")
    box = BBox(bbox, crs=CRS(crs))
    if resolution is not None:
        kwargs: dict[str, Any] = {"resolution": (float(resolution), float(resolution))}
    else:
        kwargs = {"size": tuple(size or (512, 512))}
    return SentinelHubRequest(
        evalscript=_evalscript(layers),
        input_data=[SentinelHubRequest.input_data(
            data_collection=DataCollection.SENTINEL2_L2A, time_interval=time_interval,
            mosaicking_order=MosaickingOrder.LEAST_CC,
        )],
        responses=[SentinelHubRequest.output_response("default", MimeType.TIFF)],
        bbox=box,
        config=config or make_config(),
        data_folder=data_folder,
        **kwargs,
    )


class SentinelHubCatalog:
    """Sentinel Hub Catalog API behind the :class:`~cloudfree.catalogs.base.Catalog` interface."""

    name = "sentinel-hub"

    def __init__(self, cfg: Any = None, *, sh_config: Any = None) -> None:
        self.cfg = cfg
        self._config = sh_config

    @property
    def config(self) -> Any:
        if self._config is None:
            self._config = make_config(self.cfg)
        return self._config

    def _check_credentials(self) -> None:
        if not (self.config.sh_client_id and self.config.sh_client_secret):
            raise CatalogError(
                "Sentinel Hub credentials are missing: set SH_CLIENT_ID and SH_CLIENT_SECRET, or a sentinelhub "
                "config profile (`sentinelhub.config --sh_client_id ... --sh_client_secret ...`)"
            )

    def search(self, query: SearchQuery) -> list[pystac.Item]:
        from sentinelhub import CRS, BBox, DataCollection, Geometry, SentinelHubCatalog as _ShCatalog
        from oauthlib.oauth2.rfc6749.errors import OAuth2Error
        from sentinelhub.exceptions import BaseSentinelHubException

        self._check_credentials()
        start, end = parse_interval(query.datetime)
        bad = [c for c in query.collections if c not in SH_COLLECTIONS]
        if bad:  # before any network use
            raise CatalogError(f"collection(s) {bad} are not mapped to a Sentinel Hub collection; "
                               f"use one of {sorted(SH_COLLECTIONS)}")
        check_reachable(self.config.sh_token_url, timeout=min(float(getattr(self.cfg, "timeout", 30.0)), 5.0))
        time = (start.isoformat() if start else None, end.isoformat() if end else None)
        bboxes = [None]
        if query.bbox is not None:
            b = query.bbox
            bboxes = [b] if b[0] <= b[2] else [(b[0], b[1], 180.0, b[3]), (-180.0, b[1], b[2], b[3])]
        found: list[pystac.Item] = []
        catalog = _ShCatalog(config=self.config)
        for cid in query.collections:
            if cid not in SH_COLLECTIONS:
                raise CatalogError(f"collection {cid!r} is not mapped to a Sentinel Hub collection; "
                                   f"use one of {sorted(SH_COLLECTIONS)}")
            collection = getattr(DataCollection, SH_COLLECTIONS[cid])
            for bb in bboxes:
                kwargs: dict[str, Any] = {"time": time, "filter": query_to_cql2(query.query)}
                if bb is not None:
                    kwargs["bbox"] = BBox(bb, crs=CRS.WGS84)
                if query.intersects is not None:
                    kwargs["geometry"] = Geometry(query.intersects, crs=CRS.WGS84)
                if query.ids:
                    kwargs["ids"] = list(query.ids)
                try:
                    for feat in catalog.search(collection, **{k: v for k, v in kwargs.items() if v is not None}):
                        feat = dict(feat)
                        feat["collection"] = cid
                        feat.setdefault("links", [])
                        feat.setdefault("assets", {})
                        found.append(pystac.Item.from_dict(feat, preserve_dict=False))
                        if query.max_items and len(found) >= query.max_items:
                            break
                except (BaseSentinelHubException, OAuth2Error, OSError, ValueError, RuntimeError) as exc:
                    # (requests' errors are OSErrors) the message is redacted: an exception text can echo a request
                    # body
                    from cloudfree.pipeline.redact import redact

                    raise CatalogError(redact(
                        f"Sentinel Hub catalog search for {cid} failed with {query.describe()}: "
                        f"{type(exc).__name__}: {exc}; check credentials and quota")) from None
        items = dedupe(found)[: query.max_items] if query.max_items else dedupe(found)
        if not items and not query.allow_empty:
            raise NoItemsFoundError(
                f"no items in Sentinel Hub catalog ({self.config.sh_base_url}) for collection(s) "
                f"{list(query.collections)} with {query.describe()}; widen search.period / search.aoi"
            )
        return items

    def sign(self, item: pystac.Item) -> pystac.Item:
        return item

    def cloud_layers_request(self, bbox: tuple[float, float, float, float], time_interval: tuple[str, str],
                             **kwargs: Any) -> Any:
        return cloud_layers_request(bbox, time_interval, config=self.config, **kwargs)
