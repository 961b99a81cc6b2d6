"""Per-item harmonisation: how an item's DN become surface (L2A) or TOA (L1C) reflectance.

Processing baseline 04.00 (from 2022-01-25) adds +1000 to L1C/L2A DN (BOA_ADD_OFFSET / RADIO_ADD_OFFSET = -1000).
Whether a catalog already removed it differs by catalog, so the decision is read from the item itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pystac

DEFAULT_SCALE = 1e-4
BASELINE_OFFSET_DN = -1000


@dataclass(frozen=True)
class Harmonisation:
    """``refl = DN * scale + offset`` per band; ``offset_applied`` says whether the -1000 DN offset is in it."""

    item_id: str
    scale: float = DEFAULT_SCALE
    offset: float = 0.0
    offset_applied: bool = False
    reason: str = ""
    per_band: dict[str, tuple[float, float]] = field(default_factory=dict)

    def scale_offset(self, band: str) -> tuple[float, float]:
        return self.per_band.get(band, (self.scale, self.offset))

    def to_dict(self) -> dict:
        return {"item": self.item_id, "scale": self.scale, "offset": self.offset,
                "baseline_offset_applied": self.offset_applied, "reason": self.reason}


def _baseline(item: pystac.Item) -> float | None:
    v = item.properties.get("s2:processing_baseline")
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def harmonisation(item: pystac.Item) -> Harmonisation:
    """Decide DN -> reflectance for ``item`` from its own metadata."""
    per_band: dict[str, tuple[float, float]] = {}
    for key, asset in item.assets.items():
        rb = asset.extra_fields.get("raster:bands")
        if rb and isinstance(rb, list) and ("scale" in rb[0] or "offset" in rb[0]):
            per_band[key] = (float(rb[0].get("scale", DEFAULT_SCALE)), float(rb[0].get("offset", 0.0)))
    if per_band and any(o != 0 for _, o in per_band.values()):
        return Harmonisation(item.id, per_band=per_band, offset_applied=True,
                             reason="raster:bands scale/offset on the assets (offset included)")
    if item.properties.get("earthsearch:boa_offset_applied") is True:
        return Harmonisation(item.id, per_band=per_band, reason="earthsearch:boa_offset_applied=true: DN already shifted")
    b = _baseline(item)
    if b is not None and b >= 4.0:
        off = BASELINE_OFFSET_DN * DEFAULT_SCALE
        pb = {k: (s, off) for k, (s, _) in per_band.items()}
        return Harmonisation(item.id, offset=off, per_band=pb, offset_applied=True,
                             reason=f"s2:processing_baseline {b:.2f} >= 04.00: DN - 1000")
    reason = f"s2:processing_baseline {b:.2f} < 04.00: no offset" if b is not None else "no baseline metadata: no offset"
    return Harmonisation(item.id, per_band=per_band, reason=reason)
