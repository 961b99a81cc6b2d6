import numpy as np
import pytest
import xarray as xr
import rioxarray  # noqa: F401

from cloudfree.pipeline.contract import TileInputs, TileResult, validate_scene
from cloudfree.pipeline.errors import ContractError


def _scene(dims=("time", "band", "y", "x"), dtype=np.float32, crs="EPSG:32633"):
    da = xr.DataArray(np.zeros((1, 2, 4, 4), dtype), dims=("time", "band", "y", "x"),
                      coords={"time": [np.datetime64("2020-01-01", "ns")], "band": ["B02", "B03"],
                              "y": np.arange(4.0), "x": np.arange(4.0)})
    if crs:
        da = da.rio.write_crs(crs)
    return da.transpose(*dims)


def test_valid_scene_passes_unchanged():
    da = _scene()
    assert validate_scene(da, bands=("B02",)) is da


@pytest.mark.parametrize("kw, msg", [
    ({"dims": ("band", "time", "y", "x")}, "transpose"),
    ({"dtype": np.uint16}, "float32"),
    ({"crs": None}, "CRS"),
])
def test_invalid_scene_names_problem_and_fix(kw, msg):
    with pytest.raises(ContractError, match=msg):
        validate_scene(_scene(**kw))


def test_missing_band_is_named():
    with pytest.raises(ContractError, match=r"\['B04'\]"):
        validate_scene(_scene(), bands=("B02", "B04"))


def _tile(**over):
    kw = dict(bands=("B02", "B03"), target=np.zeros((2, 8, 8), np.float32), cloud_prob=np.zeros((8, 8), np.float32),
              cloud_mask=np.zeros((8, 8), bool), references=np.zeros((1, 2, 8, 8), np.float32),
              reference_masks=np.zeros((1, 8, 8), bool), target_id="T")
    kw.update(over)
    return TileInputs(**kw)


def test_tile_inputs_shape_checks():
    assert _tile().shape == (8, 8)
    with pytest.raises(ContractError, match="cloud_prob"):
        _tile(cloud_prob=np.zeros((7, 8), np.float32))
    with pytest.raises(ContractError, match="references"):
        _tile(references=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ContractError, match="band names"):
        _tile(bands=("B02",))


def test_band_index_by_name():
    t = _tile()
    assert t.band_index("B03", "B02") == [1, 0]
    with pytest.raises(ContractError, match="B12"):
        t.band_index("B12")


def test_tile_result_validation_clips_and_casts():
    t = _tile()
    r = TileResult(np.ones((2, 8, 8), np.float64), np.full((8, 8), 1.5), np.ones((8, 8), np.int32)).validate(t)
    assert r.reflectance.dtype == np.float32 and r.confidence.max() == 1.0 and r.source.dtype == np.uint8
    with pytest.raises(ContractError, match="reflectance"):
        TileResult(np.ones((3, 8, 8)), np.ones((8, 8)), np.ones((8, 8))).validate(t)
