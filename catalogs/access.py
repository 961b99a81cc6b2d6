"""How the load path reaches a catalog's assets: band names, the href policy and lazy signing, per item.

Every backend's search stamps its items with an :class:`AssetAccess` (item property ``cloudfree:access``; an API
backend always overwrites what the catalog sent, so a remote catalog cannot grant itself access). The load path
(:mod:`cloudfree.stages.load`, :mod:`cloudfree.stages.plausibility`, the SCL clear-fraction estimator, SAR) never
opens ``asset.href`` directly but :func:`readable_href`, and odc-stac signs through :func:`items_signer`:

* **Band names**: :func:`map_band_assets` keys the band assets by the pipeline's names (``B02`` ... ``B12``,
  ``SCL``, ``CLD``) whatever the catalog calls them: Planetary Computer / Earth Search v0 ``B04``, Earth Search v1
  and stactools ``red`` / ``scl``, or any key whose ``eo:bands`` ``name`` / ``common_name`` says which band it
  holds (:func:`cloudfree.catalogs.bands.asset_key`). The catalog's own key is kept in ``cloudfree:asset_key``.
* **Href policy** (:func:`check_href`): an item of a remote catalog (``stac-api``, ``earth-search``,
  ``planetary-computer``, ``sentinel-hub``) may be read only over ``http(s)``, ``s3``, ``az`` or ``gs``, and not
  from a loopback, link-local, private, reserved or unspecified address (host names are resolved) nor from a
  local path (``/etc/passwd``, ``file://``, ``/vsi...``), unless ``catalog.allow_local_hrefs`` is true (tests
  with a server on 127.0.0.1, an in-house API on a private network). Local catalogs are the user's own files:
  always allowed. A refused href raises :class:`HrefRefusedError` naming the item, the asset and the key.
  Not covered: an HTTP redirect from a public host to a private one is followed by GDAL.
* **Signing** (Planetary Computer): the href is signed when it is opened, not when the item is found, with a SAS
  token from :class:`cloudfree.catalogs.planetary_computer.SasTokenCache` (one per token endpoint and process,
  refreshed ``refresh_margin`` s before it expires). odc-stac builds its graph with the unsigned hrefs and
  :class:`SigningRioDriver` signs each one when a chunk is read, so a run longer than a token's life reads with a
  fresh token (PC tokens live ~45-60 min). The driver (:func:`cloudfree.stages.load.reader_driver`) pickles as its
  settings: distributed workers keep their own token cache.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import pystac

from cloudfree.pipeline.errors import InputDataError

log = logging.getLogger(__name__)

ACCESS_PROP = "cloudfree:access"
#: the schemes a remote catalog's asset may use.
REMOTE_SCHEMES = ("http", "https", "s3", "az", "gs")
#: the config key that lets a remote catalog's assets be local files or private/loopback addresses.
ALLOW_KEY = "catalog.allow_local_hrefs"


class HrefRefusedError(InputDataError):
    """A remote catalog's asset href points at a local file or a loopback/private address (see module doc)."""


@dataclass(frozen=True)
class AssetAccess:
    """How the items of one catalog are read (stamped on each item as ``cloudfree:access``)."""

    #: the catalog kind the item came from.
    catalog: str = "local"
    #: local paths and loopback/private/link-local addresses allowed (local catalogs; ``catalog.allow_local_hrefs``).
    allow_local: bool = True
    #: "planetary-computer": Azure blob hrefs are signed with SAS tokens when read; None: read as they are.
    signer: str | None = None
    #: the SAS token endpoint (``catalog.sas_url``; None: planetary_computer's default).
    sas_url: str | None = None
    #: a path-style blob endpoint (``http://host:port/<account>/<container>/...``, as Azurite or a test server
    #: serve blobs) whose hrefs are signed like ``<account>.blob.core.windows.net`` ones.
    blob_endpoint: str | None = None
    #: refresh a token this many seconds before it expires.
    refresh_margin: float = 300.0
    #: per-request timeout (s) of the token endpoint / Sentinel Hub, and Sentinel Hub's retries.
    timeout: float = 10.0
    max_retries: int | None = None
    #: sentinel-hub: the deployment's base URL (None: services.sentinel-hub.com), the download cache folder and
    #: the largest side (px) of one Process API request.
    sh_url: str | None = None
    cache_dir: str | None = None
    max_pixels: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def of(cls, item: pystac.Item) -> "AssetAccess":
        """The access an item was stamped with; an unstamped item (built by hand, a local file) reads as local."""
        d = item.properties.get(ACCESS_PROP)
        if not isinstance(d, dict):
            return cls()
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return cls(catalog="unknown", allow_local=False)


def access_from_config(cfg: Any, kind: str, **extra: Any) -> AssetAccess:
    """The :class:`AssetAccess` of an API backend built from the ``catalog`` config section."""
    allow = bool(getattr(cfg, "allow_local_hrefs", False)) if cfg is not None else False
    return AssetAccess(catalog=kind, allow_local=allow, **extra)


def prepare_items(items: Iterable[pystac.Item], access: AssetAccess, *, overwrite: bool = True) -> list[pystac.Item]:
    """Items with band assets keyed by pipeline band names and stamped with ``access`` (in place, returned).

    ``overwrite=False`` keeps a stamp the item already carries (local catalogs: an export of remote items keeps
    its signer) but always allows local hrefs there."""
    out = []
    for it in items:
        map_band_assets(it)
        if overwrite or ACCESS_PROP not in it.properties:
            it.properties[ACCESS_PROP] = access.as_dict()
        elif access.allow_local:
            it.properties[ACCESS_PROP] = {**AssetAccess.of(it).as_dict(), "allow_local": True}
        out.append(it)
    return out


#: asset keys the pipeline reads under their own name (never renamed).
KEEP_KEYS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12", "SCL", "AOT",
             "WVP", "CLD", "CLDPRB", "MSK_CLDPRB", "CLP", "CLM")


def map_band_assets(item: pystac.Item) -> pystac.Item:
    """Key ``item``'s band assets by pipeline band names (``red`` -> ``B04``, ``scl`` -> ``SCL``), in place.

    Assets that are not bands (thumbnail, metadata, ``*-jp2`` duplicates, resampled ``red_20m``) keep their keys;
    an item already keyed ``B04`` is unchanged. The original key is kept in the asset's ``cloudfree:asset_key``.
    """
    from cloudfree.catalogs.bands import AUX_KEYS, S2_REFLECTANCE_BANDS, asset_key

    renamed: dict[str, pystac.Asset] = {}
    for band in (*S2_REFLECTANCE_BANDS, *AUX_KEYS):
        if band in item.assets:
            continue
        key = asset_key(item, band)
        if key is None or key in renamed.values() or key in KEEP_KEYS:
            continue
        renamed[band] = key  # type: ignore[assignment]
    if not renamed:
        return item
    assets = dict(item.assets)
    for band, key in renamed.items():
        asset = assets.pop(key)  # type: ignore[arg-type]
        asset.extra_fields["cloudfree:asset_key"] = key
        assets[band] = asset
    item.assets.clear()
    for k, a in assets.items():
        item.add_asset(k, a)
    return item


# -- href policy ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> tuple[str, ...]:
    """The IP addresses ``host`` resolves to (a literal address as itself); () when it does not resolve (offline:
    the read fails on its own)."""
    try:
        return (str(ipaddress.ip_address(host.strip("[]"))),)
    except ValueError:
        pass
    try:
        return tuple(sorted({ai[4][0] for ai in socket.getaddrinfo(host, None)}))
    except (socket.gaierror, UnicodeError, OSError):
        return ()


def _not_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_unspecified
            or ip.is_multicast)


def href_problem(href: str) -> str | None:
    """Why a remote catalog may not point at ``href`` (None: it may)."""
    u = urlsplit(href)
    scheme = u.scheme.lower()
    if scheme not in REMOTE_SCHEMES or (len(scheme) == 1 and href[1:2] == ":"):
        return f"it is a local path or an unsupported scheme ({scheme or 'no scheme'!r}; allowed: " \
               f"{', '.join(REMOTE_SCHEMES)})"
    if scheme in ("http", "https"):
        host = u.hostname
        if not host:
            return "it has no host"
        if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
            return f"its host {host!r} is the local machine"
        bad = [a for a in _addresses(host) if _not_public(a)]
        if bad:
            return f"its host {host!r} is a loopback, private, link-local or reserved address ({bad[0]})"
    return None


def check_href(item: pystac.Item, key: str, href: str, access: AssetAccess | None = None) -> None:
    """Raise :class:`HrefRefusedError` when ``item``'s asset ``key`` may not be read from ``href``."""
    access = access or AssetAccess.of(item)
    if access.allow_local:
        return
    why = href_problem(href)
    if why is not None:
        from cloudfree.pipeline.redact import redact

        raise HrefRefusedError(redact(
            f"item {item.id!r} asset {key!r} of the {access.catalog} catalog is refused: {href[:200]!r}: {why}; a "
            f"remote catalog's assets are read only from public http(s)/s3/az/gs addresses. Set {ALLOW_KEY}: true "
            "only when you trust the catalog (a test server, an in-house API on a private network)"))


def check_items(items: Sequence[pystac.Item], keys: Sequence[str]) -> None:
    """:func:`check_href` for every ``(item, key)`` the item has (before a graph is built)."""
    for it in items:
        for k in keys:
            if k in it.assets:
                check_href(it, k, asset_href(it, k))


def asset_href(item: pystac.Item, key: str) -> str:
    """The asset's absolute href as the catalog gave it (unsigned; local relative paths made absolute)."""
    asset = item.assets[key]
    raw = asset.href
    if raw.startswith("/") or "://" in raw:
        return raw
    return asset.get_absolute_href() or raw


def readable_href(item: pystac.Item, key: str) -> str:
    """The href to open ``item``'s asset ``key`` with: checked against the href policy, signed when the item's
    catalog signs (:class:`HrefRefusedError` / :class:`~cloudfree.pipeline.errors.CatalogError` otherwise)."""
    access = AssetAccess.of(item)
    href = asset_href(item, key)
    check_href(item, key, href, access)
    signer = signer_for(access)
    return signer(href) if signer is not None else href


# -- signing ----------------------------------------------------------------------------------------------------------
_CACHES: dict[tuple, Any] = {}
_CACHES_LOCK = threading.Lock()


@dataclass(frozen=True)
class HrefSigner:
    """A picklable ``href -> signed href`` for one token endpoint (Planetary Computer SAS)."""

    sas_url: str | None = None
    blob_endpoint: str | None = None
    refresh_margin: float = 300.0
    timeout: float = 10.0

    def cache(self) -> Any:
        from cloudfree.catalogs.planetary_computer import SasTokenCache

        key = (self.sas_url, self.blob_endpoint, self.refresh_margin, self.timeout)
        with _CACHES_LOCK:
            c = _CACHES.get(key)
            if c is None:
                c = _CACHES[key] = SasTokenCache(self.sas_url, timeout=self.timeout, max_retries=2,
                                                 refresh_margin=self.refresh_margin,
                                                 blob_endpoint=self.blob_endpoint)
            return c

    def __call__(self, href: str) -> str:
        return self.cache().sign_href(href)


def signer_for(access: AssetAccess) -> HrefSigner | None:
    if access.signer != "planetary-computer":
        return None
    return HrefSigner(access.sas_url, access.blob_endpoint, access.refresh_margin, access.timeout)


def items_signer(items: Sequence[pystac.Item]) -> HrefSigner | None:
    """The one signer of ``items`` (None: they are read as they are)."""
    signers = {s for s in (signer_for(AssetAccess.of(it)) for it in items) if s is not None}
    if len(signers) > 1:
        raise InputDataError(f"items {[it.id for it in items]} come from catalogs with different token endpoints; "
                             "load them separately")
    return signers.pop() if signers else None
