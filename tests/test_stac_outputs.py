"""STAC outputs: items and collection validated against the official JSON schemas (STAC core + every declared
extension, vendored: tests/stac_schemas.py), consistent extension versions, no nulls or borrowed namespaces,
relative links, and a round trip: the output items load in odc-stac and in stackstac."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio

from tests.stac_schemas import validate

EXPECTED_EXTENSIONS = {
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
}


def _nulls(obj, path=""):
    if obj is None:
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _nulls(v, f"{path}.{k}")]
    return []


def test_output_items_validate_against_core_and_every_declared_extension(demo_run):
    for r in demo_run:
        path = r.outputs["item"]
        d = json.loads(path.read_text())
        assert set(d["stac_extensions"]) == EXPECTED_EXTENSIONS
        checked = validate(path)  # raises pystac.STACValidationError naming the field otherwise
        assert set(checked) == {"https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json",
                                *EXPECTED_EXTENSIONS}
        props = d["properties"]
        # the fields each extension version defines: proj:code is projection v2, processing:datetime v1.2
        assert props["proj:code"] == "EPSG:32633" and "proj:epsg" not in props
        assert props["processing:datetime"].endswith("+00:00") and props["processing:software"]["cloudfree"]
        assert (props["mgrs:utm_zone"], props["mgrs:latitude_band"], props["mgrs:grid_square"]) == (33, "U", "UU")
        # top-level properties are never null (the provenance records may hold nulls inside, e.g. no weights)
        assert [k for k, v in props.items() if v is None] == []
        assert not [k for k in props if k.split(":")[0] in ("earthsearch", "s2", "sentinel")]
        for key in ("reflectance", "confidence", "source", "mask_provenance"):
            a = d["assets"][key]
            assert a["file:checksum"].startswith("1220") and a["file:size"] == (path.parent / a["href"]).stat().st_size
        assert [b["common_name"] for b in d["assets"]["reflectance"]["eo:bands"]][:3] == ["blue", "green", "red"]
        derived = [lk for lk in d["links"] if lk["rel"] == "derived_from"]
        assert len(derived) == 1 + len(r.references)
        for lk in derived:  # relative to the item's folder, and they resolve to the input items
            assert not Path(lk["href"]).is_absolute() and "://" not in lk["href"]
            assert json.loads((path.parent / lk["href"]).read_text())["id"] == lk["id"]
        for lk in d["links"]:
            assert not Path(lk["href"]).is_absolute()


def test_output_collection_validates_with_providers_item_assets_and_licence(demo_run, demo_config):
    out = Path(demo_config.output.dir)
    coll_path = out / "collection.json"
    checked = validate(coll_path)
    assert "https://schemas.stacspec.org/v1.1.0/collection-spec/json-schema/collection.json" in checked
    validate(out / "catalog.json")
    c = json.loads(coll_path.read_text())
    assert c["license"] == "other" and [lk for lk in c["links"] if lk["rel"] == "license"]
    roles = {r for p in c["providers"] for r in p["roles"]}
    assert {"producer", "licensor", "processor"} <= roles
    assert {"reflectance", "confidence", "source", "B02"} <= set(c["item_assets"])
    assert c["item_assets"]["reflectance"]["raster:bands"][0]["scale"] == 1e-4
    assert c["extent"]["temporal"]["interval"][0][0] is not None
    assert all(not Path(lk["href"]).is_absolute() for lk in c["links"] if lk["rel"] != "license")
    # pystac reads it back whole: every item reachable through relative links
    col = pystac.Collection.from_file(str(coll_path))
    assert sorted(i.id for i in col.get_items()) == sorted(Path(r.outputs["item"]).stem for r in demo_run)


def test_the_offline_validator_names_a_schema_it_does_not_have(demo_run):
    d = json.loads(demo_run[0].outputs["item"].read_text())
    d["stac_extensions"].append("https://stac-extensions.github.io/sentinel-2/v1.0.0/schema.json")
    with pytest.raises(Exception, match="not vendored"):
        validate(d)
    d = json.loads(demo_run[0].outputs["item"].read_text())
    d["properties"]["processing:datetime"] = "yesterday"
    with pytest.raises(pystac.STACValidationError, match="processing"):
        validate(d)


def _cog_reflectance(item_path: Path, band: int) -> np.ndarray:
    with rasterio.open(item_path.parent / json.loads(item_path.read_text())["assets"]["reflectance"]["href"]) as ds:
        dn = ds.read(band).astype(np.float64)
    return np.where(dn == 0, np.nan, dn * 1e-4)


def test_output_items_load_in_odc_stac_and_stackstac(demo_run, demo_config):
    """The round trip a user makes: open the output collection with pystac, load with odc-stac and with stackstac.
    stackstac 0.5.1 reads only ``proj:epsg`` (projection v1), which projection v2 replaced by ``proj:code``: it is
    given the EPSG code from ``proj:code`` (its documented way for items without ``proj:epsg``), and it opens asset
    hrefs as written, so the relative ones of the output tree are made absolute with pystac first; without
    ``proj:epsg`` it also needs the grid's bounds (from ``proj:transform``/``proj:shape``)."""
    import odc.stac
    import stackstac

    col = pystac.Collection.from_file(str(Path(demo_config.output.dir) / "collection.json"))
    items = sorted(col.get_items(), key=lambda i: i.id)
    assert all(i.assets["B02"].get_absolute_href().startswith("/") for i in items)
    paths = {Path(r.outputs["item"]).stem: Path(r.outputs["item"]) for r in demo_run}
    want = {i.id: (_cog_reflectance(paths[i.id], 1), _cog_reflectance(paths[i.id], 3)) for i in items}  # B02, B04

    ds = odc.stac.load(items, bands=["B02", "B04"], groupby="id", chunks={})
    for k, i in enumerate(items):
        got = ds.isel(time=k)
        dn = {b: got[b].values.astype(np.float64) for b in ("B02", "B04")}
        np.testing.assert_array_equal(np.where(dn["B02"] == 0, np.nan, dn["B02"] * 1e-4), want[i.id][0])
        np.testing.assert_array_equal(np.where(dn["B04"] == 0, np.nan, dn["B04"] * 1e-4), want[i.id][1])

    props = items[0].properties
    epsg = int(props["proj:code"].split(":")[1])
    (ny, nx), (res, _, x0, _, _, y0) = props["proj:shape"], props["proj:transform"]
    bounds = (x0, y0 - ny * res, x0 + nx * res, y0)  # the output grid (stackstac would use the lon/lat bbox)
    absolute = [i.clone().make_asset_hrefs_absolute() for i in items]
    stack = stackstac.stack(absolute, assets=["B02", "B04"], epsg=epsg, bounds=bounds, resolution=res, rescale=True,
                            dtype="float64", fill_value=np.nan, snap_bounds=False)
    assert stack.sizes["band"] == 2 and stack.sizes["time"] == len(items)
    for i in items:
        got = stack.sel(time=stack.id == i.id).isel(time=0).compute()
        b02, b04 = want[i.id]
        assert got.sel(band="B02").shape == b02.shape
        np.testing.assert_allclose(got.sel(band="B02").values, b02, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(got.sel(band="B04").values, b04, rtol=1e-6, equal_nan=True)
