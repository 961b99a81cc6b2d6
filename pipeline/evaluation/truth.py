"""Scoring an output against a SIMULATED item's truth (the demo's ``truth`` asset): PSNR before/after.

Only simulated items carry a truth asset; real scenes are scored by ``cloudfree evaluate`` instead.
"""

from __future__ import annotations

import numpy as np
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT


def _read_on(href: str, geobox: GeoBox, indexes: list[int]) -> np.ndarray:
    with rasterio.open(href) as src, WarpedVRT(src, crs=geobox.crs.to_wkt(), transform=geobox.transform,
                                               width=geobox.shape[1], height=geobox.shape[0],
                                               resampling=Resampling.bilinear) as vrt:
        return vrt.read(indexes).astype(np.float32)


def evaluate_against_truth(target, output_path, geobox: GeoBox, bands, chunk: int) -> dict:
    """PSNR (dB, reflectance range 1) of target and output vs truth: on all pixels and on simulated-cloudy pixels.

    Cloudy = simulated transmission < 0.95 (from the ``truth_transmission`` asset) when present.
    """
    truth_asset = target.assets["truth"]
    tbands = list(truth_asset.extra_fields.get("cloudfree:bands", []))
    common = [b for b in bands if b in tbands]
    if not common:
        return {}
    truth = _read_on(truth_asset.get_absolute_href(), geobox, [tbands.index(b) + 1 for b in common]) * 1e-4
    out = _read_on(str(output_path), geobox, [list(bands).index(b) + 1 for b in common]) * 1e-4
    from cloudfree.pipeline.evaluation.metrics import psnr
    from cloudfree.stages.load import load_reflectance

    before = load_reflectance([target], common, geobox, chunk).isel(time=0).values
    truth[truth <= 0] = np.nan
    out[out <= 0] = np.nan
    cloudy = np.ones(geobox.shape, bool)
    if "truth_transmission" in target.assets:
        t = _read_on(target.assets["truth_transmission"].get_absolute_href(), geobox, [1])[0]
        cloudy = t < 0.95
    res = {
        "simulated": True,
        "bands": common,
        "psnr_before_all": psnr(before, truth),
        "psnr_after_all": psnr(out, truth),
        "psnr_before_cloudy": psnr(before, truth, cloudy),
        "psnr_after_cloudy": psnr(out, truth, cloudy),
        "cloudy_fraction": float(cloudy.mean()),
        # psnr skips non-finite pixels: the share of cloudy pixels the output actually scored on (nodata excluded)
        "after_scored_fraction_cloudy": float(np.isfinite(out).all(axis=0)[cloudy].mean()) if cloudy.any() else 0.0,
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
