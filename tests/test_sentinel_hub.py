"""Sentinel Hub backend: requests are built without network; no credentials means a fast, clear error."""

from __future__ import annotations

import time

import pytest

from cloudfree.catalogs.base import SearchQuery
from cloudfree.catalogs.sentinel_hub import SentinelHubCatalog, cloud_layers_request, make_config, query_to_cql2
from cloudfree.pipeline.config import CatalogConfig
from cloudfree.pipeline.errors import CatalogError


@pytest.fixture(autouse=True)
def _isolated_sh_config(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SH_CLIENT_ID", raising=False)
    monkeypatch.delenv("SH_CLIENT_SECRET", raising=False)


def test_cloud_layers_request_payload() -> None:
    req = cloud_layers_request((17.287, 48.834, 17.310, 48.857), ("2024-06-01", "2024-06-30"), size=(64, 64),
                               config=make_config(max_download_attempts=1))
    dl = req.download_list[0]
    body = dl.post_values
    assert dl.url.endswith("/api/v1/process")
    assert body["input"]["data"][0]["type"] == "sentinel-2-l2a"
    assert body["input"]["data"][0]["dataFilter"]["mosaickingOrder"] == "leastCC"
    assert body["input"]["bounds"]["bbox"] == [17.287, 48.834, 17.31, 48.857]
    assert body["output"]["width"] == 64
    script = body["evalscript"]
    assert '"CLD", "SCL", "CLP", "dataMask"' in script and 'sampleType: "UINT8"' in script
    assert "return [s.CLD, s.SCL, s.CLP, s.dataMask]" in script


def test_credentials_from_env_never_in_messages(monkeypatch) -> None:
    monkeypatch.setenv("SH_CLIENT_ID", "id-123")
    monkeypatch.setenv("SH_CLIENT_SECRET", "very-secret-value")
    cat = SentinelHubCatalog(CatalogConfig(kind="sentinel-hub", max_retries=0))
    assert cat.config.sh_client_id == "id-123" and cat.config.max_download_attempts == 1
    assert "very-secret-value" not in repr(cat.config) and "very-secret-value" not in str(cat.config)
    with pytest.raises(CatalogError, match="not mapped") as ei:
        cat.search(SearchQuery(collections=("landsat",)))
    assert "very-secret-value" not in str(ei.value)


def test_missing_credentials_fail_fast() -> None:
    cat = SentinelHubCatalog(CatalogConfig(kind="sentinel-hub"))
    t0 = time.monotonic()
    with pytest.raises(CatalogError, match="SH_CLIENT_ID and SH_CLIENT_SECRET"):
        cat.search(SearchQuery(collections=("sentinel-2-l2a",), datetime="2024-06"))
    assert time.monotonic() - t0 < 2


def test_query_to_cql2() -> None:
    assert query_to_cql2({"eo:cloud_cover": {"gte": 5, "lt": 95}}) == "eo:cloud_cover >= 5 AND eo:cloud_cover < 95"
    assert query_to_cql2({}) is None
    with pytest.raises(CatalogError, match="CQL2"):
        query_to_cql2({"x": {"like": "a"}})
