"""Microsoft Planetary Computer: ``sentinel-2-l2a``, ``sentinel-1-rtc``, ``sentinel-1-grd``, with lazy signing.

Search is the generic :class:`~cloudfree.catalogs.stac_api.StacApiCatalog`; items come back UNSIGNED, stamped with
an access (:mod:`cloudfree.catalogs.access`) that tells the load path to sign them. Asset hrefs on Azure blob
storage need a SAS token, fetched per (storage account, container) only when an asset is opened: odc-stac reads
through :class:`cloudfree.stages.load.SigningRioDriver`, which signs each href as a chunk opens it (a token that
expires during a long run is renewed there, not baked into the graph); the probes, plausibility samples, SCL
clear fractions and Sentinel-1 RTC reads sign through :func:`cloudfree.catalogs.access.readable_href`.
:meth:`PlanetaryComputerCatalog.sign` / :meth:`PlanetaryComputerCatalog.sign_href` sign on demand for other users.

Why not ``planetary_computer.sign`` directly: its token request has no timeout and 10 retries, which without
network blocks ~443 s. :class:`SasTokenCache` does the same request with a per-attempt timeout, a few retries
with backoff + jitter, and an overall deadline (the request runs in a worker thread), so offline it fails fast
with :class:`~cloudfree.pipeline.errors.CatalogError`. Tokens are refreshed ``refresh_margin`` seconds before they
expire (PC tokens live ~45-60 min); the expiry is the earlier of ``msft:expiry`` and the token's own ``se=``.
Fetched tokens are also put into ``planetary_computer.sas.TOKEN_CACHE``, so code that later calls
``planetary_computer.sign`` (odc-stac ``patch_url``) reuses them without a second request. The subscription key
(``PC_SDK_SUBSCRIPTION_KEY``, read by ``planetary_computer.settings``) is sent as a header and never logged.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

import pystac
import requests

from cloudfree.catalogs.stac_api import StacApiCatalog, make_retry
from cloudfree.pipeline.errors import CatalogError

log = logging.getLogger(__name__)

PC_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
PC_COLLECTIONS = ("sentinel-2-l2a", "sentinel-1-rtc", "sentinel-1-grd")
BLOB_DOMAIN = ".blob.core.windows.net"
#: public containers that need no token (thumbnails).
UNSIGNED_ACCOUNTS = ("ai4edatasetspublicassets",)


@dataclass(frozen=True)
class SasToken:
    token: str
    expiry: datetime

    def ttl(self, now: datetime | None = None) -> float:
        return (self.expiry - (now or datetime.now(timezone.utc))).total_seconds()


def token_expiry(token: str, msft_expiry: str | None = None) -> datetime:
    """Expiry of a SAS token: the earlier of the API's ``msft:expiry`` and the token's ``se=`` field."""
    candidates = []
    for text in (msft_expiry, (parse_qs(token).get("se") or [None])[0]):
        if text:
            d = datetime.fromisoformat(text.replace("Z", "+00:00"))
            candidates.append(d if d.tzinfo else d.replace(tzinfo=timezone.utc))
    if not candidates:
        raise CatalogError("Planetary Computer SAS token has neither msft:expiry nor se=; cannot tell when it expires")
    return min(candidates)


def blob_account_container(href: str, blob_endpoint: str | None = None) -> tuple[str, str] | None:
    """(account, container) of an Azure blob href, or None for any other href. With ``blob_endpoint``
    (``http://host:port``, path-style as Azurite serves blobs), ``<blob_endpoint>/<account>/<container>/...``
    hrefs count as blob hrefs too."""
    if blob_endpoint:
        base = blob_endpoint.rstrip("/") + "/"
        if href.startswith(base):
            parts = href[len(base):].split("?", 1)[0].split("/")
            if len(parts) >= 3 and parts[0] and parts[1] and parts[0] not in UNSIGNED_ACCOUNTS:
                return parts[0], parts[1]
            return None
    u = urlparse(href)
    if not u.netloc.endswith(BLOB_DOMAIN):
        return None
    account = u.netloc[: -len(BLOB_DOMAIN)]
    container = u.path.lstrip("/").split("/", 1)[0]
    if account in UNSIGNED_ACCOUNTS or not container:
        return None
    return account, container


class SasTokenCache:
    """SAS tokens per (account, container), fetched with a timeout and refreshed before they expire."""

    def __init__(self, sas_url: str | None = None, *, timeout: float = 10.0, max_retries: int = 2,
                 backoff_factor: float = 0.5, deadline: float | None = None, refresh_margin: float = 300.0,
                 subscription_key: str | None = None, blob_endpoint: str | None = None) -> None:
        if sas_url is None or subscription_key is None:
            from planetary_computer.settings import Settings

            settings = Settings.get()
            sas_url = sas_url or settings.sas_url
            subscription_key = subscription_key if subscription_key is not None else settings.subscription_key
        self.sas_url = str(sas_url).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        #: wall-clock limit for one token fetch including retries.
        self.deadline = deadline if deadline is not None else timeout * (max_retries + 1) + 5.0
        self.refresh_margin = refresh_margin
        self.blob_endpoint = blob_endpoint
        self._key = subscription_key
        self._tokens: dict[tuple[str, str], SasToken] = {}
        self._lock = threading.Lock()
        self.fetches = 0

    def _session(self) -> requests.Session:
        s = requests.Session()
        adapter = requests.adapters.HTTPAdapter(max_retries=make_retry(self.max_retries, self.backoff_factor))
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        if self._key:
            s.headers["Ocp-Apim-Subscription-Key"] = self._key
        return s

    def _fetch(self, account: str, container: str) -> SasToken:
        url = f"{self.sas_url}/{account}/{container}"
        with self._session() as s:
            r = s.get(url, timeout=self.timeout)
            r.raise_for_status()
            body = r.json()
        token = body["token"]
        return SasToken(token=token, expiry=token_expiry(token, body.get("msft:expiry")))

    def get(self, account: str, container: str) -> SasToken:
        key = (account, container)
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.ttl() > self.refresh_margin:
                return tok
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pc-sas")
            future = pool.submit(self._fetch, account, container)
            try:
                tok = future.result(timeout=self.deadline)
            except concurrent.futures.TimeoutError:
                raise CatalogError(
                    f"Planetary Computer SAS token for {account}/{container} not received within {self.deadline:.0f} s "
                    f"from {self.sas_url}; check the network or raise catalog.timeout"
                ) from None
            except (requests.RequestException, KeyError, ValueError) as exc:
                raise CatalogError(
                    f"cannot get a Planetary Computer SAS token for {account}/{container} from {self.sas_url}: "
                    f"{type(exc).__name__}: {exc}; check the network (offline runs need a local catalog) or "
                    "set PC_SDK_SUBSCRIPTION_KEY if requests are throttled"
                ) from exc
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            self.fetches += 1
            self._tokens[key] = tok
            self._share_with_planetary_computer(account, container, tok)
            log.debug("SAS token for %s/%s valid until %s", account, container, tok.expiry.isoformat())
            return tok

    def _share_with_planetary_computer(self, account: str, container: str, tok: SasToken) -> None:
        try:
            from planetary_computer import sas

            sas.TOKEN_CACHE[f"{self.sas_url}/{account}/{container}"] = sas.SASToken(
                token=tok.token, **{"msft:expiry": tok.expiry})
        except (ImportError, ValueError, TypeError) as exc:  # pydantic validation of a foreign model
            log.debug("could not share the token with planetary_computer's cache: %s", exc)

    def sign_href(self, href: str) -> str:
        ac = blob_account_container(href, self.blob_endpoint)
        if ac is None:
            return href
        u = urlparse(href)
        q = parse_qs(u.query)
        if "se" in q:
            try:
                if token_expiry(u.query).timestamp() - datetime.now(timezone.utc).timestamp() > self.refresh_margin:
                    return href
            except (CatalogError, ValueError):
                pass
            href = u._replace(query="").geturl()  # expired or about to: re-sign
        return f"{href}?{self.get(*ac).token}"


class PlanetaryComputerCatalog(StacApiCatalog):
    """Planetary Computer STAC API; items are signed lazily (see the module docstring)."""

    name = "planetary-computer"
    default_url = PC_STAC_URL

    def __init__(self, cfg: Any = None, *, sas_url: str | None = None, refresh_margin: float | None = None,
                 blob_endpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        sas_url = sas_url or getattr(cfg, "sas_url", None)
        blob_endpoint = blob_endpoint or getattr(cfg, "blob_endpoint", None)
        if refresh_margin is None:
            refresh_margin = float(getattr(cfg, "sas_refresh_margin", 300.0))
        self.tokens = SasTokenCache(sas_url, timeout=min(self.timeout, 10.0), max_retries=min(self.max_retries, 2),
                                    backoff_factor=self.backoff_factor, refresh_margin=refresh_margin,
                                    blob_endpoint=blob_endpoint)
        from cloudfree.catalogs.access import access_from_config

        # the load path signs with its own cache of the same endpoint (catalogs/access.py): a token is fetched when
        # an asset is opened, not here
        self.access = access_from_config(cfg, self.name, signer="planetary-computer", sas_url=self.tokens.sas_url,
                                         blob_endpoint=blob_endpoint, refresh_margin=refresh_margin,
                                         timeout=self.tokens.timeout)

    def search(self, query: Any) -> list[pystac.Item]:
        odd = [c for c in query.collections if c not in PC_COLLECTIONS]
        if odd:
            log.warning("Planetary Computer collection(s) %s are outside the supported %s; asset names and "
                        "harmonisation may not apply", odd, list(PC_COLLECTIONS))
        return super().search(query)

    def sign_href(self, href: str) -> str:
        """One href signed (a SAS token is fetched on first use per container, then cached)."""
        return self.tokens.sign_href(href)

    def sign(self, item: pystac.Item, assets: tuple[str, ...] | None = None) -> pystac.Item:
        """A copy of ``item`` with the blob hrefs of ``assets`` (default: all) signed."""
        out = item.clone()
        expiry: datetime | None = None
        for key, asset in out.assets.items():
            if assets is not None and key not in assets:
                continue
            ac = blob_account_container(asset.href, self.tokens.blob_endpoint)
            if ac is None:
                continue
            asset.href = self.tokens.sign_href(asset.href)
            tok = self.tokens.get(*ac)
            expiry = tok.expiry if expiry is None else min(expiry, tok.expiry)
        if expiry is not None:
            out.properties["msft:expiry"] = expiry.isoformat().replace("+00:00", "Z")
        return out
