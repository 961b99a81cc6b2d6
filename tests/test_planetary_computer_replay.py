"""PlanetaryComputerCatalog against recorded real PC responses (VCR cassettes) served from 127.0.0.1 by
tests/replay.py; retries / timeouts with injected failures; lazy SAS signing with a local token endpoint."""

from __future__ import annotations

import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from cloudfree.catalogs.base import SearchQuery
from cloudfree.catalogs.planetary_computer import PlanetaryComputerCatalog, SasTokenCache, token_expiry
from cloudfree.catalogs.stac_api import StacApiCatalog
from cloudfree.pipeline.errors import CatalogError
from tests.replay import ReplayServer

NL = {"type": "Polygon", "coordinates": [[[6.42425537109375, 53.174765470134616], [7.344360351562499, 53.174765470134616],
                                          [7.344360351562499, 53.67393435835391], [6.42425537109375, 53.67393435835391],
                                          [6.42425537109375, 53.174765470134616]]]}


@pytest.fixture(scope="module")
def _replay_server(stac_data: Path) -> Iterator[ReplayServer]:
    r = ReplayServer(sorted((stac_data / "pystac-client").glob("*.yaml"))
                     + sorted((stac_data / "stac-geoparquet").glob("*.yaml"))).start()
    yield r
    r.stop()


@pytest.fixture()
def replay(_replay_server: ReplayServer) -> ReplayServer:
    r = _replay_server
    r.fail_first, r.delay, r.extra, r.log = [], 0.0, {}, []
    return r


def _pc(r: ReplayServer, **kw) -> PlanetaryComputerCatalog:
    kw.setdefault("backoff_factor", 0.01)
    return PlanetaryComputerCatalog(url=r.url + "/api/stac/v1", sas_url=r.url + "/api/sas/v1/token", **kw)


def test_search_with_query_replays_real_response(replay) -> None:
    items = _pc(replay).search(SearchQuery(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05),
                                           query={"gsd": {"eq": 0.6}}))
    assert len(items) == 12 and all(i.properties["gsd"] == 0.6 for i in items)
    assert all(".blob.core.windows.net" in i.assets["image"].href and "?" not in i.assets["image"].href
               for i in items)  # unsigned: signing is lazy


def test_first_page_of_paged_search(replay) -> None:
    items = _pc(replay).search(SearchQuery(collections=("landsat-8-c2-l2",), intersects=NL, max_items=250))
    assert len(items) == 250 and len({i.id for i in items}) == 250
    # the recorded page carried a next link; max_items stopped before it (the second page was not recorded)
    assert sum(1 for m, p, s in replay.log if p.endswith("/search")) == 1


def test_get_item_by_collection_endpoint(replay) -> None:
    it = _pc(replay).get("S2A_MSIL2A_20150704T101006_R022_T35XQA_20210411T133707", "sentinel-2-l2a")
    assert it.properties["s2:processing_baseline"] == "02.12" and "SCL" in it.assets


def test_retries_on_503_and_429_then_succeeds(replay) -> None:
    replay.fail_first = [503, 429, 502]
    items = _pc(replay, max_retries=4).search(SearchQuery(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05),
                                                          query={"gsd": {"eq": 0.6}}))
    assert len(items) == 12
    assert [s for _, _, s in replay.log[:3]] == [503, 429, 502]


def test_gives_up_with_catalog_error_after_retries(replay) -> None:
    cat = _pc(replay, max_retries=1)
    cat.client  # open while the server answers
    replay.fail_first = [503] * 5
    with pytest.raises(CatalogError, match=r"search of http://127\.0\.0\.1.*naip.*retries"):
        cat.search(SearchQuery(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05), query={"gsd": {"eq": 0.6}}))


def test_timeout_fails_fast(replay) -> None:
    replay.delay = 2.0
    t0 = time.monotonic()
    with pytest.raises(CatalogError, match="cannot open STAC API"):
        StacApiCatalog(url=replay.url + "/api/stac/v1", timeout=0.3, max_retries=1, backoff_factor=0.01).client
    assert time.monotonic() - t0 < 5


def _token(minutes: float) -> dict:
    exp = datetime.now(timezone.utc) + timedelta(minutes=minutes)
    se = exp.strftime("%Y-%m-%dT%H:%M:%SZ")
    # synthetic token in the PC format (no real SAS response was recorded)
    return {"msft:expiry": se, "token": f"st=2024-01-01T00%3A00%3A00Z&se={se.replace(':', '%3A')}&sp=rl&sv=2021-06-08&sr=c&sig=x"}


def test_lazy_signing_and_token_cache(replay) -> None:
    replay.extra["/api/sas/v1/token/sentinel2l2a01/sentinel2-l2"] = _token(45)
    cat = _pc(replay)
    it = cat.get("S2A_MSIL2A_20150704T101006_R022_T35XQA_20210411T133707", "sentinel-2-l2a")
    assert cat.tokens.fetches == 0
    signed = cat.sign(it, assets=("B04", "SCL"))
    assert "se=" in signed.assets["B04"].href and "se=" in signed.assets["SCL"].href
    assert "?" not in signed.assets["B02"].href and "?" not in it.assets["B04"].href  # only asked-for, copy
    assert "msft:expiry" in signed.properties
    cat.sign(it)
    assert cat.tokens.fetches == 1  # one container, one token, cached
    # already-signed hrefs with a valid se= are left alone
    assert cat.sign_href(signed.assets["B04"].href) == signed.assets["B04"].href


def test_token_refreshed_before_expiry(replay) -> None:
    replay.extra["/api/sas/v1/token/acc/cont"] = _token(3)  # expires within the 5-min refresh margin
    cache = SasTokenCache(replay.url + "/api/sas/v1/token", timeout=2, max_retries=0, refresh_margin=300)
    cache.get("acc", "cont")
    cache.get("acc", "cont")
    assert cache.fetches == 2
    replay.extra["/api/sas/v1/token/acc/cont"] = _token(45)
    cache.get("acc", "cont")
    cache.get("acc", "cont")
    assert cache.fetches == 3
    assert abs((token_expiry(cache.get("acc", "cont").token) - datetime.now(timezone.utc)).total_seconds() - 2700) < 60


def test_offline_signing_fails_fast_not_443_s() -> None:
    # a listening socket that never answers: the worst case (connect succeeds, no response)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        cache = SasTokenCache(f"http://127.0.0.1:{s.getsockname()[1]}/token", timeout=0.5, max_retries=1,
                              deadline=3.0)
        t0 = time.monotonic()
        with pytest.raises(CatalogError, match="SAS token"):
            cache.sign_href("https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B04.tif")
        assert time.monotonic() - t0 < 5


def test_non_blob_hrefs_are_not_signed() -> None:
    cache = SasTokenCache("http://127.0.0.1:9/unused", timeout=0.1, max_retries=0)
    href = "https://sentinel-cogs.s3.us-west-2.amazonaws.com/x/B04.tif"
    assert cache.sign_href(href) == href and cache.fetches == 0


@pytest.mark.network
def test_live_planetary_computer_search_and_sign() -> None:
    cat = PlanetaryComputerCatalog(timeout=20, max_retries=2)
    (item,) = cat.search(SearchQuery(collections=("sentinel-2-l2a",), bbox=(17.28, 48.83, 17.31, 48.86),
                                     datetime="2024-06-01/2024-06-30", max_items=1))
    assert "se=" in cat.sign(item, assets=("B04",)).assets["B04"].href
