"""Publish stage: the STAC Item that describes one output (eo/raster/proj/processing, derived_from links), and the
output Collection (``<out>/collection.json`` under a root ``<out>/catalog.json``) that lists every output item.

The collection is rewritten atomically (temp file + rename, under a file lock) each time an item is added, so a
reader (e.g. ``LocalCatalog`` pointed at ``<out>/catalog.json``) always sees a complete catalog, and a later run
can search its own outputs like any catalog (per-band VRT assets and a ``CLDPRB`` layer make an output loadable
as a reference).

:func:`check_item` is the offline structural validation: ``pystac.Item.validate()`` fetches the JSON schemas
from the internet (pystac ships no schemas), which these machines cannot reach.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pystac
from odc.geo.geobox import GeoBox

import cloudfree
from cloudfree.pipeline.contract import SOURCE_LABELS, SOURCE_REFERENCE_BASE
from cloudfree.pipeline.errors import InputDataError
from cloudfree.stages.masks import NODATA_BIT
from cloudfree.stages.write import REFLECTANCE_SCALE, WrittenOutput

log = logging.getLogger(__name__)

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
    weights_sha256: str | None = None, collection_id: str | None = None, mask_bits: dict[str, int] | None = None,
) -> pystac.Item:
    """Build (not save) the output Item; asset hrefs are relative to the item's folder."""
    bbox = list(geobox.geographic_extent.boundingbox)
    geom = geobox.geographic_extent.geom.__geo_interface__
    now = datetime.now(timezone.utc)
    source_codes = dict(SOURCE_LABELS)
    for i, r in enumerate(references):
        when = r.datetime.date().isoformat() if r.datetime else "undated"
        source_codes[SOURCE_REFERENCE_BASE + i] = f"reference {r.id} ({when})"
    props = {
        "s2:product_type": target.properties.get("s2:product_type"),
        "s2:mgrs_tile": target.properties.get("s2:mgrs_tile"),
        # the output DN are reflectance * 1e4 with no baseline offset: tells catalogs.harmonise not to subtract it
        "earthsearch:boa_offset_applied": True,
        "platform": target.properties.get("platform"),
        "constellation": target.properties.get("constellation"),
        "instruments": target.properties.get("instruments"),
        "proj:code": str(geobox.crs),
        "proj:shape": list(geobox.shape),
        "proj:transform": list(geobox.transform)[:6],
        "processing:level": "L2-cloudfree" if target.properties.get("s2:product_type", "").endswith("2A") else "L1-cloudfree",
        "processing:software": {"cloudfree": cloudfree.__version__},
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
    if mask_bits:
        props["cloudfree:mask_bits"] = {**{str(b): m for m, b in mask_bits.items()}, str(NODATA_BIT): "no valid data"}
    item = pystac.Item(f"{out.stem}", geom, bbox, target.datetime, props, stac_extensions=list(EXTENSIONS),
                       collection=collection_id)
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
    if "mask_provenance" in out.files:
        item.add_asset("mask_provenance", pystac.Asset(
            f"./{out.files['mask_provenance'].name}", "which mask method flagged the target pixel (bit flags, see "
            "cloudfree:mask_bits)", media_type=pystac.MediaType.COG, roles=["data", "provenance", "cloud"],
            extra_fields={"raster:bands": [{"data_type": "uint8"}]},
        ))
    grid = {"proj:shape": list(geobox.shape), "proj:transform": list(geobox.transform)[:6]}
    for i, b in enumerate(bands, 1):
        if f"band:{b}" in out.files:
            item.add_asset(b, pystac.Asset(
                f"./{out.files[f'band:{b}'].name}", f"{b} (band {i} of the reflectance COG, GDAL VRT)",
                # no media type: GDAL VRT has no registered one, and odc-stac reads an untyped "data" asset
                media_type=None, roles=["data", "virtual"],
                extra_fields={"eo:bands": [{"name": b}], **grid, "raster:bands": [
                    {"data_type": "uint16", "nodata": 0, "scale": REFLECTANCE_SCALE, "offset": 0}]},
            ))
    if "cldprb" in out.files:
        item.add_asset("CLDPRB", pystac.Asset(
            f"./{out.files['cldprb'].name}", "residual cloud probability, percent (100 - confidence), GDAL VRT",
            media_type=None, roles=["data", "cloud-probability", "virtual"],
            extra_fields={**grid, "raster:bands": [{"data_type": "uint8", "nodata": 255, "unit": "percent"}]},
        ))
    if "quicklook" in out.files:
        item.add_asset("quicklook", pystac.Asset(f"./{out.files['quicklook'].name}", "before | after | mask",
                                                 media_type=pystac.MediaType.PNG, roles=["overview"]))
    for src in [target, *references]:
        item.add_link(pystac.Link("derived_from", _href(src), media_type=pystac.MediaType.JSON,
                                  extra_fields={"id": src.id}))
    return item


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (e.g. a model's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def update_collection(out_dir: str | Path, item_path: str | Path, collection_id: str,
                      description: str = "cloudfree outputs") -> Path:
    """Add (or refresh) the item at ``item_path`` in ``<out_dir>/collection.json`` (extent recomputed from all
    listed items) and make sure ``<out_dir>/catalog.json`` links it; rewrites the item's root/parent/collection
    links. Atomic and locked; returns the collection path."""
    out_dir = Path(out_dir).resolve()
    item_path = Path(item_path).resolve()
    coll_path, cat_path = out_dir / "collection.json", out_dir / "catalog.json"
    with _locked(out_dir / ".collection.lock"):
        rel = "./" + item_path.relative_to(out_dir).as_posix()
        idict = json.loads(item_path.read_text())
        up = "../" * (len(item_path.relative_to(out_dir).parts) - 1)
        idict["collection"] = collection_id
        idict["links"] = [lk for lk in idict.get("links", []) if lk["rel"] not in ("root", "parent", "collection")]
        idict["links"] += [{"rel": "root", "href": f"{up}catalog.json", "type": "application/json"},
                           {"rel": "parent", "href": f"{up}collection.json", "type": "application/json"},
                           {"rel": "collection", "href": f"{up}collection.json", "type": "application/json"}]
        _write_atomic(idict, item_path)
        coll = json.loads(coll_path.read_text()) if coll_path.exists() else {
            "type": "Collection", "stac_version": pystac.get_stac_version(), "id": collection_id,
            "description": description, "license": "proprietary", "stac_extensions": [], "links": [],
            "extent": {}, "summaries": {}}
        hrefs = [lk["href"] for lk in coll["links"] if lk["rel"] == "item"]
        if rel not in hrefs:
            hrefs.append(rel)
        hrefs = [h for h in hrefs if (out_dir / h).exists()]
        bboxes, times = [], []
        for h in hrefs:
            d = json.loads((out_dir / h).read_text())
            bboxes.append(d["bbox"])
            times.append(d["properties"].get("datetime"))
        times = sorted(t for t in times if t)
        coll["extent"] = {
            "spatial": {"bbox": [[min(b[0] for b in bboxes), min(b[1] for b in bboxes),
                                  max(b[2] for b in bboxes), max(b[3] for b in bboxes)]]},
            "temporal": {"interval": [[times[0] if times else None, times[-1] if times else None]]},
        }
        coll["links"] = ([{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                          {"rel": "parent", "href": "./catalog.json", "type": "application/json"}]
                         + [{"rel": "item", "href": h, "type": "application/geo+json"} for h in hrefs])
        _write_atomic(coll, coll_path)
        if not cat_path.exists():
            _write_atomic({"type": "Catalog", "stac_version": pystac.get_stac_version(), "id": f"{collection_id}-root",
                           "description": f"cloudfree outputs in {out_dir.name}", "stac_extensions": [],
                           "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                                     {"rel": "child", "href": "./collection.json", "type": "application/json"}]},
                          cat_path)
    log.info("collection %s: %d item(s)", coll_path, len(hrefs))
    return coll_path


#: Properties every output item must carry (checked by :func:`check_item`).
REQUIRED_PROPERTIES = ("proj:code", "proj:shape", "proj:transform", "processing:level",
                       "processing:lineage", "processing:software", "cloudfree:run_id", "cloudfree:model",
                       "cloudfree:harmonisation")


def check_item(item: pystac.Item | dict | str | Path) -> list[str]:
    """Offline structural validation of an output item; returns the problems found (empty = valid).

    Checks the core Item fields, the declared extensions' fields (eo, raster, proj, processing), the cloudfree
    provenance fields, ``derived_from`` links, and that every asset href resolves to an existing file.
    """
    if isinstance(item, (str, Path)):
        item = pystac.Item.from_file(str(item))
    elif isinstance(item, dict):
        item = pystac.Item.from_dict(item)
    problems = []
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    for key in ("type", "stac_version", "id", "geometry", "bbox", "properties", "links", "assets"):
        if key not in d:
            problems.append(f"missing {key}")
    if d.get("type") != "Feature":
        problems.append(f"type is {d.get('type')!r}, not 'Feature'")
    if d.get("bbox") and len(d["bbox"]) != 4:
        problems.append(f"bbox {d['bbox']} is not [minx, miny, maxx, maxy]")
    props = d["properties"]
    if not props.get("datetime") and not (props.get("start_datetime") and props.get("end_datetime")):
        problems.append("neither datetime nor start_datetime/end_datetime")
    for key in REQUIRED_PROPERTIES:
        if d["properties"].get(key) in (None, "", []):
            problems.append(f"property {key} missing")
    for ext in ("eo", "raster", "projection", "processing"):
        if not any(f"/{ext}/" in e for e in d.get("stac_extensions", [])):
            problems.append(f"extension {ext} not declared")
    if not any(lk.rel == "derived_from" for lk in item.links):
        problems.append("no derived_from link")
    refl = item.assets.get("reflectance")
    if refl is None or not refl.extra_fields.get("eo:bands") or not refl.extra_fields.get("raster:bands"):
        problems.append("reflectance asset lacks eo:bands / raster:bands")
    for key, asset in item.assets.items():
        href = asset.get_absolute_href()
        if href is None or ("://" not in href and not Path(href).exists()):
            problems.append(f"asset {key} href {asset.href} does not resolve ({href})")
    return problems


def assert_valid_item(path: str | Path) -> pystac.Item:
    """:func:`check_item` or raise :class:`InputDataError` listing the problems."""
    item = pystac.Item.from_file(str(path))
    problems = check_item(item)
    if problems:
        raise InputDataError(f"output item {path} is not valid: {problems}; rerun the target with --overwrite")
    return item


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "1220" + h.hexdigest()  # multihash prefix for sha2-256, as the file extension expects
