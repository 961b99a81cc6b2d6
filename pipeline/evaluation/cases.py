"""Evaluation cases: inputs for the models, the truth, and region masks.

* :func:`slovakia_case`: the REAL cloudy/clear pair ``s2-pair-slovakia`` (values / 10 = reflectance, bands assumed
  B01..B12 with B8A, no B10; mask classes 1 = thick bright cloud, 2 = dark region (shadow or thin cloud, not
  documented upstream), 3 = rare). The pair has no third date, and the truth cannot be its own reference, so the
  reference is SIMULATED from the truth by :func:`simulated_reference` (seasonal per-band gain/offset, a smooth
  multiplicative field, small land-cover change patches, a sub-pixel misregistration, sensor noise). The
  reference-free models (``none``, ``dcp``) are unaffected by this choice; reference-based scores on this pair
  measure the methods under a *plausible* reference, not a real third acquisition.
* :func:`simulated_case`: real clear pixels (S2 L2A 29RKH at 100 m, S2 L1C 33UUU at 10 m, bands B02/B03/B04/B08)
  with SIMULATED clouds and shadows (:func:`cloudfree.pipeline.evaluation.simulate.simulate_clouds`) for the target and two
  simulated-change references (one partly cloudy, masked). Known transmission gives the thin (0.1 <= t < 0.95)
  and thick (t < 0.1) masks; ``cloudy`` also includes simulated shadow (shadow factor < 0.95). The model input
  mask mimics the project's mask stage: cloud probability >= 40 % or shadow factor < 0.85, dilated by 2 px.
* :mod:`cloudfree.pipeline.evaluation.romania`: the REAL multi-date stack (140 L2A dates) through the real catalog path;
  :data:`ROMANIA_EVAL_DATES` (re-exported here) lists the dates it holds out: **learned-model training must
  exclude them**.
* :func:`bigearthnet_sar_cases` (``bigearthnet-sar``, opt-in: ``cloudfree evaluate --cases bigearthnet-sar``): the 6
  REAL co-located S1 + S2 L2A BigEarthNet patches (S1 within 5-19 h of S2), each hidden behind the REAL cloud of a
  Romania donor date (mask, extent and opacity real, cloud radiance RE-SYNTHESISED on the patch by eq. 1 of
  :func:`cloudfree.pipeline.evaluation.romania.transplant`: the clouds are simulated on this scene) with its REAL SAR.
  No reference date exists, so it scores the SAR models against the reference-free floors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from cloudfree.pipeline.contract import TileInputs
from cloudfree.pipeline.errors import InputDataError
from cloudfree.pipeline.evaluation.simulate import CloudSpec, fractal_field, simulate_clouds

#: Band order assumed for the 12-band Slovakia pair (L2A band set without B10; order not stored upstream).
SLOVAKIA_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
SIM_BANDS = ("B02", "B03", "B04", "B08")
#: default data folder: the shared sample data next to the repository (../shared/data).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class EvalCase:
    """One evaluation scene: inputs for the models, the truth, and region masks (``(y, x)`` bool)."""

    name: str
    group: str
    bands: tuple[str, ...]
    target: np.ndarray
    truth: np.ndarray
    references: np.ndarray
    reference_masks: np.ndarray
    cloud_mask: np.ndarray
    cloud_prob: np.ndarray
    regions: dict[str, np.ndarray]
    reference_dt_days: tuple[float, ...] = ()
    transmission: np.ndarray | None = None
    notes: str = ""
    simulated: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    #: Sentinel-1 ``(date, pol, y, x)`` in dB clipped to [-25, 0] (the models' ``db`` convention), target date
    #: first; None = the case has no SAR (models that need it are not scored on it).
    sar: np.ndarray | None = None
    sar_bands: tuple[str, ...] = ()

    def tile_inputs(self) -> TileInputs:
        return TileInputs(
            sar=None if self.sar is None else self.sar.astype(np.float32),
            sar_bands=self.sar_bands,
            bands=self.bands,
            target=self.target.astype(np.float32),
            cloud_prob=self.cloud_prob.astype(np.float32),
            cloud_mask=self.cloud_mask.astype(bool),
            references=self.references.astype(np.float32),
            reference_masks=self.reference_masks.astype(bool),
            reference_ids=tuple(f"{self.name}-ref{i}" for i in range(self.references.shape[0])),
            reference_dt_days=self.reference_dt_days,
            target_id=self.name,
        )


def simulated_reference(
    clear: np.ndarray,
    seed: int,
    *,
    gain_sd: float = 0.06,
    offset_sd: float = 0.005,
    field_amplitude: float = 0.03,
    change_fraction: float = 0.02,
    shift: tuple[float, float] = (0.5, -0.35),
    noise: float = 0.003,
) -> np.ndarray:
    """A SIMULATED other-date observation of ``clear`` ``(band, y, x)``: per-band seasonal gain/offset, a smooth
    multiplicative field (illumination/phenology, +-``field_amplitude``), land-cover change on ``change_fraction``
    of the pixels (blobs whose spectrum is scaled per band by exp(U(-0.3, 0.3)), 0.74-1.35), a sub-pixel misregistration ``shift``
    (bilinear) and Gaussian noise."""
    rng = np.random.default_rng(seed)
    nb, ny, nx = clear.shape
    gain = 1 + rng.normal(0, gain_sd, nb)
    offset = rng.normal(0, offset_sd, nb)
    smooth = 1 + field_amplitude * fractal_field((ny, nx), 128.0, rng, octaves=2)
    out = clear * gain[:, None, None] * smooth[None] + offset[:, None, None]
    if change_fraction > 0:
        blobs = fractal_field((ny, nx), 12.0, rng, octaves=2)
        changed = blobs > np.quantile(blobs, 1 - change_fraction)
        factor = np.exp(rng.uniform(-0.3, 0.3, nb))
        out[:, changed] *= factor[:, None]
    out = np.stack([ndimage.shift(b, shift, order=1, mode="nearest") for b in out])
    out += rng.normal(0, noise, out.shape)
    return np.maximum(out, 0).astype(np.float32)


def mask_stage(cloud_prob_pct: np.ndarray, shadow: np.ndarray | None = None, threshold: float = 40.0,
               dilation: int = 2) -> np.ndarray:
    """Mimic of the project's mask stage on simulated layers: probability >= threshold or shadow, dilated."""
    m = cloud_prob_pct >= threshold
    if shadow is not None:
        m |= shadow < 0.85
    if dilation > 0:
        m = ndimage.binary_dilation(m, iterations=dilation)
    return m


def simulated_case(
    clear: np.ndarray,
    bands: Sequence[str],
    seed: int,
    spec: CloudSpec | None = None,
    *,
    name: str | None = None,
    group: str = "simulated",
) -> EvalCase:
    """SIMULATED cloudy target + two SIMULATED-change references (ref0 partly cloudy and masked) of ``clear``."""
    bands = tuple(bands)
    spec = spec or CloudSpec()
    clear = np.asarray(clear, np.float32)
    sim = simulate_clouds(clear, bands, spec, seed=seed)
    ref0 = simulated_reference(clear, seed + 1000)
    ref0_clouds = simulate_clouds(ref0, bands, CloudSpec(cover=0.2, thick_fraction=0.5, shadow_strength=0.0),
                                  seed=seed + 2000)
    ref0_mask = mask_stage(ref0_clouds.cloud_probability, None, threshold=10.0)
    ref1 = simulated_reference(clear, seed + 3000, gain_sd=0.08, field_amplitude=0.04, change_fraction=0.04,
                               shift=(-0.4, 0.6))
    t = sim.transmission
    thick = t < 0.1
    thin = (t >= 0.1) & (t < 0.95)
    cloudy = (t < 0.95) | (sim.shadow < 0.95)
    return EvalCase(
        name=name or f"sim-seed{seed}",
        group=group,
        bands=bands,
        target=sim.cloudy,
        truth=clear,
        references=np.stack([ref0_clouds.cloudy, ref1]),
        reference_masks=np.stack([ref0_mask, np.zeros_like(ref0_mask)]),
        cloud_mask=mask_stage(sim.cloud_probability, sim.shadow),
        cloud_prob=sim.cloud_probability / 100.0,
        regions={"overall": np.ones_like(thick), "cloudy": cloudy, "thin": thin, "thick": thick},
        reference_dt_days=(-12.0, 25.0),
        transmission=t,
        notes="SIMULATED clouds/shadows on real clear pixels; SIMULATED-change references",
        simulated=True,
        meta={"seed": seed, "cover": spec.cover, "thick_fraction": spec.thick_fraction},
    )


def slovakia_arrays_to_case(cloudy: np.ndarray, clean: np.ndarray, mask: np.ndarray, seed: int = 7) -> EvalCase:
    """Pure part of :func:`slovakia_case`: arrays already divided by 10 (reflectance), ``mask`` class codes."""
    classes = np.asarray(mask).astype(np.int16)
    cloud_mask = classes > 0
    prob = np.select([classes == 1, classes >= 2], [1.0, 0.5], 0.0).astype(np.float32)
    reference = simulated_reference(clean, seed)
    return EvalCase(
        name="slovakia",
        group="real",
        bands=SLOVAKIA_BANDS,
        target=cloudy.astype(np.float32),
        truth=clean.astype(np.float32),
        references=reference[None],
        reference_masks=np.zeros((1,) + classes.shape, bool),
        cloud_mask=cloud_mask,
        cloud_prob=prob,
        regions={"overall": np.ones_like(cloud_mask), "cloudy": cloud_mask, "thin": classes == 2,
                 "thick": classes == 1},
        reference_dt_days=(30.0,),
        notes="REAL cloudy/clear pair; the reference is SIMULATED from the clear image (seasonal gain/offset, "
        "smooth field, change patches, 0.5 px misregistration, noise); thin = mask class 2 (dark region, "
        "by eye shadow or thin cloud)",
        simulated=False,
        meta={"reference": "simulated from truth", "seed": seed},
    )


def slovakia_case(data_dir: str | Path, seed: int = 7) -> EvalCase:
    """The real Slovakia pair (I/O): reads ``cloudy.tif``, ``clean.tif``, ``mask.tif`` under ``data_dir``."""
    import rasterio

    d = Path(data_dir)
    if (d / "s2-pair-slovakia").is_dir():
        d = d / "s2-pair-slovakia"
    arrays = {}
    for name in ("cloudy", "clean", "mask"):
        path = d / f"{name}.tif"
        if not path.exists():
            raise InputDataError(f"Slovakia pair: {path} not found; pass the s2-pair-slovakia folder as data_dir")
        with rasterio.open(path) as ds:
            arrays[name] = ds.read().astype(np.float32)
    if arrays["cloudy"].shape[0] != len(SLOVAKIA_BANDS):
        raise InputDataError(f"Slovakia pair: {arrays['cloudy'].shape[0]} bands, expected {len(SLOVAKIA_BANDS)}")
    return slovakia_arrays_to_case(arrays["cloudy"] / 10.0, arrays["clean"] / 10.0, arrays["mask"][0], seed)


def _read_dn_reflectance(paths: Sequence[Path]) -> np.ndarray:
    """Single-band rasters (DN, baseline before 04.00) as float32 reflectance ``(band, y, x)``."""
    import rasterio

    out = []
    for path in paths:
        with rasterio.open(path) as ds:
            out.append(ds.read(1).astype(np.float32) / 10000.0)
    return np.stack(out)


def _subdir(data_dir: str | Path, name: str) -> Path:
    d = Path(data_dir)
    return d / name if (d / name).is_dir() else d


def load_29rkh(data_dir: str | Path, bands: Sequence[str] = SIM_BANDS) -> np.ndarray:
    """Real L2A reflectance (DN / 10000) of the decimated 29RKH tile, 10 m bands at 100 m, ``(band, y, x)``."""
    d = _subdir(data_dir, "s2-l2a-tile-29RKH-100m")
    return _read_dn_reflectance([d / f"{b}.tif" for b in bands])


def load_33uuu(data_dir: str | Path, bands: Sequence[str] = SIM_BANDS) -> np.ndarray:
    """Real L1C TOA reflectance (DN / 10000, baseline before 04.00) of the 33UUU crop, ``(band, y, x)``."""
    d = _subdir(data_dir, "s2-l1c-crop-33UUU") / "IMG_DATA"
    return _read_dn_reflectance([next(d.glob(f"*_{b}.jp2")) for b in bands])


#: (source, row, col) of 256x256 crops of clear real pixels (29RKH: interior, two textured and one flat desert crop;
#: 33UUU: the clear left half, away from the real thin-cloud streaks).
SIM_CROPS = (("29RKH", 400, 650), ("29RKH", 300, 300), ("29RKH", 50, 700), ("33UUU", 256, 0), ("33UUU", 256, 256))


def simulated_set(data_dir: str | Path, seeds: Iterable[int], size: int = 256,
                  spec: CloudSpec | None = None) -> list[EvalCase]:
    """One simulated case per seed: seed ``s`` puts ``s``-derived clouds on crop ``SIM_CROPS[s % len(SIM_CROPS)]``
    (so seeds 0 and 5 share a crop: the default report seed 5 reuses the tuning seed 0's surface pixels under other
    clouds)."""
    scenes = {"29RKH": load_29rkh(data_dir), "33UUU": load_33uuu(data_dir)}
    cases = []
    for seed in seeds:
        src, r, c = SIM_CROPS[seed % len(SIM_CROPS)]
        clear = scenes[src][:, r:r + size, c:c + size]
        if not np.isfinite(clear).all() or (clear <= 0).any():
            raise InputDataError(f"crop {src} {r},{c} holds nodata; pick another crop")
        cases.append(simulated_case(clear, SIM_BANDS, seed, spec, name=f"sim-{src}-{r}-{c}-seed{seed}"))
    return cases


from cloudfree.pipeline.evaluation.romania import (  # noqa: E402,F401  (re-exported: the held-out dates are a case fact)
    ROMANIA_EVAL_DATES,
    ROMANIA_MASK_DATES,
)


# -- real SAR: BigEarthNet's co-located S1 + S2 patches ------------------------------------------------------------
BIGEARTHNET_FOLDER = "s1s2-pairs-bigearthnet"
BIGEARTHNET_BANDS = ("B02", "B03", "B04", "B08")
BIGEARTHNET_GROUP = "bigearthnet-sar"
#: donors of the Romania clouds (held out of training): the first six ROMANIA_HIDDEN donors, one per patch.
BIGEARTHNET_DONORS = ROMANIA_MASK_DATES[:6]


_ROMANIA_STACKS: dict[str, Any] = {}


def bigearthnet_sar_cases(data_dir: str | Path, donors: Sequence[str] = BIGEARTHNET_DONORS, size: int = 100,
                          stack: Any = None) -> list[EvalCase]:
    """One case per BigEarthNet S1+S2 patch (sorted by S1 patch name): the S2 10 m bands ``BIGEARTHNET_BANDS``
    (DN / 10000) and the S1 VV/VH dB of the patch, centre-cropped to ``size`` (the Romania masks are 100 x 100), the
    patch hidden behind the REAL cloud of Romania donor ``donors[i]`` (its SCL mask for the model; its opacity
    ``t`` and shadow factor ``s`` transplanted by eq. 1 against its own clear-sky estimate, as the romania-hidden
    set does). Regions: thin ``0.1 <= t < 0.95``, thick ``t < 0.1``, cloudy = thin | thick | ``s < 0.95``."""
    import json

    import rasterio

    from cloudfree.pipeline.evaluation import romania as ro

    root = _subdir(data_dir, BIGEARTHNET_FOLDER)
    s1_dirs = sorted(d for d in (root / "s1").glob("*") if d.is_dir()) if (root / "s1").is_dir() else []
    if not s1_dirs:
        raise InputDataError(f"BigEarthNet pairs: no s1/<patch>/ folders under {root}; pass the shared data folder "
                             f"(holding {BIGEARTHNET_FOLDER}/) as --data-dir")
    if len(donors) < len(s1_dirs):
        raise InputDataError(f"BigEarthNet pairs: {len(s1_dirs)} patches but {len(donors)} cloud donors")
    if stack is None:  # loaded once per process and folder (140 dates: ~15 s)
        key = str(Path(data_dir).resolve())
        stack = _ROMANIA_STACKS.get(key) or _ROMANIA_STACKS.setdefault(key, ro.load_stack(data_dir))
    clear = stack.clear()
    donor_bands = [ro.ROMANIA_BANDS.index(b) for b in BIGEARTHNET_BANDS]

    def read(path: Path, off: int) -> np.ndarray:
        with rasterio.open(path) as ds:
            a = ds.read(1).astype(np.float32)
        return a[off:off + size, off:off + size]

    cases = []
    for s1_dir, donor_day in zip(s1_dirs, donors):
        meta1 = json.loads(next(s1_dir.glob("*_labels_metadata.json")).read_text())
        s2_name = meta1["corresponding_s2_patch"]
        s2_dir = root / "s2" / s2_name
        meta2 = json.loads(next(s2_dir.glob("*_labels_metadata.json")).read_text())
        with rasterio.open(next(s2_dir.glob("*_B02.tif"))) as ds:
            off = (min(ds.shape) - size) // 2
            if off < 0:
                raise InputDataError(f"BigEarthNet patch {s2_name} is {ds.shape}, smaller than {size}")
        truth = np.stack([read(next(s2_dir.glob(f"*_{b}.tif")), off) / 10000.0 for b in BIGEARTHNET_BANDS])
        sar_db = np.stack([read(next(s1_dir.glob(f"*_{p}.tif")), off) for p in ("VV", "VH")])
        kd = stack.index.get(ro.item_id(donor_day))
        if kd is None:
            raise InputDataError(f"Romania stack: donor {ro.item_id(donor_day)} not in the catalog")
        b, a = ro._neighbours(stack, kd, clear, set(), one_sided=True)
        donor_clear = ro._interp(stack, kd, b, a)[donor_bands]
        hidden, t, s_fac, light = ro.transplant(truth, stack.refl[kd][donor_bands], donor_clear, stack.scl[kd],
                                                BIGEARTHNET_BANDS)
        mask, prob = ro.scl_mask_and_prob(stack.scl[kd])
        thin, thick = (t >= 0.1) & (t < 0.95), t < 0.1
        regions = {"overall": np.ones_like(mask), "cloudy": thin | thick | (s_fac < 0.95), "thin": thin,
                   "thick": thick}
        gap_h = (dt_parse(meta1["acquisition_time"]) - dt_parse(meta2["acquisition_date"])).total_seconds() / 3600
        cases.append(EvalCase(
            name=f"bigearthnet-{s1_dir.name.rsplit('_', 3)[-3]}-{s2_name.rsplit('_', 2)[-2]}_"
                 f"{s2_name.rsplit('_', 1)[-1]}-mask-{donor_day}",
            group=BIGEARTHNET_GROUP, bands=BIGEARTHNET_BANDS, target=hidden, truth=truth.astype(np.float32),
            references=np.zeros((0,) + truth.shape, np.float32), reference_masks=np.zeros((0,) + mask.shape, bool),
            cloud_mask=mask, cloud_prob=prob, regions=regions, reference_dt_days=(),
            notes=f"REAL S2 L2A patch {s2_name} with its REAL co-located S1 ({gap_h:+.1f} h); the REAL cloud of "
                  f"Romania {donor_day} transplanted (mask and opacity real, cloud radiance RE-SYNTHESISED: the "
                  "clouds are SIMULATED on this scene); no reference date",
            simulated=True,
            meta={"s2_patch": s2_name, "s1_patch": s1_dir.name, "s1_minus_s2_hours": gap_h,
                  "donor": ro.item_id(donor_day), "cloud_fraction": float(regions["cloudy"].mean()),
                  "sar": "REAL (BigEarthNet S1 GRD, dB)"},
            sar=np.clip(np.nan_to_num(sar_db, nan=-25.0), -25.0, 0.0)[None].astype(np.float32),
            sar_bands=("vv", "vh"),
        ))
    return cases


def dt_parse(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text.replace(" ", "T"))

