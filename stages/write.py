"""Write stage: one compute pass -> Cloud-Optimized GeoTIFFs, a quicklook PNG and a STAC Item per target.

The files of one target live here; the bytes of each COG come from :mod:`cloudfree.stages.cog` (the streaming
writer), the STAC Item and the output collection from :mod:`cloudfree.stages.publish` (metadata only).

The lazy result is computed once and streamed block by block straight into the COGs (:mod:`cloudfree.stages.cog`, odc-geo's
dask COG writer: internal tiles, overviews, nodata, DEFLATE/ZSTD/LZW + predictor 2), all layers in one pass, with
no intermediate file and no lock; each file is checked with ``rio_cogeo.cogeo.cog_validate``:

* ``<id>_reflectance.tif``: uint16, ``DN = reflectance * 10000`` (scale 1e-4, offset 0, nodata 0), like the input;
* ``<id>_confidence.tif``: uint8 0-100 (percent), nodata 255;
* ``<id>_source.tif``: uint8 source codes (``cloudfree.pipeline.contract.SOURCE_*``);
* ``<id>_mask_provenance.tif``: uint8 bit flags, which mask method flagged the target pixel
  (``cloudfree.stages.masks.METHOD_BITS``, 16 = no valid target data), when the result carries ``mask_provenance``;
* ``<id>_<band>.vrt`` (one per band) and ``<id>_cldprb.vrt`` (100 - confidence): small VRTs over the COGs, so a
  later run can load an output like any Sentinel-2 item (per-band assets, a cloud-probability layer).

Everything goes to a staging folder first (``cloudfree.pipeline.safety``: one per run and target, under the target's lock) and
the finished folder, STAC item included, is moved into place with one rename (atomic); the item marks the target as
done, so a rerun skips finished targets and redoes unfinished ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import rasterio
import xarray as xr

from cloudfree.pipeline.config import OutputConfig
from cloudfree.pipeline.fileio import write_json_atomic  # noqa: F401  (re-exported for the runner and composite)

log = logging.getLogger(__name__)

REFLECTANCE_SCALE = 1e-4
CONF_NODATA = 255
RGB = ("B04", "B03", "B02")


@dataclass
class WrittenOutput:
    stem: str
    directory: Path
    files: dict[str, Path] = field(default_factory=dict)
    #: the encoded layers as written, ``{name: (band, y, x) integer array}``, when they were computed into memory
    #: (a target of one COG tile, :func:`cloudfree.stages.cog.write_layers`); empty otherwise
    arrays: dict = field(default_factory=dict)

    @property
    def reflectance(self) -> Path:
        return self.files["reflectance"]


def paths_for(out_dir: Path, stem: str) -> dict[str, Path]:
    d = Path(out_dir) / stem
    return {
        "reflectance": d / f"{stem}_reflectance.tif",
        "confidence": d / f"{stem}_confidence.tif",
        "source": d / f"{stem}_source.tif",
        "mask_provenance": d / f"{stem}_mask_provenance.tif",
        "cldprb": d / f"{stem}_cldprb.vrt",
        "quicklook": d / f"{stem}_quicklook.png",
        "item": d / f"{stem}.json",
    }


def is_done(out_dir: Path, stem: str) -> bool:
    """A target is done when its STAC item exists (published last, with the folder) and does not say
    ``cloudfree:status: unrestored`` (those are retried by every run: a new reference may have arrived)."""
    p = paths_for(out_dir, stem)["item"]
    if not p.exists():
        return False
    try:
        status = json.loads(p.read_text())["properties"].get("cloudfree:status", "done")
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable item: redo the target
    return status == "done"


def write_outputs(ds: xr.Dataset, out_dir: Path, stem: str, cfg: OutputConfig, extra_compute=(),
                  progress: Callable[[str], ContextManager] | None = None, stage: Path | None = None,
                  strip_blocks: int | None = None) -> tuple[WrittenOutput, list]:
    """Compute ``ds`` once and write the COGs. ``extra_compute`` lazy objects are computed in the same pass
    (e.g. decimated quicklook inputs), sharing the input reads. ``progress(desc)`` (e.g. the CLI's progress bar)
    returns a context manager the compute runs in; None = no progress report. Returns the outputs and the
    computed extras.

    With ``stage`` (a folder from :func:`cloudfree.pipeline.safety.staging_dir`, the caller holding the target's lock) the
    files are written there and stay there: the caller adds the item and publishes the folder
    (:func:`cloudfree.pipeline.safety.publish_dir`); ``out.files`` then point into ``stage``. Without it, a private staging
    folder is used and its files are moved into ``<out_dir>/<stem>/`` at the end. Either way every temporary file
    (the COG part files) lives in the staging folder, and a failure removes it.
    """
    from cloudfree.pipeline.safety import safe_rmtree, staging_dir

    own_stage = stage is None
    if own_stage:
        import uuid

        stage = staging_dir(out_dir, stem, uuid.uuid4().hex[:12])
    try:
        out, extras = _write_into(ds, Path(stage), stem, cfg, extra_compute, progress, strip_blocks)
    except BaseException:
        safe_rmtree(out_dir, stage)
        raise
    if not own_stage:
        return out, extras
    from cloudfree.pipeline.safety import ensure_inside

    final_dir = ensure_inside(out_dir, paths_for(out_dir, stem)["item"].parent)
    final_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(stage).iterdir():
        f.replace(final_dir / f.name)
    Path(stage).rmdir()
    out.directory = final_dir
    out.files = {k: final_dir / Path(v).name for k, v in out.files.items()}
    return out, extras


def _write_into(ds: xr.Dataset, stage: Path, stem: str, cfg: OutputConfig, extra_compute,
                progress: Callable[[str], ContextManager] | None, strip_blocks: int | None = None
                ) -> tuple[WrittenOutput, list]:
    """The COGs and VRTs of ``ds`` written into the folder ``stage`` (files named as in :func:`paths_for`)."""
    from cloudfree.stages.cog import write_layers

    final = paths_for(stage.parent, stem)
    bands = [str(b) for b in ds.band.values]
    out = WrittenOutput(stem, stage)
    files, extras, _ = write_layers(ds, stage, final, blocksize=cfg.blocksize, compress=cfg.compress,
                                    extra_compute=extra_compute, progress=progress, desc=f"{stem}: compute+write",
                                    strip_blocks=strip_blocks, arrays_out=out.arrays)
    out.files.update(files)
    for name, path in band_vrts(stage, stem, bands).items():
        out.files[name] = path
    return out, extras


_GDAL_TYPES = {"uint8": "Byte", "byte": "Byte", "uint16": "UInt16"}


def _source_info(path: Path) -> tuple:
    """``(width, height, crs wkt, gdal geotransform, dtypes, nodatavals)`` of a raster (one open)."""
    with rasterio.open(path) as ds:
        return ds.width, ds.height, ds.crs.to_wkt(), ds.transform.to_gdal(), ds.dtypes, ds.nodatavals


def _vrt(dst: Path, src_name: str, src_band: int, dtype: str, nodata: int, scale: float = 1.0,
         offset: float = 0.0, info: tuple | None = None) -> Path:
    """A one-band VRT over band ``src_band`` of the sibling file ``src_name`` (value * scale + offset); ``info``:
    that file's :func:`_source_info` when the caller has it (one open for all bands of a file)."""
    w, h, crs, gt, dtypes, nodatavals = info or _source_info(dst.parent / src_name)
    src_dtype = dtypes[src_band - 1]
    src_nodata = nodatavals[src_band - 1]
    from xml.sax.saxutils import escape

    kind = "ComplexSource" if (scale, offset) != (1.0, 0.0) or src_nodata is not None else "SimpleSource"
    extra = ""
    if kind == "ComplexSource":
        extra = f"<ScaleOffset>{offset}</ScaleOffset><ScaleRatio>{scale}</ScaleRatio>"
        if src_nodata is not None:
            extra += f"<NODATA>{src_nodata:g}</NODATA>"
    xml = (
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>{escape(crs)}</SRS>'
        f"<GeoTransform>{', '.join(repr(float(v)) for v in gt)}</GeoTransform>"
        f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="1">'
        f"<NoDataValue>{nodata}</NoDataValue><{kind}>"
        f'<SourceFilename relativeToVRT="1">{escape(src_name)}</SourceFilename><SourceBand>{src_band}</SourceBand>'
        f'<SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{_GDAL_TYPES[src_dtype]}"/>'
        f"{extra}</{kind}></VRTRasterBand></VRTDataset>"
    )
    dst.write_text(xml)
    return dst


def band_vrts(directory: Path, stem: str, bands: list[str]) -> dict[str, Path]:
    """Per-band VRTs over the reflectance COG and a cloud-probability VRT (``100 - confidence``)."""
    refl = f"{stem}_reflectance.tif"
    info = _source_info(directory / refl)
    out = {f"band:{b}": _vrt(directory / f"{stem}_{b}.vrt", refl, i, "uint16", 0, info=info)
           for i, b in enumerate(bands, 1)}
    out["cldprb"] = _vrt(directory / f"{stem}_cldprb.vrt", f"{stem}_confidence.tif", 1, "byte", CONF_NODATA,
                         scale=-1.0, offset=100.0)
    return out


#: the quicklook's fixed true-colour stretch (reflectance mapped to 0-1), the same for every panel, target and model
#: (as Sentinel Hub's and titiler's true-colour defaults): cloud looks white and bright, never "crisp forest".
QUICKLOOK_STRETCH = (0.0, 0.3)
#: mask-panel classes: (label, colour) by priority; the provenance bits of stages.masks / stages.missed_cloud.
MASK_CLASSES = (("clear", (0.13, 0.55, 0.13)), ("cloud/shadow (mask)", (0.62, 0.8, 1.0)),
                ("missed by the mask (multi-temporal test)", (1.0, 0.1, 0.6)), ("no data / failed read", (0.3, 0.3, 0.3)))


def mask_classes(provenance: np.ndarray) -> np.ndarray:
    """Provenance bits -> class index of :data:`MASK_CLASSES` (0 clear, 1 mask, 2 missed, 3 nodata). A boolean mask
    is read as "mask" where True."""
    from cloudfree.stages.masks import NODATA_BIT
    from cloudfree.stages.missed_cloud import MISSED_BIT

    p = np.asarray(provenance)
    if p.dtype == bool:
        return p.astype(np.uint8)
    p = p.astype(np.uint8)
    out = np.zeros(p.shape, np.uint8)
    out[(p & ~np.uint8(NODATA_BIT | MISSED_BIT)) > 0] = 1
    out[(p & MISSED_BIT) > 0] = 2
    out[(p & NODATA_BIT) > 0] = 3
    return out


def stretch_rgb(a: np.ndarray, lo: float = QUICKLOOK_STRETCH[0], hi: float = QUICKLOOK_STRETCH[1]) -> np.ndarray:
    """``(3, y, x)`` reflectance -> ``(y, x, 3)`` in 0-1 by the fixed stretch (NaN black)."""
    return np.clip((np.nan_to_num(np.moveaxis(np.asarray(a, np.float32), 0, -1), nan=lo) - lo) / (hi - lo), 0, 1)


def quicklook(before_rgb: np.ndarray, after_rgb: np.ndarray, mask: np.ndarray, path: Path, title: str = "") -> Path:
    """before | after | mask PNG: both images at the fixed reflectance stretch :data:`QUICKLOOK_STRETCH` (the same
    for every output and model, so outputs compare by eye), the mask panel by class (``mask``: the provenance
    bits, or a boolean mask) with a legend, the figure sized to the image (no large empty margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ny, nx = np.asarray(mask).shape[-2:]
    panel_w = 4.2
    panel_h = panel_w * ny / max(nx, 1)
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel_w, panel_h + 1.0), squeeze=True)
    cls = mask_classes(mask)
    cmap = ListedColormap([c for _, c in MASK_CLASSES])
    lo, hi = QUICKLOOK_STRETCH
    for ax, img, t in zip(axes, [stretch_rgb(before_rgb), stretch_rgb(after_rgb), cls],
                          [f"before (cloudy target), {lo:g}-{hi:g}", f"after (cloud-free), {lo:g}-{hi:g}",
                           "mask"]):
        if img.ndim == 2:
            ax.imshow(img, cmap=cmap, vmin=0, vmax=len(MASK_CLASSES) - 1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_axis_off()
    present = [i for i in range(len(MASK_CLASSES)) if (cls == i).any()] or [0]
    axes[2].legend(handles=[Patch(facecolor=MASK_CLASSES[i][1], edgecolor="0.4", label=MASK_CLASSES[i][0])
                            for i in present], loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=7,
                   ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.08, wspace=0.03)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    tmp.replace(path)
    return path


