"""Load stage: STAC items -> lazy ``(time, band, y, x)`` float32 reflectance on one output grid (odc-stac).

DN -> reflectance uses each item's own harmonisation (scale, and the baseline-04.00 offset where it applies), so
items from different baselines mix correctly. Reflectance bands are resampled bilinearly (``average`` when the
grid is coarser than 1.5x the band's native resolution); class and probability layers (SCL, MSK_CLDPRB) with
nearest, never interpolated. Nothing is computed here.

Failed reads are never silently nodata: :func:`load_reflectance_checked` probes every asset with retries
(GDAL's HTTP retries inside a scoped ``rasterio.Env`` plus an outer retry with backoff) and returns a ``failed``
layer next to the data, so each pixel is observed, masked (cloud/nodata) or failed; the runner writes the failed
ones as ``SOURCE_FAILED``. :func:`load_sar` loads Sentinel-1 backscatter (linear power) on the same grid.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Sequence

import dask
import dask.array as dsa
import numpy as np
import odc.loader
import odc.stac
import pystac
import rasterio
import rasterio.errors
import rasterio.windows
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox

from cloudfree.pipeline.config import GridConfig
from cloudfree.pipeline.contract import validate_scene
from cloudfree.pipeline.errors import ContractError, InputDataError, ReadError

log = logging.getLogger(__name__)

#: Layers that hold classes or probabilities: resampled with nearest, never averaged or interpolated.
CATEGORICAL = {"SCL": "nearest", "CLDPRB": "nearest", "MSK_CLDPRB": "nearest", "CLD": "nearest", "CLM": "nearest",
               "CLP": "nearest"}


def item_harmonisation(item: pystac.Item, band: str) -> tuple[float, float]:
    """``(scale, offset)`` turning ``band``'s DN into reflectance: ``refl = DN * scale + offset``.

    Delegates to :mod:`cloudfree.catalogs.harmonise` when available (processing baseline, catalog flags, raster:bands).
    """
    from cloudfree.catalogs.harmonise import harmonise

    h = harmonise(item)
    return h.scale[band], h.offset[band]


def native_geobox(item: pystac.Item) -> GeoBox | None:
    """The item's own pixel grid from its projection extension (``proj:transform`` / ``proj:shape`` on the item,
    else the finest asset that declares them), or None when it declares none. For Sentinel-2 this is the MGRS
    tile's 10 m grid in its UTM zone."""
    from affine import Affine

    crs = _item_crs(item)
    if crs is None:
        return None
    cands = []
    p = item.properties
    if p.get("proj:transform") and p.get("proj:shape"):
        cands.append((p["proj:transform"], p["proj:shape"]))
    for asset in item.assets.values():
        f = asset.extra_fields
        if f.get("proj:transform") and f.get("proj:shape"):
            cands.append((f["proj:transform"], f["proj:shape"]))
    if not cands:
        return None
    tr, shape = min(cands, key=lambda c: abs(float(c[0][0])))  # the finest declared grid
    ny, nx = (int(v) for v in shape)
    return GeoBox((ny, nx), Affine(*[float(v) for v in tr[:6]]), crs)


def snapped_geobox(native: GeoBox, resolution: float, bounds: Sequence[float] | None = None) -> GeoBox:
    """A north-up grid of pixel size ``resolution`` whose pixel edges line up with ``native``'s origin (so it
    nests in the MGRS tiling), covering ``bounds`` (``(left, bottom, right, top)`` in the native CRS; default the
    native extent), clipped to the native extent. At the native resolution it is the native grid (or a window
    of it): no resampling at all."""
    from affine import Affine

    t = native.transform
    if t.b != 0 or t.d != 0 or t.e >= 0:
        raise InputDataError(f"native grid {t} is rotated or south-up; set grid.crs to resample onto a plain grid")
    x0, y0 = t.c, t.f
    ext = native.extent.boundingbox
    left, bottom, right, top = bounds if bounds is not None else (ext.left, ext.bottom, ext.right, ext.top)
    left, bottom, right, top = max(left, ext.left), max(bottom, ext.bottom), min(right, ext.right), min(top, ext.top)
    if left >= right or bottom >= top:
        raise InputDataError("the AOI does not overlap the target's native grid; check search.aoi")
    r = float(resolution)
    eps = 1e-6
    xa = x0 + math.floor((left - x0) / r + eps) * r
    xb = x0 + math.ceil((right - x0) / r - eps) * r
    ya = y0 - math.floor((y0 - top) / r + eps) * r
    yb = y0 - math.ceil((y0 - bottom) / r - eps) * r
    shape = (int(round((ya - yb) / r)), int(round((xb - xa) / r)))
    return GeoBox(shape, Affine(r, 0.0, xa, 0.0, -r, ya), native.crs)


def output_geobox(target: pystac.Item, grid: GridConfig, bbox4326: Sequence[float] | None = None) -> GeoBox:
    """The output grid: the AOI (or the target's footprint) in the configured CRS (default: the target's UTM).

    When the grid's CRS is the target's own and the item declares its pixel grid (``proj:transform`` /
    ``proj:shape``), the grid snaps to it (:func:`snapped_geobox`): the whole MGRS tile (or the AOI window of it)
    at ``grid.resolution`` with pixel edges on the tile's own; at the native resolution the bands are read
    without any resampling. Otherwise a grid over the bounding box of the footprint (or AOI) is used.
    """
    crs = grid.crs or _item_crs(target)
    if crs is None:
        raise InputDataError(f"item {target.id} has no proj:epsg/proj:code; set grid.crs in the config")
    bbox = bbox4326 or target.bbox
    if bbox4326 is not None and target.bbox is not None:
        a, b = bbox4326, target.bbox
        bbox = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
        if bbox[0] >= bbox[2] or bbox[1] >= bbox[3]:
            raise InputDataError(f"item {target.id} does not overlap the AOI {list(bbox4326)}; check search.aoi")
    from odc.geo.geom import BoundingBox

    native = native_geobox(target)
    if native is not None and native.crs == GeoBox((1, 1), native.transform, crs).crs:
        bounds = None
        if bbox4326 is not None:
            bb = BoundingBox(*bbox, crs="EPSG:4326").to_crs(native.crs)
            bounds = (bb.left, bb.bottom, bb.right, bb.top)
        return snapped_geobox(native, grid.resolution, bounds)
    return GeoBox.from_bbox(BoundingBox(*bbox, crs="EPSG:4326").to_crs(crs), crs=crs, resolution=grid.resolution,
                            tight=False)


def check_grid_size(geobox: GeoBox, item: pystac.Item, grid: GridConfig, what: str = "target") -> GeoBox:
    """``geobox`` after checking it has at most ``grid.max_pixels`` pixels (default
    :func:`cloudfree.pipeline.config.default_max_pixels`); raises :class:`InputDataError` naming the item, the property the
    grid came from and the config key. Called before any pixel is read."""
    from cloudfree.pipeline.config import default_max_pixels

    limit = grid.max_pixels or default_max_pixels()
    ny, nx = (int(v) for v in geobox.shape)
    if ny * nx <= limit:
        return geobox
    native = native_geobox(item)
    src = ("its proj:shape / proj:transform" if native is not None and native.crs == geobox.crs
           else "its bbox / geometry")
    raise InputDataError(
        f"{what} {item.id}: the output grid would be {ny} x {nx} = {ny * nx:,} pixels at grid.resolution "
        f"{grid.resolution} (from {src}), above grid.max_pixels {limit:,}; set search.aoi to a smaller area or a "
        "coarser grid.resolution, fix the item's metadata if it declares a wrong size, or raise grid.max_pixels")


def _item_crs(item: pystac.Item) -> str | None:
    p = item.properties
    if p.get("proj:code"):
        return p["proj:code"]
    if p.get("proj:epsg"):
        return f"EPSG:{p['proj:epsg']}"
    return None


def declared_resolution(item: pystac.Item, band: str) -> float | None:
    """The pixel size (m) an item's asset declares for ``band``: asset ``proj:transform``, ``gsd`` or
    ``raster:bands[0].spatial_resolution``; None when it declares none."""
    asset = item.assets.get(band)
    if asset is None:
        return None
    f = asset.extra_fields
    if f.get("proj:transform"):
        return abs(float(f["proj:transform"][0]))
    rb = f.get("raster:bands") or [{}]
    for v in (f.get("gsd"), rb[0].get("spatial_resolution") if isinstance(rb[0], dict) else None):
        if v:
            return float(v)
    return None


def reflectance_resampling(bands: Sequence[str], resolution: float,
                           items: Sequence[pystac.Item] = ()) -> dict[str, str]:
    """Per band: ``average`` when the grid is coarser than 1.5x the source pixels, else ``bilinear``.

    The source pixel size is what the items' assets declare (the coarsest of them); with ``items`` given and no
    declaration, ``bilinear`` is used: GDAL's ``average`` while actually *up*sampling (a decimated file whose real
    pixels are coarser than the band's nominal GSD) gives wrong values at chunk edges. Without ``items`` the
    nominal Sentinel-2 GSD is assumed.
    """
    from cloudfree.pipeline.contract import S2_BANDS

    out = {}
    for b in bands:
        if items:
            declared = [declared_resolution(it, b) for it in items]
            src = max(declared) if all(d is not None for d in declared) else None
        else:
            src = S2_BANDS.get(b, 10)
        out[b] = "average" if src is not None and resolution > 1.5 * src else "bilinear"
    return out


# -- reaching the assets: href policy, lazy signing, assets fetched on demand (catalogs/access.py) -----------------
def reader_driver(items: Sequence[pystac.Item]):
    """odc-stac's reader for ``items``: None (its default rasterio reader) unless their catalog signs hrefs, then a
    :class:`SigningRioDriver` that signs each href when a chunk opens it (a token that expires during a long run
    is renewed, not baked into the graph)."""
    from cloudfree.catalogs.access import items_signer

    signer = items_signer(items)
    return None if signer is None else SigningRioDriver(signer)


class SigningRioDriver(odc.loader.RioDriver):
    """odc-loader's rasterio driver with every source href signed when it is opened (picklable: the signer is
    its settings; each process keeps its own token cache)."""

    def __init__(self, signer) -> None:
        from odc.stac._mdtools import StacAuxReader

        super().__init__(aux_reader=StacAuxReader())
        self.signer = signer

    def open(self, src, ctx):  # noqa: ANN001 - odc-loader's ReaderDriver interface
        return odc.loader.RioReader(src.patch(uri=self.signer(src.uri)), ctx)

    def __reduce__(self):
        return (SigningRioDriver, (self.signer,))


def fetch_remote_assets(items: Sequence[pystac.Item], keys: Sequence[str], geobox: GeoBox) -> list[pystac.Item]:
    """``items`` with assets that exist only behind an API (Sentinel Hub's ``sentinelhub://`` bands and cloud
    layers) fetched on ``geobox`` into local files (:func:`cloudfree.catalogs.sentinel_hub.fetch_assets`,
    cached); other items unchanged."""
    from cloudfree.catalogs.sentinel_hub import fetch_for_items, is_virtual

    if not any(is_virtual(it.assets[k].href) for it in items for k in keys if k in it.assets):
        return list(items)
    return fetch_for_items(items, keys, geobox)


def _prepared(items: Sequence[pystac.Item], keys: Sequence[str], geobox: GeoBox) -> list[pystac.Item]:
    """Items ready for odc-stac: remote-only assets fetched, every href of ``keys`` checked against the href
    policy (:class:`~cloudfree.catalogs.access.HrefRefusedError` names item, asset and config key)."""
    from cloudfree.catalogs.access import check_items

    items = fetch_remote_assets(items, keys, geobox)
    check_items(items, keys)
    return items


def load_reflectance(items: Sequence[pystac.Item], bands: Sequence[str], geobox: GeoBox, chunk: int = 512,
                     name: str = "scene") -> xr.DataArray:
    """Lazily load ``bands`` of ``items`` as float32 reflectance ``(time, band, y, x)``, NaN nodata."""
    if not items:
        raise InputDataError(f"{name}: no items to load")
    items = _prepared(items, bands, geobox)
    for it in items:
        missing = [b for b in bands if b not in it.assets]
        if missing:
            raise InputDataError(f"item {it.id} has no assets {missing}; pick grid.bands among {sorted(it.assets)}")
    eager = _EAGER_LOADS.get()
    resampling = reflectance_resampling(bands, abs(geobox.resolution.x), items)
    extra = _colayers(eager, items, bands, geobox)
    ds = odc.stac.load(
        items, bands=[*bands, *extra], geobox=geobox, chunks=None if eager else {"x": chunk, "y": chunk},
        resampling=resampling | {a: CATEGORICAL[a] for a in extra},
        dtype="float32", groupby="id", preserve_original_order=True, fail_on_error=True,
        driver=reader_driver(items), pool=_eager_pool() if eager else None,
    )
    for a in extra:
        eager.loaded[(a, tuple(it.id for it in items), geobox)] = ds[a]
    # DN -> reflectance in ONE task per (date, block) for all bands (scale, offset, nodata -> NaN), instead of
    # xarray's where / multiply / add / concat / transpose / astype tasks per band: 6x fewer tasks per input block
    # (graph size and scheduler time grow with the area; the values are the same, float32 in the same order)
    so = np.array([[item_harmonisation(it, b) for b in bands] for it in items], np.float32)  # (time, band, 2)
    nodata = tuple(_nodata_value(ds[b].attrs.get("nodata", 0)) for b in bands)
    if eager:  # numpy: the same conversion over all dates at once (element-wise, each date its own scale/offset)
        data = _to_reflectance(so, *(ds[b].data for b in bands), nodata=nodata)
    else:
        args = [dsa.from_array(so, chunks=(1, len(bands), 2)), "tbk"]
        for b in bands:
            args += [ds[b].data, "tyx"]
        data = dsa.blockwise(_to_reflectance, "tbyx", *args, nodata=nodata, dtype=np.float32, concatenate=True,
                             name=f"reflectance-{dask.base.tokenize(name, *(ds[b].data.name for b in bands), so)}")
    da = xr.DataArray(data, dims=("time", "band", "y", "x"),
                      coords={"time": [np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items],
                              "band": list(bands), "y": ds.y, "x": ds.x, "id": ("time", [it.id for it in items])})
    da.name = name
    da.attrs = {}
    da = da.rio.write_crs(geobox.crs.to_wkt())
    return validate_scene(da, name=name, bands=tuple(bands))


class _KeptPool:
    """A thread pool odc-stac's ``pmap`` uses as a context manager without shutting it down on exit."""

    def __init__(self, n: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(n, thread_name_prefix="cloudfree-eager-read")

    def __enter__(self):
        return self.pool

    def __exit__(self, *exc):
        return False


_POOLS: dict[int, _KeptPool] = {}
_POOLS_LOCK = threading.Lock()


def _eager_pool() -> _KeptPool | None:
    """Threads for an eager odc-stac load (its reads, one per band and date, into disjoint slices of one array): the
    threaded scheduler's ``num_workers`` (``run.workers``), as the dask loader's reads would run, in a pool kept for
    the process (as dask keeps its own: threads whose GDAL environment is set up once); None (in this thread) for
    one worker or another scheduler."""
    n = dask.config.get("num_workers", None)
    if not (dask.config.get("scheduler", None) == "threads" and isinstance(n, int) and n > 1):
        return None
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = _KeptPool(n)
        return _POOLS[n]


def _colayers(eager: _EagerLoads | None, items, bands, geobox) -> list[str]:
    """The layer assets (:func:`eager_loads`) the first eager reflectance load of a target reads with its bands: those
    every item carries, that are not bands, whose hrefs pass the policy (:func:`_prepared`) and need no fetch."""
    if eager is None or not eager.first:
        return []
    eager.first = False
    extra = [a for a in eager.layers
             if a in CATEGORICAL and a not in bands and all(a in it.assets for it in items)]
    if not extra:
        return []
    try:
        same = _prepared(items, extra, geobox)
    except Exception:  # noqa: BLE001 - not co-loaded: load_layer reads it alone and raises the specific error
        return []
    return extra if all(a is b for a, b in zip(same, items)) else []


def _nodata_value(nodata) -> float | None:
    """The nodata value odc-stac reports for a band, or None (NaN or no nodata: nothing to mask)."""
    if nodata is None or (isinstance(nodata, float) and np.isnan(nodata)):
        return None
    return float(nodata)


def _to_reflectance(so: np.ndarray, *dn: np.ndarray, nodata: tuple) -> np.ndarray:
    """One (date, block): ``so`` ``(1, band, 2)`` scale/offset, ``dn`` one ``(1, y, x)`` float32 block per band
    as odc-stac read it -> ``(1, band, y, x)`` float32 reflectance, NaN where the band's nodata value is (odc-stac
    fills pixels outside an item's footprint, and the file's own nodata, with that value (S2: DN 0) also when it
    converts to float32: they are masked before scaling)."""
    out = np.empty((dn[0].shape[0], len(dn)) + dn[0].shape[1:], np.float32)
    for i, (b, nd) in enumerate(zip(dn, nodata)):
        v = b * so[:, i, 0, None, None] + so[:, i, 1, None, None]
        out[:, i] = v if nd is None else np.where(b != nd, v, np.float32(np.nan))
    return out


def load_layer(items: Sequence[pystac.Item], asset: str, geobox: GeoBox, chunk: int = 512,
               dtype: str = "float32") -> xr.DataArray | None:
    """Lazily load a class/probability layer ``(time, y, x)`` as float32 (NaN nodata), nearest resampling
    (``dtype="uint8"``: the file's values with its nodata, e.g. SCL class 0, at a quarter of the memory).

    Returns None when no item carries the asset (the mask stage then needs another method). When every item's
    layer lies on a grid ``k`` times coarser than ``geobox`` and aligned with it (:func:`native_zoom`: SCL at
    20 m under a 10 m output, a 100 m layer under 25 m), it is read on that coarse grid (1/k^2 of the pixels)
    and each pixel repeated k x k in the same task: the values are those of a nearest read on ``geobox``.
    """
    if not all(asset in it.assets for it in items):
        have = [it.id for it in items if asset in it.assets]
        if have:
            raise ContractError(f"asset {asset!r} present on {have} but not on all items; mask each item alike")
        return None
    eager = _EAGER_LOADS.get()
    if eager is not None and dtype == "float32":  # read with the target's reflectance (:func:`eager_loads`)
        da = eager.loaded.pop((asset, tuple(it.id for it in items), geobox), None)
        if da is not None:
            return da.assign_coords(time=[np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items])
    items = _prepared(items, [asset], geobox)
    k = native_zoom(items, asset, geobox, chunk)
    gb = geobox.zoom_out(k) if k > 1 else geobox
    ds = odc.stac.load(items, bands=[asset], geobox=gb, chunks=None if eager else {"x": chunk // k, "y": chunk // k},
                       resampling=CATEGORICAL.get(asset, "nearest"), dtype=dtype, groupby="id",
                       preserve_original_order=True, driver=reader_driver(items),
                       pool=_eager_pool() if eager else None)
    da = ds[asset]
    if k > 1:
        from odc.geo.xr import xr_coords

        if eager:
            data = _repeat_pixels(da.data, k)
        else:
            data = da.data.map_blocks(_repeat_pixels, k, dtype=da.dtype, chunks=da.data.chunks[:1] + tuple(
                tuple(c * k for c in cs) for cs in da.data.chunks[1:]))
        ny, nx = geobox.shape
        coords = xr_coords(geobox)
        da = xr.DataArray(data[:, :ny, :nx], dims=da.dims, name=da.name, attrs=da.attrs,
                          coords={"y": coords["y"], "x": coords["x"], "spatial_ref": coords["spatial_ref"]})
    return da.assign_coords(time=[np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items])


def _repeat_pixels(block: np.ndarray, k: int) -> np.ndarray:
    """Each pixel of the last two axes repeated ``k x k`` (nearest upsampling by an integer factor)."""
    return np.repeat(np.repeat(block, k, axis=-2), k, axis=-1)


def native_zoom(items: Sequence[pystac.Item], asset: str, geobox: GeoBox, chunk: int) -> int:
    """The integer factor ``k >= 2`` by which ``asset`` can be read on ``geobox.zoom_out(k)`` and repeated instead
    of being read with nearest on ``geobox`` (same values), or 1.

    Needs, for every item, the asset's own grid (``proj:transform`` on the asset) in ``geobox``'s CRS, north-up,
    with pixels exactly ``k`` output pixels wide and edges on the output grid's (so output pixel ``(i, j)`` lies
    in native pixel ``(i // k, j // k)`` of the coarse grid), and ``chunk`` divisible by ``k`` (the repeated blocks
    keep the output chunking)."""
    t = geobox.transform
    if t.b != 0 or t.d != 0 or t.e >= 0 or geobox.crs is None:
        return 1
    r = t.a
    ks = set()
    for it in items:
        f = it.assets[asset].extra_fields
        tr = f.get("proj:transform")
        crs = _item_crs(it)
        if not tr or crs is None or GeoBox((1, 1), t, crs).crs != geobox.crs:
            return 1
        a, b, c, d, e, f_ = (float(v) for v in tr[:6])
        if b != 0 or d != 0 or e != -a:
            return 1
        k = round(a / r)
        if k < 2 or abs(k * r - a) > 1e-6 * a or chunk % k:
            return 1
        # output pixel edges on native edges: the origin offset is a whole number of native pixels
        ox, oy = (t.c - c) / a, (f_ - t.f) / a
        if abs(ox - round(ox)) > 1e-6 or abs(oy - round(oy)) > 1e-6:
            return 1
        ks.add(k)
    return ks.pop() if len(ks) == 1 else 1


# -- failed reads: retried, then reported as a third pixel state (observed / masked / failed) ----------------------
#: GDAL's own HTTP retries for remote assets (/vsicurl/, /vsis3/...), scoped with rasterio.Env around every open.
GDAL_RETRY_ENV = {"GDAL_HTTP_MAX_RETRY": "4", "GDAL_HTTP_RETRY_DELAY": "1", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


@dataclass(frozen=True)
class ReadFailure:
    """One asset that could not be read after retries; it reaches the output as ``SOURCE_FAILED`` pixels."""

    item_id: str
    band: str
    href: str
    error: str
    attempts: int

    def as_properties(self) -> dict:
        return asdict(self)


@dataclass
class _EagerLoads:
    """The state of :func:`eager_loads` in one thread: the layer assets the first reflectance load reads in the same
    ``odc.stac.load`` call, and what it read of them (``(asset, item ids, geobox) -> DataArray``)."""

    layers: tuple = ()
    first: bool = True
    loaded: dict = None


#: Set while the loads of one small target run eagerly (:func:`eager_loads`): odc-stac reads the pixels at once into
#: numpy (its direct loader) instead of building a dask graph. A context variable: per thread, so targets in flight
#: on other threads keep their own setting.
_EAGER_LOADS: contextvars.ContextVar[_EagerLoads | None] = contextvars.ContextVar("cloudfree_eager_loads",
                                                                                   default=None)


@contextlib.contextmanager
def eager_loads(on: bool = True, layers: Sequence[str] = ()):
    """Within the block, :func:`load_reflectance` and :func:`load_layer` read eagerly (numpy) when ``on``: for a
    small target read whole anyway (:func:`read_small_once`), the graph of its ~15 chunk reads costs more than the
    reads. odc-stac's direct and dask loaders fill each chunk with the same function (``_fill_nd_slice``) from
    the same readers, and the reflectance conversion is element-wise per date, so the values are the same.

    ``layers``: class/probability assets (:data:`CATEGORICAL`, e.g. SCL) that :func:`load_layer` will read of the
    same items on the same grid: the first :func:`load_reflectance` in the block reads them in its own
    ``odc.stac.load`` call (nearest, on the output grid: the values of :func:`load_layer`'s read, see
    :func:`native_zoom`), and :func:`load_layer` takes them from there. odc-stac parses the items and builds its
    dataset once per target instead of twice (issue 22)."""
    token = _EAGER_LOADS.set(_EagerLoads(tuple(layers), True, {}) if on else None)
    try:
        yield
    finally:
        _EAGER_LOADS.reset(token)


def read_small_once(geobox: GeoBox, window: int, *arrays):
    """``arrays`` (dask-backed xarray objects of one target) computed together now when the target fits in
    ``window`` x ``window`` px (``coregister.window``; the runner passes the target's own size for a larger target
    whose inputs are small, :func:`cloudfree.pipeline.runner.read_whole`), else unchanged.

    For such a target the co-registration estimate's eager read would be the whole target, and the main pass would
    read it all again: one ``dask.compute`` of the loads and masks reads every input pixel once, and the estimate,
    the scene-context reuse and the main pass work on the arrays in memory (a 512 x 512 target with 2 references and
    6 bands holds ~20 MB). The values are the same computations, so the outputs are byte-identical. Computed (numpy
    in the returned xarray objects), not persisted: the xarray steps after it (masks, co-registration, provenance)
    then run eagerly instead of each building a dask graph over one block (issue 22: ~10 % of a 104 px target's
    CPU)."""
    if max(geobox.shape) > window:
        return arrays
    if any(a is not None and (not isinstance(a, xr.DataArray) or any(dask.is_dask_collection(c.variable._data)
                                                                      for c in a.coords.values()))
           for a in arrays):
        return dask.compute(*arrays)
    # the dask arrays computed, then put back into their DataArrays: dask.compute of the DataArrays themselves
    # tokenizes their coordinates first (a third of this call's main-thread time on a 104 px target)
    lazy = [i for i, a in enumerate(arrays) if a is not None and dask.is_dask_collection(a.data)]
    values = dict(zip(lazy, dask.compute(*(arrays[i].data for i in lazy))))
    return tuple(a.copy(deep=False, data=values[i]) if i in values else a for i, a in enumerate(arrays))


#: most asset reads kept by :func:`memo_read` (a probe is two ints, an overview sample 128^2 px: ~32 KB each, so at most ~32 MB).
MEMO_MAX = 1024
_MEMO: "OrderedDict[tuple, object]" = OrderedDict()
_MEMO_LOCK = threading.Lock()


def file_validator(href: str) -> tuple | None:
    """``(real path, mtime_ns, size)`` of a local file ``href`` (a path or ``file://``), None for anything else
    (remote hrefs have no validator without a request, so their reads are never memoised)."""
    if href.startswith("file://"):
        href = href[7:]
    elif "://" in href or href.startswith("/vsi"):
        return None
    try:
        st = os.stat(href)
    except OSError:
        return None
    return os.path.realpath(href), st.st_mtime_ns, st.st_size


def memo_read(href: str, what: tuple, read):
    """``read()``, memoised for this process by ``(file, mtime, size, what)`` when ``href`` is a local file
    (:func:`file_validator`): an asset's probe and its plausibility overview sample are read once per process,
    not once per target that uses the item (a batch of small targets shares its references) nor once per stage
    (the scene-context sample probes the same assets). A file rewritten in place gets a new mtime/size and is read
    again. Exceptions are not memoised (a failed read is retried by the next caller). Keep the result read-only."""
    v = file_validator(href)
    if v is None:
        return read()
    key = (*v, *what)
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    val = read()
    with _MEMO_LOCK:
        _MEMO[key] = val
        while len(_MEMO) > MEMO_MAX:
            _MEMO.popitem(last=False)
    return val


def clear_read_memo() -> None:
    """Forget every memoised asset read (:func:`memo_read`)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def open_with_retry(href: str, retries: int = 3, delay: float = 0.5) -> tuple[int, int]:
    """Open ``href`` and read one pixel (header and first block) with retries; return ``(height, width)``.

    Raises :class:`ReadError` naming the asset after ``retries`` failed attempts (exponential backoff).
    """
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            with rasterio.Env(**GDAL_RETRY_ENV), rasterio.open(href) as src:
                src.read(1, window=rasterio.windows.Window(0, 0, 1, 1))
                if src.crs is None and not src.gcps[0]:  # not retried: the file is complete, just not georeferenced
                    raise InputDataError(f"{href} has no CRS (no georeferencing, no GCPs), so it cannot be placed "
                                         "on the output grid; fix the file (e.g. gdal_edit.py -a_srs EPSG:<code>) or "
                                         "the catalog's href, or drop the item")
                return src.height, src.width
        except (rasterio.errors.RasterioError, OSError) as exc:
            last = exc
            if attempt < retries:
                log.debug("read of %s failed (attempt %d/%d): %s", href, attempt, retries, exc)
                time.sleep(delay * 2 ** (attempt - 1))
    raise ReadError(f"{href} could not be read after {retries} attempts: {last}; check the path/URL, signing and "
                    "network, or drop the item")


def check_assets(items: Sequence[pystac.Item], keys: Sequence[str], retries: int = 3,
                 delay: float = 0.5) -> list[ReadFailure]:
    """Probe every ``(item, asset)`` once (header + first block, with retries); return those that failed.

    Hrefs go through :func:`~cloudfree.catalogs.access.readable_href`: a refused href or a token that cannot be
    had raises (the target fails with that message) instead of being reported as a failed read."""
    from cloudfree.catalogs.access import readable_href

    failures = []
    for it in items:
        for k in keys:
            if k not in it.assets:
                continue
            href = readable_href(it, k)
            try:  # once per file and process (memo_read): a batch's targets share their references
                memo_read(href, ("probe",), lambda: open_with_retry(href, retries, delay))
            except ReadError as exc:
                from cloudfree.pipeline.redact import redact

                log.error("item %s asset %s: %s", it.id, k, redact(str(exc)))
                failures.append(ReadFailure(it.id, k, redact(href), redact(str(exc)), retries))
            except InputDataError as exc:
                raise InputDataError(f"item {it.id} asset {k}: {exc}") from None
    return failures


def load_reflectance_checked(items: Sequence[pystac.Item], bands: Sequence[str], geobox: GeoBox, chunk: int = 512,
                             name: str = "scene", retries: int = 3, delay: float = 0.5,
                             ) -> tuple[xr.DataArray, xr.DataArray, list[ReadFailure]]:
    """:func:`load_reflectance` with failed reads kept apart from nodata.

    Every asset is probed first (:func:`check_assets`, retried). Assets that still fail are not read: their band is
    NaN and ``failed`` ``(time, y, x)`` is True over the item's pixels, so the runner writes ``SOURCE_FAILED``
    there instead of a silent nodata. Assets that pass are loaded with ``fail_on_error=True``: a read that fails
    later (mid-compute) raises instead of becoming nodata.
    """
    from odc.geo.xr import xr_coords

    items = _prepared(items, bands, geobox)
    failures = check_assets(items, bands, retries, delay)
    bad = {(f.item_id, f.band) for f in failures}
    if not failures:
        stack = load_reflectance(items, bands, geobox, chunk, name=name)
        failed = xr.zeros_like(stack.isel(band=0, drop=True), dtype=bool).rename("failed")
        return stack, failed, []
    coords = xr_coords(geobox)
    per_item = []
    for it in items:
        good = [b for b in bands if (it.id, b) not in bad]
        part = load_reflectance([it], good, geobox, chunk, name=name).isel(time=0) if good else None
        planes = [part.sel(band=b).data if b in good else
                  dsa.full(tuple(geobox.shape), np.nan, dtype=np.float32, chunks=chunk) for b in bands]
        per_item.append(dsa.stack(planes))
    out = xr.DataArray(
        dsa.stack(per_item), dims=("time", "band", "y", "x"),
        coords={"time": [np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items],
                "band": list(bands), "y": coords["y"].values, "x": coords["x"].values,
                "id": ("time", [it.id for it in items])}, name=name)
    out = out.rio.write_crs(geobox.crs.to_wkt())
    failed_items = np.array([any((it.id, b) in bad for b in bands) for it in items])
    flags = dsa.from_array(failed_items[:, None, None], chunks=1)
    failed = xr.DataArray(dsa.broadcast_to(flags, (len(items),) + tuple(geobox.shape), chunks=(1, chunk, chunk)),
                          dims=("time", "y", "x"), coords={"time": out.time, "y": out.y, "x": out.x}, name="failed")
    return validate_scene(out, name=name, bands=tuple(bands)), failed, failures


# -- Sentinel-1 -----------------------------------------------------------------------------------------------------
SAR_POLS = ("vv", "vh")


def _sar_source(item: pystac.Item, pol: str) -> tuple[str, int, bool] | None:
    """``(asset key, band index 1-based, values in dB)`` of polarisation ``pol`` in ``item``, or None."""
    for key, asset in item.assets.items():
        names = [str(b.get("name", "")).lower() for b in asset.extra_fields.get("eo:bands", []) or []]
        if key.lower() == pol or pol in names:
            idx = names.index(pol) + 1 if pol in names else 1
            rb = asset.extra_fields.get("raster:bands") or [{}]
            unit = str(rb[min(idx - 1, len(rb) - 1)].get("unit", "")).lower()
            is_db = unit in ("db", "decibel") or bool(asset.extra_fields.get("cloudfree:db"))
            return key, idx, is_db
    return None


def db_to_linear(db: np.ndarray) -> np.ndarray:
    """Backscatter dB -> linear power (pure numpy)."""
    return np.power(np.float32(10), db / np.float32(10)).astype(np.float32)


def load_sar(items: Sequence[pystac.Item], geobox: GeoBox, pols: Sequence[str] = SAR_POLS, chunk: int = 512,
             retries: int = 3, delay: float = 0.5) -> xr.DataArray:
    """Sentinel-1 backscatter ``(time, band, y, x)`` float32 linear power on ``geobox``, lazily, NaN nodata.

    Each item needs one asset per polarisation (key ``vv``/``vh``, or an ``eo:bands`` name in a multi-band asset);
    dB assets (``raster:bands`` unit ``dB``) are converted to linear power. Pixels are reprojected with odc-geo:
    bilinear, or average when the source is finer than the grid by more than 1.5x. A polarisation no item has is
    dropped; an asset that cannot be opened after retries raises :class:`ReadError` naming item and asset.
    """
    from odc.geo.xr import xr_reproject

    from cloudfree.catalogs.access import readable_href

    if not items:
        raise InputDataError("load_sar: no Sentinel-1 items to load")
    found = [p for p in pols if all(_sar_source(it, p) is not None for it in items)]
    if not found:
        raise InputDataError(f"items {[it.id for it in items]} carry none of the polarisations {list(pols)} (asset "
                             "keys or eo:bands names); check search.sar collection and asset names")
    res = abs(geobox.resolution.x)
    per_item = []
    for it in items:
        planes = []
        for p in found:
            key, idx, is_db = _sar_source(it, p)
            # checked against the href policy and signed (Planetary Computer RTC) now: the lazy read below keeps
            # this href, whose token has at least catalog.sas_refresh_margin left
            href = readable_href(it, key)
            try:
                open_with_retry(href, retries, delay)
            except ReadError as exc:
                raise ReadError(f"Sentinel-1 item {it.id} asset {p}: {exc}") from None
            # no directory listing on open (as the probe): remote blob stores answer it slowly or not at all
            with rasterio.Env(**GDAL_RETRY_ENV):
                src = rioxarray.open_rasterio(href, chunks={"x": chunk, "y": chunk}, masked=True).sel(band=idx)
            src_res = abs(float(src.rio.resolution()[0]))
            resampling = "average" if src_res * 1.5 < res else "bilinear"
            dst = xr_reproject(src.astype(np.float32), geobox, resampling=resampling, dst_nodata=np.nan,
                               chunks=(chunk, chunk))
            data = dst.data
            if is_db:
                data = dsa.map_blocks(db_to_linear, data, dtype=np.float32)
            planes.append(data.astype(np.float32))
        per_item.append(dsa.stack(planes))
    from odc.geo.xr import xr_coords

    coords = xr_coords(geobox)
    da = xr.DataArray(dsa.stack(per_item), dims=("time", "band", "y", "x"),
                      coords={"time": [np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items],
                              "band": list(found), "y": coords["y"], "x": coords["x"],
                              "id": ("time", [it.id for it in items])}, name="sar")
    return da.rio.write_crs(geobox.crs.to_wkt())


def mark_failed(ds, failed, bands=None):
    """Pixels whose target read failed become ``SOURCE_FAILED`` (confidence 0), not nodata.

    ``bands``: the bands whose read failed (default: all). Only those bands become NaN, the others keep their
    values; pixels a reference supplied (source >= ``SOURCE_REFERENCE_BASE``, every band from that reference)
    keep their value and code.
    """
    from cloudfree.pipeline.contract import SOURCE_FAILED, SOURCE_REFERENCE_BASE

    if bands is None:
        hit = failed
        band_hit = xr.DataArray(np.ones(ds.sizes["band"], bool), dims="band")
    else:
        hit = failed & (ds.source < SOURCE_REFERENCE_BASE)
        band_hit = xr.DataArray(np.isin([str(b) for b in ds.band.values], list(bands)), dims="band")
    return ds.assign(reflectance=ds.reflectance.where(~(hit & band_hit)), confidence=ds.confidence.where(~hit, 0.0),
                     source=ds.source.where(~hit, float(SOURCE_FAILED)))
