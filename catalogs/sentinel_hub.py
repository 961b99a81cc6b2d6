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

* Loading: Catalog API items have no files. :func:`add_virtual_assets` gives each one asset per band and cloud
  layer the Process API serves (``sentinelhub://<collection>/<item>/<band>`` hrefs, never opened as such), so band
  selection and ``mask.methods: auto`` (SCL) work as for any catalog. The load path
  (:func:`cloudfree.stages.load.fetch_remote_assets`) calls :func:`fetch_for_items`: the bands the load needs are
  requested on the output grid (the acquisition = the item's datetime +- 10 min, least cloudy first), in tiles of at
  most ``catalog.sh_max_pixels`` (the API's limit is 2500 px a side), all missing bands of a tile in one request,
  as UINT16 DN (``units: "DN"``; Sentinel Hub harmonises the baseline-04.00 offset, so scale 1e-4, offset 0), 0
  where ``dataMask`` is 0; each band is written to ``<cache_dir>/<item>/<grid hash>/<band>.tif`` (atomic rename
  when all its tiles came) and read from there by odc-stac like any local COG. A later load of the same item, band
  and grid downloads nothing. Sentinel-1 items are searched but not loaded.

Building a request needs no network; downloading it does (``request.get_data()``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
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
        from cloudfree.catalogs.access import access_from_config

        self.cfg = cfg
        self._config = sh_config
        url = str(getattr(cfg, "url", "") or "")
        #: stamped on every item: the load path fetches their bands from this deployment (credentials from the
        #: environment / sentinelhub profile at load time, never stamped)
        self.access = access_from_config(
            cfg, self.name, sh_url=url.rstrip("/") if url.startswith(("http://", "https://")) else None,
            cache_dir=getattr(cfg, "cache_dir", None), max_pixels=int(getattr(cfg, "sh_max_pixels", MAX_REQUEST_PX)),
            timeout=float(getattr(cfg, "timeout", 30.0)), max_retries=int(getattr(cfg, "max_retries", 4)))

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
                        found.append(add_virtual_assets(pystac.Item.from_dict(feat, preserve_dict=False), cid))
                        if query.max_items and len(found) >= query.max_items:
                            break
                except (BaseSentinelHubException, OAuth2Error, OSError, ValueError, RuntimeError) as exc:
                    # (requests' errors are OSErrors) the message is redacted: an exception text can echo a request
                    # body
                    from cloudfree.pipeline.redact import redact

                    raise CatalogError(redact(
                        f"Sentinel Hub catalog search for {cid} failed with {query.describe()}: "
                        f"{type(exc).__name__}: {exc}; check credentials and quota")) from None
        items = dedupe(found, warn_identical=False)
        items = items[: query.max_items] if query.max_items else items
        from cloudfree.catalogs.access import prepare_items

        items = prepare_items(items, self.access)
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


# -- loading: bands and cloud layers through the Process API -------------------------------------------------------
#: the scheme of the assets a Sentinel Hub item carries until the load path fetches them (never opened as such).
VIRTUAL_SCHEME = "sentinelhub"
#: what the Process API serves per collection: reflectance bands (DN, scale 1e-4) and layers.
SH_BANDS = {
    "sentinel-2-l2a": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
    "sentinel-2-l1c": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"),
}
SH_LAYERS = {"sentinel-2-l2a": ("SCL", "CLD", "CLP"), "sentinel-2-l1c": ("CLP",)}
#: the Process API's largest output side (pixels); larger grids are requested in tiles.
MAX_REQUEST_PX = 2500


def add_virtual_assets(item: pystac.Item, collection: str) -> pystac.Item:
    """Give a Sentinel Hub item (its Catalog API answer has no assets) one asset per band and cloud layer the
    Process API serves, with a ``sentinelhub://`` href that only :func:`fetch_assets` resolves."""
    for band in SH_BANDS.get(collection, ()):
        item.add_asset(band, pystac.Asset(
            f"{VIRTUAL_SCHEME}://{collection}/{item.id}/{band}", media_type=pystac.MediaType.GEOTIFF,
            roles=["data"], extra_fields={"eo:bands": [{"name": band}], "raster:bands": [
                {"data_type": "uint16", "nodata": 0, "scale": 0.0001, "offset": 0}]}))
    for layer in SH_LAYERS.get(collection, ()):
        item.add_asset(layer, pystac.Asset(
            f"{VIRTUAL_SCHEME}://{collection}/{item.id}/{layer}", media_type=pystac.MediaType.GEOTIFF,
            roles=["data"], extra_fields={"raster:bands": [{"data_type": "uint8", "nodata": 0 if layer == "SCL" else None}]}))
    return item


def is_virtual(href: str) -> bool:
    return href.startswith(f"{VIRTUAL_SCHEME}://")


def _band_evalscript(bands: Sequence[str]) -> str:
    names = ", ".join(f'"{b}"' for b in (*bands, "dataMask"))
    values = ", ".join(f"s.{b}" for b in bands)
    zeros = ", ".join("0" for _ in bands)
    return (
        "//VERSION=3\n"
        "function setup() {\n"
        f"  return {{input: [{{bands: [{names}], units: \"DN\"}}], output: {{bands: {len(bands)}, sampleType: \"UINT16\"}}}};\n"
        "}\n"
        f"function evaluatePixel(s) {{ return s.dataMask ? [{values}] : [{zeros}]; }}\n"
    )


def grid_key(geobox: Any) -> str:
    """A short, stable name of a pixel grid (CRS, transform, shape) for the cache folder."""
    import hashlib

    text = f"{geobox.crs.to_wkt()}|{tuple(geobox.transform)[:6]}|{tuple(geobox.shape)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def band_request(collection: str, bands: Sequence[str], bounds: tuple[float, float, float, float], epsg: int,
                 size: tuple[int, int], time_interval: tuple[str, str], config: Any) -> Any:
    """A Process API request for ``bands`` (DN, UINT16, 0 where there is no data) of the acquisition in
    ``time_interval`` on the grid ``bounds`` (in EPSG ``epsg``) x ``size`` (width, height) pixels."""
    from sentinelhub import CRS, BBox, DataCollection, MimeType, MosaickingOrder, SentinelHubRequest

    if max(size) > MAX_REQUEST_PX:
        raise CatalogError(f"a Process API request of {size} px exceeds the {MAX_REQUEST_PX} px limit")
    data_collection = getattr(DataCollection, SH_COLLECTIONS[collection])
    base = str(config.sh_base_url).rstrip("/")
    if data_collection.service_url and data_collection.service_url.rstrip("/") != base:
        # another deployment than the collection's default (a local test server, an enterprise one): the collection's
        # own service_url would win over config.sh_base_url in the request
        import hashlib

        name = f"{data_collection.name}_{hashlib.sha256(base.encode()).hexdigest()[:10]}"
        data_collection = DataCollection.define_from(data_collection, name, service_url=base)
    return SentinelHubRequest(
        evalscript=_band_evalscript(bands),
        input_data=[SentinelHubRequest.input_data(
            data_collection=data_collection, time_interval=time_interval,
            mosaicking_order=MosaickingOrder.LEAST_CC)],
        responses=[SentinelHubRequest.output_response("default", MimeType.TIFF)],
        bbox=BBox(bounds, crs=CRS(epsg)), size=size, config=config)


def _acquisition_interval(item: pystac.Item, minutes: float = 10.0) -> tuple[str, str]:
    from datetime import timedelta

    dt = item.datetime or item.common_metadata.start_datetime
    if dt is None:
        raise CatalogError(f"Sentinel Hub item {item.id} has no datetime; it cannot be requested")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return (dt - timedelta(minutes=minutes)).strftime(fmt), (dt + timedelta(minutes=minutes)).strftime(fmt)


def fetch_assets(items: Sequence[pystac.Item], keys: Sequence[str], geobox: Any, *, config: Any,
                 cache_dir: str | Path, max_px: int = MAX_REQUEST_PX) -> list[pystac.Item]:
    """``items`` with their ``sentinelhub://`` assets among ``keys`` fetched on ``geobox`` and replaced by local
    GeoTIFFs (one per band, under ``cache_dir/<item>/<grid>/``; a later load of the same grid reuses them).

    The grid is requested in tiles of at most ``max_px`` pixels a side (the Process API's limit is 2500), all
    missing bands of a tile in one request; a band's file appears (atomic rename) only when all its tiles came.
    """
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from cloudfree.pipeline.safety import safe_stem

    epsg = geobox.crs.epsg
    if epsg is None:
        raise CatalogError(f"Sentinel Hub requests need an EPSG grid; grid CRS {geobox.crs} has none: set grid.crs")
    ny, nx = geobox.shape
    step = max(16, min(int(max_px), MAX_REQUEST_PX))
    out = []
    for it in items:
        want = [k for k in dict.fromkeys(keys) if k in it.assets and is_virtual(it.assets[k].href)]
        if not want:
            out.append(it)
            continue
        collection = it.assets[want[0]].href[len(VIRTUAL_SCHEME) + 3:].split("/", 1)[0]
        folder = Path(cache_dir) / safe_stem(it.id) / grid_key(geobox)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [k for k in want if not (folder / f"{k}.tif").exists()]
        if missing:
            tmp = {k: folder / f".{k}.{os.getpid()}.tif" for k in missing}
            profile = {"driver": "GTiff", "width": nx, "height": ny, "count": 1, "dtype": "uint16", "nodata": 0,
                       "crs": f"EPSG:{epsg}", "transform": geobox.transform, "tiled": True, "blockxsize": 256,
                       "blockysize": 256, "compress": "deflate"}
            dsts = {k: rasterio.open(p, "w", **profile) for k, p in tmp.items()}
            try:
                interval = _acquisition_interval(it)
                for y0 in range(0, ny, step):
                    for x0 in range(0, nx, step):
                        h, w = min(step, ny - y0), min(step, nx - x0)
                        t = geobox.transform
                        bounds = (t.c + x0 * t.a, t.f + (y0 + h) * t.e, t.c + (x0 + w) * t.a, t.f + y0 * t.e)
                        req = band_request(collection, missing, bounds, epsg, (w, h), interval, config)
                        try:
                            (data,) = req.get_data()
                        except Exception as exc:  # noqa: BLE001 - sentinelhub raises many types; redacted, named
                            from cloudfree.pipeline.redact import redact

                            raise CatalogError(redact(
                                f"Sentinel Hub Process API request for item {it.id} bands {missing} failed: "
                                f"{type(exc).__name__}: {exc}; check credentials, quota and the network")) from None
                        data = np.asarray(data)
                        if data.ndim == 2:
                            data = data[:, :, None]
                        if data.shape[:2] != (h, w) or data.shape[2] != len(missing):
                            raise CatalogError(f"Sentinel Hub answered {data.shape} for item {it.id}, expected "
                                               f"{(h, w, len(missing))}")
                        for i, k in enumerate(missing):
                            dsts[k].write(data[:, :, i].astype(np.uint16), 1, window=Window(x0, y0, w, h))
            except BaseException:
                for d in dsts.values():
                    d.close()
                for p in tmp.values():
                    p.unlink(missing_ok=True)
                raise
            for k, d in dsts.items():
                d.close()
                os.replace(tmp[k], folder / f"{k}.tif")
            log.info("Sentinel Hub: %s bands %s fetched on a %dx%d grid (%d request(s))", it.id, missing, nx, ny,
                     -(-ny // step) * -(-nx // step))
        local = it.clone()
        for k in want:
            local.assets[k].href = str(folder / f"{k}.tif")
            local.assets[k].extra_fields["cloudfree:fetched_from"] = "sentinel-hub process api"
        out.append(local)
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cloudfree" / "sentinel-hub"


def fetch_for_items(items: Sequence[pystac.Item], keys: Sequence[str], geobox: Any) -> list[pystac.Item]:
    """:func:`fetch_assets` with each item's Sentinel Hub deployment, cache and limits from its
    ``cloudfree:access`` stamp; credentials from SH_CLIENT_ID / SH_CLIENT_SECRET or the sentinelhub profile."""
    from types import SimpleNamespace

    from cloudfree.catalogs.access import AssetAccess

    out = []
    for it in items:
        acc = AssetAccess.of(it)
        if acc.catalog != "sentinel-hub" or not any(k in it.assets and is_virtual(it.assets[k].href) for k in keys):
            out.append(it)
            continue
        cfg = SimpleNamespace(url=acc.sh_url or "", timeout=acc.timeout, backoff_factor=0.5,
                              max_retries=acc.max_retries if acc.max_retries is not None else 4)
        config = make_config(cfg)
        if not (config.sh_client_id and config.sh_client_secret):
            raise CatalogError(
                f"item {it.id} is loaded through the Sentinel Hub Process API, which needs credentials: set "
                "SH_CLIENT_ID and SH_CLIENT_SECRET, or a sentinelhub config profile")
        check_reachable(config.sh_token_url, timeout=min(acc.timeout, 5.0))
        [local] = fetch_assets([it], keys, geobox, config=config,
                               cache_dir=acc.cache_dir or default_cache_dir(),
                               max_px=acc.max_pixels or MAX_REQUEST_PX)
        if local is not it:  # its files are ours (under the cache folder): local hrefs allowed for this copy
            local.properties["cloudfree:access"] = {**acc.as_dict(), "allow_local": True}
        out.append(local)
    return out
