"""Harmonisation decision on EVERY real item fixture under ../shared/data/stac (files and cassette bodies)."""

from __future__ import annotations

import json

import numpy as np
import pystac
import pytest
import yaml

from cloudfree.catalogs.harmonise import harmonise, processing_baseline
from cloudfree.pipeline.errors import HarmonisationError
from tests.stac_server import DATA, real_items

OFF, ON, NOT_S2 = "no offset", "offset -1000", "not Sentinel-2"

#: item id -> (expected decision, expected baseline, level). Reasons in comments.
EXPECTED = {
    # Earth Search v0 (sentinel-s2-l2a-cogs): baseline only in sentinel:product_id (N0214 / N0212)
    "S2A_28QCH_20200714_0_L2A": (OFF, "02.14", "L2A"),
    "S2A_31NBJ_20190524_0_L2A": (OFF, "02.12", "L2A"),
    # Earth Search v1: s2:processing_baseline 02.14, earthsearch:boa_offset_applied false, raster:bands offset 0
    "S2A_29RKH_20200219_0_L2A": (OFF, "02.14", "L2A"),
    # Planetary Computer sentinel-2-l2a (no raster:bands; PC keeps the offset in the DN)
    "S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531": (OFF, "02.12", "L2A"),
    "S2B_MSIL2A_20220612T182919_R027_T24XWR_20220613T123251": (ON, "04.00", "L2A"),
    "S2B_MSIL2A_20240419T095549_R122_T47XML_20240419T123458": (ON, "05.10", "L2A"),
    "S2B_MSIL2A_20240419T095549_R122_T47XMJ_20240419T122756": (ON, "05.10", "L2A"),
    "S2B_MSIL2A_20240419T095549_R122_T46XES_20240419T123824": (ON, "05.10", "L2A"),
    "S2B_MSIL2A_20240419T095549_R122_T46XER_20240419T124342": (ON, "05.10", "L2A"),
    "S2A_MSIL2A_20150704T101006_R022_T35XQA_20210411T133707": (OFF, "02.12", "L2A"),  # 2015 scene, PB 02.12
    "S2B_MSIL2A_20250312T014549_R074_T53NKG_20250312T041213": (ON, "05.11", "L2A"),
    # stactools-sentinel2 output (raster:bands offset 0, scale 1e-4)
    "S2A_T46RER_20210908T043714_L1C": (OFF, "03.01", "L1C"),
    "S2A_T07HFE_20190212T192646_L2A": (OFF, "02.12", "L2A"),
    "S2B_T01CCV_20191228T210521_L2A": (OFF, "02.12", "L2A"),
    # Sentinel-1 (PC sentinel-1-rtc / -grd): no DN harmonisation
    "S1A_IW_GRDH_1SDV_20240419T045904_20240419T045916_053498_067DF2_rtc": (NOT_S2, None, None),
    "S1A_IW_GRDH_1SDV_20240419T045839_20240419T045904_053498_067DF2_rtc": (NOT_S2, None, None),
    "S1A_IW_GRDH_1SDV_20240419T045814_20240419T045839_053498_067DF2_rtc": (NOT_S2, None, None),
    "S1A_IW_GRDH_1SDV_20240419T045749_20240419T045814_053498_067DF2_rtc": (NOT_S2, None, None),
    "S1A_IW_GRDH_1SDV_20250312T052236_20250312T052301_058267_073394": (NOT_S2, None, None),
    "S1A_IW_GRDH_1SDV_20250311T044231_20250311T044249_058252_073302_rtc": (NOT_S2, None, None),
}


def _all_items() -> list[dict]:
    return real_items(DATA) if DATA.is_dir() else []


def test_every_fixture_item_has_an_expected_decision() -> None:
    ids = {it["id"] for it in _all_items()}
    if not ids:
        pytest.skip(f"shared data missing at {DATA}")
    assert ids == set(EXPECTED), f"unlisted: {ids - set(EXPECTED)}, stale: {set(EXPECTED) - ids}"


@pytest.mark.parametrize("item_dict", _all_items(), ids=lambda d: d["id"][:60])
def test_decision_per_item(item_dict: dict) -> None:
    item = pystac.Item.from_dict(item_dict)
    decision, baseline, level = EXPECTED[item.id]
    if decision == NOT_S2:
        with pytest.raises(HarmonisationError, match="not a Sentinel-2"):
            harmonise(item)
        return
    h = harmonise(item)
    assert h.level == level and h.processing_baseline == baseline
    assert h.applied is (decision == ON)
    bands = set(h.bands)
    assert {"B02", "B03", "B04", "B08", "B11", "B12"} <= bands
    assert ("B10" in bands) is (level == "L1C")
    for b in h.bands:
        assert h.scale[b] == pytest.approx(1e-4)
        assert h.dn_offset(b) == pytest.approx(-1000.0 if decision == ON else 0.0)
    assert baseline in h.reason
    props = json.loads(json.dumps(h.as_properties()))
    assert props["applied"] == h.applied and props["offset"]["B04"] == pytest.approx(h.offset["B04"])


def test_landsat_and_naip_cassette_items_are_refused(stac_data) -> None:
    n = 0
    for f in sorted((stac_data / "pystac-client").glob("*.yaml")):
        for inter in yaml.safe_load(f.read_text())["interactions"]:
            body = json.loads(inter["response"]["body"]["string"])
            for feat in body.get("features", []):
                n += 1
                with pytest.raises(HarmonisationError):
                    harmonise(pystac.Item.from_dict(feat))
    assert n == 250 + 250 + 12 + 12


def test_reflectance_conversion_and_nodata() -> None:
    found = [d for d in _all_items() if d["id"].endswith("T47XML_20240419T123458")]
    if not found:
        pytest.skip(f"shared data missing at {DATA}")
    item = pystac.Item.from_dict(found[0])
    h = harmonise(item)
    dn = np.array([0, 1000, 1500, 11000], dtype=np.uint16)
    out = h.to_reflectance(dn, "B04")
    assert out.dtype == np.float32 and np.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.0, 0.05, 1.0], atol=1e-6)
    with pytest.raises(HarmonisationError, match="B10"):
        h.to_reflectance(dn, "B10")


def _item(props: dict, assets: dict | None = None, id_: str = "S2A_MSIL2A_X") -> pystac.Item:
    return pystac.Item.from_dict({
        "type": "Feature", "stac_version": "1.0.0", "id": id_, "geometry": None, "links": [],
        "properties": {"datetime": "2023-01-01T00:00:00Z", "platform": "sentinel-2a", **props},
        "assets": assets or {},
    })


def test_offset_flag_true_wins_over_baseline() -> None:
    h = harmonise(_item({"s2:processing_baseline": "05.09", "earthsearch:boa_offset_applied": True}))
    assert not h.applied and h.source == "offset-flag" and h.dn_offset("B04") == 0


def test_raster_bands_zero_offset_is_overruled_by_baseline() -> None:
    assets = {"red": {"href": "r.tif", "raster:bands": [{"scale": 0.0001, "offset": 0}]}}
    h = harmonise(_item({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False}, assets))
    assert h.applied and "overruled" in h.reason and h.bands == ("B04",)


def test_raster_bands_used_when_no_baseline() -> None:
    assets = {"B04": {"href": "r.tif", "raster:bands": [{"scale": 0.0001, "offset": -0.1}]}}
    h = harmonise(_item({}, assets, id_="S2A_FOO_L2A"))
    assert h.applied and h.source == "raster-bands" and h.dn_offset("B04") == pytest.approx(-1000)


def test_unknown_baseline_is_an_error_with_the_fix() -> None:
    with pytest.raises(HarmonisationError, match="s2:processing_baseline"):
        harmonise(_item({}, id_="S2A_FOO_L2A"))


@pytest.mark.parametrize("text, expected", [("S2A_MSIL2A_20200714T115221_N0214_R123_T28QCH_20200714T191310", "02.14"),
                                            ("S2A_OPER_MSI_L2A_TL_MPS__20200219T123947_A024344_T29RKH_N02.14", "02.14")])
def test_baseline_from_ids(text: str, expected: str) -> None:
    assert processing_baseline(_item({"sentinel:product_id": text})) == expected
