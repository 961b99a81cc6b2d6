"""Column strips with spilled crossings (issue 22: flat memory for halo models): same values, crossings on disk."""

from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.core import flatten

from cloudfree.stages.cog import _Spilled, spill_across, strip_order


def _halo_graph(values: np.ndarray):
    """4 x 6 blocks of 16 px, each a task of its own (as the reads are), under a halo kernel: every output block
    needs its neighbours' pixels (as a removal model's tiles do). ``(out, expected values, optimised graph, output
    keys in raster order, strip order (2 columns), markers in that order)``."""
    src = da.from_array(values.astype(np.float32), chunks=16).map_blocks(np.sqrt)
    out = src.map_overlap(lambda b: b * 2 + np.roll(b, 1, axis=0), depth=3, boundary="reflect")
    expected = out.compute(scheduler="sync")
    dsk = dict(dask.array.optimization.optimize(out.__dask_graph__(), list(flatten(out.__dask_keys__()))))
    raster = list(flatten(out.__dask_keys__()))
    order = strip_order(out.numblocks, 2)
    return out, expected, dsk, raster, order, [[raster[p]] for p in order]


def test_strip_order_is_a_permutation_by_column_strips():
    order = strip_order((3, 5), 2)
    assert sorted(order) == list(range(15))
    # strip 0 = columns 0-1 row by row, then columns 2-3, then column 4
    assert order[:6] == [0, 1, 5, 6, 10, 11]
    assert order[6:12] == [2, 3, 7, 8, 12, 13]
    assert order[12:] == [4, 9, 14]


def test_spill_across_keeps_the_values_and_puts_the_border_crossings_on_disk(tmp_path, monkeypatch):
    import cloudfree.stages.cog as cog

    monkeypatch.setattr(cog, "SPILL_MIN_BYTES", 0)  # these test blocks are 1 KB: write every crossing to disk
    out, expected, dsk, raster, order, markers = _halo_graph(np.random.default_rng(0).random((64, 96)))
    strips = [(p % out.numblocks[1]) // 2 for p in order]
    n = spill_across(dsk, markers, strips, str(tmp_path))
    assert n > 0  # the input chunks and overlap pieces at the two strip borders
    got = np.block([[dask.get(dsk, k) for k in row] for row in out.__dask_keys__()])
    np.testing.assert_array_equal(got, expected)
    files = list(tmp_path.iterdir())
    assert files  # the crossing results that were large enough went through the disk
    assert all(f.suffix == ".pkl" for f in files)


def test_spill_reach_zero_puts_the_strips_line_buffer_on_disk_too(tmp_path, monkeypatch):
    """``reach=0`` (:data:`cloudfree.stages.cog.SPILL_REACH_ROWS`, the default for halo models): a result that a
    later block of the same strip needs (the halo's line buffer of input chunks) is read back from disk as well,
    not only the strip-border crossings; the values stay the same."""
    import cloudfree.stages.cog as cog

    monkeypatch.setattr(cog, "SPILL_MIN_BYTES", 0)
    counts = {}
    for reach in (None, 0):
        out, expected, dsk, raster, order, markers = _halo_graph(np.random.default_rng(1).random((64, 96)))
        strips = [(p % out.numblocks[1]) // 2 for p in order]
        folder = tmp_path / str(reach)
        folder.mkdir()
        counts[reach] = spill_across(dsk, markers, strips, str(folder), reach=reach)
        got = np.block([[dask.get(dsk, k) for k in row] for row in out.__dask_keys__()])
        np.testing.assert_array_equal(got, expected)
    # within a strip, the input chunks of a block row are needed by the rows above and below it too
    assert counts[0] > counts[None] > 0, counts
    assert cog.SPILL_REACH_ROWS == 0


def test_spilled_small_results_stay_in_memory():
    from cloudfree.stages.cog import _spill_value, _unspill

    h = _spill_value(np.arange(4), "/nonexistent/never-written.pkl")
    assert isinstance(h, _Spilled) and h.path is None
    np.testing.assert_array_equal(_unspill(h), np.arange(4))


def test_read_back_crossings_are_not_kept_alive_by_the_slices_taken_from_them(tmp_path, monkeypatch):
    """A later strip's task that slices a read-back result (an overlap's halo strip) returns an array of its own,
    not a view: a view held until its consumer ran kept the whole read-back block in memory (issue 22: 174 MB of
    the 16x reference-replace scene)."""
    import cloudfree.stages.cog as cog

    monkeypatch.setattr(cog, "SPILL_MIN_BYTES", 0)
    src = da.from_array(np.arange(64 * 96, dtype=np.float32).reshape(64, 96), chunks=16).map_blocks(np.sqrt)
    out = src.map_overlap(lambda b: b + 1, depth=2, boundary="none")
    expected = out.compute(scheduler="sync")
    dsk = dict(dask.array.optimization.optimize(out.__dask_graph__(), list(flatten(out.__dask_keys__()))))
    raster = list(flatten(out.__dask_keys__()))
    order = strip_order(out.numblocks, 2)
    assert spill_across(dsk, [[raster[p]] for p in order], [(p % out.numblocks[1]) // 2 for p in order],
                        str(tmp_path)) > 0
    owned = [k for k, t in dsk.items() if getattr(t, "func", None) is cog._owned]
    assert owned  # the late readers of the crossings
    for k in owned:
        v = dask.get(dsk, k)
        assert isinstance(v, np.ndarray) and v.base is None, k
    got = np.block([[dask.get(dsk, k) for k in row] for row in out.__dask_keys__()])
    np.testing.assert_array_equal(got, expected)


def test_read_backs_of_a_later_strip_wait_for_their_blocks_like_reads(tmp_path, monkeypatch):
    """A task of a later strip whose only input is a spilled result (a tile prediction's piece for the next column,
    an overlap's halo strip) is gated by bound_lookahead like a read: ungated, dask ran it as soon as the spill was
    written and held its result for the whole strip (issue 22: 63 MB of prediction pieces at the 16x phyvlm-cr
    peak, 150 MB with a 1-block lookahead). Checked on the graph (every such task waits for the blocks up to its
    first block - slack) and in a run on 4 threads (each starts only after those blocks were computed; same
    values)."""
    import threading

    from dask._task_spec import TaskRef
    from dask.callbacks import Callback
    from dask.threaded import get

    import cloudfree.stages.cog as cog

    monkeypatch.setattr(cog, "SPILL_MIN_BYTES", 0)
    out, expected, dsk, raster, order, markers = _halo_graph(np.arange(64 * 96).reshape(64, 96))
    assert spill_across(dsk, markers, [(p % out.numblocks[1]) // 2 for p in order], str(tmp_path)) > 0
    readers = [k for k, t in dsk.items() if t.dependencies and all(cog._is_spill(dsk[d]) for d in t.dependencies)]
    assert readers
    slack = 1
    pos = {m[0]: i for i, m in enumerate(markers)}
    lo = {k: s[0] for k, s in cog._marker_spans(dsk, pos).items()}
    cog.bound_lookahead(dsk, markers, slack)
    gated = {k for k in readers if lo[k] >= slack}
    assert gated
    for k in gated:
        t = dsk[k]
        assert t.func is cog._after, k
        assert isinstance(t.args[0], TaskRef) and t.args[0].key == ("cloudfree-written", lo[k] - slack), k

    done, bad, lock = set(), [], threading.Lock()

    def pre(key, dsk_, state):
        if key in gated:
            with lock:
                if not set(range(lo[key] - slack + 1)) <= done:
                    bad.append(key)

    def post(key, result, dsk_, state, worker_id):
        if key in pos:
            with lock:
                done.add(pos[key])

    with Callback(pretask=pre, posttask=post):
        blocks = get(dsk, raster, num_workers=4)
    assert not bad
    got = np.block([[blocks[i * out.numblocks[1] + j] for j in range(out.numblocks[1])]
                    for i in range(out.numblocks[0])])
    np.testing.assert_array_equal(got, expected)


def test_load_chunks_smaller_than_the_tiles_write_the_same_cogs_in_strips(tmp_path):
    """A halo model on a grid loaded in ``grid.chunk`` = 256 px under 512 px tiles and COG blocks (the
    mask_provenance layer keeps the load's chunks, the predictions the tiles'): the column-strip writer orders its
    blocks by the COG blocks of every layer (it used to take them from the layers' own chunks and failed with an
    IndexError), and the files are byte-identical to those of a 512 px load. Real 29RKH pixels at 100 m, 3 x 3
    blocks."""
    import pytest

    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.bench import DATA, _config, dated_items, scene_plan
    from cloudfree.pipeline.runner import dask_context, process_target

    if not (DATA / "B02.tif").exists():
        pytest.skip("needs ../shared/data/s2-l2a-tile-29RKH-100m")
    items = dated_items(DATA, 3)
    plan = scene_plan(items, "test")
    files = {}
    for chunk in (512, 256):
        cfg = _config(100.0, tmp_path / str(chunk), "dcp").replace(grid={"chunk": chunk})
        assert cfg.tile.size == cfg.output.blocksize == 512
        with dask_context(cfg):
            r = process_target(plan, build_model("dcp", {}), cfg, "test")
        assert r.status == "done", r.error
        files[chunk] = {k: Path(p).read_bytes() for k, p in r.outputs.items() if str(p).endswith(".tif")}
    assert {"reflectance", "mask_provenance"} <= set(files[512]), sorted(files[512])
    assert files[256].keys() == files[512].keys()
    for k in files[512]:
        assert files[256][k] == files[512][k], k
