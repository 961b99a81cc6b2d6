"""Co-registration: known sub-pixel shifts applied to real Sentinel pixels are recovered to < 0.1 px."""

from __future__ import annotations

import json

import dask.array as dsa
import numpy as np
import pytest
import rasterio
import xarray as xr
from scipy import ndimage

from cloudfree.pipeline.config import CoregisterConfig
from cloudfree.stages.coregister import (Coregistration, apply_shifts, estimate_shift, estimate_shift_cross_modal,
                               shift_block)
from tests.conftest import shared

SHIFTS = [(0.3, -0.25), (-0.4, 0.5), (1.7, -2.2), (0.05, 0.9)]


@pytest.fixture(scope="module")
def b08_29rkh() -> np.ndarray:
    with rasterio.open(shared("s2-l2a-tile-29RKH-100m", "B08.tif")) as ds:
        return ds.read(1, window=((300, 556), (300, 556))).astype(np.float32) / 1e4


@pytest.mark.parametrize("true", SHIFTS)
def test_recovers_known_shift_on_real_l2a(b08_29rkh, true):
    # the reference content is displaced by `true`, with a gain/offset (seasonal change)
    moving = ndimage.shift(b08_29rkh, true, order=3, mode="nearest") * 1.1 + 0.02
    est = estimate_shift(b08_29rkh, moving)
    assert np.allclose(est.misregistration, true, atol=0.1), (true, est)
    assert est.converged


def test_recovers_shift_with_clouds_masked(b08_29rkh):
    rng = np.random.default_rng(0)
    cloud = ndimage.gaussian_filter(rng.normal(size=b08_29rkh.shape), 8) > 0.02  # ~30 % cloud
    moving = ndimage.shift(b08_29rkh, (0.3, -0.25), order=3, mode="nearest")
    moving[cloud] = 0.8
    est = estimate_shift(b08_29rkh, moving, None, ~cloud)
    assert np.allclose(est.misregistration, (0.3, -0.25), atol=0.1), est


def test_recovers_fourier_shift_on_real_l1c():
    src = next(shared("s2-l1c-crop-33UUU", "IMG_DATA").glob("*_B08.jp2"))
    with rasterio.open(src) as ds:
        a = ds.read(1, window=((200, 456), (600, 856))).astype(np.float64) / 1e4
    moved = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(a), (0.3, -0.25))).real
    est = estimate_shift(a, moved)
    assert np.allclose(est.misregistration, (0.3, -0.25), atol=0.1), est


def test_sar_to_optical_shift_is_estimated_and_a_known_offset_recovered():
    """Real S1 (linear power) against the cloud-free optical mean of the same 2.56 km (s1-uk-10m)."""
    folder = shared("s1-uk-10m")
    with rasterio.open(next(folder.glob("*.tif"))) as ds:
        vv = ds.read(2).astype(np.float32)
    optical = np.load(folder / "2019_mean.npy")[..., 0]
    base = estimate_shift_cross_modal(optical, vv)
    assert np.hypot(*base.shift) < 3.0, base  # the two products agree to a few pixels
    moved = np.clip(ndimage.shift(vv, (1.3, -0.6), order=3, mode="nearest"), 1e-6, None)
    est = estimate_shift_cross_modal(optical, moved)
    delta = np.subtract(est.misregistration, base.misregistration)
    assert np.allclose(delta, (1.3, -0.6), atol=0.1), (base, est)


def test_apply_shifts_is_lazy_and_chunk_independent(b08_29rkh):
    img = np.stack([b08_29rkh, b08_29rkh * 2])[None]  # (time, band, y, x)
    img[0, :, 10:20, 30:40] = np.nan
    refs = xr.DataArray(dsa.from_array(img, chunks=(1, 1, 64, 64)), dims=("time", "band", "y", "x"),
                        coords={"band": ["B04", "B08"]})
    masks = xr.DataArray(dsa.from_array(np.isnan(img[:, 0]), chunks=(1, 64, 64)), dims=("time", "y", "x"))
    cfg = CoregisterConfig(max_shift_px=3, order=1)
    shift = Coregistration("r", "optical", "applied", shift_px=(-0.4, 1.3))
    out, mout = apply_shifts(refs, masks, [shift], cfg)
    assert isinstance(out.data, dsa.Array) and isinstance(mout.data, dsa.Array)
    whole = shift_block(img[0], (-0.4, 1.3), order=1)
    np.testing.assert_allclose(out.values[0], whole, rtol=1e-5, atol=1e-6, equal_nan=True)
    m = mout.values[0]
    assert m[9:21, 31:42].any() and 90 <= m.sum() <= 110  # the nodata patch moved with the pixels
    rejected = Coregistration("r", "optical", "rejected", shift_px=(5.0, 0.0))
    same, _ = apply_shifts(refs, masks, [rejected], cfg)
    assert same is refs


def test_demo_misregistrations_are_recovered_and_recorded(demo_run):
    """The demo references carry simulated misregistrations; the runner estimates, applies and records them."""
    from cloudfree.pipeline.evaluation.demo_catalog import ITEMS

    truth = {s.id: s.shift for s in ITEMS}
    for r in demo_run:
        assert r.coregistration, r.target_id
        item = json.loads(r.outputs["item"].read_text())
        recorded = {c["id"]: c for c in item["properties"]["cloudfree:coregistration"]}
        for c in r.coregistration:
            assert c["status"] == "applied"
            assert recorded[c["id"]]["misregistration_px"] == c["misregistration_px"]
            assert np.allclose(c["misregistration_px"], truth[c["id"]], atol=0.1), c


def test_scene_level_estimate_applies_rejects_and_fails(b08_29rkh):
    from cloudfree.stages.coregister import estimate_reference_shifts

    def scene(a):
        return xr.DataArray(dsa.from_array(a[None], chunks=(1, 128, 128)), dims=("band", "y", "x"),
                            coords={"band": ["B08"]})

    refs = xr.concat([scene(ndimage.shift(b08_29rkh, s, order=3, mode="nearest"))
                      for s in [(0.3, -0.25), (2.5, 0.0), (0.0, 0.0), (0.0, 0.0)]], dim="time")
    masks = xr.DataArray(np.zeros((4, 256, 256), bool), dims=("time", "y", "x"))
    masks[2] = True  # the third reference is all cloud
    tmask = xr.DataArray(np.zeros((256, 256), bool), dims=("y", "x"))
    cfg = CoregisterConfig(max_shift_px=2.0, window=200)
    out = estimate_reference_shifts(scene(b08_29rkh), tmask, refs, masks, ["a", "b", "c", "d"], cfg)
    # the fourth is the target itself: a shift below min_shift_px is recorded, not applied (no blur, no re-read)
    assert [c.status for c in out] == ["applied", "rejected", "failed", "negligible"]
    assert np.hypot(*out[3].shift_px) < cfg.min_shift_px and not out[3].applied
    assert np.allclose(out[0].as_properties()["misregistration_px"], (0.3, -0.25), atol=0.1)
    assert np.allclose(out[1].as_properties()["misregistration_px"], (2.5, 0.0), atol=0.1)
    assert out[0].window == (28, 228, 28, 228) and "max_shift_px" in out[1].reason


def test_loading_on_a_shifted_grid_equals_shifting_the_pixels(demo_catalog):
    """The runner applies shifts by reading references on a shifted grid; check it against ndimage.shift."""
    import pystac

    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.coregister import shifted_geobox
    from cloudfree.stages.load import load_reflectance, output_geobox

    item = next(i for i in pystac.Catalog.from_file(str(demo_catalog)).get_items(recursive=True)
                if i.id.endswith("SIMCLOUDY"))
    gb = output_geobox(item, GridConfig())[100:356, 300:556]
    plain = load_reflectance([item], ["B08"], gb).values[0, 0]
    moved = load_reflectance([item], ["B08"], shifted_geobox(gb, (0.4, -0.3))).values[0, 0]
    expect = ndimage.shift(plain, (0.4, -0.3), order=1, mode="nearest")
    inner = np.s_[2:-2, 2:-2]
    np.testing.assert_allclose(moved[inner], expect[inner], rtol=1e-3, atol=2e-3)
    assert np.allclose(estimate_shift(plain, moved).misregistration, (0.4, -0.3), atol=0.1)


def test_shift_estimated_on_a_cloudy_target_is_unreliable_not_a_bound_to_raise(b08_29rkh):
    """Issue 18: on a mostly cloudy target (here 85 % of the window) the shift is recorded as unreliable and not
    applied, and the reason does not tell the user to raise coregister.max_shift_px. Issue 22: nor is it estimated."""
    from cloudfree.stages.coregister import UNRELIABLE_TARGET_CLEAR, estimate_reference_shifts

    def scene(a):
        return xr.DataArray(dsa.from_array(a[None], chunks=(1, 128, 128)), dims=("band", "y", "x"),
                            coords={"band": ["B08"]})

    refs = xr.concat([scene(ndimage.shift(b08_29rkh, (2.5, 0.0), order=3, mode="nearest"))], dim="time")
    masks = xr.DataArray(np.zeros((1, 256, 256), bool), dims=("time", "y", "x"))
    cloudy = np.ones((256, 256), bool)
    cloudy[60:140, 60:140] = False  # 80 x 80 clear of the central 200 x 200 window: 16 %
    tmask = xr.DataArray(cloudy, dims=("y", "x"))
    cfg = CoregisterConfig(max_shift_px=2.0, window=200)
    (c,) = estimate_reference_shifts(scene(b08_29rkh), tmask, refs, masks, ["a"], cfg)
    assert (~cloudy[28:228, 28:228]).mean() < UNRELIABLE_TARGET_CLEAR
    assert c.status == "unreliable" and not c.applied
    assert "unreliable" in c.reason and "raise" not in c.reason
    # not estimated (issue 22: the estimate would be thrown away): no shift recorded, the clear overlap is
    assert "not estimated" in c.reason and c.shift_px == (0.0, 0.0) and c.n_pixels == int((~cloudy[28:228, 28:228]).sum())


@pytest.mark.parametrize("shape", [(512, 512), (256, 256), (300, 517), (511, 512), (100, 37), (3, 1), (1, 1)])
def test_hann_window_is_skimages_to_the_bit(shape):
    """The phase correlation's window is skimage's (the estimates, hence the shifted references and the outputs,
    stay byte-identical), built without the ~1 s import of scipy.signal behind ``skimage.filters.window``."""
    from skimage.filters import window

    from cloudfree.stages.coregister import hann_window

    got, want = hann_window(shape), window("hann", shape)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
