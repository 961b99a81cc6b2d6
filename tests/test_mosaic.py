"""Seamless mosaicking: partition-of-unity weights, the blend kernel, and the seam metric on real pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfree.stages.mosaic import axis_weights, blend_block, neighbours, seam_ratio, tile_weights
from cloudfree.stages.tile import plan_tiles

THIN = "S2B_T33UUU_20170226_SIMTHIN"


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(1, 300), nx=st.integers(1, 300), size=st.integers(16, 128), halo=st.integers(0, 70),
       kind=st.sampled_from(["feather", "hann", "none"]))
def test_weights_sum_to_one_everywhere_including_grid_edges(ny, nx, size, halo, kind):
    tiles = plan_tiles((ny, nx), size, halo)
    total = np.zeros((ny, nx))
    for t in tiles:
        w = tile_weights(tiles, halo, kind)[t.index]
        assert w.shape == (t.read[0].stop - t.read[0].start, t.read[1].stop - t.read[1].start)
        assert (w >= 0).all() and (w <= 1).all()
        total[t.read] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    for t in tiles:
        assert len(neighbours(t, tiles)) <= 9 or halo > size


def test_feather_ramps_only_across_interior_borders():
    w = axis_weights([(0, 100), (100, 200)], [(0, 110), (90, 200)], 10, "feather")
    assert w[0][0] == 1 and w[0][89] == 1 and 0 < w[0][95] < 1 and w[0][109] < 0.1
    assert w[1][-1] == 1 and w[1][0] < 0.1
    np.testing.assert_allclose(w[0][90:110] + w[1][:20], 1.0, atol=1e-6)


def test_blend_removes_a_per_tile_offset_step_and_none_keeps_it():
    ny, nx, size, halo = 64, 128, 32, 8
    tiles = plan_tiles((ny, nx), size, halo)
    x = np.arange(nx, dtype=np.float32)

    def pred(t, kind):
        offset = 0.05 * ((t.index[0] + t.index[1]) % 2)  # a per-tile statistic: alternating offsets
        ry, rx = t.read
        refl = np.broadcast_to(0.001 * x[rx] + offset, (ry.stop - ry.start, rx.stop - rx.start))
        return np.stack([refl, np.ones_like(refl), np.full_like(refl, 2)])

    out = {}
    for kind in ("none", "feather", "hann"):
        w = tile_weights(tiles, halo, kind)
        img = np.zeros((3, ny, nx), np.float32)
        for t in tiles:
            parts = [(n, pred(n, kind), w[n.index]) for n in neighbours(t, tiles)]
            img[(slice(None),) + t.core] = blend_block(t, parts, 1, kind)
        out[kind] = img
    def max_border_jump(img):
        return max(np.abs(np.diff(img, axis=1))[:, size - 1::size].max(),
                   np.abs(np.diff(img, axis=0))[size - 1::size].max())

    assert seam_ratio(out["none"][0], size) > 10  # the 0.05 step dominates a 0.001/px slope
    assert max_border_jump(out["none"][0]) == pytest.approx(0.051, abs=1e-4)
    for kind in ("feather", "hann"):
        assert max_border_jump(out[kind][0]) < 0.01  # the step is spread over 2 * halo pixels
        np.testing.assert_allclose(out[kind][1], 1.0)  # confidence blended, still 1
        assert (out[kind][2] == 2).all()  # source not blended


def test_seam_ratio_is_one_on_a_smooth_field_and_rejects_tiny_images():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 200, 200))
    assert seam_ratio(img, 50) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError):
        seam_ratio(img[:, :10, :10], 50)


@pytest.fixture(scope="module")
def thin_scene(demo_config):
    """The real-pixel thin-cloud demo target (256 x 512 px at 10 m) as lazy scene inputs."""
    from cloudfree.catalogs.base import SearchQuery, open_catalog
    from cloudfree.stages.load import load_reflectance, output_geobox
    from cloudfree.stages.masks import build_masks
    from cloudfree.stages.remove import SceneInputs

    cat = open_catalog(demo_config.catalog)
    it = cat.search(SearchQuery(collections=(demo_config.catalog.collection,), ids=(THIN,)))[0]
    gb = output_geobox(it, demo_config.grid)[:256, :512]
    stack = load_reflectance([it], demo_config.grid.bands, gb, 256)
    m, p = build_masks([it], gb, demo_config.mask, 256)
    return SceneInputs(stack[0], m[0], p[0], None, None, target_id=it.id), stack[0]


def test_per_tile_statistics_model_has_seams_without_blending_and_none_with_it(thin_scene):
    """DCP estimates its atmospheric light per tile: a per-tile statistic. Measured on real pixels."""
    import dask

    from cloudfree.models.registry import build_model
    from cloudfree.stages.remove import remove_clouds

    inputs, target = thin_scene
    model = build_model("dcp", {"keep_clear_target": False})
    size, halo = 64, model.spec.halo
    tiles = plan_tiles(target.shape[1:], size, halo)
    ratios, timings = {}, []
    with dask.config.set(scheduler="threads"):
        for kind in ("none", "feather"):
            tim = [] if kind == "feather" else None
            ds = remove_clouds(inputs, model, tiles, halo, blend=kind, timings=tim)
            refl, *secs = dask.compute(ds.reflectance.data, *(tim or []))
            ratios[kind] = seam_ratio(refl, size)
            timings = secs or timings
        ratios["input"] = seam_ratio(target.values, size)
    print("seam ratios (border / interior median |gradient|):", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["none"] > 1.25, ratios  # measurable border excess without blending
    for kind in ("feather",):
        assert ratios[kind] < 1.1 and abs(ratios[kind] - ratios["input"]) < 0.06, ratios
    assert len(timings) == len(tiles) and all(s > 0 for _, s in timings)


@pytest.mark.parametrize("kind", ["feather", "hann"])
def test_blending_pieces_of_the_predictions_gives_the_same_bytes(thin_scene, monkeypatch, kind):
    """Each output block blends copies of its part of the neighbours' predictions (stages.remove.BLEND_PIECES,
    issue 22: a prediction is released once cut, not when the last of its 9 blocks is blended): the same values as
    blending the whole predictions, bit for bit, on real pixels."""
    import dask

    import cloudfree.stages.remove as remove
    from cloudfree.models.registry import build_model

    inputs, target = thin_scene
    model = build_model("dcp", {"keep_clear_target": False})
    tiles = plan_tiles(target.shape[1:], 64, model.spec.halo)
    out = {}
    with dask.config.set(scheduler="threads"):
        for pieces in (False, True):
            monkeypatch.setattr(remove, "BLEND_PIECES", pieces)
            ds = remove.remove_clouds(inputs, model, tiles, model.spec.halo, blend=kind)
            keys = [str(k[0]) for k in ds.__dask_graph__() if isinstance(k, tuple)]
            assert any(k.endswith("-piece") for k in keys) == pieces
            out[pieces] = dask.compute(ds.reflectance.data, ds.confidence.data, ds.source.data)
    for a, b in zip(out[True], out[False]):
        assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert np.isfinite(out[True][0]).mean() > 0.9  # real values, not an all-NaN pass


def _fallback_inputs():
    import xarray as xr

    from cloudfree.stages.remove import SceneInputs

    ny, nx = 4, 5
    coords = {"y": np.arange(ny), "x": np.arange(nx)}
    conf = np.full((ny, nx), 0.9, np.float32)
    conf[0, :] = 0.1  # low confidence on the first row
    ds = xr.Dataset({
        "reflectance": (("band", "y", "x"), np.full((2, ny, nx), 0.5, np.float32)),
        "confidence": (("y", "x"), conf), "source": (("y", "x"), np.full((ny, nx), 2, np.float32)),
    }, coords={"band": ["B02", "B03"], **coords}).chunk({"y": 2, "x": 3})
    refs = np.stack([np.full((2, ny, nx), 0.1, np.float32), np.full((2, ny, nx), 0.2, np.float32)])
    rmask = np.zeros((2, ny, nx), bool)
    rmask[0, 0, :2] = True  # first reference cloudy at (0, 0..1) -> the second one is used there
    rmask[:, 0, 4] = True  # no clear reference at (0, 4) -> the model value stays
    inputs = SceneInputs(ds.reflectance, ds.confidence < 0, ds.confidence,
                         xr.DataArray(refs, dims=("time", "band", "y", "x")).chunk({"y": 2}),
                         xr.DataArray(rmask, dims=("time", "y", "x")).chunk({"y": 2}), ("r0", "r1"), (1.0, 2.0), "t")
    return ds, inputs


def test_confidence_fallback_modes():
    import dask

    from cloudfree.stages.mosaic import confidence_fallback

    ds, inputs = _fallback_inputs()
    with dask.config.set(scheduler="sync"):
        keep = confidence_fallback(ds, inputs, 0.5, "keep")
        assert keep is ds
        nod = confidence_fallback(ds, inputs, 0.5, "nodata").compute()
        assert np.isnan(nod.reflectance.values[:, 0]).all() and (nod.source.values[0] == 0).all()
        assert (nod.reflectance.values[:, 1:] == 0.5).all()
        best = confidence_fallback(ds, inputs, 0.5, "best-available").compute()
    r, s = best.reflectance.values[0], best.source.values
    assert list(r[0]) == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.5])
    assert list(s[0]) == [11, 11, 10, 10, 2]
    assert (r[1:] == 0.5).all() and (s[1:] == 2).all()
    np.testing.assert_array_equal(best.confidence.values, ds.confidence.values)  # confidence is not rewritten
    with pytest.raises(ValueError, match="low_confidence"):
        confidence_fallback(ds, inputs, 0.5, "fill")


def test_blending_and_fallback_stay_lazy(thin_scene):
    """Building the blended graph (and the fallback) reads no pixel: compute happens once, at the write."""
    import dask

    from cloudfree.models.registry import build_model
    from cloudfree.stages.mosaic import confidence_fallback
    from cloudfree.stages.remove import remove_clouds

    def refuse(*args, **kwargs):
        raise AssertionError("a stage computed eagerly")

    inputs, target = thin_scene
    model = build_model("dcp")
    with dask.config.set(scheduler=refuse):
        ds = remove_clouds(inputs, model, plan_tiles(target.shape[1:], 128, 16), 16, blend="hann")
        ds = confidence_fallback(ds, inputs, 0.3, "nodata")
    assert ds.reflectance.shape == target.shape and ds.reflectance.chunks[1][0] == 128
