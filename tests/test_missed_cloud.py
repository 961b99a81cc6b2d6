"""Cloud the mask missed (issue 18): the multi-temporal test on the REAL Romania dates where SCL calls the cloud
"snow" (2019-06-11, 2019-06-21), on the real labelled cloudy/clear pair (Slovakia), the lazy form against the
numpy kernel, the bounded alignment, and the output check."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from cloudfree.stages.missed_cloud import MissedCloudParams, apply_to_tile, missed_cloud_kernel
from tests.conftest import shared

RBANDS = ("B02", "B03", "B04", "B08", "B8A", "B11")


def _romania(day: str) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (band, 100, 100) and SCL of one Romania date, read in place from the static catalog's COGs."""
    d = shared("s2-l2a-stack-romania-nrt", "stac", "s2-l2a-romania-nrt", f"S2_ROMANIA_{day.replace('-', '')}")
    planes = []
    for b in (*RBANDS, "SCL"):
        with rasterio.open(d / f"{b}.tif") as ds:
            planes.append(ds.read(1, out_shape=(100, 100), resampling=rasterio.enums.Resampling.nearest))
    refl = np.stack(planes[:-1]).astype(np.float32) / 1e4
    refl[refl <= 0] = np.nan
    return refl, planes[-1]


def _scl_mask(scl: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(np.isin(scl, (3, 8, 9, 10)), iterations=2)


@pytest.mark.parametrize("day,refs", [("2019-06-11", ("2019-06-16", "2019-07-01", "2019-07-06")),
                                      ("2019-06-21", ("2019-06-16", "2019-07-01", "2019-07-06", "2019-07-11"))])
def test_scl_misses_cloud_on_romania_and_the_test_finds_it(day, refs):
    target, scl = _romania(day)
    mask = _scl_mask(scl)
    loaded = [_romania(r) for r in refs]
    references = np.stack([x for x, _ in loaded])
    valid = np.stack([~_scl_mask(s) for _, s in loaded])
    missed = ~mask & (target[0] > 0.3)  # cloud-level blue SCL calls clear (it says snow, class 11)
    assert missed.sum() >= 250 and set(np.unique(scl[missed])) <= {7, 11}
    cloud, shadow = missed_cloud_kernel(target, mask, references, valid, RBANDS)
    assert cloud[missed].mean() >= 0.95, cloud[missed].mean()
    assert not (cloud & mask).any() and not (shadow & mask).any()  # only adds to the mask
    left = ~mask & ~cloud & ~shadow
    assert (target[0][left] > 0.3).sum() <= 0.01 * missed.sum() + 10  # hardly any cloud-level pixel stays "clear"


def test_clear_romania_dates_raise_no_false_alarm():
    for day, refs in (("2019-07-01", ("2019-06-16", "2019-07-06", "2019-07-11")),
                      ("2019-06-16", ("2019-07-01", "2019-07-06", "2019-07-11"))):
        target, scl = _romania(day)
        loaded = [_romania(r) for r in refs]
        cloud, shadow = missed_cloud_kernel(target, _scl_mask(scl), np.stack([x for x, _ in loaded]),
                                            np.stack([~_scl_mask(s) for _, s in loaded]), RBANDS)
        assert cloud.mean() + shadow.mean() < 0.005, (day, cloud.mean(), shadow.mean())


def test_labelled_pair_detection_with_no_product_mask():
    """The real cloudy/clear Slovakia pair with its label (1 thick cloud, 2 dark: shadow/thin, 0 clear): the test
    alone (no product mask at all, one reference of another season) finds most thick cloud, no clear pixel."""
    d = shared("s2-pair-slovakia")
    names = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
    with rasterio.open(d / "cloudy.tif") as a, rasterio.open(d / "clean.tif") as b, rasterio.open(d / "mask.tif") as m:
        cloudy, clean, label = a.read() / 10.0, b.read() / 10.0, m.read(1)
    none = np.zeros(label.shape, bool)
    cloud, shadow = missed_cloud_kernel(cloudy.astype(np.float32), none, clean[None].astype(np.float32),
                                        np.ones((1,) + label.shape, bool), names)
    assert cloud[label == 1].mean() > 0.6
    assert (cloud | shadow)[label == 0].mean() < 0.005
    assert shadow[label == 2].mean() > 0.05


def test_whiteness_and_snow_guards_and_no_reference():
    p = MissedCloudParams(opening=0, dilation=0)
    bands = ("B02", "B03", "B04", "B08", "B11")
    ref = np.array([0.03, 0.05, 0.03, 0.3, 0.15], np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32)
    cases = {"cloud": [0.5, 0.5, 0.5, 0.55, 0.35], "harvest (red up more than blue)": [0.08, 0.1, 0.14, 0.25, 0.3],
             "snow": [0.6, 0.6, 0.55, 0.5, 0.05]}
    got = {}
    for name, spec in cases.items():
        t = np.array(spec, np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32)
        got[name] = missed_cloud_kernel(t, np.zeros((8, 8), bool), ref[None], np.ones((1, 8, 8), bool), bands, p)[0]
    assert got["cloud"].all() and not got["harvest (red up more than blue)"].any() and not got["snow"].any()
    t = np.full((5, 8, 8), 0.5, np.float32)
    nothing = missed_cloud_kernel(t, np.zeros((8, 8), bool), ref[None], np.zeros((1, 8, 8), bool), bands, p)
    assert not nothing[0].any()  # no clear reference: nothing to compare with, nothing flagged


def test_lazy_form_matches_the_kernel_and_ignores_chunk_borders():
    import dask.array as dsa
    import xarray as xr

    from cloudfree.stages.missed_cloud import add_missed_cloud, reference_flags

    target, scl = _romania("2019-06-21")
    refs = [_romania(r) for r in ("2019-06-16", "2019-07-01", "2019-07-06")]
    mask = _scl_mask(scl)
    r = np.stack([x for x, _ in refs])
    rm = np.stack([_scl_mask(s) for _, s in refs])
    coords = {"y": np.arange(100.0), "x": np.arange(100.0)}
    t_da = xr.DataArray(dsa.from_array(target, chunks=(6, 37, 41)), dims=("band", "y", "x"),
                        coords={"band": list(RBANDS), **coords})
    m_da = xr.DataArray(dsa.from_array(mask, chunks=(50, 50)), dims=("y", "x"), coords=coords)
    p_da = xr.DataArray(dsa.from_array(np.zeros((100, 100), np.float32), chunks=(50, 50)), dims=("y", "x"),
                        coords=coords)
    r_da = xr.DataArray(dsa.from_array(r, chunks=(1, 6, 30, 30)), dims=("time", "band", "y", "x"),
                        coords={"band": list(RBANDS), **coords})
    rm_da = xr.DataArray(dsa.from_array(rm, chunks=(1, 30, 30)), dims=("time", "y", "x"), coords=coords)
    mask2, prob2, rmask2, missed = add_missed_cloud(t_da, m_da, p_da, r_da, rm_da)
    c, s = missed_cloud_kernel(target, mask, r, ~rm, RBANDS)
    np.testing.assert_array_equal(missed.values, c | s)
    np.testing.assert_array_equal(mask2.values, mask | c | s)
    assert (prob2.values[c] == 1).all()
    np.testing.assert_array_equal(rmask2.values, rm | reference_flags(r, rm, RBANDS))


def test_alignment_is_bounded_and_falls_back_when_the_target_is_cloud():
    from cloudfree.models._align import GAIN_BOUNDS, OFFSET_ABS, OFFSET_REL, fit_linear, scene_alignment
    from cloudfree.pipeline.contract import TileInputs

    rng = np.random.default_rng(0)
    ref = (0.02 + 0.01 * rng.random((4, 64, 64))).astype(np.float32)
    cloud = (0.7 + 0.1 * rng.random((4, 64, 64))).astype(np.float32)  # every "clear" pixel is cloud-level
    g, o = fit_linear(cloud, ref, np.ones((64, 64), bool))
    assert (g >= GAIN_BOUNDS[0]).all() and (g <= GAIN_BOUNDS[1]).all()
    assert (np.abs(o) <= OFFSET_ABS + OFFSET_REL * 0.03 + 1e-6).all()  # not +0.7
    bands = ("B02", "B03", "B04", "B08")
    tile = TileInputs(bands, cloud, np.zeros((64, 64), np.float32), np.zeros((64, 64), bool), ref[None],
                      np.zeros((1, 64, 64), bool), ("r0",), (5.0,), target_id="cloudy-but-unmasked")
    (g, o), = scene_alignment(tile)  # blue far above the reference everywhere: nothing trustworthy -> identity
    np.testing.assert_array_equal(g, 1.0)
    np.testing.assert_array_equal(o, 0.0)
    fixed, share = apply_to_tile(tile)
    assert share > 0.95 and fixed.cloud_mask.mean() > 0.95 and fixed.cloud_prob[fixed.cloud_mask].min() == 1.0


def test_output_check_flags_cloud_level_restoration():
    from cloudfree.stages.output_check import check_output

    bands = ("B02", "B03", "B04", "B08")
    refs = np.stack([np.full((4, 32, 32), v, np.float32) for v in (0.02, 0.03)])
    refs[:, 3] = 0.3
    valid = np.ones((2, 32, 32), bool)
    restored = np.ones((32, 32), bool)
    good = refs[0] * 1.05
    assert check_output(good, restored, refs, valid, bands).ok
    bad = good.copy()
    bad[:3, :, :20] = 0.7  # cloud-level on 62 % of the restored pixels
    res = check_output(bad, restored, refs, valid, bands)
    assert not res.ok and "B0" in res.reason and res.implausible_share > 0.5
    assert check_output(bad, restored, refs, np.zeros_like(valid), bands).ok  # no clear reference: abstains


def test_plausibility_raises_no_false_alarm_on_cloud_shadows_but_catches_a_scale_error():
    """Romania dates with real cloud shadows (and a snowy winter date) used to warn "10th percentile 2-4x below its
    references" (12 of the cloudy dates); a 10x scale error still fails."""
    import pystac

    from cloudfree.pipeline.errors import InputDataError
    from cloudfree.stages.plausibility import check_reflectance

    cat = pystac.Catalog.from_file(str(shared("s2-l2a-stack-romania-nrt", "stac", "catalog.json")))
    items = {i.id: i for i in cat.get_items(recursive=True)}
    for i in items.values():
        i.make_asset_hrefs_absolute()
    refs = [items["S2_ROMANIA_20190701"], items["S2_ROMANIA_20190706"]]
    for day in ("S2_ROMANIA_20190716", "S2_ROMANIA_20190626", "S2_ROMANIA_20190731"):
        assert check_reflectance(items[day], refs, list(RBANDS)) == [], day
    winter = [items["S2_ROMANIA_20161014"], items["S2_ROMANIA_20170402"]]
    assert check_reflectance(items["S2_ROMANIA_20170102"], winter, list(RBANDS)) == []  # snow, dark in B11
    small = items["S2_ROMANIA_20190716"].clone()
    for b in RBANDS:
        small.assets[b].extra_fields["raster:bands"] = [{"scale": 1e-5, "offset": 0, "nodata": 0}]
    with pytest.raises(InputDataError, match="S2_ROMANIA_20190716 band B"):
        check_reflectance(small, refs, list(RBANDS))
