"""The Python API as a notebook uses it: ``import cloudfree``, odc-stac / stackstac loads of the real Romania
catalog, ``cloudfree.remove`` on them, and the result compared with what ``cloudfree scene`` writes for the same
target and references (the same numbers, DN for DN)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import yaml
from click.testing import CliRunner

from tests.conftest import shared

TARGET = "S2_ROMANIA_20190621"  # 92 % cloud by SCL, clear dates on both sides
BANDS = ["B02", "B03", "B04", "B08"]


def test_import_cloudfree_is_lazy_and_exposes_the_api():
    code = ("import sys, time; t = time.perf_counter(); import cloudfree; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('dask', 'torch', 'xarray', 'rasterio', 'pystac') if m in sys.modules]; "
            "print(dt, heavy, callable(cloudfree.remove), callable(cloudfree.search), callable(cloudfree.run))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["[]", "True", "True", "True"], out
    assert float(out[0]) < 0.5


@pytest.fixture(scope="module")
def romania_cli(tmp_path_factory):
    """``cloudfree scene`` on the real Romania catalog (SCL masks, 10 m bands, no co-registration: the API takes
    its inputs as given), through the CLI, from a config file."""
    from cloudfree.pipeline.cli import main

    catalog = shared("s2-l2a-stack-romania-nrt", "stac", "catalog.json")
    tmp = tmp_path_factory.mktemp("api")
    cfg = {"catalog": {"kind": "local", "url": str(catalog), "collection": "s2-l2a-romania-nrt"},
           "search": {"max_days": 30}, "grid": {"bands": BANDS}, "mask": {"methods": ["scl"]},
           "coregister": {"enabled": False}, "model": {"name": "temporal"},
           "output": {"dir": str(tmp / "out"), "report": False}, "run": {"progress": False}}
    path = tmp / "romania.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["scene", TARGET, "-c", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    item_path = next((tmp / "out").glob(f"{TARGET}__temporal/*.json"))
    return catalog, json.loads(item_path.read_text()), item_path.parent


def _cog(folder: Path, item: dict, key: str) -> np.ndarray:
    with rasterio.open(folder / item["assets"][key]["href"]) as ds:
        return ds.read()


def _items(catalog: Path, ids: list[str]) -> list[pystac.Item]:
    by_id = {i.id: i for i in pystac.Catalog.from_file(str(catalog)).get_items(recursive=True)}
    return [by_id[i] for i in ids]


def _encoded(ds):
    """The API's result as the CLI stores it (cloudfree.stages.cog's DN / percent encoders)."""
    from cloudfree.stages.cog import _conf, _dn

    refl = ds.reflectance.values
    return _dn(refl), _conf(ds.confidence.values, refl), ds.source.values


def test_remove_on_an_odc_stac_load_equals_the_cli(romania_cli):
    import odc.stac
    from affine import Affine
    from odc.geo.geobox import GeoBox

    import cloudfree

    catalog, cli_item, folder = romania_cli
    refs = cli_item["properties"]["cloudfree:references"]
    assert len(refs) >= 2
    items = _items(catalog, [TARGET, *refs])
    # the notebook way: one load of the target and its references on the target's own pixel grid, odd chunks
    p = items[0].properties
    grid = GeoBox(tuple(p["proj:shape"]), Affine(*p["proj:transform"][:6]), f"EPSG:{p['proj:epsg']}")
    ds = odc.stac.load(items, bands=[*BANDS, "SCL"], geobox=grid, chunks={"x": 37, "y": 64}, groupby="id",
                       preserve_original_order=True)
    out = cloudfree.remove(ds.isel(time=[0]), ds.isel(time=slice(1, None)), mask="scl", model="temporal")
    assert out.reflectance.chunks is not None  # lazy: nothing computed yet
    assert list(out.reflectance.band.values) == BANDS and out.attrs["model"] == "temporal"
    dn, conf, src = _encoded(out.compute())
    np.testing.assert_array_equal(dn, _cog(folder, cli_item, "reflectance"))
    np.testing.assert_array_equal(conf, _cog(folder, cli_item, "confidence")[0])
    np.testing.assert_array_equal(src, _cog(folder, cli_item, "source")[0])
    assert (src >= 10).any() and (src == 1).any()  # references filled the cloud, clear pixels kept


def test_remove_takes_common_names_any_chunking_and_stackstac(romania_cli):
    """Earth Search style names (red, nir, scl) in other chunks, and a stackstac DataArray, give the same."""
    import odc.stac
    import stackstac
    from affine import Affine
    from odc.geo.geobox import GeoBox

    import cloudfree

    catalog, cli_item, folder = romania_cli
    items = _items(catalog, [TARGET, *cli_item["properties"]["cloudfree:references"]])
    p = items[0].properties
    grid = GeoBox(tuple(p["proj:shape"]), Affine(*p["proj:transform"][:6]), f"EPSG:{p['proj:epsg']}")
    ds = odc.stac.load(items, bands=[*BANDS, "SCL"], geobox=grid, chunks={"x": 100, "y": 23}, groupby="id",
                       preserve_original_order=True)
    common = ds.rename({"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl"})
    out = cloudfree.remove(common.isel(time=[0]), common.isel(time=slice(1, None)), mask="scl", model="temporal")
    assert list(out.reflectance.band.values) == ["blue", "green", "red", "nir"]
    dn, conf, src = _encoded(out.compute())
    np.testing.assert_array_equal(dn, _cog(folder, cli_item, "reflectance"))
    np.testing.assert_array_equal(src, _cog(folder, cli_item, "source")[0])

    (x0, y0), (ny, nx) = (p["proj:transform"][2], p["proj:transform"][5]), p["proj:shape"]
    st = stackstac.stack([i.clone().make_asset_hrefs_absolute() for i in items], assets=[*BANDS, "SCL"], epsg=p["proj:epsg"], resolution=10.0,
                         bounds=(x0, y0 - 10 * ny, x0 + 10 * nx, y0), rescale=False, dtype="float64", fill_value=np.nan,
                         chunksize=50, snap_bounds=False)
    # stackstac's float DN (rescale=False): the scale is given, as the docs say for float inputs
    order = [list(st.id.values).index(i.id) for i in items]  # stackstac sorts by time: back to target, refs
    out = cloudfree.remove(st.isel(time=order[:1]), st.isel(time=order[1:]), mask="scl", scale=1e-4,
                           model="temporal")
    dn, _, src = _encoded(out.compute())
    np.testing.assert_array_equal(dn, _cog(folder, cli_item, "reflectance"))
    np.testing.assert_array_equal(src, _cog(folder, cli_item, "source")[0])


def test_remove_names_what_is_wrong(romania_cli):
    import xarray as xr

    import cloudfree
    from cloudfree.pipeline.errors import ContractError

    t = xr.Dataset({"B02": (("time", "y", "x"), np.ones((1, 8, 8), np.uint16))},
                   coords={"time": [np.datetime64("2020-01-01")]})
    with pytest.raises(ContractError, match="SCL layer"):
        cloudfree.remove(t, None, mask="scl", model="none")
    with pytest.raises(ContractError, match="one acquisition"):
        cloudfree.remove(xr.concat([t, t], "time"), None, mask=xr.DataArray(np.zeros((8, 8), bool)), model="none")


def test_search_and_run_from_python(romania_cli, tmp_path):
    import cloudfree

    catalog, cli_item, _ = romania_cli
    plans = cloudfree.search(str(catalog), "s2-l2a-romania-nrt", period="2019-06-15/2019-06-25",
                             bbox=[22.14, 45.19, 22.17, 45.22])
    assert TARGET in [pl.target.id for pl in plans]
    plan = next(pl for pl in plans if pl.target.id == TARGET)
    assert [c.item.id for c in plan.references][:2]
    res = cloudfree.run({"catalog": {"url": str(catalog), "collection": "s2-l2a-romania-nrt"},
                         "search": {"targets": [TARGET], "max_days": 30}, "grid": {"bands": BANDS},
                         "mask": {"methods": ["scl"]}, "coregister": {"enabled": False}},
                        output={"dir": str(tmp_path / "out"), "report": False}, run={"progress": False})
    assert [r.status for r in res] == ["done"] and res[0].outputs["item"].exists()


def test_the_readme_example_runs(demo_catalog, monkeypatch):
    """The README's Python API block, as written, on the demo catalog (its path swapped in)."""
    import re

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"## Python API\n\n```python\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    block = block.replace('"data/demo/catalog.json"', repr(str(demo_catalog)))
    block = block.replace('cloudfree.run("configs/demo.yaml")', "")  # the batch job has its own tests
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    out = scope["out"]
    assert set(out.data_vars) == {"reflectance", "confidence", "source"}
    src = out.source.values
    assert (src >= 10).any() and np.isfinite(out.reflectance.values).mean() > 0.9


def test_run_section_shorthands_and_a_wrong_override_named(tmp_path):
    """`run(..., catalog="cat.json", output="out", model="reference-replace")` is read as the section's main key;
    anything else that is not a dict is a TypeError naming the section (never a bare 'str is not a mapping')."""
    from cloudfree.pipeline.api import _config

    cfg = _config(None, catalog=str(tmp_path / "cat.json"), output=tmp_path / "out", model="reference-replace")
    assert (cfg.catalog.kind, str(cfg.catalog.url)) == ("local", str(tmp_path / "cat.json"))
    assert Path(cfg.output.dir) == tmp_path / "out" and cfg.model.name == "reference-replace"
    assert _config(None, catalog="https://example.test/stac").catalog.kind == "stac-api"
    with pytest.raises(TypeError, match="search="):
        _config(None, search="2019-06")
