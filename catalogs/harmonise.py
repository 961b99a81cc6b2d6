"""Per-item radiometric harmonisation of Sentinel-2 DN: does the baseline-04.00 offset apply to this item?

Since processing baseline 04.00 (products generated from 2022-01-25, and every Collection-1 reprocessing, PB 05.xx,
whatever the sensing date) L1C and L2A DN carry a +1000 shift: reflectance = (DN + ADD_OFFSET) / QUANTIFICATION
with ``RADIO_ADD_OFFSET`` (L1C) / ``BOA_ADD_OFFSET`` (L2A) = -1000 and QUANTIFICATION = 10000. Catalogs differ in
whether they removed it from the COGs already, so the decision is made per item from the item's own metadata:

1. ``earthsearch:boa_offset_applied`` / ``sentinel:boa_offset_applied`` is true -> the catalog already removed
   the offset from the DN: offset 0.
2. the processing baseline (``s2:processing_baseline``, ``sentinel:processing_baseline``, ``processing:version``,
   or the ``_Nxxyy_`` / ``_Nxx.yy`` token of the product / granule id) is >= 04.00 -> offset -0.1 reflectance
   (-1000 DN). A ``raster:bands`` offset of 0 on such an item is reported in the reason and overruled: Earth
   Search has published items whose ``raster:bands`` / flag disagree with the pixels (Element84/earth-search#71).
3. the baseline is < 04.00 -> offset 0.
4. no baseline and no flag: the assets' ``raster:bands`` offset/scale are used if present; otherwise
   :class:`~cloudfree.pipeline.errors.HarmonisationError` (never a silent guess from the date, since Collection-1
   reprocessing moved old acquisitions to PB 05.xx).

The scale is the asset's ``raster:bands`` scale where given, else 1e-4. The result, :class:`Harmonisation`, is
what the loader applies (``reflectance = DN * scale + offset``, DN 0 = nodata) and what the output item records.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import pystac

from cloudfree.catalogs.bands import S2_REFLECTANCE_BANDS, band_assets
from cloudfree.pipeline.errors import HarmonisationError

log = logging.getLogger(__name__)

QUANTIFICATION = 10000.0
ADD_OFFSET_DN = -1000.0
BASELINE_04 = (4, 0)
#: ``cloudfree:add_offset_applied``: a cloudfree output (DN = reflectance * 1e4, no baseline offset left).
OFFSET_FLAGS = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied", "cloudfree:add_offset_applied")
BASELINE_PROPS = ("s2:processing_baseline", "sentinel:processing_baseline", "processing:version")
ID_PROPS = ("s2:product_uri", "sentinel:product_id", "s2:granule_id", "s2:datatake_id")
L1C_BANDS = S2_REFLECTANCE_BANDS
L2A_BANDS = tuple(b for b in S2_REFLECTANCE_BANDS if b != "B10")

_BASELINE_IN_ID = re.compile(r"_N(\d{2})\.?(\d{2})(?:_|$|\.)")


@dataclass(frozen=True)
class Harmonisation:
    """How to turn one item's DN into reflectance, and why.

    ``applied`` is True when the item's DN carry the +1000 baseline-04.00 shift and this harmonisation removes it
    (``offset`` = -0.1 for those bands).
    """

    item_id: str
    level: str
    processing_baseline: str | None
    scale: Mapping[str, float]
    offset: Mapping[str, float]
    applied: bool
    reason: str
    #: what decided: "offset-flag", "processing-baseline" or "raster-bands".
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", MappingProxyType(dict(self.scale)))
        object.__setattr__(self, "offset", MappingProxyType(dict(self.offset)))

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.scale)

    def dn_offset(self, band: str) -> float:
        """The offset in DN (-1000.0 or 0.0) for ``band``."""
        return self.offset[band] / self.scale[band]

    def to_reflectance(self, dn: np.ndarray, band: str, nodata: float | None = 0) -> np.ndarray:
        """float32 reflectance from DN; ``nodata`` DN become NaN (pure numpy, works on dask chunks too)."""
        if band not in self.scale:
            raise HarmonisationError(
                f"item {self.item_id}: no harmonisation for band {band!r}; it has {list(self.scale)}"
            )
        out = dn.astype(np.float32) * np.float32(self.scale[band]) + np.float32(self.offset[band])
        if nodata is not None:
            out = np.where(dn == nodata, np.float32(np.nan), out)
        return out

    def as_properties(self) -> dict[str, Any]:
        """JSON-able record for the output STAC item (``cloudfree:harmonisation``)."""
        return {
            "item": self.item_id,
            "level": self.level,
            "processing_baseline": self.processing_baseline,
            "applied": self.applied,
            "scale": dict(self.scale),
            "offset": dict(self.offset),
            "reason": self.reason,
            "source": self.source,
        }


def processing_baseline(item: pystac.Item) -> str | None:
    """The item's processing baseline as ``"NN.NN"``, from properties or the product/granule id; None if absent."""
    props = item.properties
    for key in BASELINE_PROPS:
        val = props.get(key)
        if val is not None and re.fullmatch(r"\d{1,2}\.\d{1,2}", str(val).strip()):
            major, minor = str(val).strip().split(".")
            return f"{int(major):02d}.{int(minor):02d}"
    for text in [props.get(k) for k in ID_PROPS] + [item.id]:
        if isinstance(text, str):
            m = _BASELINE_IN_ID.search(text)
            if m:
                return f"{m.group(1)}.{m.group(2)}"
    return None


def processing_level(item: pystac.Item) -> str | None:
    """"L1C", "L2A" or None (not a Sentinel-2 MSI product)."""
    props = item.properties
    if props.get("cloudfree:level") in ("L1C", "L2A"):  # a cloudfree output: the level of its reflectance
        return props["cloudfree:level"]
    platform = str(props.get("platform", "")).lower()
    constellation = str(props.get("constellation", "")).lower()
    product_type = str(props.get("s2:product_type", "") or props.get("sentinel:product_type", "")).upper()
    text = " ".join(filter(None, [item.id, item.collection_id or "", str(props.get("sentinel:product_id", "")),
                                  str(props.get("s2:product_uri", ""))])).upper()
    is_s2 = (
        platform.startswith("sentinel-2") or "sentinel-2" in constellation or product_type.startswith("S2MSI")
        or "MSIL1C" in text or "MSIL2A" in text or bool(re.search(r"(^|_)S2[ABC]_", item.id.upper()))
    )
    if not is_s2:
        return None
    if product_type == "S2MSI1C" or "MSIL1C" in text or "L1C" in text:
        return "L1C"
    if product_type in ("S2MSI2A", "S2MSI2AP") or "MSIL2A" in text or "L2A" in text:
        return "L2A"
    return None


def _offset_flag(item: pystac.Item) -> tuple[str, bool] | None:
    for key in OFFSET_FLAGS:
        if key in item.properties and item.properties[key] is not None:
            return key, bool(item.properties[key])
    return None


def _raster_band(item: pystac.Item, key: str) -> dict[str, Any]:
    rb = item.assets[key].extra_fields.get("raster:bands") or []
    return rb[0] if rb else {}


def harmonise(item: pystac.Item) -> Harmonisation:
    """Decide, from ``item``'s metadata only, how its DN convert to reflectance (see the module docstring)."""
    level = processing_level(item)
    if level is None:
        raise HarmonisationError(
            f"item {item.id} (collection {item.collection_id}) is not a Sentinel-2 L1C/L2A product "
            f"(platform={item.properties.get('platform')!r}, s2:product_type="
            f"{item.properties.get('s2:product_type')!r}); only Sentinel-2 DN are harmonised, pass SAR and other "
            "sensors to their own loaders"
        )
    name = "RADIO_ADD_OFFSET" if level == "L1C" else "BOA_ADD_OFFSET"
    level_bands = L1C_BANDS if level == "L1C" else L2A_BANDS
    assets = band_assets(item, level_bands)
    bands = tuple(assets) or level_bands
    raster = {b: _raster_band(item, k) for b, k in assets.items()}
    scale = {b: float(raster.get(b, {}).get("scale") or 1.0 / QUANTIFICATION) for b in bands}
    declared = {b: raster[b]["offset"] for b in raster if raster[b].get("offset") is not None}
    baseline = processing_baseline(item)
    flag = _offset_flag(item)

    if flag is not None and flag[1]:
        offset = {b: 0.0 for b in bands}
        applied, source = False, "offset-flag"
        reason = f"{flag[0]}=true: the catalog already removed {name} from the DN (baseline {baseline})"
    elif baseline is not None:
        major_minor = tuple(int(x) for x in baseline.split("."))
        if major_minor >= BASELINE_04:
            offset = {b: ADD_OFFSET_DN * scale[b] for b in bands}
            applied, source = True, "processing-baseline"
            reason = f"processing baseline {baseline} >= 04.00: DN carry +1000, {name}=-1000 removed"
            if flag is not None:
                reason += f" ({flag[0]}=false)"
            disagree = sorted({float(v) for b, v in declared.items() if not np.isclose(v, offset[b])})
            if disagree:
                reason += f"; raster:bands offset {disagree} overruled by the baseline"
                log.warning("item %s: raster:bands offset %s disagrees with baseline %s; using the baseline",
                            item.id, disagree, baseline)
        else:
            offset = {b: 0.0 for b in bands}
            applied, source = False, "processing-baseline"
            reason = f"processing baseline {baseline} < 04.00: no {name} in the DN"
            disagree = sorted({float(v) for v in declared.values() if v != 0})
            if disagree:
                reason += f"; raster:bands offset {disagree} overruled by the baseline"
                log.warning("item %s: raster:bands offset %s on a pre-04.00 item; ignoring it", item.id, disagree)
    elif declared:
        offset = {b: float(declared.get(b, 0.0)) for b in bands}
        applied = any(v != 0 for v in offset.values())
        source = "raster-bands"
        reason = "no processing baseline in the metadata; using the assets' raster:bands scale/offset"
    else:
        raise HarmonisationError(
            f"item {item.id} (collection {item.collection_id}) has no processing baseline "
            f"({', '.join(BASELINE_PROPS)}, or _Nxxyy in {', '.join(ID_PROPS)} / the id), no "
            f"{' / '.join(OFFSET_FLAGS)} flag and no raster:bands offset, so whether {name} applies is unknown; "
            "add s2:processing_baseline to the item (it is in the product's MTD_MSIL*.xml)"
        )
    log.debug("harmonise %s: %s", item.id, reason)
    return Harmonisation(item.id, level, baseline, scale, offset, applied, reason, source)
