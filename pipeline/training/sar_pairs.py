"""Co-located Sentinel-1 + Sentinel-2 L2A training pairs from any STAC catalog with both, with REAL SAR.

Built the way SEN12MS-CR-TS was (Ebel et al. 2022): for each Sentinel-2 L2A item of an AOI and period, the
Sentinel-1 scene (RTC first, then GRD; nearest in time) whose footprint overlaps it within ``max_days`` is paired
with it; both are loaded onto ONE grid (the S2 item's own pixel grid, cut to the AOI, at ``resolution``) by the
project's load stage (:func:`cloudfree.stages.load.load_reflectance_checked`, :func:`cloudfree.stages.load.load_sar`;
Planetary Computer hrefs are signed lazily through :mod:`cloudfree.catalogs.access`), and the backscatter is
converted to dB (``10 log10`` of the linear gamma0 / sigma0; not clipped; NaN where S1 has no data).

Output folder (``cloudfree train sar-pairs --out DIR``)::

    DIR/pairs/<S2 item id>/s2.tif      float32 L2A reflectance (DN harmonised per item), one band per name, NaN nodata
    DIR/pairs/<S2 item id>/s1.tif      float32 backscatter in dB, bands vv, vh (NaN nodata)
    DIR/pairs/<S2 item id>/scl.tif     uint8 Sen2Cor scene classes, when the item carries SCL
    DIR/pairs/<S2 item id>/pair.json   provenance: item ids, collections, times, signed time gap, asset hrefs
                                       (unsigned and redacted), grid, valid fractions, SCL cloud fraction
    DIR/summary.json                   pairs, distinct S2 images and S1 scenes, pixels, time gaps, skipped items

Each pair folder is written in a staging folder and renamed into place when complete (under a per-pair lock), so a
reader sees a whole pair or none; a rerun skips the pairs already there (resume) and rebuilds the summary from every
``pair.json``. Folder names come from item ids through :func:`cloudfree.pipeline.safety.safe_stem` (catalog strings
are untrusted).

An S2 item that cannot be paired is skipped with a reason naming it and the fix (no S1 within the window, S1 items
without the polarisations, missing bands, failed reads, too little S1 coverage); they are listed in the summary. A
build that yields no pair at all raises :class:`~cloudfree.pipeline.errors.InputDataError` with those reasons.

What this is not: a cloud-removal sample yet. The S2 side is whatever the catalog holds for that date (cloudy or
clear: ``scl_cloud_fraction`` says which); cloudy targets, clear truths and references are drawn from such a time
series by the training sources (:mod:`cloudfree.pipeline.training.datasets`).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cloudfree.pipeline.errors import CatalogError, CloudfreeError, InputDataError, ReadError

log = logging.getLogger(__name__)

#: the 12 Sentinel-2 L2A bands (B10 is L1C only).
L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: SCL classes counted as cloud/shadow in ``scl_cloud_fraction`` (3 shadow, 8/9 cloud, 10 cirrus).
SCL_CLOUD = (3, 8, 9, 10)
PAIRS = "pairs"
SUMMARY = "summary.json"
PAIR_JSON = "pair.json"


@dataclass(frozen=True)
class PairSpec:
    """What to pair. ``bbox`` (degrees) or ``geometry`` (GeoJSON, EPSG:4326) is the AOI; ``period`` an ISO interval."""

    collection: str = "sentinel-2-l2a"
    #: Sentinel-1 collection(s), comma-separated (e.g. ``sentinel-1-rtc,sentinel-1-grd``): RTC is preferred.
    sar_collection: str = "sentinel-1-rtc"
    bbox: tuple[float, float, float, float] | None = None
    geometry: dict[str, Any] | None = None
    period: str | None = None
    #: the S1 scene must lie within this many days of the S2 acquisition (SEN12MS-CR-TS: nearest S1 per S2 date).
    max_days: float = 3.0
    bands: tuple[str, ...] = L2A_BANDS
    pols: tuple[str, ...] = ("vv", "vh")
    resolution: float = 10.0
    #: share of the S2 footprint the S1 footprint must cover.
    min_overlap: float = 0.3
    #: share of the pair's pixels with finite backscatter in every polarisation.
    min_sar_valid: float = 0.5
    #: S2 ``eo:cloud_cover`` range searched (default all: cloudy dates are what cloud removal needs).
    cloud_cover: tuple[float, float] = (0.0, 100.0)
    #: at most this many S2 items (nearest-first order of the catalog answer is not assumed: sorted by time).
    max_items: int | None = None
    chunk: int = 512
    #: most pixels one pair may have (a pair is computed in memory: 12 bands + 2 pols of float32 = 56 bytes a
    #: pixel, ~0.9 GB at the default 4096 x 4096); larger S2 footprints need a smaller AOI.
    max_pixels: int | None = 4096 * 4096


@dataclass
class Skipped:
    id: str
    reason: str


@dataclass
class BuildResult:
    out: Path
    built: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# -- choosing the S1 scene ---------------------------------------------------------------------------------------------
def sar_candidates(catalog: Any, s2: Any, spec: PairSpec) -> list[tuple[Any, float, float]]:
    """``(s1 item, signed days from s2, overlap)`` of every S1 scene overlapping ``s2`` within ``spec.max_days``,
    best first: RTC before GRD, then nearest in time, then larger overlap. A failing catalog raises (that is not a
    property of the item)."""
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.stages.search import _window, footprint_overlap, is_rtc, item_time

    t0 = item_time(s2)
    cols = tuple(c.strip() for c in spec.sar_collection.split(",") if c.strip())
    scenes = catalog.search(SearchQuery(collections=cols, intersects=s2.geometry,
                                        bbox=None if s2.geometry else tuple(s2.bbox),
                                        datetime=_window(t0, spec.max_days), allow_empty=True))
    out = []
    for s in scenes:
        signed = (item_time(s) - t0).total_seconds() / 86400.0
        ov = footprint_overlap(s2, s)
        if abs(signed) <= spec.max_days and ov >= spec.min_overlap:
            out.append((s, signed, ov))
    out.sort(key=lambda c: (not is_rtc(c[0]), abs(c[1]), -c[2], c[0].id))
    return out


def _pols_of(item: Any, pols: Sequence[str]) -> list[str]:
    from cloudfree.stages.load import _sar_source

    return [p for p in pols if _sar_source(item, p) is None]


def backscatter_problem(item: Any, pols: Sequence[str]) -> str | None:
    """Why ``item``'s pixels are not geocoded backscatter (None when they are). RTC items are (gamma0 on a map
    grid). Other items (GRD) qualify only when they declare a map projection (``proj:epsg``/``proj:code``/
    ``proj:wkt2`` on the item or the asset) AND backscatter units (``raster:bands`` unit dB / linear / power, or
    ``cloudfree:db``): Planetary Computer's and Earth Search's ``sentinel-1-grd`` hold uncalibrated amplitude DN in
    radar geometry (GCPs only), which 10 log10 would turn into numbers that are not dB of anything."""
    from cloudfree.stages.load import _sar_source
    from cloudfree.stages.search import is_rtc

    if is_rtc(item):
        return None
    for pol in pols:
        key, idx, is_db = _sar_source(item, pol)
        a = item.assets[key]
        fields = {**item.properties, **a.extra_fields}
        geocoded = any(fields.get(k) for k in ("proj:epsg", "proj:code", "proj:wkt2", "proj:projjson"))
        rb = a.extra_fields.get("raster:bands") or [{}]
        unit = str(rb[min(idx - 1, len(rb) - 1)].get("unit", "")).lower()
        if not geocoded or not (is_db or unit in ("linear", "power", "1")):
            return (f"{item.id} asset {key!r} is {'not geocoded (no proj:* grid: radar geometry) and ' if not geocoded else ''}"
                    f"{'not declared as backscatter (raster:bands unit dB/linear)' if not (is_db or unit) else 'in unit ' + repr(unit)}"
                    " (GRD amplitude DN)")
    return None


def choose_sar(catalog: Any, s2: Any, spec: PairSpec) -> tuple[Any, float, float]:
    """The S1 scene of ``s2``: the best candidate that carries every polarisation of ``spec.pols``. Raises
    :class:`InputDataError` naming the S2 (or S1) item and the fix when there is none."""
    cands = sar_candidates(catalog, s2, spec)
    if not cands:
        raise InputDataError(
            f"S2 item {s2.id} ({s2.datetime:%Y-%m-%d %H:%M}): no scene of {spec.sar_collection} overlaps it (at least "
            f"{spec.min_overlap:.0%} of its footprint) within {spec.max_days:g} days; widen --max-days, add "
            "another Sentinel-1 collection to --sar-collection (e.g. sentinel-1-rtc,sentinel-1-grd), or drop this "
            "date")
    lacking, raw = [], []
    for c in cands:
        missing = _pols_of(c[0], spec.pols)
        if missing:
            lacking.append(f"{c[0].id} lacks {missing} (assets {sorted(c[0].assets)})")
            continue
        why = backscatter_problem(c[0], spec.pols)
        if why is None:
            return c
        raw.append(why)
    if raw:
        raise InputDataError(
            f"S2 item {s2.id}: no Sentinel-1 scene within {spec.max_days:g} days holds geocoded backscatter: "
            f"{'; '.join(raw + lacking)}; use sentinel-1-rtc (radiometrically terrain-corrected gamma0 on a map "
            "grid), or calibrate and geocode the GRD scenes first (e.g. with SNAP or pyroSAR) and catalog those")
    raise InputDataError(
        f"S2 item {s2.id}: the Sentinel-1 scene(s) within {spec.max_days:g} days carry no "
        f"{'/'.join(spec.pols)} asset: {'; '.join(lacking)}; use a dual-polarisation collection whose items have "
        "vv and vh assets (e.g. sentinel-1-rtc), or ask for the polarisations they have (--pols vv)")


# -- one pair ----------------------------------------------------------------------------------------------------------
def _geobox(s2: Any, spec: PairSpec):
    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.load import check_grid_size, output_geobox

    grid = GridConfig(resolution=spec.resolution, bands=list(spec.bands), chunk=spec.chunk,
                      max_pixels=spec.max_pixels)
    bbox = spec.bbox
    if bbox is None and spec.geometry is not None:
        from shapely.geometry import shape

        bbox = tuple(shape(spec.geometry).bounds)
    try:
        return check_grid_size(output_geobox(s2, grid, bbox), s2, grid, what="S2 item")
    except InputDataError as exc:
        raise InputDataError(f"{exc} (here: give --bbox/--aoi a smaller area or raise --max-pixels)") from None


def _hrefs(item: Any, keys: Sequence[str]) -> dict[str, str]:
    from cloudfree.catalogs.access import asset_href
    from cloudfree.pipeline.redact import redact

    return {k: redact(asset_href(item, k)) for k in keys if k in item.assets}


def _write_tif(path: Path, data: np.ndarray, geobox, names: Sequence[str], *, dtype: str, nodata: Any,
               units: str | None = None) -> None:
    import rasterio

    ny, nx = data.shape[-2:]
    prof = {"driver": "GTiff", "width": nx, "height": ny, "count": data.shape[0], "dtype": dtype,
            "crs": geobox.crs.to_wkt(), "transform": geobox.transform, "nodata": nodata, "compress": "deflate"}
    if nx >= 256 and ny >= 256:
        prof.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data.astype(dtype))
        for i, n in enumerate(names, 1):
            ds.set_band_description(i, n)
            if units:
                ds.set_band_unit(i, units)


def linear_to_db(linear: np.ndarray) -> np.ndarray:
    """Linear backscatter power -> dB (``10 log10``), NaN where the power is not positive or not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(linear) & (linear > 0), 10.0 * np.log10(linear), np.nan).astype(np.float32)


def build_pair(s2: Any, s1: Any, signed_days: float, overlap: float, spec: PairSpec, folder: Path) -> dict[str, Any]:
    """Load ``s2`` and ``s1`` onto one grid and write the pair's files into ``folder``; returns its provenance."""
    import dask

    from cloudfree.stages.load import load_layer, load_reflectance_checked, load_sar
    from cloudfree.stages.search import is_rtc

    geobox = _geobox(s2, spec)
    optical, _, failures = load_reflectance_checked([s2], list(spec.bands), geobox, chunk=spec.chunk, name="s2")
    if failures:
        raise ReadError(f"S2 item {s2.id}: assets {[f.band for f in failures]} could not be read "
                        f"({failures[0].error}); check the catalog's access (signing) or drop this date")
    sar = load_sar([s1], geobox, pols=spec.pols, chunk=spec.chunk)
    scl = load_layer([s2], "SCL", geobox, chunk=spec.chunk, dtype="uint8") if "SCL" in s2.assets else None
    with dask.config.set(scheduler="threads"):
        parts = dask.compute(optical.data[0], sar.data[0], *(() if scl is None else (scl.data[0],)))
    refl, lin = parts[0], parts[1]
    db = linear_to_db(lin)
    sar_ok = np.isfinite(db).all(axis=0)
    opt_ok = np.isfinite(refl).all(axis=0)
    if sar_ok.mean() < spec.min_sar_valid:
        raise InputDataError(
            f"S2 item {s2.id}: Sentinel-1 {s1.id} has backscatter on only {sar_ok.mean():.0%} of the pair's "
            f"{sar_ok.size} pixels (at least {spec.min_sar_valid:.0%} wanted); the scene covers the AOI only in "
            "part: narrow the AOI, lower min_sar_valid, or drop this date")
    if not opt_ok.any():
        raise InputDataError(f"S2 item {s2.id} has no valid pixel on the pair's grid (all nodata); check the AOI")
    _write_tif(folder / "s2.tif", refl, geobox, spec.bands, dtype="float32", nodata=float("nan"))
    _write_tif(folder / "s1.tif", db, geobox, [str(p) for p in sar.band.values], dtype="float32",
               nodata=float("nan"), units="dB")
    cloud = None
    if scl is not None:
        classes = np.asarray(parts[2], np.uint8)
        _write_tif(folder / "scl.tif", classes[None], geobox, ["SCL"], dtype="uint8", nodata=0)
        valid = classes > 0
        cloud = float(np.isin(classes, SCL_CLOUD)[valid].mean()) if valid.any() else None
    finite_db = db[:, sar_ok]
    coreg = _coregistration(refl, spec.bands, lin, sar_ok, parts[2] if scl is not None else None, s1.id)
    t = geobox.transform
    return {
        "s2": {"id": s2.id, "collection": s2.collection_id, "datetime": s2.datetime.isoformat(),
               "platform": s2.properties.get("platform"), "mgrs_tile": s2.properties.get("s2:mgrs_tile"),
               "eo:cloud_cover": s2.properties.get("eo:cloud_cover"),
               "assets": _hrefs(s2, [*spec.bands, *(["SCL"] if scl is not None else [])])},
        "s1": {"id": s1.id, "collection": s1.collection_id, "datetime": s1.datetime.isoformat(),
               "kind": "RTC" if is_rtc(s1) else "GRD", "platform": s1.properties.get("platform"),
               "orbit_state": s1.properties.get("sat:orbit_state"),
               "relative_orbit": s1.properties.get("sat:relative_orbit"), "assets": _hrefs(s1, spec.pols)},
        "time_gap_days": round(float(signed_days), 6),
        "time_gap_hours": round(float(signed_days) * 24.0, 4),
        "footprint_overlap": round(float(overlap), 4),
        "grid": {"crs": geobox.crs.to_wkt(), "epsg": geobox.crs.epsg, "transform": list(t)[:6],
                 "shape": [int(v) for v in geobox.shape], "resolution": spec.resolution},
        "bands": list(spec.bands), "pols": [str(p) for p in sar.band.values],
        "pixels": int(sar_ok.size), "optical_valid_fraction": round(float(opt_ok.mean()), 6),
        "sar_valid_fraction": round(float(sar_ok.mean()), 6),
        "sar_db_median": {str(p): float(np.median(finite_db[i])) for i, p in enumerate(sar.band.values)},
        "scl_cloud_fraction": cloud,
        "coregistration": coreg,
        "sar": "REAL co-located Sentinel-1 backscatter in dB (10 log10 of linear power, not clipped)",
        "optical": "Sentinel-2 L2A reflectance (DN harmonised per item: scale and baseline-04.00 offset)",
        "files": {"s2": "s2.tif", "s1": "s1.tif", **({"scl": "scl.tif"} if scl is not None else {})},
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _coregistration(refl: np.ndarray, bands: Sequence[str], lin: np.ndarray, sar_ok: np.ndarray, scl: Any,
                    s1_id: str) -> dict[str, Any]:
    """The S1 -> S2 misregistration the pipeline's estimator finds (:func:`cloudfree.stages.coregister.estimate_sar_shift`,
    default settings, on B08 or the last band, SCL cloud/shadow masked): RECORDED, never applied to the pair."""
    import xarray as xr

    from cloudfree.pipeline.config import CoregisterConfig
    from cloudfree.stages.coregister import estimate_sar_shift

    band = "B08" if "B08" in bands else bands[-1]
    mask = ~np.isfinite(refl).all(axis=0) | ~sar_ok
    if scl is not None:
        mask |= np.isin(np.asarray(scl), SCL_CLOUD)
    try:
        rec = estimate_sar_shift(xr.DataArray(refl[list(bands).index(band)], dims=("y", "x")),
                                 xr.DataArray(mask, dims=("y", "x")),
                                 xr.DataArray(np.where(sar_ok, lin[0], np.nan), dims=("y", "x")), s1_id,
                                 CoregisterConfig())
        out = {k: v for k, v in rec.as_properties().items() if k in ("status", "misregistration_px", "n_pixels",
                                                                     "reason")}
        if out["status"] == "applied":  # what the run would apply; here it is only recorded
            out["status"] = "estimated"
    except Exception as exc:  # noqa: BLE001 - a diagnostic: its failure never costs the pair
        out = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {**out, "band": band, "applied": False,
            "note": "estimated on the pair, recorded only: the pair's S1 is as the catalog delivered it"}


# -- the build ---------------------------------------------------------------------------------------------------------
def _pairs_dir(out: Path) -> Path:
    return out / PAIRS


def summarise(out: str | Path, skipped: Sequence[Skipped] = (), spec: PairSpec | None = None,
              catalog: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of every finished pair under ``out`` (what a rerun would find), plus this build's skips."""
    out = Path(out)
    records = []
    d = _pairs_dir(out)
    for f in sorted(d.glob(f"*/{PAIR_JSON}")) if d.is_dir() else []:
        records.append(json.loads(f.read_text()))
    gaps = [abs(r["time_gap_days"]) * 24.0 for r in records]
    return {
        "pairs": len(records),
        "distinct_s2_images": len({r["s2"]["id"] for r in records}),
        "distinct_s1_scenes": len({r["s1"]["id"] for r in records}),
        "pixels": int(sum(r["pixels"] for r in records)),
        "sar_valid_pixels": int(sum(round(r["pixels"] * r["sar_valid_fraction"]) for r in records)),
        "time_gap_hours": ({"min": min(gaps), "median": float(np.median(gaps)), "max": max(gaps)} if gaps else None),
        "sar": "REAL co-located Sentinel-1 (no simulated SAR)",
        "skipped": [asdict(s) for s in skipped],
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()} if spec else None,
        "catalog": catalog,
        "grids": _grids(records),
        "pairs_index": [{"folder": f"{PAIRS}/{_stem(r['s2']['id'])}", "s2": r["s2"]["id"], "s1": r["s1"]["id"],
                         "time_gap_hours": r["time_gap_hours"], "shape": r["grid"]["shape"]} for r in records],
    }


def _grids(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs by grid (CRS, transform, shape): the pairs of one grid are a time series of one place, as
    SEN12MS-CR-TS's patches are (cloudy targets, clear truths and references are drawn within a grid)."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        g = r["grid"]
        by.setdefault((g["epsg"] or g["crs"], tuple(g["transform"]), tuple(g["shape"])), []).append(r)
    return [{"epsg": k[0] if isinstance(k[0], int) else None, "transform": list(k[1]), "shape": list(k[2]),
             "pairs": len(rs), "dates": sorted(r["s2"]["datetime"][:10] for r in rs)} for k, rs in by.items()]


def _stem(item_id: str) -> str:
    from cloudfree.pipeline.safety import safe_stem

    return safe_stem(item_id)


def search_s2(catalog: Any, spec: PairSpec) -> list[Any]:
    from cloudfree.catalogs.base import SearchQuery
    from cloudfree.stages.search import item_time

    lo, hi = spec.cloud_cover
    query = {} if (lo, hi) == (0.0, 100.0) else {"eo:cloud_cover": {"gte": lo, "lte": hi}}
    items = catalog.search(SearchQuery(collections=(spec.collection,), bbox=spec.bbox, intersects=spec.geometry,
                                       datetime=spec.period, query=query, allow_empty=True))
    items = sorted(items, key=lambda it: (item_time(it), it.id))
    return items[: spec.max_items] if spec.max_items else items


def build_sar_pairs(catalog: Any, spec: PairSpec, out: str | Path, *, catalog_info: dict | None = None,
                    progress: Any = None) -> BuildResult:
    """Build the pairs of ``spec`` from ``catalog`` (an opened :mod:`cloudfree.catalogs` backend) into ``out``.

    Resumes: pairs whose folder exists are kept. Writes ``out/summary.json`` (atomically) at the end. Raises
    :class:`InputDataError` when no S2 item matches, or when no pair exists at the end (with every item's reason).
    """
    from cloudfree.pipeline.fileio import write_json_atomic
    from cloudfree.pipeline.safety import clean_stale_staging, ensure_inside, publish_dir, staging_dir, target_lock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = BuildResult(out)
    s2_items = search_s2(catalog, spec)
    if not s2_items:
        raise InputDataError(f"no item of {spec.collection!r} in the AOI {list(spec.bbox or []) or 'geometry'} and "
                             f"period {spec.period!r}; check --collection, --bbox/--aoi and --period")
    run_id = uuid.uuid4().hex[:8]
    for n, s2 in enumerate(s2_items, 1):
        stem = _stem(s2.id)
        final = ensure_inside(out, _pairs_dir(out) / stem)
        if (final / PAIR_JSON).is_file():
            res.existing.append(s2.id)
            continue
        with target_lock(out, stem):
            if (final / PAIR_JSON).is_file():  # another process finished it while we waited
                res.existing.append(s2.id)
                continue
            clean_stale_staging(out, stem)
            try:
                missing = [b for b in spec.bands if b not in s2.assets]
                if missing:
                    raise InputDataError(
                        f"S2 item {s2.id} has no assets {missing} (it has {sorted(s2.assets)}); pick --bands among "
                        "them, or a Sentinel-2 L2A collection")
                s1, signed, overlap = choose_sar(catalog, s2, spec)
                stage = staging_dir(out, stem, run_id)
                record = build_pair(s2, s1, signed, overlap, spec, stage)
                write_json_atomic(record, stage / PAIR_JSON)  # last: a folder with pair.json is complete
                final.parent.mkdir(parents=True, exist_ok=True)
                publish_dir(out, stage, final)
            except CatalogError:
                raise  # the catalog is down or refuses: not a property of this item
            except (InputDataError, ReadError, CloudfreeError) as exc:
                from cloudfree.pipeline.redact import redact

                reason = redact(str(exc))
                log.warning("skipped: %s", reason)
                res.skipped.append(Skipped(s2.id, reason))
                clean_stale_staging(out, stem)
                continue
        res.built.append(s2.id)
        log.info("pair %d/%d: %s + %s (%.1f h apart)", n, len(s2_items), s2.id, s1.id, signed * 24.0)
        if progress is not None:
            progress(s2.id, s1.id, signed)
    summary = summarise(out, res.skipped, spec, catalog_info)
    summary.update(built_now=len(res.built), existing=len(res.existing), searched_s2_items=len(s2_items))
    write_json_atomic(summary, out / SUMMARY)
    res.summary = summary
    if summary["pairs"] == 0:
        reasons = "\n  ".join(f"{s.id}: {s.reason}" for s in res.skipped)
        raise InputDataError(f"no S1+S2 pair could be built from {len(s2_items)} S2 item(s):\n  {reasons}")
    return res


def spec_from_args(*, collection: str, sar_collection: str, bbox=None, aoi=None, period=None, **kw: Any) -> PairSpec:
    """A :class:`PairSpec` from CLI-style arguments (``aoi``: a bbox list or a GeoJSON path)."""
    from cloudfree.stages.search import load_aoi

    b, g = load_aoi(list(bbox) if bbox else aoi)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None}
    return PairSpec(collection=collection, sar_collection=sar_collection, bbox=b, geometry=g, period=period, **kw)



# -- SEN12MS-CR-TS layout: `cloudfree train MODEL` reads the pairs with data.source: sen12ms-cr-ts -------------------
S2_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
TS_ROI = "cloudfree"


def _tile_name(grid_index: int, records: Sequence[dict[str, Any]]) -> str:
    import re

    mgrs = next((r["s2"].get("mgrs_tile") for r in records if r["s2"].get("mgrs_tile")), None)
    base = re.sub(r"[^A-Za-z0-9]", "", str(mgrs or "grid"))[:16] or "grid"
    return f"{base}g{grid_index}"


def _write_atomic_tif(path: Path, data: np.ndarray, dtype: str, transform, crs_wkt: str) -> None:
    import os

    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.part")
    try:
        with rasterio.open(tmp, "w", driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=data.shape[0],
                           dtype=dtype, crs=crs_wkt, transform=transform, compress="deflate") as ds:
            ds.write(data.astype(dtype))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _starts(n: int, p: int) -> list[int]:
    """Patch origins along an axis of ``n`` pixels: every ``p``, the last one moved back to end at the edge (it
    overlaps its neighbour) so that no pixel is left out."""
    out = list(range(0, n - p + 1, p))
    return out + [n - p] if out[-1] != n - p else out


def export_sen12ms_cr_ts(pairs_out: str | Path, dest: str | Path, patch: int = 256) -> dict[str, Any]:
    """Write the pairs under ``pairs_out`` in the SEN12MS-CR-TS layout at ``dest`` (read by
    :class:`cloudfree.pipeline.training.datasets.Sen12MSCRTS`: ``data.source: sen12ms-cr-ts``, ``data.path: dest``):
    ``<dest>/cloudfree/<tile>/{S1,S2}/<patch>/{s1,s2}_cloudfree_<tile>_ImgNo_<t>_<date>_patch_<patch>.tif``.

    One ``<tile>`` per grid (the pairs of one place, its dates numbered ``t`` in time order; one pair per day),
    cut into ``patch`` x ``patch`` patches covering it (the last row/column of patches overlaps its neighbour; a
    grid smaller than that is one patch). S2: the 13 bands of the layout
    as DN (reflectance x 10000, uint16, 0 = nodata) with **B10 all zeros** (L2A has no B10; the reader's cloud score
    then uses B01 alone for that term); S1: VV, VH in dB (float32). Needs pairs built with all 12 L2A bands (the
    default ``--bands``). The reader samples a cloudy target and a clearer truth per patch, so a grid needs at
    least 2 dates; grids with one are reported in ``single_date_grids``. Files are written atomically; a rerun
    rewrites them."""
    from cloudfree.pipeline.fileio import write_json_atomic

    pairs_out, dest = Path(pairs_out), Path(dest)
    records = [json.loads(f.read_text()) for f in sorted(_pairs_dir(pairs_out).glob(f"*/{PAIR_JSON}"))]
    if not records:
        raise InputDataError(f"no pairs under {pairs_out / PAIRS}; build them first (cloudfree train sar-pairs)")
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        g = r["grid"]
        by.setdefault((g["crs"], tuple(g["transform"]), tuple(g["shape"])), []).append(r)
    written, single = 0, []
    import rasterio
    from affine import Affine

    for gi, (key, rs) in enumerate(by.items()):
        tile = _tile_name(gi, rs)
        rs = sorted(rs, key=lambda r: r["s2"]["datetime"])
        days: dict[str, dict[str, Any]] = {}
        for r in rs:
            days.setdefault(r["s2"]["datetime"][:10], r)
        if len(days) < 2:
            single.append(tile)
        crs_wkt, tr, (ny, nx) = key[0], Affine(*key[1]), key[2]
        py, px = min(patch, ny), min(patch, nx)
        windows = [(y, x) for y in _starts(ny, py) for x in _starts(nx, px)]
        for t, (day, r) in enumerate(days.items()):
            missing = [b for b in S2_13 if b != "B10" and b not in r["bands"]]
            if missing:
                raise InputDataError(f"pair {r['s2']['id']} lacks bands {missing}; the SEN12MS-CR-TS layout has all "
                                     "13: rebuild the pairs with the default --bands")
            folder = _pairs_dir(pairs_out) / _stem(r["s2"]["id"])
            with rasterio.open(folder / r["files"]["s2"]) as ds:
                refl = ds.read()
            with rasterio.open(folder / r["files"]["s1"]) as ds:
                db = ds.read()
            dn = np.zeros((13, ny, nx), np.uint16)
            for i, b in enumerate(S2_13):
                if b != "B10":
                    v = refl[r["bands"].index(b)]
                    dn[i] = np.where(np.isfinite(v), np.clip(np.round(v * 10000.0), 1, 65535), 0)
            for k, (y, x) in enumerate(windows):
                wt = tr * Affine.translation(x, y)
                for kind, arr, dtype in (("s2", dn, "uint16"), ("s1", db[:2], "float32")):
                    name = f"{kind}_{TS_ROI}_{tile}_ImgNo_{t}_{day}_patch_{k}.tif"
                    _write_atomic_tif(dest / TS_ROI / tile / kind.upper() / str(k) / name,
                                      arr[:, y:y + py, x:x + px], dtype, wt, crs_wkt)
                    written += 1
    info = {"layout": "SEN12MS-CR-TS", "root": str(dest), "tiles": len(by), "files": written,
            "single_date_grids": single, "b10": "zeros (L2A has no B10)",
            "train_with": {"data": {"source": "sen12ms-cr-ts", "path": str(dest)}}}
    write_json_atomic(info, dest / "cloudfree-export.json")
    return info
