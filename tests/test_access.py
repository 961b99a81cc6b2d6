"""catalogs/access.py: band names from any catalog layout, the href policy, the stamp a remote catalog cannot forge,
the signing reader's pickling, and mask.methods auto (the end-to-end runs are in tests/test_catalogs_e2e.py)."""

from __future__ import annotations

import json
import pickle

import pystac
import pytest

from cloudfree.catalogs.access import (ACCESS_PROP, AssetAccess, HrefRefusedError, HrefSigner, check_href,
                                       href_problem, map_band_assets, prepare_items)


@pytest.mark.parametrize("href", [
    "/etc/passwd", "file:///etc/passwd", "./B02.tif", "/vsicurl/https://example.com/x.tif", "C:\\data\\x.tif",
    "http://127.0.0.1:8000/B02.tif", "http://localhost/B02.tif", "http://api.localhost/x", "http://10.1.2.3/x.tif",
    "http://192.168.0.7/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x", "http://0.0.0.0/x",
    "http://[::ffff:127.0.0.1]/x", "ftp://example.com/x.tif", "http:///x",
])
def test_refused_hrefs(href) -> None:
    assert href_problem(href) is not None


@pytest.mark.parametrize("href", [
    "https://sentinel-cogs.s3.us-west-2.amazonaws.com/sentinel-s2-l2a-cogs/29/R/KH/B02.tif",
    "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B02.tif", "s3://sentinel-s2-l2a/tiles/B02.jp2",
    "gs://gcp-public-data-sentinel-2/x.jp2", "az://container/blob.tif", "https://93.184.216.34/x.tif",
])
def test_allowed_hrefs(href) -> None:
    assert href_problem(href) is None


def _item(assets: dict, access: dict | None = None) -> pystac.Item:
    from datetime import datetime, timezone

    props = {ACCESS_PROP: access} if access else {}
    it = pystac.Item("it-1", None, None, datetime(2024, 1, 1, tzinfo=timezone.utc), props)
    for k, a in assets.items():
        it.add_asset(k, pystac.Asset(a.pop("href"), extra_fields=a))
    return it


def test_refusal_names_item_asset_and_key_and_local_access_allows() -> None:
    remote = _item({"B02": {"href": "/etc/passwd"}}, AssetAccess("earth-search", allow_local=False).as_dict())
    with pytest.raises(HrefRefusedError, match=r"item 'it-1' asset 'B02' of the earth-search catalog.*"
                                                r"catalog\.allow_local_hrefs"):
        check_href(remote, "B02", "/etc/passwd")
    check_href(_item({"B02": {"href": "/etc/passwd"}}), "B02", "/etc/passwd")  # unstamped = local catalog


def test_a_remote_catalog_cannot_forge_its_access() -> None:
    forged = _item({"B02": {"href": "http://127.0.0.1/x.tif"}},
                   {"catalog": "local", "allow_local": True, "signer": "planetary-computer",
                    "sas_url": "http://evil.example/"})
    [it] = prepare_items([forged], AssetAccess("stac-api", allow_local=False))
    assert AssetAccess.of(it) == AssetAccess("stac-api", allow_local=False)


def test_band_names_from_common_name_keys(stac_data) -> None:
    d = json.loads((stac_data / "stactools-sentinel2" /
                    "S2A_MSIL2A_20190212T192651_N0212_R013_T07HFE_20201007T160857.expected_output.json").read_text())
    it = map_band_assets(pystac.Item.from_dict(d))
    assert it.assets["B02"].extra_fields["cloudfree:asset_key"] == "blue"
    assert it.assets["B8A"].extra_fields["cloudfree:asset_key"] == "nir08"
    assert it.assets["SCL"].extra_fields["cloudfree:asset_key"] == "scl"
    assert "blue" not in it.assets and "blue_20m" in it.assets  # the resampled copy keeps its key
    pc = json.loads((stac_data / "stac-geoparquet" / "sentinel-2-l2a-pc.json").read_text())[0]
    it = map_band_assets(pystac.Item.from_dict(pc))
    assert set(pystac.Item.from_dict(pc).assets) == set(it.assets)  # already B02 / SCL: unchanged


def test_band_names_from_eo_bands_names() -> None:
    it = map_band_assets(_item({"band-2": {"href": "https://x/a.tif", "eo:bands": [{"name": "B02"}]},
                                "image": {"href": "https://x/b.tif", "eo:bands": [{"name": "x", "common_name": "red"}]}}))
    assert set(it.assets) == {"B02", "B04"}


def test_signing_reader_pickles_as_its_settings() -> None:
    from cloudfree.stages.load import SigningRioDriver

    drv = SigningRioDriver(HrefSigner("http://127.0.0.1:9/sas", "http://127.0.0.1:9/blob", 60.0, 2.0))
    back = pickle.loads(pickle.dumps(drv))
    assert back.signer == drv.signer and type(back).__name__ == "SigningRioDriver"


def test_path_style_blob_endpoint() -> None:
    from cloudfree.catalogs.planetary_computer import blob_account_container

    ep = "http://127.0.0.1:9/blob"
    assert blob_account_container(f"{ep}/sentinel2l2a01/sentinel2-l2/a/B02.tif", ep) == ("sentinel2l2a01", "sentinel2-l2")
    assert blob_account_container("http://127.0.0.1:9/files/a/b/c.tif", ep) is None
    assert blob_account_container("https://acc.blob.core.windows.net/cont/x.tif") == ("acc", "cont")


def test_mask_auto_follows_the_items() -> None:
    from cloudfree.pipeline.config import MaskConfig
    from cloudfree.stages.masks import auto_method, mask_inputs, resolve_methods

    scl = _item({"SCL": {"href": "https://x/scl.tif"}, "CLD": {"href": "https://x/cld.tif"}})
    cld = _item({"MSK_CLDPRB": {"href": "https://x/cld.tif"}})
    none = _item({"B02": {"href": "https://x/b.tif"}})
    assert [auto_method([scl]), auto_method([cld]), auto_method([none]), auto_method([scl, cld])] == \
        ["scl", "cldprb", "spectral", "spectral"]
    assert MaskConfig().methods == ["auto"]
    assert resolve_methods([scl], ["auto", "scl", "spectral"]) == ["scl", "spectral"]
    assert mask_inputs([cld], MaskConfig()) == ["MSK_CLDPRB"]
