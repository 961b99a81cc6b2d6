"""The REAL multi-date evaluation: ``s2-l2a-stack-romania-nrt`` (140 real S2 L2A dates of one 1 km2 forest
footprint, EPSG:3035, SCL per date), run through the real catalog path.

Everything is read as ``cloudfree run`` reads it: the static STAC catalog is opened by
:func:`cloudfree.catalogs.base.open_catalog` (``kind: local``), reflectance and SCL are loaded by
:func:`cloudfree.stages.load.load_reflectance` / :func:`cloudfree.stages.load.load_layer` (odc-stac) onto the target's native grid
(:func:`cloudfree.stages.load.output_geobox`), references are chosen by :func:`cloudfree.stages.search.plan_targets` with the
configured policy (bracketing dates, ``search.max_references``, ``search.max_days``), and the model's cloud mask
and probability come from SCL exactly as the mask stage builds them (:func:`cloudfree.stages.masks.scl_kernel`, classes
3/8/9/10, dilation 2; probability 1 for SCL 8/9, 0.5 for 10). Two sets:

* ``romania-hidden`` (:data:`ROMANIA_HIDDEN`): a REAL clear date (the truth) hidden behind the REAL cloud of
  another, cloudy date (the mask donor; 16 targets, 16 different donors). The donor's cloud is transplanted
  by the imaging model of PhyVLM-CR (eq. 1): per pixel of the donor's SCL cloud (8/9/10), the transmission ``t``
  is estimated from the donor against its own clear-sky estimate ``J_n`` (linear in time between the donor's
  nearest clear dates) by eq. 5, ``t = (I - A).(J_n - A) / |J_n - A|^2`` clipped to [0, 1], with ``A`` the
  per-band median of the donor's brightest 5 % SCL-8/9 pixels (the simulation's cloud albedo when it has fewer
  than 20); on SCL shadow (3) a multiplicative factor ``s = I.J_n / |J_n|^2``. The hidden target is
  ``truth * s * t + A (1 - t)``. So the cloud's shape, extent, opacity and the mask are real, the cloudy radiance
  is RE-SYNTHESISED from them (labelled so in every report). Regions: thin ``0.1 <= t < 0.95``, thick
  ``t < 0.1``, cloudy = thin | thick | ``s < 0.95``. Each case records the gap (days) to its nearest
  reference and the span of the references bracketing it.
* ``romania-real`` (:data:`ROMANIA_REAL_CLOUDY`): REAL cloudy dates with their own SCL mask, scored against a
  PROXY truth, the linear-in-time interpolation of their nearest clear dates before and after (those two dates
  are withheld from the references). Cloudy = SCL 3/8/9/10, thin = SCL 8 (medium probability) and 10 (cirrus),
  thick = SCL 9. SCL misses some cloud (see the data README), so this proxy is noisy; it scores real cloud
  radiance, which the hidden set re-synthesises.

:data:`ROMANIA_EVAL_DATES` (every target date of both sets) is held out: **training data for learned models must
exclude these dates** (import the constant; :data:`ROMANIA_MASK_DATES` lists the donors, whose clouds are reused
as masks).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cloudfree.pipeline.errors import InputDataError

log = logging.getLogger(__name__)

ROMANIA_BANDS = ("B02", "B03", "B04", "B08", "B8A", "B11")
from cloudfree.pipeline.holdout import (  # noqa: E402,F401  (the case dates live in one data module)
    ROMANIA_COLLECTION,
    ROMANIA_FOLDER,
    ROMANIA_EVAL_DATES,
    ROMANIA_HIDDEN,
    ROMANIA_MASK_DATES,
    ROMANIA_REAL_CLOUDY,
    ROMANIA_REAL_TRUTH_DATES,
)

#: SCL classes: cloud (medium, high, cirrus), shadow, snow; "clear" = none of 3/8/9/10/11.
SCL_CLOUD, SCL_SHADOW, SCL_NOT_CLEAR = (8, 9, 10), 3, (3, 8, 9, 10, 11)
#: a date is clear when at most this share of its pixels is SCL 3/8/9/10/11.
CLEAR_MAX_FRACTION = 0.005


def item_id(day: str) -> str:
    return f"S2_ROMANIA_{day.replace('-', '')}"


@dataclass
class RomaniaStack:
    """The whole stack loaded through the catalog path: items sorted by date, ``(time, band, y, x)`` reflectance,
    ``(time, y, x)`` SCL, the catalog and the grid."""

    catalog: Any
    items: list
    refl: np.ndarray
    scl: np.ndarray
    dates: list[dt.date]
    index: dict[str, int]

    def clear(self) -> np.ndarray:
        bad = np.isin(np.nan_to_num(self.scl, nan=0).astype(np.int16), SCL_NOT_CLEAR) | ~np.isfinite(self.refl).all(1)
        return bad.mean(axis=(1, 2)) <= CLEAR_MAX_FRACTION


def stac_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    for cand in (d / ROMANIA_FOLDER / "stac", d / "stac", d):
        if (cand / "catalog.json").exists():
            return cand
    raise InputDataError(f"Romania stack: no stac/catalog.json under {d}; pass the shared data folder (holding "
                         f"{ROMANIA_FOLDER}/) as --data-dir")


def load_stack(data_dir: str | Path, bands: Sequence[str] = ROMANIA_BANDS) -> RomaniaStack:
    """Open the static catalog and load every date (reflectance + SCL) on the native 10 m grid."""
    from cloudfree.catalogs.base import SearchQuery, open_catalog
    from cloudfree.pipeline.config import CatalogConfig, GridConfig
    from cloudfree.stages.load import load_layer, load_reflectance, output_geobox

    cat = open_catalog(CatalogConfig(kind="local", url=str(stac_dir(data_dir) / "catalog.json"),
                                     collection=ROMANIA_COLLECTION))
    items = sorted(cat.search(SearchQuery(collections=(ROMANIA_COLLECTION,))), key=lambda i: (i.datetime, i.id))
    geobox = output_geobox(items[0], GridConfig(resolution=10.0, bands=list(bands)))
    refl = load_reflectance(items, list(bands), geobox, name="romania").compute().values.astype(np.float32)
    scl_da = load_layer(items, "SCL", geobox)
    if scl_da is None:
        raise InputDataError("Romania stack: items carry no SCL asset; rebuild the catalog with make_catalog.py")
    scl = scl_da.compute().values
    dates = [i.datetime.date() for i in items]
    return RomaniaStack(cat, items, refl, scl, dates, {i.id: k for k, i in enumerate(items)})


def scl_mask_and_prob(scl: np.ndarray, dilation: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The mask stage's SCL mask (classes 3/8/9/10, dilated) and probability (1 for 8/9, 0.5 for 10)."""
    from cloudfree.stages.masks import scl_kernel

    mask = scl_kernel(scl, [3, 8, 9, 10], dilation)
    s = np.nan_to_num(scl, nan=0).astype(np.int16)
    prob = np.where(np.isin(s, (8, 9)), 1.0, np.where(s == 10, 0.5, 0.0)).astype(np.float32)
    return mask, prob


def _neighbours(stack: RomaniaStack, k: int, clear: np.ndarray, exclude: set[int] = frozenset(),
                one_sided: bool = False) -> tuple[int, int]:
    """Nearest clear dates before and after date ``k`` (with ``one_sided``, the nearest on the side that has one
    stands in for a missing side)."""
    pool = [j for j in np.flatnonzero(clear) if j != k and j not in exclude]
    before = [j for j in pool if stack.dates[j] < stack.dates[k]]
    after = [j for j in pool if stack.dates[j] > stack.dates[k]]
    if one_sided and (before or after):
        return (before or after[:1])[-1], (after or before[-1:])[0]
    if not before or not after:
        raise InputDataError(f"Romania stack: {stack.items[k].id} has no clear date on both sides")
    return before[-1], after[0]


def _interp(stack: RomaniaStack, k: int, b: int, a: int) -> np.ndarray:
    if a == b:
        return stack.refl[b].astype(np.float32)
    db, da = (stack.dates[k] - stack.dates[b]).days, (stack.dates[a] - stack.dates[k]).days
    w = db / (db + da)
    return ((1 - w) * stack.refl[b] + w * stack.refl[a]).astype(np.float32)


def transplant(truth: np.ndarray, donor: np.ndarray, donor_clear: np.ndarray, donor_scl: np.ndarray,
               bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The donor's real cloud on ``truth`` by eq. 1 (module docstring). Returns hidden target, ``t``, ``s``, ``A``."""
    from cloudfree.pipeline.evaluation.simulate import CLOUD_ALBEDO

    s_cls = np.nan_to_num(donor_scl, nan=0).astype(np.int16)
    cloud = np.isin(s_cls, SCL_CLOUD)
    shadow = s_cls == SCL_SHADOW
    a = np.array([CLOUD_ALBEDO.get(b, 0.8) for b in bands], np.float32)
    thick_cls = np.isin(s_cls, (8, 9)) & np.isfinite(donor).all(axis=0)
    if thick_cls.sum() >= 20:
        v = donor[:3].mean(axis=0)
        top = thick_cls & (v >= np.percentile(v[thick_cls], 95))
        a = np.median(donor[:, top], axis=1).astype(np.float32)
    di, dj = donor - a[:, None, None], donor_clear - a[:, None, None]
    t = np.clip((di * dj).sum(0) / np.maximum((dj * dj).sum(0), 1e-6), 0.0, 1.0)
    t = np.where(cloud, t, 1.0).astype(np.float32)
    s = np.clip((donor * donor_clear).sum(0) / np.maximum((donor_clear ** 2).sum(0), 1e-6), 0.0, 1.0)
    s = np.where(shadow & ~cloud, s, 1.0).astype(np.float32)
    hidden = (truth * (s * t)[None] + a[:, None, None] * (1 - t)[None]).astype(np.float32)
    return hidden, t, s, a


def _plan_references(stack: RomaniaStack, target_id: str, search_cfg: Any, exclude: set[str] = frozenset()):
    """The references :func:`cloudfree.stages.search.plan_targets` picks for ``target_id`` (minus ``exclude``)."""
    from cloudfree.stages.search import plan_targets, select_references

    n = search_cfg.max_references
    cfg = search_cfg.model_copy(update={"targets": [target_id], "max_references": n + len(exclude)})
    plan = plan_targets(stack.catalog, cfg, ROMANIA_COLLECTION)[0]
    kept = [c for c in plan.references if c.item.id not in exclude]
    return select_references(kept, n, search_cfg.policy.bracket)


def _case(stack: RomaniaStack, name: str, group: str, k_target: int, target: np.ndarray, truth: np.ndarray,
          cloud_mask: np.ndarray, cloud_prob: np.ndarray, regions: dict, refs, notes: str, meta: dict):
    from cloudfree.pipeline.evaluation.cases import EvalCase

    idx = [stack.index[c.item.id] for c in refs]
    rmask = np.stack([scl_mask_and_prob(stack.scl[j])[0] | ~np.isfinite(stack.refl[j]).all(0) for j in idx]) \
        if idx else np.zeros((0,) + cloud_mask.shape, bool)
    references = stack.refl[idx] if idx else np.zeros((0,) + target.shape, np.float32)
    offsets = tuple(float(c.offset_days) for c in refs)
    clear_dt = [abs(o) for o, j in zip(offsets, idx) if not rmask[idx.index(j)][regions["cloudy"]].all()]
    before = [-o for o in offsets if o < 0]
    after = [o for o in offsets if o > 0]
    meta = {**meta, "target_date": str(stack.dates[k_target]), "references": [c.item.id for c in refs],
            "reference_dt_days": list(offsets), "gap_days": min(clear_dt) if clear_dt else float("nan"),
            "bracket_span_days": (min(before) + min(after)) if before and after else float("nan")}
    return EvalCase(
        name=name, group=group, bands=ROMANIA_BANDS, target=target, truth=truth, references=references,
        reference_masks=rmask, cloud_mask=cloud_mask, cloud_prob=cloud_prob, regions=regions,
        reference_dt_days=offsets, notes=notes, simulated=False, meta=meta,
    )


def romania_hidden_cases(stack: RomaniaStack, search_cfg: Any,
                         pairs: Sequence[tuple[str, str]] = ROMANIA_HIDDEN) -> list:
    """One case per (clear target, donor) pair of :data:`ROMANIA_HIDDEN`."""
    clear = stack.clear()
    cases = []
    for day, donor_day in pairs:
        kt, kd = stack.index.get(item_id(day)), stack.index.get(item_id(donor_day))
        if kt is None or kd is None:
            raise InputDataError(f"Romania stack: {item_id(day)} or {item_id(donor_day)} not in the catalog")
        if not clear[kt]:
            raise InputDataError(f"Romania stack: evaluation target {item_id(day)} is not clear by SCL")
        b, a = _neighbours(stack, kd, clear, {kt}, one_sided=True)
        donor_clear = _interp(stack, kd, b, a)
        truth = stack.refl[kt]
        hidden, t, s, a_light = transplant(truth, stack.refl[kd], donor_clear, stack.scl[kd], ROMANIA_BANDS)
        mask, prob = scl_mask_and_prob(stack.scl[kd])
        thin, thick = (t >= 0.1) & (t < 0.95), t < 0.1
        regions = {"overall": np.ones_like(mask), "cloudy": thin | thick | (s < 0.95), "thin": thin, "thick": thick}
        refs = _plan_references(stack, item_id(day), search_cfg)
        cases.append(_case(
            stack, f"romania-{day}-mask-{donor_day}", "romania-hidden", kt, hidden, truth, mask, prob, regions,
            refs, f"REAL clear date {day} hidden behind the REAL cloud of {donor_day} (mask, extent and opacity "
            "real; cloudy radiance RE-SYNTHESISED by eq. 1)",
            {"donor": item_id(donor_day), "A": a_light.tolist(), "cloud_fraction": float(regions["cloudy"].mean())},
        ))
    return cases


def romania_real_cases(stack: RomaniaStack, search_cfg: Any, days: Sequence[str] = ROMANIA_REAL_CLOUDY) -> list:
    """Real cloudy dates scored against the interpolation of their nearest clear dates (withheld as references)."""
    clear = stack.clear()
    cases = []
    for day in days:
        k = stack.index.get(item_id(day))
        if k is None:
            raise InputDataError(f"Romania stack: {item_id(day)} not in the catalog")
        b, a = _neighbours(stack, k, clear)
        truth = _interp(stack, k, b, a)
        s_cls = np.nan_to_num(stack.scl[k], nan=0).astype(np.int16)
        mask, prob = scl_mask_and_prob(stack.scl[k])
        regions = {"overall": np.ones_like(mask), "cloudy": np.isin(s_cls, (3, 8, 9, 10)),
                   "thin": np.isin(s_cls, (8, 10)), "thick": s_cls == 9}
        refs = _plan_references(stack, item_id(day), search_cfg, {stack.items[b].id, stack.items[a].id})
        cases.append(_case(
            stack, f"romania-real-{day}", "romania-real", k, stack.refl[k], truth, mask, prob, regions, refs,
            f"REAL cloudy date {day}; PROXY truth = linear interpolation of the clear dates {stack.dates[b]} and "
            f"{stack.dates[a]} (withheld from the references)",
            {"truth_dates": [str(stack.dates[b]), str(stack.dates[a])],
             "cloud_fraction": float(regions["cloudy"].mean())},
        ))
    return cases


def default_search_config() -> Any:
    """The search section ``cloudfree run`` would use (defaults), with every date a candidate reference."""
    from cloudfree.pipeline.config import SearchConfig

    return SearchConfig(reference_max_cloud_cover=30.0, max_days=60.0)


def romania_cases(data_dir: str | Path, search_cfg: Any = None, which: Sequence[str] = ("hidden", "real")) -> list:
    stack = load_stack(data_dir)
    cfg = search_cfg or default_search_config()
    out = []
    if "hidden" in which:
        out += romania_hidden_cases(stack, cfg)
    if "real" in which:
        out += romania_real_cases(stack, cfg)
    return out


def gap_bin(days: float) -> str:
    """Bins of the gap (days) to the nearest reference used in the tables."""
    if not np.isfinite(days):
        return "no reference"
    return "<= 5 d" if days <= 5 else "6-10 d" if days <= 10 else "11-20 d" if days <= 20 else "> 20 d"

