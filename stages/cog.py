"""Streaming COG writer: computed tiles -> finished Cloud-Optimized GeoTIFFs in one dask pass (odc-geo).

A library for :mod:`cloudfree.stages.write` (which decides which layers a target or composite gets); it
knows nothing of STAC (:mod:`cloudfree.stages.publish`).

Each output layer (reflectance, confidence, source, mask provenance) becomes one lazy write
(:func:`cog_write`) built on :func:`odc.geo.cog.save_cog_with_dask`: every 512 px block of the full-resolution
image is compressed as soon as it is computed, the overviews are reduced from the same blocks (``average`` for
reflectance, ``nearest`` for classes), and the compressed blocks are gathered into the final file behind a header
that lists them (overviews first, as a COG wants). All layers of a target are written by one ``dask.compute``
together with anything else the caller needs (quicklook, timings): the inputs are read and the model runs once,
nothing is written twice, there is no intermediate GeoTIFF and no lock (each block goes to its own part file,
the parts are concatenated at the end). Memory per task is one block; the graph has a fixed number of tasks per
block, so memory does not grow with the area.

Determinism: the blocks are compressed with the same settings whatever the scheduler, and the parts are
assembled in block order, so the same inputs give the same bytes under threads and dask.distributed.

GDAL metadata written with each file: band descriptions, and ``scale``/``offset`` per band (reflectance: DN
scale 1e-4, offset 0), like the input Sentinel-2 COGs. Remote workers need the output directory on a shared file
system (odc-geo's file sink writes part files next to the destination).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator, Sequence
from xml.sax.saxutils import escape

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

#: tifffile's names for the compressions the config offers.
_COMPRESSION = {"deflate": "ADOBE_DEFLATE", "zstd": "ZSTD", "lzw": "LZW"}


def layer_array(data, geobox: GeoBox, names: Sequence[str], nodata, coords=None) -> xr.DataArray:
    """``data`` (dask ``(band, y, x)``) as a DataArray on ``geobox`` with band names and nodata (odc attrs);
    ``coords``: ``odc.geo.xr.xr_coords(geobox)`` when the caller has it (built once for all layers of a grid)."""
    from odc.geo.xr import xr_coords

    coords = xr_coords(geobox) if coords is None else coords
    da = xr.DataArray(data, dims=("band", "y", "x"),
                      coords={"band": list(names), "y": coords["y"], "x": coords["x"],
                              "spatial_ref": coords["spatial_ref"]})
    if nodata is not None:
        da.attrs["nodata"] = nodata
    return da


def _metadata_items(names: Sequence[str], scales: Sequence[float] | None, offsets: Sequence[float] | None) -> list[str]:
    items = []
    for i, n in enumerate(names):
        items.append(f'<Item name="DESCRIPTION" sample="{i}" role="description">{escape(str(n))}</Item>')
        if scales is not None:
            items.append(f'<Item name="SCALE" sample="{i}" role="scale">{scales[i]!r}</Item>')
            items.append(f'<Item name="OFFSET" sample="{i}" role="offset">{(offsets or [0.0] * len(names))[i]!r}</Item>')
    return items


def cog_write(layer: xr.DataArray, dst: Path, *, blocksize: int = 512, compress: str = "deflate",
              predictor: int = 2, level: int = 6, overview_resampling: str = "nearest",
              scales: Sequence[float] | None = None, offsets: Sequence[float] | None = None):
    """A Delayed that writes ``layer`` (``(band, y, x)`` integer dask array on an odc geobox) as a COG at ``dst``.

    Internal tiles of ``blocksize`` px (overviews too), ``compress`` with ``predictor``, overviews down to one
    block, ``nodata`` from ``layer.attrs``. odc-geo builds the header and the per-level tile compression
    (``save_cog_with_dask(..., dst="")``); each batch of compressed tiles is appended to its own part file as
    soon as it is ready, and one final task writes header + parts (overviews first) into ``dst`` and removes the
    parts. Nothing is computed until the Delayed is.
    """
    import dask
    from odc.geo.cog import save_cog_with_dask

    if np.dtype(layer.dtype).kind not in "ui":
        raise TypeError(f"{dst.name}: COG layers are integer-encoded, got {layer.dtype}")
    names = [str(b) for b in layer.band.values]
    layer = layer.copy(data=layer.data.rechunk({0: -1, 1: blocksize, 2: blocksize}))
    parts = _unpadded(lambda: save_cog_with_dask(
        layer, "", compression=_COMPRESSION[compress], level=level, predictor=predictor,
        blocksize=[blocksize, blocksize], overview_resampling=overview_resampling, stats=False, bigtiff=False,
    ))
    parts_dir = dst.parent / f".{dst.name}.parts"
    from dask._task_spec import Task, TaskRef
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    # the spill and assembly tasks are written straight into one graph layer over the bags' partitions: building
    # them with dask.delayed calls unpacked and culled the whole graph once per part (2.2 s of the 16x bench
    # scene's main thread for its 4 layers, growing with the area)
    token = dask.base.tokenize(layer, dst, blocksize, compress, level)
    name = f"cogwrite-{dst.name}-{token}"
    dsk: dict = {}
    spills = []
    # coarsest overview first, full resolution last: the COG layout rio-cogeo validates
    for lvl, bag in enumerate(parts["tiles"][::-1]):
        for k in range(bag.npartitions):
            key = (f"cogspill-{token}", lvl, k)
            dsk[key] = Task(key, _spill, str(parts_dir / f"{lvl:02d}-{k:05d}.bin"), TaskRef((bag.name, k)))
            spills.append(key)
    dsk[name] = Task(name, _assemble_cog, str(dst), parts["meta"], parts["hdr0"],
                     tuple(_metadata_items(names, scales, offsets)), *(TaskRef(k) for k in spills))
    return Delayed(name, HighLevelGraph.from_collections(name, dsk, dependencies=list(parts["tiles"])))


def one_tile(shape: Sequence[int], blocksize: int) -> bool:
    """True when a ``(y, x)`` image of ``shape`` is one internal tile of ``blocksize`` px and so has no overviews
    (:func:`write_cog_array` writes it without a dask graph)."""
    from odc.geo.cog._tifffile import compute_cog_spec

    # a width of 3 or 4 px reads as (y, x, RGB[A]) to odc-geo's writer: such an image keeps the dask path
    return compute_cog_spec(tuple(shape), (blocksize, blocksize), max_pad=0)[2] == 0 and shape[-1] not in (3, 4)


def write_cog_array(arr: np.ndarray, geobox: GeoBox, dst: Path, names: Sequence[str], nodata, *,
                    blocksize: int = 512, compress: str = "deflate", predictor: int = 2, level: int = 6,
                    scales: Sequence[float] | None = None, offsets: Sequence[float] | None = None) -> Path:
    """Write the in-memory ``(band, y, x)`` integer ``arr`` as a COG at ``dst``, byte for byte what
    :func:`cog_write` writes for the same pixels, for an image of one tile (:func:`one_tile`: no overviews).

    The same odc-geo calls build the header (:func:`_unpadded`) and compress each band's tile; the tiles are laid
    out as :func:`cog_write` lays them out (its tile bags in reverse order, i.e. the last band first) behind the
    same patched header, through a temporary name. No dask graph, no part files: for small targets, where
    building and running the streaming writer's graph costs more than compressing the one tile.
    """
    import os

    from odc.geo.cog._tifffile import _make_empty_cog, _mk_tile_compressor, _norm_compression_tifffile, _patch_hdr

    arr = np.asarray(arr)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{Path(dst).name}: COG layers are integer-encoded, got {arr.dtype}")
    if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(geobox.shape) or not one_tile(arr.shape[1:], blocksize):
        raise ValueError(f"{Path(dst).name}: write_cog_array takes a (band, y, x) array of one {blocksize} px tile "
                         f"on its geobox {tuple(geobox.shape)}, got {arr.shape}")
    pred, comp, comp_args = _norm_compression_tifffile(arr.dtype, predictor, _COMPRESSION[compress], None,
                                                       level=level, kw={})
    meta, hdr0 = _unpadded(lambda: _make_empty_cog(
        arr.shape, arr.dtype, geobox, predictor=pred, compression=comp, compressionargs=comp_args,
        blocksize=[blocksize, blocksize], bigtiff=False, nodata=nodata, gdal_metadata=""), geotags_once=True)
    hdr0 = bytes(hdr0)
    if meta.overviews or meta.axis != "SYX":  # pragma: no cover - one_tile() above rules these out
        raise ValueError(f"{Path(dst).name}: an image with overviews goes through cog_write")
    ty, tx = meta.tile.yx
    tiles = []
    # cog_write spills odc-geo's tile bags in reverse order (one bag per level and sample): last sample first
    for sample in reversed(range(meta.num_planes)):
        encoder = _mk_tile_compressor(meta, sample)
        for s, y, x in meta.tidx(sample):
            # the (band, y, x) block, as the dask writer passes it: the compressor picks its band
            tiles.append((encoder(arr[:, y * ty:(y + 1) * ty, x * tx:(x + 1) * tx]), (0, s, y, x)))
    hdr = _patch_hdr([(len(data), idx) for data, idx in tiles], meta, hdr0, None,
                     _metadata_items([str(n) for n in names], scales, offsets))
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(hdr)
        for data, _ in tiles:
            out.write(data)
    os.replace(tmp, dst)
    return dst


_PAD_LOCK = threading.Lock()


#: GeoTIFF tags without nodata of recent grids (see :func:`_geotiff_tags_once`), most recent last: keyed by the grid
#: without its origin where the tags hold the origin as a plain tie point, else by the whole grid.
_GEOTAGS: dict = {}
_TIEPOINT = 33922  # ModelTiepointTag


def _integral(nodata) -> bool:
    """An integer nodata, or a float with an integer value (odc-geo's ``.odc.nodata`` reads ``0`` back as ``0.0``)."""
    if isinstance(nodata, (bool, np.bool_)):
        return False
    if isinstance(nodata, (int, np.integer)):
        return True
    return isinstance(nodata, (float, np.floating)) and bool(np.isfinite(nodata)) and float(nodata).is_integer()


def _geotiff_tags_once(orig, geobox: GeoBox, nodata="auto", gdal_metadata=None):
    """odc-geo's ``geotiff_metadata`` (it writes a 2x2 GeoTIFF through GDAL and reads its tags back: ~4-8 ms a
    call, three calls per target) computed once per CRS and pixel grid, without nodata: for a north-up grid GDAL
    writes the origin only as the tie point ``(0, 0, 0, x0, y0, 0)`` (checked on the call that fills the cache,
    else the entry is kept for that exact grid), so the next targets of a batch on the same CRS and resolution get
    the cached tags with their own origin. An integer nodata (or a float with an integer value, as odc-geo reads
    ``0`` back) is then the GDAL_NODATA tag GDAL writes for it (ASCII, the integer's digits), in the place GDAL puts
    it (after the GeoTIFF tags, before the metadata tag). The same tags, so the same bytes (tests/test_scaling.py
    compares the tags and the files); other nodata values (non-integer floats, "auto") go to ``orig``."""
    from tifffile import DATATYPE

    if not (nodata is None or _integral(nodata)):
        return orig(geobox, nodata=nodata, gdal_metadata=gdal_metadata)
    aff, wkt = geobox.affine, geobox.crs.to_wkt()
    grid_key = (wkt, aff.a, aff.b, aff.d, aff.e, gdal_metadata)
    full_key = (wkt, tuple(aff), gdal_metadata)
    if grid_key in _GEOTAGS:
        tags, md = _GEOTAGS[grid_key]
        tie = (0.0, 0.0, 0.0, float(aff.c), float(aff.f), 0.0)
        tags = [(c, dt, n, tie) if c == _TIEPOINT else (c, dt, n, v) for c, dt, n, v in tags]
        md = {**md, "ModelTiepoint": list(tie)}
    else:
        if full_key not in _GEOTAGS:
            tags, md = orig(geobox, nodata=None, gdal_metadata=gdal_metadata)
            ties = [v for c, _, _, v in tags if c == _TIEPOINT]
            plain = (aff.b == 0 and aff.d == 0 and len(ties) == 1
                     and tuple(ties[0]) == (0.0, 0.0, 0.0, float(aff.c), float(aff.f), 0.0))
            _GEOTAGS[grid_key if plain else full_key] = (tags, md)
            while len(_GEOTAGS) > 16:
                del _GEOTAGS[next(iter(_GEOTAGS))]
        tags, md = _GEOTAGS.get(full_key) or _GEOTAGS[grid_key]
    tags = list(tags)
    if nodata is not None:
        text = str(int(nodata))
        at = len(tags) - 1 if gdal_metadata is not None else len(tags)
        tags.insert(at, (42113, DATATYPE.ASCII, len(text) + 1, text))
    return tags, dict(md)


def _unpadded(build, geotags_once: bool = False):
    """Run ``build`` (a graph-building call of odc-geo's COG writer) with the image NOT padded.

    odc-geo pads the image right/bottom to a multiple of ``2**levels`` so each overview halves exactly; that
    would make the COG larger than the output grid (1098 -> 1100 px on the 29RKH tile, 10980 -> 10992 on a 10 m
    MGRS tile). ``compute_cog_spec`` takes ``max_pad``, but ``_make_empty_cog`` does not pass it, so it is
    passed here (``max_pad=0``) for the duration of the call, under a lock. Overviews are then
    ``floor(n / 2)`` px over the full extent (pixel size ``extent / n``), which GDAL reads like any overview.
    """
    import functools

    import odc.geo.cog._tifffile as tf

    with _PAD_LOCK:
        orig, orig_tags = tf.compute_cog_spec, tf.geotiff_metadata
        tf.compute_cog_spec = functools.partial(orig, max_pad=0)
        if geotags_once:  # write_cog_array: the grid's GeoTIFF tags computed once for all layers of a target
            tf.geotiff_metadata = functools.partial(_geotiff_tags_once, orig_tags)
        try:
            return build()
        finally:
            tf.compute_cog_spec, tf.geotiff_metadata = orig, orig_tags


def _spill(path: str, tiles) -> tuple[str, list]:
    """Append one batch of compressed tiles ``[(bytes, (level, sample, y, x))]`` to the part file ``path``."""
    p = Path(path)
    # only the part folder itself: a staging folder removed after a failed write (disk full) is never recreated by
    # a tile task that was still running (that task fails instead, and its error is not the one reported)
    p.parent.mkdir(exist_ok=True)
    info = []
    with open(p, "wb") as f:
        for data, idx in tiles:
            f.write(data)
            info.append((len(data), tuple(idx)))
    return path, info


def _assemble_cog(dst: str, meta, hdr0: bytes, md_extra, *spills) -> str:
    """Header (tile offsets/sizes of every level) + the part files in order -> ``dst`` (via a temporary name)."""
    import os
    import shutil

    from odc.geo.cog._tifffile import _patch_hdr

    tiles = [t for _, info in spills for t in info]
    hdr = _patch_hdr(tiles, meta, hdr0, None, list(md_extra))
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    with open(tmp, "wb") as out:
        out.write(hdr)
        for path, _ in spills:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    os.replace(tmp, dst)
    for path, _ in spills:
        Path(path).unlink()
    parent = Path(spills[0][0]).parent if spills else None
    if parent is not None and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
    return dst


# -- the output layers of a target ---------------------------------------------------------------------------------
REFLECTANCE_SCALE = 1e-4
CONF_NODATA = 255


def _dn(refl: np.ndarray) -> np.ndarray:
    """Reflectance -> uint16 DN (scale 1e-4, nodata 0: valid values clipped to 1..65535)."""
    dn = np.round(refl / np.float32(REFLECTANCE_SCALE))
    return np.where(np.isfinite(dn), np.clip(dn, 1, 65535), 0).astype(np.uint16)


def _conf(conf: np.ndarray, refl: np.ndarray) -> np.ndarray:
    """Confidence 0-1 -> uint8 percent, 255 where any reflectance band is nodata."""
    pct = np.clip(np.round(conf * np.float32(100)), 0, 100)
    pct = np.where(np.isfinite(pct), pct, 0)
    return np.where(np.isfinite(refl).all(axis=0), pct, CONF_NODATA).astype(np.uint8)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(a, np.float32), nan=0.0).astype(np.uint8)


def encoded_layers(ds: xr.Dataset, geobox: GeoBox) -> dict[str, tuple[xr.DataArray, str, list | None]]:
    """``{name: (integer (band, y, x) DataArray, overview resampling, band scales)}`` for every output layer of
    ``ds`` (reflectance, confidence, source and mask_provenance when present), lazily, one task per block."""
    import dask.array as dsa
    from odc.geo.xr import xr_coords

    coords = xr_coords(geobox)  # once for the four layers (building it is most of a layer's graph-side cost)
    bands = [str(b) for b in ds.band.values]
    refl = ds.reflectance.data
    if all(isinstance(ds[n].data, np.ndarray) for n in ("reflectance", "confidence", "source", "mask_provenance")
           if n in ds):
        # in memory (a small target, stages.remove.in_memory): the same encoders on the whole arrays, eagerly (they
        # are element-wise over y, x: where the blocks end does not change a value)
        out = {"reflectance": (layer_array(_dn(refl), geobox, bands, 0, coords), "average",
                               [REFLECTANCE_SCALE] * len(bands)),
               "confidence": (layer_array(_conf(ds.confidence.data, refl)[None], geobox, ["confidence"],
                                          CONF_NODATA, coords), "nearest", None)}
        for name in ("source", "mask_provenance"):
            if name in ds:
                out[name] = (layer_array(_u8(ds[name].data)[None], geobox, [name], None, coords), "nearest", None)
        return out
    # some layers in memory beside lazy ones (a small target read whole but tiled: its masks, hence its
    # mask_provenance, are numpy): those go on the lazy layers' blocks
    yx = next(ds[n].data.chunks[-2:] for n in ("reflectance", "confidence", "source", "mask_provenance")
              if n in ds and isinstance(ds[n].data, dsa.Array))

    def lazy(a):
        return a if isinstance(a, dsa.Array) else dsa.from_array(a, chunks=tuple((n,) for n in a.shape[:-2]) + yx)

    refl = lazy(refl)
    out = {"reflectance": (layer_array(dsa.map_blocks(_dn, refl, dtype=np.uint16), geobox, bands, 0, coords),
                           "average", [REFLECTANCE_SCALE] * len(bands))}
    conf = lazy(ds.confidence.data)
    refl_r = refl.rechunk({0: -1, 1: conf.chunks[0], 2: conf.chunks[1]})
    conf8 = dsa.blockwise(_conf, "yx", conf, "yx", refl_r, "byx", dtype=np.uint8, concatenate=True)
    out["confidence"] = (layer_array(conf8[None], geobox, ["confidence"], CONF_NODATA, coords), "nearest", None)
    for name in ("source", "mask_provenance"):
        if name in ds:
            d = lazy(ds[name].data)
            out[name] = (layer_array(dsa.map_blocks(_u8, d, dtype=np.uint8)[None], geobox, [name], None, coords),
                         "nearest", None)
    return out


def inline_reader_opens(dsk: dict) -> dict:
    """Inline odc-loader's reader-open tasks (cheap: they wrap a source and a context, no I/O) into the chunk
    reads that use them.

    Each ``open`` task feeds every chunk of one (item, band); as a shared root it makes dask's ordering read one
    (item, band) over the whole area before the next, so a per-block reduction over dates and bands (the
    composite, the model) starts only when every input is in memory: memory then grows with the area (600 MB
    of held input blocks at 4x on the 29RKH bench). Inlined, every chunk read is its own root and the blocks are
    reduced as they arrive.
    """
    from dask._task_spec import Task, convert_legacy_graph
    from odc.loader._builder import _dask_open_reader

    dsk = convert_legacy_graph(dsk)
    opens = {k: t for k, t in dsk.items()
             if isinstance(t, Task) and getattr(t, "func", None) is _dask_open_reader and not t.dependencies}
    if not opens:
        return dsk
    users = [k for k, t in dsk.items() if k not in opens and t.dependencies & opens.keys()]
    for k in users:
        dsk[k] = dsk[k].substitute({o: opens[o] for o in dsk[k].dependencies & opens.keys()})
    for k in opens:
        del dsk[k]
    return dsk


#: the observer :func:`observe_graphs` installed in this context (None: nothing is recorded).
_GRAPH_OBSERVER: ContextVar[Callable[[int, int], None] | None] = ContextVar("cloudfree_graph_observer", default=None)


@contextlib.contextmanager
def observe_graphs(observer: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, :func:`compute_once` calls ``observer(tasks, gated)`` for every graph it runs: its task
    count after optimisation and the number of source tasks :func:`bound_lookahead` gated (the benchmark's graph
    size). Scoped to the calling context (a thread the caller starts does not inherit it); nothing is kept."""
    token = _GRAPH_OBSERVER.set(observer)
    try:
        yield
    finally:
        _GRAPH_OBSERVER.reset(token)


#: dask callbacks :func:`profile_computes` installed in this context (None: none).
_COMPUTE_CALLBACKS: ContextVar[tuple | None] = ContextVar("cloudfree_compute_callbacks", default=None)


@contextlib.contextmanager
def profile_computes(*callbacks) -> Iterator[None]:
    """Within the block, :func:`compute_once` runs its graphs with these dask callbacks (local schedulers), passed
    to that compute only: dask's global ``Callback.active`` is emptied while any compute runs, so a callback
    registered globally misses a compute that starts while another thread's is running (the benchmark's held
    memory and task-seconds, :mod:`cloudfree.pipeline.evaluation.bench`)."""
    token = _COMPUTE_CALLBACKS.set(tuple(callbacks))
    try:
        yield
    finally:
        _COMPUTE_CALLBACKS.reset(token)


def _n_workers() -> int:
    """Worker threads of the active scheduler (threads: ``num_workers``; distributed: total threads)."""
    import os

    import dask

    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        pass
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


#: output blocks (raster order) that may be in flight ahead of the last finished one, per worker thread; see
#: :func:`bound_lookahead`.
LOOKAHEAD_PER_WORKER = 1

#: :func:`bound_lookahead`'s gate waits for every block up to ``lo - slack`` (True), not that block alone.
PREFIX_GATE = True


def _done(*_written) -> None:
    """A block's completion marker (holds nothing: what it waited for is released as usual)."""
    return None


def _is_spill(task) -> bool:
    """``task`` writes a result to disk for a later strip (:func:`spill_across`)."""
    return getattr(task, "func", None) is _spill_value


def _after(_gate, value):
    """The value of a gated source task (``_gate`` is the completion marker it waited for)."""
    return value


def bound_lookahead(dsk: dict, markers: list[list], slack: int) -> int:
    """Gate the graph's source tasks (reads) so that none starts more than ``slack`` output blocks ahead of the
    written ones.

    ``markers``: per output block in raster order, the keys of its encoded blocks (one per COG layer), all in
    ``dsk``. For every task, ``lo`` = the first block (raster position) whose markers depend on it. A block is
    *written* when the level-0 tile compressions of all its layers (the markers' ``_compress_cog_tile``
    dependents; the markers themselves if there are none) are done: one ``done`` task per block depends on
    them, and on the block before it (:data:`PREFIX_GATE`), so ``done(p)`` means every block up to ``p`` is written.
    A source task (one whose dependencies are only data nodes: odc-stac's reads, after
    :func:`inline_reader_opens`), or a later strip's read-back of a spilled result (one whose only task
    dependencies are :func:`spill_across`'s spill handles), with ``lo >= slack`` waits for ``done(lo - slack)``.
    Ungated, a read-back ran as soon as its spill was written and its result was held for the whole strip: the
    tile predictions' pieces for the next column, 63 MB at the 16x phyvlm-cr peak (150 MB with a 1-block
    lookahead). Gated (bench --factors 16 --workers 2, scene jobs, 2 runs each, alternated): phyvlm-cr 1054/1040 MB
    peak RSS against 1116/1143 ungated, dcp 562/527 against 648/663, reference-replace 586/569 against 605/565,
    seconds the same (46.4/44.7 against 47.3/44.5 for phyvlm-cr). Gated on one block alone, a later block that
    finished early let the reads run on while an earlier one lagged (a column waiting for its neighbour's
    missed-cloud flags): the next strip's inputs were read and the lagging column's held (issue 22).

    Without this, dask's ordering and the threaded scheduler read blocks rows ahead of their consumers whenever a
    worker is idle (1 GB of held inputs and tile predictions in the 16x phyvlm-cr scene), or, with one worker,
    keep computing blocks while their compressions wait (200 MB of finished composite blocks). With it, the
    inputs in memory are those of the blocks in flight plus what halos need from the next row: a model that needs
    its neighbours' pixels cannot finish a row before reading the next one, so that part (a line buffer) grows
    with the width of the output, not its area.

    Never deadlocks: a gated source feeds only blocks ``>= lo`` and waits for ``done(lo - slack)``, which depends
    only on blocks up to ``lo - slack`` and so on sources with ``lo' <= lo - slack < lo``; by induction over
    raster positions every block can finish. A gated read-back is the same case: it also feeds only blocks
    ``>= lo`` (so ``done(lo - slack)`` never depends on it), and the spill it reads comes from an earlier block.
    Returns the number of gated tasks.
    """
    from dask._task_spec import DataNode, Task, TaskRef
    from odc.geo.cog._tifffile import _compress_cog_tile

    pos = {k: i for i, keys in enumerate(markers) for k in keys}
    users: dict = {}  # marker -> its dependents (the tile compressions that write it)
    for k, t in dsk.items():
        for d in t.dependencies:
            if d in pos:
                users.setdefault(d, []).append(k)
    # lo = min raster position of the markers that depend on a task
    lo = {k: s[0] for k, s in _marker_spans(dsk, pos).items()}
    done_keys: dict = {}

    def done(p: int):
        # PREFIX_GATE: block q's marker also waits for block q - 1's, so all blocks up to p are built in order
        for q in (range(len(done_keys), p + 1) if PREFIX_GATE else (p,)):
            if q in done_keys:
                continue
            written = []
            for m in markers[q]:
                comp = [u for u in users.get(m, ()) if getattr(dsk[u], "func", None) is _compress_cog_tile]
                written.extend(comp or [m])
            dk = ("cloudfree-written", q)
            prev = (TaskRef(done_keys[q - 1]),) if q > 0 and PREFIX_GATE else ()
            dsk[dk] = Task(dk, _done, *prev, *(TaskRef(w) for w in written))
            done_keys[q] = dk
        return done_keys[p]

    gated = 0
    for k, t in list(dsk.items()):
        if not isinstance(t, Task) or k in pos or lo.get(k) is None or lo[k] < slack:
            continue
        if any(not (isinstance(dsk.get(d), DataNode) or _is_spill(dsk.get(d))) for d in t.dependencies):
            continue
        dsk[k] = Task(k, _after, TaskRef(done(lo[k] - slack)), t)
        gated += 1
    return gated


#: width (output blocks) of the column strips a model with a halo is computed in (:func:`strip_order`): memory then
#: grows with the strip's width, not the output's; what crosses a strip border is spilled (:func:`spill_across`).
#: A halo model's output block needs the predictions of its 8 neighbours and they need their neighbours' inputs, so a
#: strip holds the inputs of its width + 4 block columns. bench, 16x, 2 workers, 2 runs each: phyvlm-cr (123 px
#: halo) 1123 MB peak RSS with 1, 1285 MB with 2 (+3 % time with 1); dcp (47 px) 752 vs 733 MB.
STRIP_BLOCKS = 1


def strip_order(shape_blocks: tuple[int, int], width: int) -> list[int]:
    """Raster positions of a ``(rows, cols)`` block grid in column-strip order: strips of ``width`` block columns,
    each strip row by row."""
    rows, cols = shape_blocks
    return [r * cols + c for c0 in range(0, cols, width) for r in range(rows) for c in range(c0, min(c0 + width, cols))]


class _Spilled:
    """A task result written to disk (:func:`_spill_value`); small results are kept as they are."""

    __slots__ = ("path", "value")

    def __init__(self, path, value=None):
        self.path, self.value = path, value


def _sizeof_spilled(handle: _Spilled) -> int:
    """dask's ``sizeof`` of a spill handle: the result kept in memory (small ones), else nothing (its file)."""
    from dask.sizeof import sizeof

    return 0 if handle.value is None else int(sizeof(handle.value))


def _register_sizeof() -> None:
    from dask.sizeof import sizeof

    sizeof.register(_Spilled)(_sizeof_spilled)


_register_sizeof()  # the benchmark's held-memory profile (and dask.distributed) then counts what a handle keeps

#: block rows of a strip within which a result is held; a dependent further on reads it back from disk
#: (:func:`spill_across`); None = only across strip borders. 0: every input chunk or prediction that a later block
#: of the strip needs (the halo's line buffer: a halo + blend block needs 5 rows of input chunks, 3 of them again
#: for the next block) is written once and read back inside each later consumer. bench --factors 16 --workers 2,
#: alternated, 3 runs each (issue 22): phyvlm-cr peak RSS 934 / 953 / 954 MB against 996 / 1002 / 999 with None,
#: 44.6 / 39.1 / 53.2 s against 45.8 / 40.6 / 47.7; held results at the peak 185 MB against 306 (the first block's
#: 3 x 3 chunks, as the whole 1x image); dcp (47 px halo) 545 / 547 / 552 against 541 / 550 / 559 MB, the same
#: seconds; the same bytes out (4x COGs of both hash-identical).
SPILL_REACH_ROWS: int | None = 0

#: results smaller than this are not written to disk by :func:`spill_across`.
SPILL_MIN_BYTES = 1 << 20


def _spill_value(value, path: str) -> _Spilled:
    import pickle

    from dask.sizeof import sizeof

    if sizeof(value) < SPILL_MIN_BYTES:
        return _Spilled(None, value)
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=5)
    return _Spilled(path)


def _unspill(handle: _Spilled):
    """Inside the consuming task: the spilled result, read back (exactly the bytes that were computed)."""
    if handle.path is None:
        return handle.value
    import pickle

    with open(handle.path, "rb") as f:
        return pickle.load(f)


def _owned(value):
    """``value``, with a numpy view replaced by a copy of its own (same values): a view keeps its base alive."""
    if isinstance(value, np.ndarray) and value.base is not None:
        return value.copy()
    return value


def _marker_spans(dsk: dict, pos: dict) -> dict:
    """Per task, ``(min, max)`` of the marker positions that depend on it (absent: no marker depends on it)."""
    deps = {k: t.dependencies for k, t in dsk.items()}
    indeg = {k: 0 for k in dsk}
    for k, ds in deps.items():
        for d in ds:
            if d in indeg:
                indeg[d] += 1
    stack = [k for k, n in indeg.items() if n == 0]
    span: dict = {}
    while stack:
        k = stack.pop()
        mine = span.get(k)
        if k in pos:
            mine = (pos[k], pos[k]) if mine is None else (min(mine[0], pos[k]), max(mine[1], pos[k]))
            span[k] = mine
        for d in deps[k]:
            if d not in indeg:
                continue
            if mine is not None:
                old = span.get(d)
                span[d] = mine if old is None else (min(old[0], mine[0]), max(old[1], mine[1]))
            indeg[d] -= 1
            if indeg[d] == 0:
                stack.append(d)
    return span


def spill_across(dsk: dict, markers: list[list], strip_of: list[int], folder: str, reach: int | None = None) -> int:
    """Results that blocks of a later column strip need are read back from disk there, not held in memory.

    ``markers`` in computing order (:func:`strip_order`), ``strip_of[p]`` the strip of position ``p``. A task whose
    result is needed by blocks of several strips (an input chunk or a tile prediction at a strip border: the halo
    and the blending reach across it) gets a spill task (:func:`_spill_value`, a pickle file in ``folder``); its
    dependents that belong only to later strips read that file inside their own task (:func:`_unspill`), so the
    result itself is released as soon as its own strip is done with it. Same values, same bytes out; the cost is
    one write and one read per crossing result. ``reach`` (positions): also a dependent whose first block comes
    more than ``reach`` positions after the result's first one reads it back (a halo model's inputs and tile
    predictions are needed by three block rows: held, they are a line buffer of the strip). Returns the number
    of spilled tasks.
    """
    from dask._task_spec import Alias, Task, TaskRef

    pos = {k: i for i, keys in enumerate(markers) for k in keys}
    span = _marker_spans(dsk, pos)
    first = {k: strip_of[v[0]] for k, v in span.items()}
    last = {k: strip_of[v[1]] for k, v in span.items()}
    dependents: dict = {}
    for k, t in dsk.items():
        for d in t.dependencies:
            dependents.setdefault(d, []).append(k)
    n = 0
    def is_late(d, x) -> bool:
        return first[d] > first[x] or (reach is not None and span[d][0] - span[x][0] > reach)

    for x in [k for k in span if (first[k] < last[k] or (reach is not None and span[k][1] - span[k][0] > reach))
              and isinstance(dsk.get(k), Task) and k not in pos]:
        users, todo = [], [x]  # dependents, looking through aliases: (dependent, the key it refers to)
        while todo:
            ref = todo.pop()
            for d in dependents.get(ref, ()):
                if isinstance(dsk[d], Alias):
                    todo.append(d)
                else:
                    users.append((d, ref))
        late = [(d, ref) for d, ref in users if d in first and d not in pos and is_late(d, x)]
        if not late:
            continue
        # the key names the spill folder (unique per compute): two targets in flight on one dask.distributed
        # scheduler must never share a key, or one target gets the other's spilled blocks
        sk = (f"cloudfree-spill-{Path(folder).name}", n)
        dsk[sk] = Task(sk, _spill_value, TaskRef(x), f"{folder}/{n}.pkl")
        load = Task(None, _unspill, TaskRef(sk))
        for d, ref in late:
            t = dsk[d].substitute({ref: load})
            if type(t) is Task:  # not an Alias or data node
                # a dependent that slices the read-back result (the halo strip of an overlap) would return a view:
                # held until its own consumer runs, it kept the whole read-back block alive (174 MB of the 16x
                # reference-replace scene's 540 MB traced); its result is made its own array instead
                t = Task(d, _owned, Task(None, t.func, *t.args, **t.kwargs))
            dsk[d] = t
        n += 1
    return n


def compute_once(*objs, markers: list[list] | None = None, lookahead: int | None = None,
                 strips: list[int] | None = None, spill_in: str | Path | None = None,
                 spill_reach: int | None = None):
    """Compute ``objs`` (dask collections, or lists/tuples of them, or plain values) as ONE graph.

    Since dask 2025 ``dask.compute(a, b, c)`` optimises every collection on its own; array optimisation fuses and
    renames tasks, so work shared by several outputs (the input reads under the COG writes, the quicklook and the
    tile timings) is done once per output. Here the graphs are merged first and optimised together
    (``dask.array.optimization.optimize`` over all output keys: blockwise fusion, culling, low-level fusion),
    so every shared task stays one task; one gather task finalises each collection. Runs on the active scheduler
    (threads, processes, or a dask.distributed client).

    ``markers`` (per output block in computing order, the keys of its encoded blocks, one per COG layer) bounds how
    far the reads run ahead of the written blocks (:func:`bound_lookahead`, ``lookahead`` blocks; default
    :data:`LOOKAHEAD_PER_WORKER` per worker thread, at least 2). ``strips`` (the column strip of each marker
    position, markers in :func:`strip_order`): results needed across a strip border are spilled to a temporary
    folder (:func:`spill_across`; in ``spill_in``, removed at the end) instead of held, so memory follows the
    strip's width; with ``spill_reach`` also those needed more than that many positions later.
    """
    import dask
    from dask.array.optimization import optimize as array_optimize
    from dask.base import tokenize
    from dask.core import flatten
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    colls: list = []

    def spec(o):
        if isinstance(o, (list, tuple)):
            return (type(o), [spec(x) for x in o])
        if dask.is_dask_collection(o):
            colls.append(o)
            return ("collection", len(colls) - 1)
        return ("value", o)

    specs = [spec(o) for o in objs]
    if not colls:
        return list(objs)
    merged = HighLevelGraph.merge(*[c.__dask_graph__() for c in colls])
    keys = [c.__dask_keys__() for c in colls]
    markers = [list(m) for m in markers or ()]
    dsk = inline_reader_opens(dict(array_optimize(merged, list(flatten(keys)) + [k for m in markers for k in m])))
    gated = 0
    spill_dir = None
    if markers and strips is not None and len(set(strips)) > 1:
        import tempfile

        spill_dir = tempfile.mkdtemp(prefix=".cloudfree-spill-", dir=spill_in)
        spill_across(dsk, markers, strips, spill_dir, reach=spill_reach)
    if markers:
        if lookahead is None:
            lookahead = max(2, LOOKAHEAD_PER_WORKER * _n_workers())
        gated = bound_lookahead(dsk, markers, lookahead)
    name = "cloudfree-compute-once-" + tokenize(*colls)
    for i, (c, k) in enumerate(zip(colls, keys)):
        post, args = c.__dask_postcompute__()
        dsk[(name, i)] = (post, k, *args)
    dsk[name] = (list, [(name, i) for i in range(len(colls))])
    observer = _GRAPH_OBSERVER.get()
    if observer is not None:
        observer(len(dsk), gated)
    try:
        from dask.callbacks import normalize_callback

        cbs = [normalize_callback(c) for c in _COMPUTE_CALLBACKS.get() or ()]
        results = Delayed(name, dsk).compute(**({"callbacks": cbs} if cbs else {}))
    finally:
        if spill_dir is not None:
            import shutil

            shutil.rmtree(spill_dir, ignore_errors=True)

    def build(sp):
        kind, v = sp
        if kind == "collection":
            return results[v]
        if kind == "value":
            return v
        return kind(build(x) for x in v)

    return [build(sp) for sp in specs]


def write_layers(ds: xr.Dataset, folder: Path, names: dict[str, Path], *, blocksize: int = 512,
                 compress: str = "deflate", extra_compute=(), progress=None, desc: str = "",
                 geobox: GeoBox | None = None, strip_blocks: int | None = None,
                 arrays_out: dict | None = None) -> tuple[dict[str, Path], list, GeoBox]:
    """Write every layer of ``ds`` as a COG into ``folder`` (file names from ``names[layer]``) in ONE dask pass,
    together with ``extra_compute``; returns ``(files, computed extras, the files' grid)``.

    Everything is one graph (:func:`compute_once`): optimising the writes, the quicklook and the timings each on
    its own would fuse the shared reads into each of them and read the inputs again per consumer. The files'
    grid is ``geobox`` exactly (no padding, see :func:`_unpadded`). ``strip_blocks``: compute the blocks in column
    strips of that many blocks (:func:`strip_order`, :func:`spill_across`): for models with a halo, whose line
    buffer would otherwise grow with the width of the output. ``arrays_out``: a dict that receives the encoded
    layers (``{name: (band, y, x) array}``) when they are computed into memory (one tile).
    """
    if geobox is None:
        geobox = ds.reflectance.odc.geobox
    from dask.core import flatten

    writes, files, blocks = [], {}, []
    layers = encoded_layers(ds, geobox)
    if one_tile(geobox.shape, blocksize):
        # a small target (one tile, no overviews): every layer computed into memory with the extras in one pass,
        # then written directly (write_cog_array: the same bytes as the streaming writer, without its graph)
        with progress(desc or "compute+write") if progress is not None else contextlib.nullcontext():
            arrays, *extras = compute_once([layer.data for layer, _, _ in layers.values()], *extra_compute)
        layouts = {}
        for (name, (layer, _, scales)), arr in zip(layers.items(), arrays):
            nodata = layer.odc.nodata
            files[name] = write_cog_array(arr, geobox, Path(folder) / names[name].name,
                                          [str(b) for b in layer.band.values], nodata,
                                          blocksize=blocksize, compress=compress, scales=scales,
                                          offsets=[0.0] * len(scales) if scales else None)
            layouts[name] = (str(geobox.crs), np.shape(arr), np.asarray(arr).dtype.str, blocksize, compress,
                             repr(nodata), scales is not None)
            if arrays_out is not None:
                arrays_out[name] = np.asarray(arr)
        _validate_layouts(files, layouts)
        return files, extras, geobox
    for name, (layer, resampling, scales) in layers.items():
        if isinstance(layer.data, np.ndarray):  # in memory but more than one COG tile: the streaming writer's path
            import dask.array as dsa

            layer = layer.copy(data=dsa.from_array(layer.data, chunks=(-1, blocksize, blocksize)))
        # the COG's blocks (cog_write's rechunk, a no-op where the chunks already are the blocks): a layer chunked
        # otherwise (mask_provenance on grid.chunk px beside tile-sized predictions) still gives one marker per block
        layer = layer.copy(data=layer.data.rechunk({0: -1, 1: blocksize, 2: blocksize}))
        blocks.append(list(flatten(layer.data.__dask_keys__())))  # raster order: how far the reads may run ahead
        grid = layer.data.numblocks[1:]
        dst = Path(folder) / names[name].name
        writes.append(cog_write(layer, dst, blocksize=blocksize, compress=compress, overview_resampling=resampling,
                                scales=scales, offsets=[0.0] * len(scales) if scales else None))
        files[name] = dst
    # progress(desc): e.g. the CLI's progress bar, a context manager the compute runs in; None = none
    markers = [list(m) for m in zip(*blocks)]
    strips = None
    if strip_blocks:  # column strips (a model with a halo): the blocks in strip order, crossings spilled
        nby, nbx = grid
        order = strip_order((nby, nbx), strip_blocks)
        markers = [markers[p] for p in order]
        strips = [(p % nbx) // strip_blocks for p in order]
    with progress(desc or "compute+write") if progress is not None else contextlib.nullcontext():
        reach = strip_blocks * SPILL_REACH_ROWS if strip_blocks and SPILL_REACH_ROWS is not None else None
        _, *extras = compute_once(writes, *extra_compute, markers=markers, strips=strips, spill_in=folder,
                                  spill_reach=reach)
    _validate(files)
    return files, extras, geobox


#: layouts (:func:`write_cog_array`'s shape, dtype, tiling, compression, nodata, scales) whose file passed
#: ``cog_validate`` in this process (bounded: the oldest is forgotten).
_VALID_LAYOUTS: "OrderedDict[tuple, None]" = OrderedDict()
_VALID_LOCK = threading.Lock()


def _validate_layouts(files: dict[str, Path], layouts: dict[str, tuple]) -> None:
    """:func:`_validate` of the directly written files whose layout no file has passed yet in this process.

    :func:`write_cog_array` lays out a one-tile COG from its layout alone (header, tile order, offsets after the
    header): the structure ``cog_validate`` checks is the same for every file of one layout, and its ~1 ms a file
    (an open and the IFD walk) was ~3 % of a small target (issue 22). The first file of each layout (and of each
    grid shape) is validated, so a writer change that breaks the structure still fails the first target."""
    with _VALID_LOCK:
        todo = {n: f for n, f in files.items() if layouts[n] not in _VALID_LAYOUTS}
    _validate(todo)
    with _VALID_LOCK:
        for n in todo:
            _VALID_LAYOUTS[layouts[n]] = None
        while len(_VALID_LAYOUTS) > 256:
            _VALID_LAYOUTS.popitem(last=False)


def _validate(files: dict[str, Path]) -> None:
    from rio_cogeo.cogeo import cog_validate

    for dst in files.values():
        ok, errors, _ = cog_validate(dst, quiet=True)
        if not ok:
            raise RuntimeError(f"{dst} is not a valid COG: {errors}")  # pragma: no cover - writer bug guard
