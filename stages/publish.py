"""Publish stage: the STAC Item that describes one output (eo/raster/proj/processing, derived_from links)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pystac
from odc.geo.geobox import GeoBox

import pipeline
from pipeline.contract import SOURCE_LABELS, SOURCE_REFERENCE_BASE
from stages.write import REFLECTANCE_SCALE, WrittenOutput

EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
]


def _href(item: pystac.Item) -> str:
    self_href = item.get_self_href()
    return self_href or f"stac:{item.collection_id}/{item.id}"


def output_item(
    target: pystac.Item, references: Sequence[pystac.Item], out: WrittenOutput, geobox: GeoBox, bands: Sequence[str],
    model_name: str, model_params: dict, run_id: str, harmonisation: Sequence[dict], extra: dict | None = None,
    weights_sha256: str | None = None,
) -> pystac.Item:
    """Build (not save) the output Item; asset hrefs are relative to the item's folder."""
    bbox = list(geobox.geographic_extent.boundingbox)
    geom = geobox.geographic_extent.geom.__geo_interface__
    now = datetime.now(timezone.utc)
    source_codes = dict(SOURCE_LABELS)
    for i, r in enumerate(references):
        source_codes[SOURCE_REFERENCE_BASE + i] = f"reference {r.id}"
    props = {
        "platform": target.properties.get("platform"),
        "constellation": target.properties.get("constellation"),
        "instruments": target.properties.get("instruments"),
        "proj:code": str(geobox.crs),
        "proj:shape": list(geobox.shape),
        "proj:transform": list(geobox.transform)[:6],
        "processing:level": "L2-cloudfree" if target.properties.get("s2:product_type", "").endswith("2A") else "L1-cloudfree",
        "processing:software": {"cloudfree": pipeline.__version__},
        "processing:lineage": (
            f"cloud removal of {target.id} with model {model_name!r} using references "
            f"{[r.id for r in references]}"
        ),
        "processing:datetime": now.isoformat(),
        "cloudfree:run_id": run_id,
        "cloudfree:model": {"name": model_name, "params": model_params, "weights_sha256": weights_sha256},
        "cloudfree:target": target.id,
        "cloudfree:references": [r.id for r in references],
        "cloudfree:harmonisation": list(harmonisation),
        "cloudfree:source_codes": {str(k): v for k, v in sorted(source_codes.items())},
        "cloudfree:simulated_inputs": any(i.properties.get("cloudfree:simulated") for i in [target, *references]),
    }
    props.update(extra or {})
    item = pystac.Item(f"{out.stem}", geom, bbox, target.datetime, props, stac_extensions=list(EXTENSIONS))
    item.add_asset("reflectance", pystac.Asset(
        f"./{out.files['reflectance'].name}", "cloud-free reflectance", media_type=pystac.MediaType.COG,
        roles=["data", "reflectance"],
        extra_fields={
            "eo:bands": [{"name": b} for b in bands],
            "raster:bands": [{"name": b, "data_type": "uint16", "nodata": 0, "scale": REFLECTANCE_SCALE, "offset": 0}
                             for b in bands],
            "file:checksum": _sha256(out.files["reflectance"]),
        },
    ))
    item.add_asset("confidence", pystac.Asset(
        f"./{out.files['confidence'].name}", "per-pixel confidence, percent (100 = observed)",
        media_type=pystac.MediaType.COG, roles=["data", "quality"],
        extra_fields={"raster:bands": [{"data_type": "uint8", "nodata": 255, "unit": "percent"}]},
    ))
    item.add_asset("source", pystac.Asset(
        f"./{out.files['source'].name}", "per-pixel source code (see cloudfree:source_codes)",
        media_type=pystac.MediaType.COG, roles=["data", "provenance"],
        extra_fields={"raster:bands": [{"data_type": "uint8"}]},
    ))
    if "quicklook" in out.files:
        item.add_asset("quicklook", pystac.Asset(f"./{out.files['quicklook'].name}", "before | after | mask",
                                                 media_type=pystac.MediaType.PNG, roles=["overview"]))
    for src in [target, *references]:
        item.add_link(pystac.Link("derived_from", _href(src), media_type=pystac.MediaType.JSON,
                                  extra_fields={"id": src.id}))
    return item


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "1220" + h.hexdigest()  # multihash prefix for sha2-256, as the file extension expects
