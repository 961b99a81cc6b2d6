"""Training pairs for the learned models: readers of the public layouts and a pair builder over any STAC catalog.

Every source yields the same sample (a dict of float32 numpy arrays, see :mod:`cloudfree.pipeline.training.api` for keys and
shapes, without the batch axis) from ``sample(rng, split)``; the loop draws one ``rng`` per step from the seed, so a
batch depends only on ``(seed, step)`` and resume is exact. Scaling (the :class:`InputConvention`): optical clipped
to [0, 10000] DN = [0, 1] reflectance; SAR sigma0 in dB clipped to [-25, 0], mapped to [0, 1] by ``(dB + 25) / 25``.

Sources:

* :class:`StacPairs` (``source: stac``): a user's own AOI time series from any catalog the pipeline can open (static
  catalog, stac-geoparquet, STAC API). Clear dates are hidden behind **real cloud masks transplanted from cloudy
  dates of the same place** (the cloudy date's own pixels under its mask, so cloud radiometry is real), or behind
  SIMULATED clouds (``clouds: simulate``, :func:`cloudfree.pipeline.evaluation.simulate.simulate_clouds`). References are the
  nearest other dates with their own masks. SAR: the catalog's co-located Sentinel-1 (``sar: catalog``), SIMULATED
  SAR (``sar: simulated``, :func:`simulate_sar` of each date's *observed* surface, :meth:`StacPairs.observed_surface`:
  never of the sample's hidden truth), real S1 rasters *unrelated to the optical* (``sar: real-unpaired``)
  or none. Dates in ``holdout_dates`` (default: the Romania evaluation dates and their cloud donors) never enter
  training or validation.
* :class:`Sen12MSCR`: SEN12MS-CR (Ebel et al. 2020) layout
  ``ROIs<roi>_<season>_{s1,s2,s2_cloudy}/{s1,s2,s2_cloudy}_<scene>/ROIs<roi>_<season>_<kind>_<scene>_p<patch>.tif``
  (S2: 13 bands B01..B12 with B8A and B10, DN; S1: VV, VH in dB).
* :class:`Sen12MSCRTS`: SEN12MS-CR-TS (Ebel et al. 2022) layout
  ``<ROI>/<tile>/{S1,S2}/<patch>/{s1,s2}_<ROI>_<tile>_ImgNo_<t>_<YYYY-MM-DD>_patch_<patch>.tif``; per patch the
  clearest date is the truth, the cloudiest date nearest to it the target, other dates the references.
* :class:`AllClear`: AllClear (Zhou et al. 2024) benchmark metadata JSON ``{id: {"s2_toa": [[date, path], ...],
  "s1": [[date, path], ...], "target": [[date, path]], "cld_shdw": [[date, path], ...]?}}`` with paths relative to
  the JSON's folder (S2 TOA 13 bands DN, S1 VV/VH dB, cloud/shadow file: band 2 cloud, band 5 shadow); the last
  input is the target, the others references.

Masks for the public sets are the project's own spectral cloud score (eq. 13-16 of the cloud-attentive paper,
:func:`cloudfree.stages.masks.spectral_score_kernel`), as the SEN12MS-CR papers compute theirs from the imagery.
"""

from __future__ import annotations

import abc

import json
import logging
import re
import zlib
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from cloudfree.pipeline.errors import ConfigError, InputDataError
from cloudfree.pipeline.holdout import (  # noqa: F401  (ROMANIA_EVAL_DATES/MASK_DATES re-exported for tests)
    ROMANIA_EVAL_DATES,
    ROMANIA_HELDOUT_DATES,
    ROMANIA_MASK_DATES,
)

log = logging.getLogger(__name__)

S2_13_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S1_POLS = ("vv", "vh")
#: ``references: search-like`` takes dates with at most this cloud fraction first (search.reference_max_cloud_cover
#: of the evaluation's search config: 30 %).
SEARCH_MAX_CLOUD = 0.3

#: Romania stack dates the evaluation uses (:mod:`cloudfree.pipeline.evaluation.romania`): every target date of its
#: hidden-clear and real-cloudy sets (ROMANIA_EVAL_DATES) and the donor dates whose real clouds hide its targets
#: (ROMANIA_MASK_DATES). They are excluded from training AND validation in every role (truth, target, cloud-mask
#: source, reference), together with the clear dates the real-cloudy set interpolates as its proxy truth
#: (ROMANIA_REAL_TRUTH_DATES). All from :mod:`cloudfree.pipeline.holdout`: one list, never two that drift.
#: The weights shipped in models/weights/ were trained before the proxy-truth dates joined this list (their cards
#: list the 35 dates they held out); their romania-real rows are therefore not a clean hold-out.



def in_windows(day: date, windows: Sequence[tuple[str, str]]) -> bool:
    return any(date.fromisoformat(a) <= day <= date.fromisoformat(b) for a, b in windows)


def is_held_out(day: date, dates: Sequence[str], windows: Sequence[tuple[str, str]]) -> bool:
    return day.isoformat() in set(dates) or in_windows(day, windows)


def scale_optical(dn_or_refl: np.ndarray, dn: bool) -> np.ndarray:
    x = dn_or_refl.astype(np.float32) / (10000.0 if dn else 1.0)
    return np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0).astype(np.float32)


def scale_sar_db(db: np.ndarray) -> np.ndarray:
    """sigma0 dB -> [0, 1]: clip to [-25, 0], ``(dB + 25) / 25``; NaN -> 0 (the floor)."""
    return ((np.clip(np.nan_to_num(db, nan=-25.0), -25.0, 0.0) + 25.0) / 25.0).astype(np.float32)


def linear_to_scaled(linear: np.ndarray) -> np.ndarray:
    """sigma0 linear power -> the scaled dB convention."""
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(np.where(linear > 0, linear, np.nan))
    return scale_sar_db(db)


def simulate_sar(optical: np.ndarray, bands: Sequence[str], rng: np.random.Generator, looks: float = 4.4,
                 ) -> np.ndarray:
    """SIMULATED Sentinel-1 VV/VH ``(2, y, x)`` in the scaled dB convention, from a clear optical image.

    Not a radar model: a smooth function of vegetation (NDVI) and NIR texture standing in for volume scattering and
    roughness, in dB ranges typical of IW GRD over land (VV ~ -17..-7 dB, VH ~ 6-7 dB below), with multiplicative
    gamma speckle of ``looks`` equivalent looks (Sentinel-1 GRD-HR ENL ~ 4.4). It carries structure of the surface
    but none of its spectra, which is what the models may learn to use from SAR; it is always labelled simulated.
    """
    b = list(bands)
    red, nir = optical[b.index("B04")], optical[b.index("B08")]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-4)
    texture = np.sqrt(np.maximum(ndimage.uniform_filter(nir ** 2, 5) - ndimage.uniform_filter(nir, 5) ** 2, 0))
    vv = -17.0 + 7.0 * np.clip(ndvi, 0, 1) + 30.0 * np.clip(texture, 0, 0.1) + rng.normal(0, 0.5, ndvi.shape)
    vh = vv - 7.5 + 2.5 * np.clip(ndvi, 0, 1)
    out = []
    for db in (vv, vh):
        lin = 10 ** (db / 10) * rng.gamma(looks, 1.0 / looks, db.shape)
        out.append(linear_to_scaled(lin))
    return np.stack(out).astype(np.float32)


def spectral_cloud_mask(image: np.ndarray, bands: Sequence[str], threshold: float = 0.2) -> np.ndarray:
    """Binary cloud mask of a reflectance image with the project's spectral score (eq. 13-16), 2 px dilation."""
    from cloudfree.stages.masks import spectral_mask_kernel, spectral_score_kernel

    refl = {b: image[i] for i, b in enumerate(bands)}
    return spectral_mask_kernel(spectral_score_kernel(refl), threshold, 2, 1, 2)


def _crop(arrays: dict[str, np.ndarray], y: int, x: int, size: int) -> dict[str, np.ndarray]:
    return {k: (v[..., y:y + size, x:x + size] if isinstance(v, np.ndarray) and v.ndim >= 2 else v)
            for k, v in arrays.items()}


def _augment(sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random flips and 90-degree rotations, the same for every spatial array of the sample."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = {}
    for key, v in sample.items():
        if isinstance(v, np.ndarray) and v.ndim >= 2 and key not in ("ref_dt",):
            v = np.rot90(v, k, axes=(-2, -1))
            if flip:
                v = v[..., ::-1]
            v = np.ascontiguousarray(v)
        out[key] = v
    return out


def finish_sample(target, truth, cloud_mask, refs, ref_masks, ref_dt, sar, n_refs: int) -> dict[str, np.ndarray]:
    """Pad/trim references to ``n_refs`` (missing ones all-masked zeros) and package a sample."""
    c, h, w = truth.shape
    r = np.zeros((n_refs, c, h, w), np.float32)
    rm = np.ones((n_refs, h, w), np.float32)
    dt = np.zeros(n_refs, np.float32)
    k = min(n_refs, len(refs))
    if k:
        r[:k], rm[:k], dt[:k] = np.asarray(refs[:k]), np.asarray(ref_masks[:k]), np.asarray(ref_dt[:k])
    present = sar is not None
    s = np.zeros((n_refs + 1, len(S1_POLS), h, w), np.float32)
    if present:
        s[: min(len(sar), n_refs + 1)] = np.asarray(sar)[: n_refs + 1]
    return {"target": target.astype(np.float32), "truth": truth.astype(np.float32),
            "cloud_mask": cloud_mask.astype(np.float32), "references": r, "ref_masks": rm, "ref_dt": dt,
            "sar": s, "sar_present": np.float32(present)}


class DataConfig(BaseModel):
    """``data`` section of a training config."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["stac", "sen12ms-cr", "sen12ms-cr-ts", "allclear"] = "stac"
    #: stac: catalog URL/path (static catalog, stac-geoparquet or API root); others: dataset root / metadata JSON.
    path: str = "../shared/data/s2-l2a-stack-romania-nrt/stac/catalog.json"
    kind: Literal["local", "stac-api", "planetary-computer", "earth-search", "sentinel-hub"] = "local"
    collection: str = "s2-l2a-romania-nrt"
    sar_collection: str | None = None
    bbox: list[float] | None = None
    period: str | None = None
    resolution: float = 10.0
    #: SCL classes counted as cloud/shadow for the transplanted masks (Sen2Cor: 3 shadow, 8/9 cloud, 10 cirrus).
    scl_classes: list[int] = Field(default_factory=lambda: [3, 8, 9, 10])
    clear_max_cloud: float = 0.01
    cloudy_range: tuple[float, float] = (0.05, 0.95)
    clouds: Literal["transplant", "simulate"] = "transplant"
    sar: Literal["simulated", "catalog", "real-unpaired", "none"] = "simulated"
    #: real S1 rasters (linear power or dB, first two bands VV/VH-like) for ``sar: real-unpaired``.
    sar_paths: list[str] = Field(default_factory=list)
    #: which dates are a sample's references: ``nearest-random`` (a random pick among the 2 x n_refs nearest dates,
    #: often cloudy), ``search-like`` (as the search stage picks them for ``cloudfree run``: the clearest dates
    #: bracketing the target, StacPairs._search_like) or ``mixed`` (each sample one or the other, 50/50).
    references: Literal["nearest-random", "search-like", "mixed"] = "nearest-random"
    #: probability that a training sample's SAR is dropped (zeros, sar_present = 0): the model learns to run without.
    sar_dropout: float = Field(0.3, ge=0, le=1)
    #: dates (ISO) and date windows never used in training or validation (default: the Romania evaluation dates).
    holdout_dates: list[str] = Field(default_factory=lambda: list(ROMANIA_HELDOUT_DATES))
    holdout_windows: list[tuple[str, str]] = Field(default_factory=list)
    #: every k-th clear date (k = round(1 / val_fraction)) is a validation truth date.
    val_fraction: float = Field(0.2, gt=0, lt=1)
    #: references are drawn among dates at most this far from the truth date.
    max_ref_days: float = 60.0
    augment: bool = True


class PairSource(abc.ABC):
    """Base: ``sample(rng, split)`` -> one sample dict; ``describe()`` -> what the data is (for the model card)."""

    bands: tuple[str, ...]
    n_refs: int
    patch: int

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, split: str = "train") -> dict[str, np.ndarray]:
        """One training sample of ``split``: target, truth, cloud_mask, references, ref_dt, sar, sar_present."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the data is (real vs simulated, dates, bands), for the model card."""

    @abc.abstractmethod
    def n_pairs(self, split: str = "train") -> int:
        """How many distinct pairs ``split`` holds (for the card's epochs-equivalent)."""


@dataclass
class _Date:
    id: str
    day: date
    image: np.ndarray  # (C, H, W) reflectance 0-1, NaN nodata
    mask: np.ndarray  # (H, W) bool cloud/shadow
    valid: np.ndarray  # (H, W) bool
    sar: np.ndarray | None = None  # (2, H, W) scaled dB, real (catalog) S1 of this date

    @property
    def cloud_fraction(self) -> float:
        return float(self.mask[self.valid].mean()) if self.valid.any() else 1.0


class StacPairs(PairSource):
    """Pairs from a STAC catalog time series of one AOI (see module docstring). Loads the AOI into memory once."""

    def __init__(self, cfg: DataConfig, bands: Sequence[str], n_refs: int, patch: int) -> None:
        self.cfg, self.bands, self.n_refs, self.patch = cfg, tuple(bands), n_refs, patch
        self._check_holdout()
        self.dates = self._load()
        clear = [d for d in self.dates if d.cloud_fraction <= cfg.clear_max_cloud and d.valid.mean() > 0.99]
        lo, hi = cfg.cloudy_range
        self.cloudy = [d for d in self.dates if lo <= d.cloud_fraction <= hi and d.valid.mean() > 0.99]
        k = max(2, round(1 / cfg.val_fraction))
        self.split = {"val": [d for i, d in enumerate(clear) if i % k == k - 1],
                      "train": [d for i, d in enumerate(clear) if i % k != k - 1]}
        # validation has its own cloud donors (every k-th cloudy date): a donor's mask and cloudy pixels never serve
        # both splits; with a single cloudy date both splits must share it (said in describe()).
        self.donors = {"val": [d for i, d in enumerate(self.cloudy) if i % k == k - 1],
                       "train": [d for i, d in enumerate(self.cloudy) if i % k != k - 1]}
        if not self.donors["val"] or not self.donors["train"]:
            self.donors = {"val": list(self.cloudy), "train": list(self.cloudy)}
        #: dates that are validation inputs or truths: never a training truth, donor or reference.
        self._val_ids = {d.id for d in self.split["val"]} | (
            {d.id for d in self.donors["val"]} - {d.id for d in self.donors["train"]})
        if not self.split["train"] or not self.split["val"] or (cfg.clouds == "transplant" and not self.cloudy):
            raise InputDataError(
                f"catalog {cfg.path}: {len(clear)} clear and {len(self.cloudy)} cloudy dates outside the held-out "
                "dates; training needs at least 2 clear dates and (for transplanted clouds) 1 cloudy date: widen "
                "data.period / data.bbox or relax data.clear_max_cloud / data.cloudy_range")
        if min(self.dates[0].image.shape[1:]) < patch:
            raise ConfigError(f"patch {patch} px is larger than the AOI grid {self.dates[0].image.shape[1:]}")
        if cfg.sar == "real-unpaired":
            self._real_sar = [self._read_sar_file(p) for p in cfg.sar_paths]
            if not self._real_sar:
                raise ConfigError("data.sar = real-unpaired needs data.sar_paths (S1 rasters)")

    def _check_holdout(self) -> None:
        """The evaluation's own stack: ``holdout_dates`` may add dates, never drop an evaluation/donor date."""
        from cloudfree.pipeline.holdout import ROMANIA_COLLECTION, ROMANIA_FOLDER

        cfg = self.cfg
        if cfg.collection != ROMANIA_COLLECTION and ROMANIA_FOLDER not in str(cfg.path):
            return
        dropped = [d for d in ROMANIA_HELDOUT_DATES
                   if not is_held_out(date.fromisoformat(d), cfg.holdout_dates, cfg.holdout_windows)]
        if dropped:
            raise ConfigError(
                f"catalog {cfg.path} is the Romania evaluation stack but data.holdout_dates/holdout_windows do not "
                f"hold out its evaluation and mask-donor dates {dropped}: training on them leaks the evaluation; "
                "remove data.holdout_dates from the config (the default holds them out) or add these dates")

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> list[_Date]:
        import dask

        from cloudfree.catalogs.base import SearchQuery, open_catalog
        from cloudfree.pipeline.config import CatalogConfig, GridConfig
        from cloudfree.stages.load import load_layer, load_reflectance, output_geobox

        cfg = self.cfg
        catalog = open_catalog(CatalogConfig(kind=cfg.kind, url=cfg.path, collection=cfg.collection))
        items = catalog.search(SearchQuery(collections=(cfg.collection,), bbox=tuple(cfg.bbox) if cfg.bbox else None,
                                           datetime=cfg.period))
        items = sorted(items, key=lambda it: it.datetime)
        kept = [it for it in items if not is_held_out(it.datetime.date(), cfg.holdout_dates, cfg.holdout_windows)]
        log.info("training catalog %s: %d items, %d not held out", cfg.path, len(items), len(kept))
        if len(kept) < 3:
            raise InputDataError(f"catalog {cfg.path} collection {cfg.collection}: only {len(kept)} usable items")
        geobox = output_geobox(kept[0], GridConfig(resolution=cfg.resolution, bands=list(self.bands)), cfg.bbox)
        refl = load_reflectance(kept, list(self.bands), geobox, chunk=2048, name="training")
        scl = load_layer(kept, "SCL", geobox, chunk=2048)
        refl_np, scl_np = dask.compute(refl.data, scl.data if scl is not None else None)
        out = []
        for i, it in enumerate(kept):
            img = refl_np[i]
            valid = np.isfinite(img).all(0)
            if scl_np is not None:
                from cloudfree.stages.masks import scl_kernel

                mask = scl_kernel(scl_np[i], list(cfg.scl_classes), 1) | (scl_np[i] == 0)
            elif {"B02", "B03", "B04", "B11"} <= set(self.bands):
                mask = spectral_cloud_mask(np.nan_to_num(img), self.bands)
            else:
                raise InputDataError(f"item {it.id} has no SCL and bands {self.bands} cannot carry a spectral mask")
            sar = self._catalog_sar(catalog, it, geobox) if cfg.sar == "catalog" else None
            out.append(_Date(it.id, it.datetime.date(), img, mask & valid, valid, sar))
        return out

    def _catalog_sar(self, catalog, item, geobox) -> np.ndarray | None:
        from cloudfree.pipeline.config import SelectionPolicy
        from cloudfree.stages.load import load_sar
        from cloudfree.stages.search import _sar

        if not self.cfg.sar_collection:
            raise ConfigError("data.sar = catalog needs data.sar_collection (e.g. sentinel-1-rtc)")
        cands = _sar(catalog, item, self.cfg.sar_collection, SelectionPolicy())
        if not cands:
            return None
        lin = load_sar([cands[0].item], geobox).isel(time=0)
        pols = [p for p in S1_POLS if p in lin.band.values]
        if len(pols) != 2:
            return None
        return np.stack([linear_to_scaled(np.asarray(lin.sel(band=p).values)) for p in pols])

    @staticmethod
    def _read_sar_file(path: str) -> np.ndarray:
        import rasterio

        with rasterio.open(path) as ds:
            a = ds.read([1, 2]).astype(np.float32)
        is_db = np.nanmedian(a) < 0
        return np.stack([scale_sar_db(a[i]) if is_db else linear_to_scaled(a[i]) for i in range(2)])

    # -- sampling ---------------------------------------------------------------------------------------------
    def n_pairs(self, split: str = "train") -> int:
        return len(self.split[split]) * max(1, len(self.donors[split]) if self.cfg.clouds == "transplant" else 1)

    def distinct(self, split: str = "train") -> dict[str, Any]:
        """What ``split`` holds, counted honestly: distinct clear truth images, their pixels, the cloud donors."""
        h, w = self.dates[0].image.shape[1:]
        n = len(self.split[split])
        return {"truth_images": n, "truth_pixels": n * h * w, "image_px": f"{h}x{w}",
                "cloud_donors": len(self.donors[split]) if self.cfg.clouds == "transplant" else 0,
                "truth_x_donor_pairs": self.n_pairs(split)}

    def _search_like(self, others: list[_Date], truth_day: date) -> list[_Date]:
        """References as the search stage picks them (``search.policy.bracket``, ``reference_max_cloud_cover``):
        dates with at most :data:`SEARCH_MAX_CLOUD` cloud, the nearest before and the nearest after the truth date
        first, then alternately outwards; topped up with the nearest remaining dates when fewer are that clear.
        ``others`` is sorted by distance in days and already excludes the truth and (in training) validation dates."""
        good = [d for d in others if d.cloud_fraction <= SEARCH_MAX_CLOUD]
        before = [d for d in good if d.day < truth_day]
        after = [d for d in good if d.day >= truth_day]
        out: list[_Date] = []
        while len(out) < self.n_refs and (before or after):
            for side in (before, after):
                if side and len(out) < self.n_refs:
                    out.append(side.pop(0))
        return out + [d for d in others if d not in out][: self.n_refs - len(out)]

    def observed_surface(self, image: np.ndarray, cloudy: np.ndarray, day: date, win: tuple[slice, slice],
                         exclude: set[str]) -> np.ndarray:
        """The surface a SIMULATED radar sees at ``day``: ``image`` where that date is clear and, under its cloud
        (``cloudy``), the nearest other date of the stack clear at the pixel -- never a date in ``exclude`` (the
        hidden truth of the sample and, in training, every validation date). Pixels no such date covers take the
        per-band median of ``image``'s clear pixels. So the SIMULATED SAR of the cloudy target says nothing about
        the truth under its cloud that another observed date does not (it used to be simulated from the truth)."""
        out = np.array(image, np.float32, copy=True)
        need = np.asarray(cloudy, bool).copy()
        if need.any():
            for d in sorted(self.dates, key=lambda d: abs((d.day - day).days)):
                if d.id in exclude or d.day == day:
                    continue
                ok = need & ~(d.mask | ~d.valid)[win]
                if ok.any():
                    out[:, ok] = np.nan_to_num(d.image[:, win[0], win[1]])[:, ok]
                    need &= ~ok
                    if not need.any():
                        break
        if need.any():
            clear = ~np.asarray(cloudy, bool)
            fill = np.median(out[:, clear], 1) if clear.any() else np.zeros(out.shape[0], np.float32)
            out[:, need] = fill[:, None]
        return out

    def _sar_for(self, surfaces: list[np.ndarray] | None, dates: list[_Date], rng) -> np.ndarray | None:
        if self.cfg.sar == "none":
            return None
        if self.cfg.sar == "catalog":
            if any(d.sar is None for d in dates):
                return None
            return np.stack([d.sar for d in dates])
        if self.cfg.sar == "real-unpaired":
            src = self._real_sar[int(rng.integers(len(self._real_sar)))]
            h = w = self.patch
            y, x = int(rng.integers(src.shape[1] - h + 1)), int(rng.integers(src.shape[2] - w + 1))
            return np.stack([src[:, y:y + h, x:x + w]] * len(dates))
        # SIMULATED: from each date's observed surface (observed_surface), never from the sample's hidden truth
        return np.stack([simulate_sar(s, self.bands, rng) for s in surfaces])

    def sample(self, rng: np.random.Generator, split: str = "train") -> dict[str, np.ndarray]:
        cfg, p = self.cfg, self.patch
        pool = self.split[split]
        truth_d = pool[int(rng.integers(len(pool)))]
        ny, nx = truth_d.image.shape[1:]
        for _ in range(20):
            y, x = int(rng.integers(ny - p + 1)), int(rng.integers(nx - p + 1))
            win = (slice(y, y + p), slice(x, x + p))
            truth = np.nan_to_num(truth_d.image[:, win[0], win[1]])
            if cfg.clouds == "simulate":
                from cloudfree.pipeline.evaluation.simulate import CloudSpec, simulate_clouds

                sim = simulate_clouds(truth, self.bands, CloudSpec(cover=float(rng.uniform(0.2, 0.7)),
                                                                    scale=p / 2), seed=int(rng.integers(2**31)))
                target, mask = sim.cloudy, (sim.transmission < 0.9) | (sim.shadow < 0.9)
            else:
                donors = self.donors[split]
                cd = donors[int(rng.integers(len(donors)))]
                mask = cd.mask[win]
                target = np.where(mask[None], np.nan_to_num(cd.image[:, win[0], win[1]]), truth)
            frac = float(mask.mean())
            if cfg.cloudy_range[0] <= frac <= cfg.cloudy_range[1]:
                break
        # training never sees a validation truth or validation donor, not even as a reference
        banned = self._val_ids if split == "train" else set()
        others = [d for d in self.dates if d is not truth_d and abs((d.day - truth_d.day).days) <= cfg.max_ref_days
                  and d.valid.mean() > 0.5 and d.id not in banned]
        others.sort(key=lambda d: abs((d.day - truth_d.day).days))
        cand = others[: 2 * self.n_refs]
        pick = sorted(rng.permutation(len(cand))[: self.n_refs].tolist()) if cand else []
        refs = [cand[i] for i in pick]
        if cfg.references == "search-like" or (cfg.references == "mixed" and rng.random() < 0.5):
            refs = self._search_like(others, truth_d.day)
        r_img = [np.nan_to_num(d.image[:, win[0], win[1]]) for d in refs]
        r_mask = [(d.mask | ~d.valid)[win] for d in refs]
        r_dt = [(d.day - truth_d.day).days for d in refs]
        sar = None
        if split == "val" or rng.random() >= cfg.sar_dropout:
            surfaces = None
            if cfg.sar == "simulated":  # never from the hidden truth (see observed_surface)
                exclude = {truth_d.id} | banned
                surfaces = [self.observed_surface(target, mask, truth_d.day, win, exclude)] + [
                    self.observed_surface(im, m, d.day, win, exclude) for im, m, d in zip(r_img, r_mask, refs)]
            sar = self._sar_for(surfaces, [truth_d, *refs], rng)
            if sar is not None and cfg.sar == "catalog":
                sar = sar[..., win[0], win[1]]
        s = finish_sample(np.clip(target, 0, 1), np.clip(truth, 0, 1), mask, r_img, r_mask, r_dt, sar, self.n_refs)
        return _augment(s, rng) if cfg.augment and split == "train" else s

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        clouds = ("REAL cloud masks and cloudy pixels transplanted from cloudy dates of the same footprint onto "
                  "clear dates (truth = the clear date)" if cfg.clouds == "transplant" else
                  "SIMULATED clouds (pipeline.evaluation.simulate) on real clear dates")
        sar = {"simulated": "SIMULATED S1 VV/VH (training.datasets.simulate_sar: NDVI/texture -> dB, gamma speckle "
                            "4.4 looks) from each date's OBSERVED surface: its own clear pixels and, under its cloud, "
                            "the nearest other date clear there, never the sample's hidden truth "
                            "(StacPairs.observed_surface); no real co-located S1 exists in the data",
               "catalog": f"real co-located S1 from {cfg.sar_collection}",
               "real-unpaired": f"REAL S1 rasters {cfg.sar_paths} paired with UNRELATED optical (no co-location)",
               "none": "none"}[cfg.sar]
        return {"optical": f"catalog {cfg.path} collection {cfg.collection}: {len(self.dates)} dates "
                           f"({self.dates[0].day} .. {self.dates[-1].day}), bands {list(self.bands)}, "
                           f"{self.dates[0].image.shape[1]}x{self.dates[0].image.shape[2]} px at {cfg.resolution} m",
                "references": {"nearest-random": "a random pick among the 2 x n nearest dates (often cloudy)",
                               "search-like": "as the search stage picks them (clearest dates bracketing the target)",
                               "mixed": "half the samples a random pick among the 2 x n nearest dates, half as the "
                                        "search stage picks them (clearest bracketing dates)"}[cfg.references],
                "clouds": clouds, "sar": sar + f"; dropped (zeros) in {cfg.sar_dropout:.0%} of training samples",
                "split": f"{len(self.split['train'])} clear truth dates for training, {len(self.split['val'])} for "
                         f"validation (every {max(2, round(1 / cfg.val_fraction))}th clear date); "
                         f"{len(self.donors['train'])} cloudy mask-source dates for training, "
                         f"{len(self.donors['val'])} for validation"
                         + (" (shared: only one cloudy date)" if self.donors['val'] == self.donors['train'] else
                            " (disjoint)") + "; validation truth and donor dates are never training references",
                "held_out": f"{len(cfg.holdout_dates)} evaluation/mask-donor dates {cfg.holdout_dates}"
                            + (f" and windows {cfg.holdout_windows}" if cfg.holdout_windows else "")
                            + " excluded from every role"}


# -- public datasets ------------------------------------------------------------------------------------------
def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read().astype(np.float32)


def _is_val(key: str, val_fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 1000 < 1000 * val_fraction


class _PublicBase(PairSource):
    def __init__(self, cfg: DataConfig, bands: Sequence[str], n_refs: int, patch: int) -> None:
        self.cfg, self.bands, self.n_refs, self.patch = cfg, tuple(bands), n_refs, patch
        missing = [b for b in self.bands if b not in S2_13_BANDS]
        if missing:
            raise ConfigError(f"bands {missing} are not Sentinel-2 bands of the public datasets")
        self._idx = [S2_13_BANDS.index(b) for b in self.bands]
        self.entries = self._index()
        self.split = {"train": [e for e in self.entries if not _is_val(e["key"], cfg.val_fraction)],
                      "val": [e for e in self.entries if _is_val(e["key"], cfg.val_fraction)]}
        if not self.split["train"]:
            raise InputDataError(f"{type(self).__name__}: no samples found under {cfg.path}; check data.path")
        if not self.split["val"]:  # tiny sets: validate on the training samples rather than not at all
            self.split["val"] = self.split["train"][:1]

    def _optical(self, path: Path) -> np.ndarray:
        a = _read(path)
        if a.shape[0] != 13:
            raise InputDataError(f"{path}: {a.shape[0]} bands, the layout has 13 (B01..B12 with B8A, B10)")
        finite = a[np.isfinite(a)]
        if finite.size and float(finite.max()) <= 2.0:
            raise InputDataError(f"{path}: values <= {float(finite.max()):.3g}, i.e. reflectance 0-1; the layout "
                                 "stores Sentinel-2 DN 0-10000 (scaled here by 1/10000): use the original files")
        return a

    def _mask(self, dn13: np.ndarray) -> np.ndarray:
        return spectral_cloud_mask(scale_optical(dn13, True), S2_13_BANDS)

    def _select(self, dn13: np.ndarray) -> np.ndarray:
        return scale_optical(dn13[self._idx], True)

    def _pack(self, rng, split, target13, truth13, refs13, ref_dt, sar_db, mask=None, ref_masks=None):
        h, w = truth13.shape[1:]
        p = min(self.patch, h, w)
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        ys, xs = slice(y, y + p), slice(x, x + p)
        mask = self._mask(target13) if mask is None else mask
        ref_masks = [self._mask(r) for r in refs13] if ref_masks is None else ref_masks
        sar = None
        if sar_db is not None and (split == "val" or rng.random() >= self.cfg.sar_dropout):
            for s in sar_db:
                if s.shape[0] < 2 or not (np.nanmedian(s[:2]) < 0):
                    raise InputDataError(
                        f"{type(self).__name__} {self.cfg.path}: an S1 file has {s.shape[0]} band(s) with median "
                        f"{float(np.nanmedian(s[:2])):.3g}; the layout stores VV, VH sigma0 in dB (negative over "
                        "land): linear power or single-pol files need converting (10 log10) first")
            sar = np.stack([scale_sar_db(s[:2]) for s in sar_db])[..., ys, xs]
        s = finish_sample(self._select(target13)[:, ys, xs], self._select(truth13)[:, ys, xs], mask[ys, xs],
                          [self._select(r)[:, ys, xs] for r in refs13], [m[ys, xs] for m in ref_masks], ref_dt,
                          sar, self.n_refs)
        return _augment(s, rng) if self.cfg.augment and split == "train" else s

    def n_pairs(self, split: str = "train") -> int:
        return len(self.split[split])

    def describe(self) -> dict[str, Any]:
        return {"optical": f"{type(self).__name__} at {self.cfg.path}: {len(self.entries)} samples, bands "
                           f"{list(self.bands)}", "sar": "real co-registered S1 VV/VH of the dataset",
                "clouds": "real clouds of the dataset; masks from the spectral cloud score (eq. 13-16)",
                "split": f"{len(self.split['train'])} train / {len(self.split['val'])} val (by scene hash)"}


class Sen12MSCR(_PublicBase):
    """SEN12MS-CR: mono-temporal triplets (S1, cloud-free S2, cloudy S2); references are empty."""

    def _index(self) -> list[dict]:
        out = []
        for cloudy in sorted(Path(self.cfg.path).glob("*_s2_cloudy/s2_cloudy_*/*_s2_cloudy_*_p*.tif")):
            rel = str(cloudy.relative_to(self.cfg.path))
            clear = Path(self.cfg.path) / rel.replace("s2_cloudy", "s2")
            s1 = Path(self.cfg.path) / rel.replace("s2_cloudy", "s1")
            if clear.is_file() and s1.is_file():
                scene = cloudy.parent.parent.name.split("_s2_cloudy")[0] + "_" + cloudy.parent.name
                out.append({"key": scene, "cloudy": cloudy, "clear": clear, "s1": s1})
        return out

    def sample(self, rng, split="train"):
        e = self.split[split][int(rng.integers(len(self.split[split])))]
        return self._pack(rng, split, self._optical(e["cloudy"]), self._optical(e["clear"]), [], [],
                          [_read(e["s1"])])


_TS_NAME = re.compile(r"^(s[12])_(?P<roi>.+)_(?P<tile>[^_]+)_ImgNo_(?P<t>\d+)_(?P<date>\d{4}-\d{2}-\d{2})_patch_"
                      r"(?P<patch>\d+)\.tif$")


class Sen12MSCRTS(_PublicBase):
    """SEN12MS-CR-TS: per patch, 30 co-registered S1/S2 dates."""

    def _index(self) -> list[dict]:
        out = []
        root = Path(self.cfg.path)
        for pdir in sorted(root.glob("*/*/S2/*")):
            s2 = {}
            for f in pdir.glob("s2_*.tif"):
                m = _TS_NAME.match(f.name)
                if m:
                    s2[m["date"]] = f
            s1dir = pdir.parent.parent / "S1" / pdir.name
            dates = []
            for d in sorted(s2):
                s1 = next(iter(s1dir.glob(f"s1_*_{d}_patch_*.tif")), None)
                if s1 is not None:
                    dates.append((d, s2[d], s1))
            if len(dates) >= 2:
                out.append({"key": f"{pdir.parent.parent.parent.name}/{pdir.parent.parent.name}", "dates": dates})
        return out

    def sample(self, rng, split="train"):
        e = self.split[split][int(rng.integers(len(self.split[split])))]
        opt = [self._optical(p) for _, p, _ in e["dates"]]
        masks = [self._mask(o) for o in opt]
        cover = np.array([m.mean() for m in masks])
        truth_i = int(np.argmin(cover))
        days = np.array([datetime.fromisoformat(d).toordinal() for d, _, _ in e["dates"]])
        lo, hi = self.cfg.cloudy_range
        cands = [i for i in range(len(opt)) if i != truth_i and lo <= cover[i] <= hi] or \
            [i for i in range(len(opt)) if i != truth_i]
        target_i = min(cands, key=lambda i: abs(days[i] - days[truth_i]))
        rest = [i for i in range(len(opt)) if i not in (truth_i, target_i)]
        ref_i = [rest[j] for j in sorted(rng.permutation(len(rest))[: self.n_refs].tolist())]
        sar_db = [_read(e["dates"][i][2]) for i in [target_i, *ref_i]]
        return self._pack(rng, split, opt[target_i], opt[truth_i], [opt[i] for i in ref_i],
                          [float(days[i] - days[target_i]) for i in ref_i], sar_db, masks[target_i],
                          [masks[i] for i in ref_i])


class AllClear(_PublicBase):
    """AllClear benchmark samples from its metadata JSON (``data.path`` = the JSON file)."""

    def _index(self) -> list[dict]:
        path = Path(self.cfg.path)
        if not path.is_file():
            raise InputDataError(f"AllClear: metadata JSON {path} not found; set data.path to it")
        meta = json.loads(path.read_text())
        out = []
        for key, v in meta.items():
            try:
                ent = {"key": str(v.get("roi", [key])[0]) if isinstance(v.get("roi"), list) else key,
                       "inputs": [(d, path.parent / p) for d, p in v["s2_toa"]],
                       "target": path.parent / v["target"][0][1],
                       "s1": [(d, path.parent / p) for d, p in v.get("s1", [])],
                       "cld_shdw": [path.parent / p for _, p in v.get("cld_shdw", [])]}
            except (KeyError, TypeError, IndexError) as exc:
                raise InputDataError(f"AllClear metadata {path}: entry {key!r} is malformed ({exc})") from None
            out.append(ent)
        return out

    def sample(self, rng, split="train"):
        e = self.split[split][int(rng.integers(len(self.split[split])))]
        opt = [self._optical(p) for _, p in e["inputs"]]
        if e["cld_shdw"]:
            masks = []
            for p in e["cld_shdw"]:
                cs = _read(p)
                masks.append((cs[1] > 0) | (cs[4] > 0 if cs.shape[0] > 4 else False))
        else:
            masks = [self._mask(o) for o in opt]
        days = [datetime.fromisoformat(str(d)[:10]).toordinal() for d, _ in e["inputs"]]
        t = len(opt) - 1
        sar_db = None
        if len(e["s1"]) == len(opt):
            s1 = [_read(p) for _, p in e["s1"]]
            sar_db = [s1[t]] + [s1[i] for i in range(t)]
        return self._pack(rng, split, opt[t], self._optical(e["target"]), opt[:t], [float(days[i] - days[t])
                          for i in range(t)], sar_db, masks[t], masks[:t])


def build_source(cfg: DataConfig, bands: Sequence[str], n_refs: int, patch: int) -> PairSource:
    cls = {"stac": StacPairs, "sen12ms-cr": Sen12MSCR, "sen12ms-cr-ts": Sen12MSCRTS, "allclear": AllClear}[cfg.source]
    return cls(cfg, bands, n_refs, patch)


def collate(samples: Sequence[dict[str, np.ndarray]]):
    """Stack samples into a batch of torch tensors."""
    import torch

    return {k: torch.from_numpy(np.stack([np.asarray(s[k], np.float32) for s in samples])) for k in samples[0]}
