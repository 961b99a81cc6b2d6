"""The data contract between stages, and the tile contract between the runner and the removal models.

Scene contract (stage to stage): a lazy ``xarray.DataArray`` with dims ``("time", "band", "y", "x")``, a ``band``
coordinate named as Sentinel-2 bands (``"B02"``...), ``time`` as datetime64, CRS and transform through rioxarray,
float32 reflectance (0-1 scale) with NaN as nodata. ``validate_scene`` checks it at stage boundaries.

Tile contract (runner to model): plain numpy arrays in a frozen :class:`TileInputs`; the model returns a
:class:`TileResult`. Keeping models free of xarray/dask/rasterio makes them picklable, testable without files, and
lets GPU models batch tiles (``predict_batch``) without a rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from cloudfree.pipeline.errors import ContractError

#: Sentinel-2 MSI bands and their native ground sampling distance in metres.
S2_BANDS: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}
SCENE_DIMS = ("time", "band", "y", "x")

# Source codes written to the per-pixel ``source`` band of every output.
SOURCE_NODATA = 0  #: nothing could be written (no valid input anywhere)
SOURCE_TARGET = 1  #: the target's own observation, kept unchanged (clear)
SOURCE_MODEL = 2  #: restored from the target by the model (e.g. thin-cloud inversion)
SOURCE_FUSED = 3  #: blend of model restoration and a reference (soft gate, PhyVLM-CR eq. 10)
SOURCE_FAILED = 4  #: an input read failed; the pixel is not a cloud-free estimate
SOURCE_UNFILLED = 5  #: the target's cloudy observation, kept because nothing could restore it (not clear)
#: the target's observation of a pixel its cloud layer flagged but the mask refinement's opening removed from the
#: mask (an isolated speck): kept as observed, confidence ``1 - probability``, never labelled clear
SOURCE_OPENED = 6
SOURCE_REFERENCE_BASE = 10  #: reference ``i`` (0 = best ranked) supplied the pixel -> code ``10 + i``

SOURCE_LABELS = {
    SOURCE_NODATA: "nodata",
    SOURCE_TARGET: "target observation (clear)",
    SOURCE_MODEL: "restored by model from the target",
    SOURCE_FUSED: "fusion of model and reference",
    SOURCE_FAILED: "read failed",
    SOURCE_UNFILLED: "cloudy, not restored",
    SOURCE_OPENED: "flagged cloud removed from the mask by the refinement's opening (target observation, not clear)",
}


def validate_scene(da: xr.DataArray, *, name: str = "scene", bands: tuple[str, ...] | None = None) -> xr.DataArray:
    """Check ``da`` against the scene contract; return it unchanged (lazy arrays stay lazy).

    Raises :class:`ContractError` naming the problem and the fix.
    """
    if not isinstance(da, xr.DataArray):
        raise ContractError(f"{name}: expected an xarray.DataArray, got {type(da).__name__}")
    if tuple(da.dims) != SCENE_DIMS:
        raise ContractError(
            f"{name}: dims are {tuple(da.dims)}, the contract is {SCENE_DIMS}; "
            f"use .transpose{SCENE_DIMS} or add the missing dims with .expand_dims"
        )
    if "band" not in da.coords or da.coords["band"].dtype.kind not in "UO":
        raise ContractError(f"{name}: the 'band' coordinate must hold band names such as 'B02'")
    have = [str(b) for b in da.coords["band"].values]
    if bands is not None:
        missing = [b for b in bands if b not in have]
        if missing:
            raise ContractError(f"{name}: bands {missing} are missing (have {have}); add them to grid.bands")
    if "time" not in da.coords or not np.issubdtype(da.coords["time"].dtype, np.datetime64):
        raise ContractError(f"{name}: the 'time' coordinate must be datetime64")
    if da.dtype != np.float32:
        raise ContractError(f"{name}: dtype is {da.dtype}, stages exchange float32 reflectance; convert with harmonise")
    if da.rio.crs is None:
        raise ContractError(f"{name}: no CRS; write one with .rio.write_crs(...)")
    return da


@dataclass(frozen=True)
class TileWindow:
    """One output tile of the grid: the core window it writes and the halo-padded window it reads.

    Offsets are in pixels of the output grid; ``read`` is clipped to the grid, so ``core_in_read`` gives the
    core's position inside the read window.
    """

    index: tuple[int, int]
    core: tuple[slice, slice]
    read: tuple[slice, slice]

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        (cy, cx), (ry, rx) = self.core, self.read
        return (slice(cy.start - ry.start, cy.stop - ry.start), slice(cx.start - rx.start, cx.stop - rx.start))


@dataclass(frozen=True)
class TileInputs:
    """Everything a removal model sees for one (halo-padded) tile. Pure numpy, float32 reflectance, NaN nodata.

    Attributes:
        bands: band names of axis 0 of ``target`` / axis 1 of ``references``.
        target: ``(band, y, x)`` the cloudy scene.
        cloud_prob: ``(y, x)`` continuous cloud probability/opacity in [0, 1] (thin vs thick); NaN = unknown.
        cloud_mask: ``(y, x)`` True where the mask stage flagged cloud or shadow.
        references: ``(time, band, y, x)`` clear(er) observations of the same place, best ranked first; time may be 0.
        reference_masks: ``(time, y, x)`` True where a reference pixel is cloudy or nodata.
        reference_ids: STAC ids of the references, same order.
        reference_dt_days: signed days from the target to each reference.
        sar: ``(time, pol, y, x)`` Sentinel-1 backscatter, one scene per optical date (target first), in the units
            the model's ``spec.sar_units`` declares (linear power, or dB clipped to [-25, 0]); None without S1.
        sar_bands: polarisation names of ``sar`` axis 1 (e.g. ``("vv", "vh")``).
        halo: pixels of context around the core on each side (already included in the arrays).
        target_id: STAC id of the target.
        context: scene-level statistics the model computed once per scene with ``fit_scene`` on a coarse
            sample (e.g. per-reference radiometric alignment), so tiles agree and mosaics have no seams.
        origin: ``(row, col)`` of the tile's first pixel (halo included) in the scene's output grid; generative
            models derive their noise from it so overlapping tiles draw the same noise at the same ground pixel.
    """

    bands: tuple[str, ...]
    target: np.ndarray
    cloud_prob: np.ndarray
    cloud_mask: np.ndarray
    references: np.ndarray
    reference_masks: np.ndarray
    reference_ids: tuple[str, ...] = ()
    reference_dt_days: tuple[float, ...] = ()
    sar: np.ndarray | None = None
    sar_bands: tuple[str, ...] = ()
    halo: int = 0
    target_id: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)
    origin: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        nb, ny, nx = _shape(self.target, 3, "target")
        if len(self.bands) != nb:
            raise ContractError(f"tile {self.target_id}: {len(self.bands)} band names for {nb} target bands")
        if self.cloud_prob.shape != (ny, nx) or self.cloud_mask.shape != (ny, nx):
            raise ContractError(
                f"tile {self.target_id}: cloud_prob {self.cloud_prob.shape} / cloud_mask {self.cloud_mask.shape} "
                f"must be {(ny, nx)}"
            )
        nt = _shape(self.references, 4, "references")[0]
        if self.references.shape[1:] != (nb, ny, nx) or self.reference_masks.shape != (nt, ny, nx):
            raise ContractError(
                f"tile {self.target_id}: references {self.references.shape} / reference_masks "
                f"{self.reference_masks.shape} do not match the target {(nb, ny, nx)}"
            )
        if self.sar is not None and (self.sar.ndim != 4 or self.sar.shape[2:] != (ny, nx)):
            raise ContractError(f"tile {self.target_id}: sar {self.sar.shape} must be (time, pol, {ny}, {nx})")

    def band_index(self, *names: str) -> list[int]:
        """Positions of the named bands; select bands by name, never by position."""
        missing = [n for n in names if n not in self.bands]
        if missing:
            raise ContractError(f"tile {self.target_id}: bands {missing} missing; have {self.bands}")
        return [self.bands.index(n) for n in names]

    @property
    def shape(self) -> tuple[int, int]:
        return self.target.shape[1], self.target.shape[2]


@dataclass
class TileResult:
    """What a removal model returns for one tile (same shape as its inputs, halo included).

    ``reflectance`` ``(band, y, x)`` float32; ``confidence`` ``(y, x)`` in [0, 1] (1 = observed or certain);
    ``source`` ``(y, x)`` uint8 codes (``SOURCE_*``); ``diagnostics`` named ``(y, x)`` float32 maps for inspection
    (e.g. PhyVLM-CR's A, t, U, omega).
    """

    reflectance: np.ndarray
    confidence: np.ndarray
    source: np.ndarray
    diagnostics: Mapping[str, np.ndarray] = field(default_factory=dict)

    def validate(self, inputs: TileInputs, model: str = "model") -> "TileResult":
        nb, ny, nx = inputs.target.shape
        if self.reflectance.shape != (nb, ny, nx):
            raise ContractError(f"{model}: reflectance {self.reflectance.shape}, expected {(nb, ny, nx)}")
        if self.confidence.shape != (ny, nx) or self.source.shape != (ny, nx):
            raise ContractError(f"{model}: confidence/source must be {(ny, nx)}")
        for k, v in self.diagnostics.items():
            if v.shape[-2:] != (ny, nx):
                raise ContractError(f"{model}: diagnostic {k!r} has shape {v.shape}, expected (..., {ny}, {nx})")
        self.reflectance = self.reflectance.astype(np.float32, copy=False)
        self.confidence = np.clip(self.confidence, 0, 1).astype(np.float32, copy=False)
        self.source = self.source.astype(np.uint8, copy=False)
        return self


def _shape(a: np.ndarray, ndim: int, what: str) -> tuple[int, ...]:
    if not isinstance(a, np.ndarray) or a.ndim != ndim:
        raise ContractError(f"{what} must be a {ndim}-d numpy array, got {getattr(a, 'shape', type(a))}")
    return a.shape
