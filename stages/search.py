"""Search stage: pick cloudy targets and, for each, its best clear references (and Sentinel-1 if configured).

Minimal policy (eo:cloud_cover only); the catalogs issue extends it with pixel-level clear fractions, orbit/tile
matching and SAR ranking, keeping these names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pystac

from catalogs.base import Catalog, SearchQuery
from pipeline.config import SearchConfig
from pipeline.errors import NoItemsFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A reference (or SAR) candidate for one target, with why it was ranked where it is."""

    item: pystac.Item
    dt_days: float
    clear_fraction: float
    overlap: float = 1.0
    same_orbit: bool = False
    same_tile: bool = False
    score: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class TargetPlan:
    target: pystac.Item
    references: tuple[Candidate, ...]
    sar: tuple[Candidate, ...] = ()


def _aoi_bbox(search: SearchConfig) -> tuple[float, float, float, float] | None:
    if search.aoi is None:
        return None
    if isinstance(search.aoi, list):
        return tuple(search.aoi)  # type: ignore[return-value]
    import geopandas as gpd

    return tuple(gpd.read_file(search.aoi).to_crs(4326).total_bounds)  # type: ignore[return-value]


def _days(a: pystac.Item, b: pystac.Item) -> float:
    return (b.datetime - a.datetime).total_seconds() / 86400.0


def plan_targets(
    catalog: Catalog, search: SearchConfig, collection: str, sar_collection: str | None = None
) -> list[TargetPlan]:
    """Targets in the cloud-cover range (or the explicit ``search.targets``) and their ranked references."""
    bbox = _aoi_bbox(search)
    lo, hi = search.target_cloud_cover
    if search.targets:
        tq = SearchQuery(collections=(collection,), ids=tuple(search.targets), bbox=bbox)
    else:
        tq = SearchQuery(
            collections=(collection,), bbox=bbox, datetime=search.period,
            query={"eo:cloud_cover": {"gte": lo, "lte": hi}},
        )
    targets = catalog.search(tq)
    if not targets:
        raise NoItemsFoundError(
            f"catalog {getattr(catalog, 'url', catalog.name)!r}, collection {collection!r}: no target matched "
            f"({tq.describe()}); widen search.period / search.aoi or search.target_cloud_cover"
        )
    plans = []
    for t in targets:
        window = f"{(t.datetime - _td(search.max_days)).isoformat()}/{(t.datetime + _td(search.max_days)).isoformat()}"
        rq = SearchQuery(
            collections=(collection,), bbox=tuple(t.bbox) if t.bbox else bbox, datetime=window,
            query={"eo:cloud_cover": {"lte": search.reference_max_cloud_cover}},
        )
        cands = []
        for r in catalog.search(rq):
            if r.id == t.id:
                continue
            dt = _days(t, r)
            clear = 1.0 - float(r.properties.get("eo:cloud_cover", 100.0)) / 100.0
            same_tile = r.properties.get("s2:mgrs_tile") == t.properties.get("s2:mgrs_tile")
            score = clear - abs(dt) / max(search.max_days, 1.0) * 0.5 + (0.1 if same_tile else 0.0)
            cands.append(Candidate(r, dt, clear, same_tile=same_tile, score=score,
                                   reason=f"clear {clear:.0%}, {dt:+.0f} d"))
        cands.sort(key=lambda c: -c.score)
        plans.append(TargetPlan(t, tuple(cands[: search.max_references])))
        log.info("target %s: %d reference(s): %s", t.id, len(plans[-1].references),
                 ", ".join(c.item.id for c in plans[-1].references))
    return plans


def _td(days: float):
    from datetime import timedelta

    return timedelta(days=days)
