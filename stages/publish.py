"""Publish stage (metadata only; :mod:`~cloudfree.stages.write` writes the files, :mod:`~cloudfree.stages.cog` is its
COG byte writer): the STAC Item that describes one output (eo/raster/proj/processing, derived_from links), and the
output Collection (``<out>/collection.json`` under a root ``<out>/catalog.json``) that lists every output item.

The collection is rewritten atomically (temp file + rename, under a file lock) each time an item is added, so a
reader (e.g. ``LocalCatalog`` pointed at ``<out>/catalog.json``) always sees a complete catalog, and a later run
can search its own outputs like any catalog (per-band VRT assets and a ``CLDPRB`` layer make an output loadable
as a reference).

Items are built with pystac's extension helpers (eo, raster, projection v2, file, mgrs) plus the processing
extension v1.2.0; the tests validate items and the collection against the official JSON schemas of STAC core and
every declared extension, vendored for offline use (``tests/stac_schemas.py``). :func:`check_item` is the run-time
check of what a schema cannot see (provenance fields, ``derived_from`` links, asset files that exist).
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
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.mgrs import MgrsExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

import cloudfree
from cloudfree.pipeline.contract import SOURCE_LABELS, SOURCE_REFERENCE_BASE
from cloudfree.pipeline.errors import InputDataError
from cloudfree.pipeline.fileio import file_sha256  # noqa: F401  (re-exported: the runner records weights hashes)
from cloudfree.stages.masks import NODATA_BIT
from cloudfree.stages.write import REFLECTANCE_SCALE, WrittenOutput

log = logging.getLogger(__name__)

#: STAC extension schemas of the output items, at consistent versions: the pystac helpers (eo, raster, projection,
#: file, mgrs) declare their own; processing has no pystac helper, its fields are written here at v1.2.0 (the first
#: version with ``processing:datetime``). Tests validate every output against all of them (tests/stac_schemas.py).
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
#: The outputs are derived from Copernicus Sentinel-2 data: no SPDX identifier covers its terms, so STAC's
#: ``license: other`` with a ``license`` link to the legal notice.
LICENSE = "other"
LICENSE_LINK = pystac.Link(
    "license", "https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice",
    media_type="application/pdf", title="Legal notice on the use of Copernicus Sentinel Data and Service Information")
PROVIDERS = (
    pystac.Provider("European Union / ESA / Copernicus", roles=[pystac.ProviderRole.PRODUCER,
                                                             pystac.ProviderRole.LICENSOR],
                    url="https://sentinels.copernicus.eu", description="Sentinel-2 MSI acquisitions (the inputs)"),
    pystac.Provider("cloudfree", roles=[pystac.ProviderRole.PROCESSOR],
                    description="cloud removal: reflectance, confidence and per-pixel provenance (this pipeline)"),
)


def _href(item: pystac.Item, item_dir: Path | None = None) -> str:
    """Where ``item`` is: a URL as is, a local file relative to ``item_dir`` (an output's folder) when given
    (relative links: the output tree and its inputs can move together), else ``stac:<collection>/<id>``."""
    self_href = item.get_self_href()
    if not self_href:
        return f"stac:{item.collection_id}/{item.id}"
    if item_dir is not None and (self_href.startswith("file://") or "://" not in self_href):
        local = self_href[len("file://"):] if self_href.startswith("file://") else self_href
        return os.path.relpath(os.path.abspath(local), os.path.abspath(item_dir))
    return self_href


def _raster_band(data_type: str, nodata=None, scale=None, offset=None, unit=None) -> RasterBand:
    return RasterBand.create(data_type=DataType(data_type), nodata=nodata, scale=scale, offset=offset, unit=unit)


def _eo_band(name: str) -> Band:
    from cloudfree.catalogs.bands import S2_COMMON_NAMES

    return Band.create(name=name, common_name=S2_COMMON_NAMES.get(name))


def _apply_mgrs(item: pystac.Item, tile: str | None) -> None:
    """The MGRS extension (``mgrs:utm_zone``, ``mgrs:latitude_band``, ``mgrs:grid_square``) from a tile id like
    ``33UUU``; nothing when the tile is unknown (never a null)."""
    import re

    m = re.fullmatch(r"T?(\d{1,2})([C-X])([A-Z]{2})", str(tile or ""))
    if m:
        MgrsExtension.ext(item, add_if_missing=True).apply(m.group(2), m.group(3), int(m.group(1)))


def geographic_extent(geobox: GeoBox):
    """``geobox.geographic_extent`` (its footprint in EPSG:4326, densified to 100 points a side), the same geometry:
    odc-geo's ``footprint`` ends with ``dropna()``, which rebuilds the polygon point by point in Python (~1/3 of the
    call on a small target, issue 22) to drop non-finite points; a one-ring polygon whose points are all finite is
    returned as reprojected (the rebuild would give the same points)."""
    import numpy as np
    import shapely

    if geobox.crs is None or geobox.crs.geographic:
        return geobox.geographic_extent
    ext = geobox.extent
    bbox = ext.boundingbox
    g = ext.to_crs("epsg:4326", resolution=max(bbox.span_x, bbox.span_y) / 100, wrapdateline=False)
    if g.geom_type == "Polygon" and not g.geom.interiors and np.isfinite(shapely.get_coordinates(g.geom)).all():
        return g
    return g.dropna()


def output_item(
    target: pystac.Item, references: Sequence[pystac.Item], out: WrittenOutput, geobox: GeoBox, bands: Sequence[str],
    model_name: str, model_params: dict, run_id: str, harmonisation: Sequence[dict], extra: dict | None = None,
    weights_sha256: str | None = None, collection_id: str | None = None, mask_bits: dict[str, int] | None = None,
    item_dir: str | Path | None = None,
) -> pystac.Item:
    """Build (not save) the output Item with pystac's extension helpers; asset hrefs are relative to the item's
    folder, and so are ``derived_from`` links to local inputs when ``item_dir`` (the item's final folder) is given.
    """
    from cloudfree.catalogs.harmonise import processing_level
    from cloudfree.stages.search import mgrs_tile

    extent = geographic_extent(geobox)  # densifies and reprojects the footprint: computed once
    bbox = list(extent.boundingbox)
    geom = extent.geom.__geo_interface__
    now = datetime.now(timezone.utc)
    source_codes = dict(SOURCE_LABELS)
    for i, r in enumerate(references):
        when = r.datetime.date().isoformat() if r.datetime else "undated"
        source_codes[SOURCE_REFERENCE_BASE + i] = f"reference {r.id} ({when})"
    level = processing_level(target)
    props = {
        # the reflectance is of the target's level; its DN are reflectance * 1e4 with no baseline offset: tells
        # catalogs.harmonise (a later run reading this output as a reference) not to subtract one
        "cloudfree:level": level,
        "cloudfree:add_offset_applied": True,
        "processing:level": f"{(level or 'L2A')[:2]}-cloudfree",
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
    for key in ("platform", "constellation", "instruments"):  # common metadata: copied when known, never null
        if target.properties.get(key) not in (None, "", []):
            props[key] = target.properties[key]
    props.update(extra or {})
    if mask_bits:
        props["cloudfree:mask_bits"] = {**{str(b): m for m, b in mask_bits.items()}, str(NODATA_BIT): "no valid data"}
    item = pystac.Item(f"{out.stem}", geom, bbox, target.datetime, props, stac_extensions=[PROCESSING_SCHEMA],
                       collection=collection_id)
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=str(geobox.crs), shape=list(geobox.shape), transform=list(geobox.transform)[:6])
    _apply_mgrs(item, mgrs_tile(target))

    def add(key: str, path: Path, title: str, media_type, roles: list[str], raster: list[RasterBand],
            eo: list[Band] | None = None, checksum: bool = False, grid: bool = False) -> pystac.Asset:
        asset = pystac.Asset(f"./{path.name}", title, media_type=media_type, roles=roles)
        item.add_asset(key, asset)
        if eo:
            EOExtension.ext(asset, add_if_missing=True).bands = eo
        RasterExtension.ext(asset, add_if_missing=True).bands = raster
        if grid:
            ProjectionExtension.ext(asset).apply(shape=list(geobox.shape), transform=list(geobox.transform)[:6])
        if checksum:
            FileExtension.ext(asset, add_if_missing=True).apply(checksum=_sha256(path), size=path.stat().st_size)
        return asset

    refl = [_raster_band("uint16", 0, REFLECTANCE_SCALE, 0.0) for _ in bands]
    add("reflectance", out.files["reflectance"], "cloud-free reflectance", pystac.MediaType.COG,
        ["data", "reflectance"], refl, [_eo_band(b) for b in bands], checksum=True)
    add("confidence", out.files["confidence"], "per-pixel confidence, percent (100 = observed)",
        pystac.MediaType.COG, ["data", "quality"], [_raster_band("uint8", 255, unit="percent")], checksum=True)
    add("source", out.files["source"], "per-pixel source code (see cloudfree:source_codes)",
        pystac.MediaType.COG, ["data", "provenance"], [_raster_band("uint8")], checksum=True)
    if "mask_provenance" in out.files:
        add("mask_provenance", out.files["mask_provenance"], "which mask method flagged the target pixel (bit "
            "flags, see cloudfree:mask_bits)", pystac.MediaType.COG, ["data", "provenance", "cloud"],
            [_raster_band("uint8")], checksum=True)
    for i, b in enumerate(bands, 1):
        if f"band:{b}" in out.files:
            # no media type: GDAL VRT has no registered one, and odc-stac reads an untyped "data" asset
            add(b, out.files[f"band:{b}"], f"{b} (band {i} of the reflectance COG, GDAL VRT)", None,
                ["data", "virtual"], [_raster_band("uint16", 0, REFLECTANCE_SCALE, 0.0)], [_eo_band(b)], grid=True)
    if "cldprb" in out.files:
        add("CLDPRB", out.files["cldprb"], "residual cloud probability, percent (100 - confidence), GDAL VRT", None,
            ["data", "cloud-probability", "virtual"], [_raster_band("uint8", 255, unit="percent")], grid=True)
    if "quicklook" in out.files:
        item.add_asset("quicklook", pystac.Asset(f"./{out.files['quicklook'].name}", "before | after | mask",
                                                 media_type=pystac.MediaType.PNG, roles=["overview"]))
    item_dir = Path(item_dir) if item_dir is not None else None
    for src in [target, *references]:
        item.add_link(pystac.Link("derived_from", _href(src, item_dir), media_type=pystac.MediaType.JSON,
                                  extra_fields={"id": src.id}))
    return item



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


#: asset fields an output collection's ``item_assets`` repeats from its items (the per-item ones are left out).
ITEM_ASSET_FIELDS = ("eo:bands", "raster:bands")


def _item_assets(items: Sequence[dict]) -> dict[str, pystac.ItemAssetDefinition]:
    """``item_assets`` of a collection: every asset key its items have, described by the first item that has it."""
    out: dict[str, pystac.ItemAssetDefinition] = {}
    for d in items:
        for key, a in d.get("assets", {}).items():
            if key not in out:
                out[key] = pystac.ItemAssetDefinition.create(
                    a.get("title"), a.get("description"), a.get("type"), a.get("roles"),
                    extra_fields={k: a[k] for k in ITEM_ASSET_FIELDS if k in a})
    return out


def _interval(props: dict) -> tuple[datetime | None, datetime | None]:
    from pystac.utils import str_to_datetime

    start = props.get("start_datetime") or props.get("datetime")
    end = props.get("end_datetime") or props.get("datetime")
    return (str_to_datetime(start) if start else None, str_to_datetime(end) if end else None)


def output_collection(collection_id: str, description: str, items: Sequence[dict], hrefs: Sequence[str]) -> dict:
    """The output Collection (a dict with relative links) over ``items`` (item dicts) at ``hrefs`` (relative to
    the collection), built with pystac: extent from the items, ``providers``, ``item_assets``, a licence."""
    bboxes = [d["bbox"] for d in items]
    spans = [_interval(d["properties"]) for d in items]
    starts = sorted(s for s, _ in spans if s)
    ends = sorted(e for _, e in spans if e)
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(b[0] for b in bboxes), min(b[1] for b in bboxes),
                               max(b[2] for b in bboxes), max(b[3] for b in bboxes)]] if bboxes else [[-180, -90, 180, 90]]),
        pystac.TemporalExtent([[starts[0] if starts else None, ends[-1] if ends else None]]))
    coll = pystac.Collection(collection_id, description, extent, license=LICENSE, providers=list(PROVIDERS),
                             title=collection_id)
    coll.item_assets = _item_assets(items)
    used = {ext for d in items for ext in d.get("stac_extensions", [])}
    coll.stac_extensions = sorted(e for e in used if any(f"/{n}/" in e for n in ("eo", "raster")))
    d = coll.to_dict(include_self_link=False, transform_hrefs=False)
    d["links"] = ([{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                   {"rel": "parent", "href": "./catalog.json", "type": "application/json"},
                   LICENSE_LINK.to_dict()]
                  + [{"rel": "item", "href": h, "type": "application/geo+json"} for h in hrefs])
    return d


def _listed_items(out_dir: Path, coll_path: Path) -> list[str]:
    """The item hrefs ``collection.json`` lists; when it is unreadable (truncated, not JSON, not a collection: a
    crash of another tool, a foreign file) a warning, and the list rebuilt from the items in ``out_dir``
    (``<stem>/<stem>.json``), so the collection is rewritten whole instead of failing every target forever."""
    if not coll_path.exists():
        return []
    try:
        old = json.loads(coll_path.read_text())
        return [lk["href"] for lk in old["links"] if lk["rel"] == "item"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        found = sorted(f"./{p.parent.name}/{p.name}" for p in out_dir.glob("*/*.json") if p.stem == p.parent.name)
        log.warning("output collection %s is unreadable (%s: %s); rebuilding it from the %d item(s) in %s",
                    coll_path, type(exc).__name__, exc, len(found), out_dir)
        return found


#: what :func:`output_collection` reads of each listed item, by path, with the file's (inode, mtime_ns, size) when
#: it was read: a run that lists n targets in one folder re-read and re-parsed every listed item for every target
#: (n^2 item reads: 200 items of 28 KB took 0.5 s per update, 56 s in all); now only new or rewritten items are read.
_SUMMARIES: dict[str, tuple[tuple[int, int, int], dict]] = {}
_SUMMARIES_MAX = 8192


def _item_summary(path: Path) -> dict:
    """The parts of the item at ``path`` that :func:`output_collection` uses (bbox, the datetime properties, asset
    descriptions, extensions), read once per version of the file (validated by inode, mtime and size: an item is
    always replaced by a rename, so a new version is a new inode)."""
    st = path.stat()
    key, stamp = str(path), (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _SUMMARIES.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    d = json.loads(path.read_text())
    props = d.get("properties") or {}
    summary = {"bbox": d["bbox"], "stac_extensions": list(d.get("stac_extensions", [])),
               "properties": {k: props[k] for k in ("datetime", "start_datetime", "end_datetime") if k in props},
               "assets": {k: {f: a[f] for f in ("title", "description", "type", "roles", *ITEM_ASSET_FIELDS)
                              if f in a} for k, a in (d.get("assets") or {}).items()}}
    _SUMMARIES[key] = (stamp, summary)
    while len(_SUMMARIES) > _SUMMARIES_MAX:
        try:
            del _SUMMARIES[next(iter(_SUMMARIES))]
        except (StopIteration, KeyError, RuntimeError):  # another thread trimmed it meanwhile
            break
    return summary


def with_collection_links(idict: dict, item_path: str | Path, out_dir: str | Path, collection_id: str) -> dict:
    """The item dict ``idict`` (to be saved at ``item_path`` under ``out_dir``) with its ``collection`` and its
    root/parent/collection links (relative) as :func:`update_collection` sets them; a new dict (the same key order)."""
    up = "../" * (len(Path(item_path).resolve().relative_to(Path(out_dir).resolve()).parts) - 1)
    out = dict(idict)
    out["collection"] = collection_id
    out["links"] = [lk for lk in idict.get("links", []) if lk["rel"] not in ("root", "parent", "collection")]
    out["links"] += [{"rel": "root", "href": f"{up}catalog.json", "type": "application/json"},
                     {"rel": "parent", "href": f"{up}collection.json", "type": "application/json"},
                     {"rel": "collection", "href": f"{up}collection.json", "type": "application/json"}]
    return out


def update_collection(out_dir: str | Path, item_path: str | Path, collection_id: str,
                      description: str = "cloudfree outputs") -> Path:
    """Add (or refresh) the item at ``item_path`` in ``<out_dir>/collection.json`` (extent recomputed from all
    listed items) and make sure ``<out_dir>/catalog.json`` links it; rewrites the item's root/parent/collection
    links (relative). Atomic and locked; returns the collection path."""
    out_dir = Path(out_dir).resolve()
    item_path = Path(item_path).resolve()
    coll_path, cat_path = out_dir / "collection.json", out_dir / "catalog.json"
    with _locked(out_dir / ".collection.lock"):
        rel = "./" + item_path.relative_to(out_dir).as_posix()
        old = json.loads(item_path.read_text())
        idict = with_collection_links(old, item_path, out_dir, collection_id)
        if idict != old:  # the runner writes its items with these links already (no second serialisation)
            _write_atomic(idict, item_path)
        hrefs = _listed_items(out_dir, coll_path)
        if rel not in hrefs:
            hrefs.append(rel)
        hrefs = [h for h in hrefs if (out_dir / h).exists()]
        _SUMMARIES.pop(str(item_path), None)  # just rewritten: read again below (its stat changed anyway)
        items = [_item_summary(out_dir / h) for h in hrefs]
        _write_atomic(output_collection(collection_id, description, items, hrefs), coll_path)
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
    for ext in ("eo", "raster", "projection", "processing", "file"):
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


def _sha256(path: Path) -> str:
    return "1220" + file_sha256(path)  # multihash prefix for sha2-256, as the file extension expects
