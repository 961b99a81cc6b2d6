"""Search stage: pick cloudy targets, rank clear references and the nearest Sentinel-1 scenes for each.

:func:`plan_targets` returns one :class:`TargetPlan` per target:

* targets: items of ``collection`` whose ``eo:cloud_cover`` lies in ``search.target_cloud_cover`` within the AOI
  and period, or exactly the ids in ``search.targets``;
* references: items of the same collection within ``search.max_days`` of the target with ``eo:cloud_cover`` at
  most ``search.reference_max_cloud_cover``, covering at least ``policy.min_overlap`` of the target footprint,
  ranked by the weighted score of :class:`~cloudfree.pipeline.config.SelectionPolicy` (temporal distance, clear fraction
  over the target's cloudy pixels, footprint overlap, same relative orbit, same MGRS tile); best first. With
  ``policy.bracket`` (default) the best-scored reference before the target and the best-scored one after it are
  always among the ``search.max_references`` kept when both sides have one (:func:`select_references`), so a
  temporal model interpolates instead of extrapolating; every candidate carries its signed ``offset_days``
  (the runner passes them to the model as ``TileInputs.reference_dt_days``). Validity stays per pixel: the
  load/mask stages give every reference its own cloud mask;
* sar: scenes of ``sar_collection`` (comma-separated ids allowed, e.g. ``"sentinel-1-rtc,sentinel-1-grd"``)
  within ``policy.sar_max_days``, RTC before GRD, then nearest in time; orbit direction and platform are recorded
  in the reason.

The clear fraction is a pluggable ``ClearFractionFn(target, reference) -> float``. The default,
:func:`clear_fraction_from_metadata`, uses the reference's ``eo:cloud_cover``; :func:`scl_clear_fraction` reads
the SCL assets of target and reference (when readable) and measures, over the target's cloudy pixels, the share
that is clear in the reference. The runner may pass any other estimator.

:func:`format_plans` (the text table ``cloudfree search`` prints), :func:`to_table`, :func:`write_plans` (JSON or GeoParquet) and :func:`read_plans` (JSON) keep plans for later runs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pystac

from cloudfree.catalogs.base import SearchQuery
from cloudfree.pipeline.errors import CatalogError, ConfigError, InputDataError, NoItemsFoundError

log = logging.getLogger(__name__)

ClearFractionFn = Callable[[pystac.Item, pystac.Item], float]

#: SCL classes counted as not clear: saturated/defective, dark area, cloud shadow, cloud medium/high, cirrus.
SCL_NOT_CLEAR = (0, 1, 3, 8, 9, 10)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One reference (or SAR scene) for a target, with the numbers it was ranked by (keyword-only: five of its
    fields are numbers or flags, unreadable by position)."""

    item: pystac.Item
    dt_days: float
    clear_fraction: float
    overlap: float
    same_orbit: bool
    same_tile: bool
    score: float
    reason: str
    #: signed days from the target to this item (negative = before the target).
    offset_days: float = 0.0


@dataclass(frozen=True)
class TargetPlan:
    target: pystac.Item
    references: tuple[Candidate, ...]
    sar: tuple[Candidate, ...]
    #: references dropped while processing (``{"id", "reason"}``: a read failed; see the runner).
    dropped: tuple[dict, ...] = ()


class Plans(list):
    """The plans of one search (a list of :class:`TargetPlan`) and ``skipped``: the catalog items the search could
    not use (malformed, duplicate ids), as :class:`cloudfree.catalogs.base.SkippedItem` (id, reason)."""

    def __init__(self, plans=(), skipped=()) -> None:
        super().__init__(plans)
        self.skipped = list(skipped)


# -- item facts --------------------------------------------------------------------------------------------------
def item_time(item: pystac.Item) -> datetime:
    dt = item.datetime or item.common_metadata.start_datetime
    if dt is None:
        raise InputDataError(f"item {item.id} has no datetime/start_datetime; it cannot be ranked in time")
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def relative_orbit(item: pystac.Item) -> int | None:
    for key in ("sat:relative_orbit", "sentinel:relative_orbit"):
        if item.properties.get(key) is not None:
            return int(item.properties[key])
    for text in (item.id, str(item.properties.get("s2:product_uri", "")),
                 str(item.properties.get("sentinel:product_id", ""))):
        m = re.search(r"_R(\d{3})_", text)
        if m:
            return int(m.group(1))
    return None


def mgrs_tile(item: pystac.Item) -> str | None:
    p = item.properties
    if p.get("s2:mgrs_tile"):
        return str(p["s2:mgrs_tile"]).lstrip("T")
    if p.get("mgrs:utm_zone") and p.get("mgrs:latitude_band") and p.get("mgrs:grid_square"):
        return f"{int(p['mgrs:utm_zone']):02d}{p['mgrs:latitude_band']}{p['mgrs:grid_square']}"
    if p.get("sentinel:utm_zone") and p.get("sentinel:latitude_band") and p.get("sentinel:grid_square"):
        return f"{int(p['sentinel:utm_zone']):02d}{p['sentinel:latitude_band']}{p['sentinel:grid_square']}"
    for text in (item.id, str(p.get("sentinel:product_id", "")), str(p.get("s2:product_uri", ""))):
        m = re.search(r"_T(\d{2}[A-Z]{3})(?:_|$)", text) or re.search(r"^S2[ABC]_(\d{2}[A-Z]{3})_", text)
        if m:
            return m.group(1)
    return None


def _shape(item: pystac.Item) -> Any:
    from shapely.geometry import box, shape

    if item.geometry:
        g = shape(item.geometry)
        return g if g.is_valid else g.buffer(0)
    if item.bbox:
        return box(*item.bbox)
    raise InputDataError(f"item {item.id} has neither geometry nor bbox")


def footprint_overlap(target: pystac.Item, other: pystac.Item) -> float:
    """Share of the target footprint (lon/lat, planar) covered by ``other``, in [0, 1]."""
    t = _shape(target)
    if t.area == 0:
        return 0.0
    return float(t.intersection(_shape(other)).area / t.area)


def is_rtc(item: pystac.Item) -> bool:
    return "rtc" in (item.collection_id or "").lower() or item.id.lower().endswith("_rtc")


# -- clear-fraction estimators ------------------------------------------------------------------------------------
def clear_fraction_from_metadata(target: pystac.Item, reference: pystac.Item) -> float:
    """1 - eo:cloud_cover / 100 of the reference (scene-wide; does not look at where the target is cloudy)."""
    cc = reference.properties.get("eo:cloud_cover")
    if cc is None:
        raise InputDataError(f"reference {reference.id} has no eo:cloud_cover; pass a pixel-based clear-fraction "
                             "estimator (stages.search.scl_clear_fraction) to plan_targets")
    return max(0.0, min(1.0, 1.0 - float(cc) / 100.0))


def scl_clear_fraction(
    target: pystac.Item,
    reference: pystac.Item,
    *,
    size: int = 256,
    not_clear: Sequence[int] = SCL_NOT_CLEAR,
    fallback: ClearFractionFn | None = clear_fraction_from_metadata,
    href: Callable[[pystac.Item, str], str] | None = None,
) -> float:
    """Share of the target's cloudy pixels (SCL) that are clear in the reference (SCL), on a ``size`` x ``size``
    grid over the two footprints' overlap in EPSG:4326 (nearest resampling; overviews make this cheap on COGs).

    ``href(item, asset_key)`` may sign / localise the href (e.g. ``PlanetaryComputerCatalog.sign_href``). When an
    SCL asset is missing or unreadable, ``fallback`` is used (None: raise :class:`InputDataError`).
    """
    import numpy as np
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.transform import from_bounds
    from rasterio.warp import reproject

    from cloudfree.catalogs.access import readable_href
    from cloudfree.catalogs.bands import asset_key

    inter = _shape(target).intersection(_shape(reference))
    try:
        if inter.is_empty:
            raise InputDataError(f"reference {reference.id} does not overlap target {target.id}")
        grids = []
        bounds = inter.bounds
        dst_transform = from_bounds(*bounds, size, size)
        for it in (target, reference):
            key = asset_key(it, "SCL")
            if key is None:
                raise InputDataError(f"item {it.id} has no SCL asset")
            # default: the loader's href (policy-checked, signed where the catalog signs; absolute local paths kept
            # as they are: pystac joins even those onto an s3:// self link)
            url = href(it, key) if href else readable_href(it, key)
            dst = np.zeros((size, size), dtype=np.uint8)
            with rasterio.open(url) as src:
                reproject(rasterio.band(src, 1), dst, dst_transform=dst_transform, dst_crs=CRS.from_epsg(4326),
                          resampling=Resampling.nearest, dst_nodata=0)
            grids.append(dst)
        t_scl, r_scl = grids
        valid = (t_scl > 0) & (r_scl > 0)
        cloudy = valid & np.isin(t_scl, not_clear)
        if not cloudy.any():
            # no cloudy target pixel in the overlap: judge the reference on the whole overlap instead
            cloudy = valid
        if not cloudy.any():
            raise InputDataError(f"no valid SCL pixels where {target.id} and {reference.id} overlap")
        return float((~np.isin(r_scl[cloudy], not_clear)).mean())
    except (InputDataError, RasterioError, OSError) as exc:
        if fallback is None:
            raise InputDataError(f"pixel-level clear fraction of {reference.id} over {target.id} failed: {exc}") from exc
        log.info("SCL clear fraction unavailable for %s over %s (%s); falling back", reference.id, target.id, exc)
        return fallback(target, reference)


# -- planning ------------------------------------------------------------------------------------------------------
def load_aoi(aoi: Any) -> tuple[tuple[float, float, float, float] | None, dict[str, Any] | None]:
    """``search.aoi`` -> (bbox, geometry): a bbox list, a GeoJSON file (Feature/FeatureCollection/geometry), None."""
    if aoi is None:
        return None, None
    if isinstance(aoi, (list, tuple)):
        return tuple(float(v) for v in aoi), None  # type: ignore[return-value]
    from shapely.geometry import mapping
    from shapely.ops import unary_union

    p = Path(aoi)
    if not p.exists():
        raise ConfigError(f"search.aoi file {p} does not exist; give a GeoJSON file or [minx, miny, maxx, maxy]")
    try:
        gj = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"search.aoi file {p} is not valid JSON: {exc}") from None
    geom = unary_union([_aoi_shape(g, p, i) for i, g in enumerate(_aoi_geometries(gj, p))])
    if geom.is_empty:
        raise ConfigError(f"search.aoi file {p} holds no geometry")
    return None, mapping(geom)


def _aoi_geometries(gj: Any, p: Path) -> list[dict[str, Any]]:
    """The geometries of an AOI GeoJSON (FeatureCollection, Feature or geometry), each checked to exist."""
    if not isinstance(gj, dict):
        raise ConfigError(f"search.aoi file {p} must hold a GeoJSON object, got {type(gj).__name__}")
    kind = gj.get("type")
    if kind == "FeatureCollection":
        feats = gj.get("features") or []
        if not feats:
            raise ConfigError(f"search.aoi file {p}: the FeatureCollection has no features; add a Polygon feature")
    elif kind == "Feature":
        feats = [gj]
    elif kind in ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "MultiPoint", "LineString",
                  "MultiLineString"):
        return [gj]
    else:
        raise ConfigError(f"search.aoi file {p}: GeoJSON type {kind!r} is not a FeatureCollection, Feature or "
                          "geometry; write a Polygon")
    out = []
    for i, f in enumerate(feats):
        g = f.get("geometry") if isinstance(f, dict) else None
        if not isinstance(g, dict) or "type" not in g:
            raise ConfigError(f"search.aoi file {p}: feature {i} has no geometry (got {g!r}); give each feature a "
                              "Polygon geometry")
        out.append(g)
    return out


def _aoi_shape(g: dict[str, Any], p: Path, i: int) -> Any:
    """A shapely geometry from AOI geometry ``i``; unclosed or invalid polygon rings are config errors (RFC 7946
    rings repeat their first position at the end; shapely would close them silently)."""
    from shapely.geometry import shape

    rings = []
    if g.get("type") == "Polygon":
        rings = list(g.get("coordinates") or [])
    elif g.get("type") == "MultiPolygon":
        rings = [r for poly in (g.get("coordinates") or []) for r in poly]
    for r in rings:
        if len(r) < 4 or list(r[0]) != list(r[-1]):
            raise ConfigError(f"search.aoi file {p}: geometry {i} has an unclosed or too short ring (first position "
                              f"{r[0] if r else None}, last {r[-1] if r else None}, {len(r)} positions); repeat the "
                              "first position at the end (RFC 7946) and give at least 4 positions")
    try:
        shp = shape(g)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ConfigError(f"search.aoi file {p}: geometry {i} is not valid GeoJSON: {exc}") from None
    if not shp.is_valid:
        from shapely.validation import explain_validity

        raise ConfigError(f"search.aoi file {p}: geometry {i} is invalid ({explain_validity(shp)}); fix it (e.g. "
                          "shapely make_valid) before running")
    return shp


def _score(policy: Any, dt_days: float, clear: float, overlap: float, same_orbit: bool, same_tile: bool) -> float:
    w = (policy.w_time, policy.w_clear, policy.w_overlap, policy.w_same_orbit, policy.w_same_tile)
    terms = (math.exp(-dt_days / policy.time_scale_days), clear, overlap, float(same_orbit), float(same_tile))
    return sum(a * b for a, b in zip(w, terms)) / sum(w)


def _window(t: datetime, days: float) -> str:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return f"{(t - timedelta(days=days)).strftime(fmt)}/{(t + timedelta(days=days)).strftime(fmt)}"


def _targets(catalog: Any, cfg: Any, collection: str, bbox: Any, geom: Any) -> list[pystac.Item]:
    if cfg.targets:
        # allow_empty: an unknown id is reported as such below, not as an empty period
        items = catalog.search(SearchQuery(collections=(collection,), ids=tuple(cfg.targets), allow_empty=True))
        missing = sorted(set(cfg.targets) - {it.id for it in items})
        if missing:
            skipped = {s.id: s.reason for s in getattr(catalog, "skipped", ())}
            why = "; ".join(f"{m!r} was skipped: {skipped[m]}" for m in missing if m in skipped)
            raise NoItemsFoundError(f"target id(s) {missing} are not in collection {collection!r} of catalog "
                                    f"{getattr(catalog, 'url', catalog.name)}" + (f" ({why})" if why else "")
                                    + "; check the id (`cloudfree search` lists the targets) or search.targets")
        return items
    lo, hi = cfg.target_cloud_cover
    q = SearchQuery(collections=(collection,), bbox=bbox, intersects=geom, datetime=cfg.period,
                    query={"eo:cloud_cover": {"gte": lo, "lte": hi}})
    return catalog.search(q)


def plan_targets(
    catalog: Any,
    search_cfg: Any,
    collection: str,
    sar_collection: str | None = None,
    *,
    clear_fraction: ClearFractionFn | None = None,
) -> list[TargetPlan]:
    """Plans (target, ranked references, SAR) for the AOI / period / targets of ``search_cfg``.

    Raises :class:`~cloudfree.pipeline.errors.NoItemsFoundError` when no target matches; a target without references or
    SAR gets empty tuples (and a log line), since the model may still work from the target alone.
    """
    plans = _plan_targets(catalog, search_cfg, collection, sar_collection, clear_fraction=clear_fraction)
    return Plans(plans, getattr(catalog, "skipped", ()))


def _plan_targets(catalog: Any, search_cfg: Any, collection: str, sar_collection: str | None,
                  clear_fraction: ClearFractionFn | None) -> list[TargetPlan]:
    policy = search_cfg.policy
    estimate = clear_fraction or (scl_clear_fraction if policy.clear_fraction == "scl" else clear_fraction_from_metadata)
    bbox, geom = load_aoi(search_cfg.aoi)
    targets = _targets(catalog, search_cfg, collection, bbox, geom)
    targets.sort(key=lambda it: (item_time(it), it.id))
    plans = []
    for target in targets:
        t0 = item_time(target)
        refs = catalog.search(SearchQuery(
            collections=(collection,), intersects=target.geometry, bbox=None if target.geometry else target.bbox,
            datetime=_window(t0, search_cfg.max_days),
            query={"eo:cloud_cover": {"lte": search_cfg.reference_max_cloud_cover}}, allow_empty=True,
        ))
        t_orbit, t_tile = relative_orbit(target), mgrs_tile(target)
        cands = []
        for ref in refs:
            if ref.id == target.id:
                continue
            if ref.properties.get("cloudfree:status") == "unrestored":
                continue  # a cloudfree output that could not be restored is cloudy, whatever its other fields say
            signed = (item_time(ref) - t0).total_seconds() / 86400.0
            dt = abs(signed)
            if dt > search_cfg.max_days:
                continue
            ov = footprint_overlap(target, ref)
            if ov < policy.min_overlap:
                continue
            cf = float(estimate(target, ref))
            if cf < policy.min_clear_fraction:
                continue
            so = t_orbit is not None and relative_orbit(ref) == t_orbit
            st = t_tile is not None and mgrs_tile(ref) == t_tile
            score = _score(policy, dt, cf, ov, so, st)
            reason = (f"dt={dt:.1f} d, clear={cf:.2f}, overlap={ov:.2f}, "
                      f"{'same' if so else 'other'} orbit, {'same' if st else 'other'} tile")
            cands.append(Candidate(item=ref, dt_days=dt, clear_fraction=cf, overlap=ov, same_orbit=so,
                                   same_tile=st, score=score, reason=reason, offset_days=signed))
        cands.sort(key=lambda c: (-c.score, c.dt_days, c.item.id))
        references = select_references(cands, search_cfg.max_references, getattr(policy, "bracket", False))
        sar = _sar(catalog, target, sar_collection, policy) if sar_collection else ()
        if not references:
            log.warning("target %s: no reference within %s d with eo:cloud_cover <= %s and overlap >= %s",
                        target.id, search_cfg.max_days, search_cfg.reference_max_cloud_cover, policy.min_overlap)
        plans.append(TargetPlan(target, references, sar))
    return plans


def select_references(ranked: Sequence[Candidate], n: int, bracket: bool = True) -> tuple[Candidate, ...]:
    """The ``n`` references to keep from ``ranked`` (best score first). With ``bracket``, the best-scored candidate
    before the target and the best-scored one after it are kept whenever both sides have one (a temporal model
    then interpolates instead of extrapolating); the remaining places go by score. Order stays by score."""
    if n <= 0 or not ranked:
        return ()
    chosen: list[Candidate] = []
    if bracket and n >= 2:
        before = next((c for c in ranked if c.offset_days < 0), None)
        after = next((c for c in ranked if c.offset_days > 0), None)
        if before is not None and after is not None:
            chosen = [before, after]
    for c in ranked:
        if len(chosen) >= n:
            break
        if c not in chosen:
            chosen.append(c)
    order = {id(c): i for i, c in enumerate(ranked)}
    return tuple(sorted(chosen, key=lambda c: order[id(c)]))


def _sar(catalog: Any, target: pystac.Item, sar_collection: str, policy: Any) -> tuple[Candidate, ...]:
    if policy.max_sar == 0:
        return ()
    t0 = item_time(target)
    cols = tuple(c.strip() for c in sar_collection.split(",") if c.strip())
    try:
        scenes = catalog.search(SearchQuery(collections=cols, intersects=target.geometry,
                                            bbox=None if target.geometry else target.bbox,
                                            datetime=_window(t0, policy.sar_max_days), allow_empty=True))
    except CatalogError as exc:
        log.warning("target %s: SAR search in %s failed: %s", target.id, cols, exc)
        return ()
    cands = []
    for s in scenes:
        signed = (item_time(s) - t0).total_seconds() / 86400.0
        dt = abs(signed)
        ov = footprint_overlap(target, s)
        if dt > policy.sar_max_days or ov < policy.sar_min_overlap:
            continue
        rtc = is_rtc(s)
        score = 0.5 * math.exp(-dt / max(policy.sar_max_days, 1e-6)) + 0.25 * ov + 0.25 * float(rtc)
        reason = (f"{'RTC' if rtc else 'GRD'}, dt={dt * 24:.1f} h, overlap={ov:.2f}, "
                  f"orbit={s.properties.get('sat:orbit_state', '?')}, platform={s.properties.get('platform', '?')}, "
                  f"relative orbit {relative_orbit(s)}")
        cands.append(Candidate(item=s, dt_days=dt, clear_fraction=float("nan"), overlap=ov, same_orbit=False,
                               same_tile=False, score=score, reason=reason, offset_days=signed))
    cands.sort(key=lambda c: (not is_rtc(c.item), c.dt_days, -c.overlap, c.item.id))
    return tuple(cands[: policy.max_sar])


# -- persistence ---------------------------------------------------------------------------------------------------
def _cand_record(c: Candidate) -> dict[str, Any]:
    return {"dt_days": c.dt_days, "offset_days": c.offset_days, "clear_fraction": None if math.isnan(c.clear_fraction) else c.clear_fraction,
            "overlap": c.overlap, "same_orbit": c.same_orbit, "same_tile": c.same_tile, "score": c.score,
            "reason": c.reason, "item": c.item.to_dict(transform_hrefs=False)}


def plans_to_json(plans: Sequence[TargetPlan]) -> dict[str, Any]:
    """A JSON document holding the full items, so a later run can use the plans without searching again; the items
    the search skipped (malformed, duplicate) are listed with their reason under ``skipped``."""
    return {"type": "cloudfree:plans", "version": 1, "plans": [
        {"target": p.target.to_dict(transform_hrefs=False), "references": [_cand_record(c) for c in p.references],
         "sar": [_cand_record(c) for c in p.sar]} for p in plans],
        "skipped": [s.as_dict() for s in getattr(plans, "skipped", ())]}


def plans_from_json(doc: dict[str, Any]) -> list[TargetPlan]:
    if doc.get("type") != "cloudfree:plans":
        raise InputDataError(f"not a cloudfree plans document (type={doc.get('type')!r}); write it with write_plans")

    def cand(r: dict[str, Any], target: pystac.Item) -> Candidate:
        cf = r["clear_fraction"]
        item = pystac.Item.from_dict(r["item"])
        offset = r.get("offset_days")
        if offset is None:  # plans written before offsets were recorded: recompute from the dates
            offset = (item_time(item) - item_time(target)).total_seconds() / 86400.0
        return Candidate(item=item, dt_days=r["dt_days"], clear_fraction=float("nan") if cf is None else cf,
                         overlap=r["overlap"], same_orbit=r["same_orbit"], same_tile=r["same_tile"], score=r["score"],
                         reason=r["reason"], offset_days=float(offset))

    from cloudfree.catalogs.base import SkippedItem

    out = []
    for p in doc["plans"]:
        target = pystac.Item.from_dict(p["target"])
        out.append(TargetPlan(target, tuple(cand(r, target) for r in p["references"]),
                              tuple(cand(r, target) for r in p["sar"])))
    return Plans(out, [SkippedItem(s["id"], s["reason"]) for s in doc.get("skipped", [])])


def format_plans(plans: list[Any]) -> str:
    """A plain-text table: one line per target, its references and SAR indented below it."""
    lines = [f"{'role':<10} {'item':<70} {'date':<16} {'cc %':>6} {'dt d':>6} {'clear':>5} {'ovl':>4} {'score':>5}"]
    for p in plans:
        t = p.target
        cc = t.properties.get("eo:cloud_cover")
        lines.append(f"{'TARGET':<10} {t.id[:70]:<70} {item_time(t):%Y-%m-%d %H:%M} "
                     f"{'' if cc is None else f'{cc:6.1f}':>6}")
        for role, cands in (("ref", p.references), ("sar", p.sar)):
            for i, c in enumerate(cands, 1):
                it = c.item
                cc = it.properties.get("eo:cloud_cover")
                clear = "" if c.clear_fraction != c.clear_fraction else f"{c.clear_fraction:5.2f}"
                lines.append(f"  {role + str(i):<8} {it.id[:70]:<70} {item_time(it):%Y-%m-%d %H:%M} "
                             f"{'' if cc is None else f'{cc:6.1f}':>6} {c.offset_days:+6.1f} {clear:>5} {c.overlap:4.2f} "
                             f"{c.score:5.2f}  {c.reason}")
        if not p.references:
            lines.append("  (no reference)")
        if not p.sar:
            lines.append("  (no SAR)")
    for s in getattr(plans, "skipped", ()):
        lines.append(f"{'SKIPPED':<10} {s.id[:70]:<70} {s.reason}")
    # item ids, reasons and platforms come from the catalog: control characters escaped, one line per row
    from cloudfree.pipeline.redact import printable

    return "\n".join(printable(line) for line in lines)


def to_table(plans: Sequence[TargetPlan]) -> Any:
    """A GeoDataFrame, one row per (target, role, rank); role "target" rows have rank 0. Geometry: the row's item
    footprint, EPSG:4326."""
    import geopandas as gpd

    rows = []
    for p in plans:
        t = p.target
        base = {"target_id": t.id, "target_datetime": item_time(t).isoformat(),
                "target_cloud_cover": t.properties.get("eo:cloud_cover")}
        rows.append({**base, "role": "target", "rank": 0, "item_id": t.id, "collection": t.collection_id,
                     "datetime": item_time(t).isoformat(), "dt_days": 0.0, "clear_fraction": None, "overlap": 1.0,
                     "same_orbit": True, "same_tile": True, "score": None, "reason": "target",
                     "orbit_state": t.properties.get("sat:orbit_state"), "platform": t.properties.get("platform"),
                     "geometry": _shape(t)})
        for role, cands in (("reference", p.references), ("sar", p.sar)):
            for rank, c in enumerate(cands, 1):
                it = c.item
                rows.append({**base, "role": role, "rank": rank, "item_id": it.id, "collection": it.collection_id,
                             "datetime": item_time(it).isoformat(), "dt_days": c.dt_days,
                             "clear_fraction": None if math.isnan(c.clear_fraction) else c.clear_fraction,
                             "overlap": c.overlap, "same_orbit": c.same_orbit, "same_tile": c.same_tile,
                             "score": c.score, "reason": c.reason,
                             "orbit_state": it.properties.get("sat:orbit_state"),
                             "platform": it.properties.get("platform"), "geometry": _shape(it)})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")


def write_plans(plans: Sequence[TargetPlan], path: str | Path, fmt: str | None = None) -> Path:
    """Write plans as JSON (``.json``, full items, re-readable with :func:`read_plans`) or GeoParquet
    (``.parquet``/``.geoparquet``, the :func:`to_table` rows)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(plans_to_json(plans), indent=1, default=str))
    elif fmt in ("parquet", "geoparquet"):
        to_table(plans).to_parquet(path)
    else:
        raise ConfigError(f"unknown plans format {fmt!r} for {path}; use .json or .parquet")
    return path


def read_plans(path: str | Path) -> list[TargetPlan]:
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ConfigError(f"read_plans reads the JSON form only (got {path}); GeoParquet plans hold ids, not items")
    return plans_from_json(json.loads(path.read_text()))
