"""Property tests of the tile plan (hypothesis) and a guard proving the stages build their graphs lazily."""

from __future__ import annotations

import dask
import dask.array as dsa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfree.pipeline.errors import ConfigError
from cloudfree.stages.tile import grid_of_tiles, plan_tiles

# (shape, size) pairs with at most ~1,500 tiles: large grids with large tiles, tiny grids with tiny tiles
shapes = st.tuples(st.integers(1, 600), st.integers(1, 600))
sizes = st.integers(16, 300)
small = st.tuples(st.tuples(st.integers(1, 40), st.integers(1, 40)), st.integers(1, 12))
halos = st.integers(0, 120)


def _cases():
    return st.one_of(st.tuples(shapes, sizes), small)


@settings(max_examples=150, deadline=None)
@given(case=_cases(), halo=halos)
def test_cores_cover_the_grid_exactly_once(case, halo):
    shape, size = case
    tiles = plan_tiles(shape, size, halo)
    count = np.zeros(shape, np.int32)
    for t in tiles:
        count[t.core] += 1
    assert (count == 1).all()  # full coverage, no gaps, no double writes
    assert len(tiles) == -(-shape[0] // size) * -(-shape[1] // size)
    assert len({t.index for t in tiles}) == len(tiles)


@settings(max_examples=150, deadline=None)
@given(case=_cases(), halo=halos)
def test_read_windows_contain_cores_with_halo_clipped_at_edges(case, halo):
    shape, size = case
    ny, nx = shape
    for t in plan_tiles(shape, size, halo):
        for core, read, n in zip(t.core, t.read, shape):
            assert 0 <= read.start <= core.start < core.stop <= read.stop <= n
            assert core.stop - core.start <= size and core.stop > core.start
            # the halo is the full halo unless the grid edge clips it
            assert core.start - read.start == min(halo, core.start)
            assert read.stop - core.stop == min(halo, n - core.stop)
        cy, cx = t.core_in_read
        ry, rx = t.read
        assert (ry.start + cy.start, ry.start + cy.stop) == (t.core[0].start, t.core[0].stop)
        assert (rx.start + cx.start, rx.start + cx.stop) == (t.core[1].start, t.core[1].stop)


@settings(max_examples=100, deadline=None)
@given(case=_cases(), halo=halos)
def test_tiles_reassemble_the_grid(case, halo):
    shape, size = case
    grid = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape)
    rows = grid_of_tiles(plan_tiles(shape, size, halo))
    out = np.block([[grid[t.read][t.core_in_read] for t in row] for row in rows])
    np.testing.assert_array_equal(out, grid)


@given(shape=shapes, size=st.integers(-5, 0), halo=halos)
def test_bad_tile_size_is_a_config_error(shape, size, halo):
    with pytest.raises(ConfigError):
        plan_tiles(shape, size, halo)


def test_empty_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="empty grid"):
        plan_tiles((0, 10), 8, 1)


# -- laziness --------------------------------------------------------------------------------------------------
class ComputeForbidden(RuntimeError):
    pass


def _forbidden_scheduler(dsk, keys, **kwargs):
    raise ComputeForbidden(f"a stage computed {keys!r:.200} while building its graph")


def test_forbidden_scheduler_catches_a_compute():
    with dask.config.set(scheduler=_forbidden_scheduler), pytest.raises(ComputeForbidden):
        dsa.ones(4).sum().compute()


def test_load_mask_coregister_tile_remove_build_graphs_without_computing(demo_catalog):
    """Everything up to the write is lazy: a scheduler that raises on any compute stays untouched."""
    import pystac

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.config import CoregisterConfig, GridConfig, MaskConfig
    from cloudfree.stages.coregister import Coregistration, apply_shifts, load_aligned_references
    from cloudfree.stages.load import load_reflectance_checked, output_geobox
    from cloudfree.stages.masks import build_masks
    from cloudfree.stages.remove import SceneInputs, remove_clouds

    items = sorted(pystac.Catalog.from_file(str(demo_catalog)).get_items(recursive=True), key=lambda i: i.id)
    target = next(i for i in items if i.id.endswith("SIMCLOUDY"))
    refs = [i for i in items if i.id.endswith("SIMREF")]
    model = build_model("reference-replace", {})
    grid = GridConfig()
    with dask.config.set(scheduler=_forbidden_scheduler):
        geobox = output_geobox(target, grid)
        stack, failed, failures = load_reflectance_checked([target, *refs], grid.bands, geobox, grid.chunk)
        mask, prob = build_masks([target, *refs], geobox, MaskConfig(methods=["cldprb", "scl", "spectral"]),
                                 grid.chunk)
        ref_masks = mask[1:] | stack[1:].isnull().any("band") | failed[1:]
        shifts = [Coregistration(r.id, "optical", "applied", shift_px=(0.3, -0.2)) for r in refs]
        shifted, _ = apply_shifts(stack[1:], ref_masks, shifts, CoregisterConfig())  # in-memory variant
        ref_stack, ref_masks = load_aligned_references(refs, shifts, geobox, grid.bands,
                                                       MaskConfig(methods=["cldprb", "scl", "spectral"]),
                                                       grid.chunk, stack[0])  # what the runner uses
        tiles = plan_tiles(geobox.shape, 256, model.spec.halo)
        ds = remove_clouds(SceneInputs(stack[0], mask[0], prob[0], ref_stack, ref_masks,
                                       tuple(r.id for r in refs), (-10.0, 25.0), target.id),
                           model, tiles, model.spec.halo)
    assert not failures
    for a in (stack, failed, mask, prob, shifted, ref_stack, ref_masks, ds.reflectance, ds.source):
        assert isinstance(a.data, dsa.Array)
    assert ds.reflectance.shape == (len(grid.bands),) + tuple(geobox.shape)
