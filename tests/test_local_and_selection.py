"""LocalCatalog (static JSON and stac-geoparquet), antimeridian matching, and the pixel-level clear fraction on
the real 29RKH SCL layer."""

from __future__ import annotations

from pathlib import Path

import pystac
import pytest

from cloudfree.catalogs.base import SearchQuery
from cloudfree.catalogs.local import LocalCatalog, write_geoparquet
from cloudfree.catalogs.stac_api import split_antimeridian_bbox, split_antimeridian_geometry
from cloudfree.pipeline.errors import NoItemsFoundError
from cloudfree.stages.search import clear_fraction_from_metadata, mgrs_tile, relative_orbit, scl_clear_fraction
from tests.stac_server import real_items

TILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "s2-l2a-tile-29RKH-100m"


@pytest.fixture(scope="module")
def items(stac_data) -> list[pystac.Item]:
    return [pystac.Item.from_dict(d) for d in real_items(stac_data)]


def test_geoparquet_round_trip_and_search(items, tmp_path) -> None:
    s2 = [i for i in items if i.collection_id == "sentinel-2-l2a"]
    cat = LocalCatalog(write_geoparquet(s2, tmp_path / "s2.parquet"))
    got = cat.search(SearchQuery(collections=("sentinel-2-l2a",), query={"eo:cloud_cover": {"gt": 5}},
                                 sortby=("-eo:cloud_cover",)))
    assert [round(i.properties["eo:cloud_cover"], 1) for i in got] == [97.9, 30.5, 10.0]
    assert cat.get("S2A_29RKH_20200219_0_L2A").properties["earthsearch:boa_offset_applied"] is False
    with pytest.raises(NoItemsFoundError, match="s2.parquet"):
        cat.search(SearchQuery(collections=("sentinel-2-l2a",), datetime="1990"))


def test_static_item_collection(stac_data) -> None:
    cat = LocalCatalog(stac_data / "stac-geoparquet" / "sentinel-1-rtc-pc.json")
    assert len(cat.search(SearchQuery(collections=("sentinel-1-rtc",)))) == 4


def test_antimeridian_split() -> None:
    assert split_antimeridian_bbox((170, -20, -170, -10)) == [(170, -20, 180.0, -10), (-180.0, -20, -170, -10)]
    poly = {"type": "Polygon", "coordinates": [[[179, 0], [-179, 0], [-179, 1], [179, 1], [179, 0]]]}
    parts = split_antimeridian_geometry(poly)
    assert len(parts) == 2
    xs = sorted(round(c[0]) for p in parts for c in p["coordinates"][0])
    assert xs[0] == -180 and xs[-1] == 180


def test_local_antimeridian_bbox(items, tmp_path) -> None:
    cat = LocalCatalog(write_geoparquet([i for i in items if i.collection_id == "stactools-sentinel2"],
                                        tmp_path / "st.parquet"))
    got = cat.search(SearchQuery(collections=("stactools-sentinel2",), bbox=(175.0, -80.0, -175.0, -60.0)))
    assert [i.id for i in got] == ["S2B_T01CCV_20191228T210521_L2A"]


def test_orbit_and_tile_from_real_items(items) -> None:
    by_id = {i.id: i for i in items}
    assert mgrs_tile(by_id["S2A_28QCH_20200714_0_L2A"]) == "28QCH"  # Earth Search v0 sentinel:* fields
    assert mgrs_tile(by_id["S2A_29RKH_20200219_0_L2A"]) == "29RKH"  # mgrs extension
    assert mgrs_tile(by_id["S2B_MSIL2A_20240419T095549_R122_T47XML_20240419T123458"]) == "47XML"
    assert relative_orbit(by_id["S2A_28QCH_20200714_0_L2A"]) == 123  # from sentinel:product_id _R123_


@pytest.mark.skipif(not (TILE / "SCL.tif").exists(), reason=f"{TILE}/SCL.tif missing")
def test_scl_clear_fraction_on_real_scl(items, tmp_path) -> None:
    item = next(i for i in items if i.id == "S2A_29RKH_20200219_0_L2A").clone()
    item.assets["scl"].href = str(TILE / "SCL.tif")
    # the target against itself: every cloudy target pixel is cloudy in the "reference" too
    assert scl_clear_fraction(item, item, size=128) == 0.0
    # an unreadable SCL falls back to the metadata estimate
    other = item.clone()
    other.assets["scl"].href = str(tmp_path / "missing.tif")
    assert scl_clear_fraction(item, other, size=64) == pytest.approx(clear_fraction_from_metadata(item, other))


def test_pixel_level_clear_fraction_from_config(demo_catalog):
    """search.policy.clear_fraction = scl ranks references by how much of the target's cloud they see clear."""
    from cloudfree.catalogs.local import LocalCatalog
    from cloudfree.pipeline.config import parse_config
    from cloudfree.stages.search import plan_targets

    cat = LocalCatalog(demo_catalog)
    meta = parse_config({"search": {"targets": ["S2A_T33UUU_20170216_SIMCLOUDY"]}}).search
    scl = parse_config({"search": {"targets": ["S2A_T33UUU_20170216_SIMCLOUDY"],
                                   "policy": {"clear_fraction": "scl"}}}).search
    by_meta = {c.item.id: c.clear_fraction for c in plan_targets(cat, meta, "demo-s2-l1c")[0].references}
    by_scl = {c.item.id: c.clear_fraction for c in plan_targets(cat, scl, "demo-s2-l1c")[0].references}
    assert set(by_meta) == set(by_scl)
    # the pixel estimate is measured over the target's cloudy pixels, so it differs from 1 - eo:cloud_cover
    assert any(abs(by_meta[k] - by_scl[k]) > 0.005 for k in by_meta)
    assert all(0.5 < v <= 1.0 for v in by_scl.values())
