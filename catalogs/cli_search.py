"""Body of ``cloudfree search``: plan targets for an AOI and period, print them, write JSON or GeoParquet.

The click command in ``pipeline/cli.py`` parses options and calls :func:`search_command`; this module only
uses ``click.echo`` for output (no logging configuration, no ``sys.exit``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from pipeline.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)


def format_plans(plans: list[Any]) -> str:
    """A plain-text table: one line per target, its references and SAR indented below it."""
    from stages.search import item_time

    lines = [f"{'role':<10} {'item':<70} {'date':<16} {'cc %':>6} {'dt d':>6} {'clear':>5} {'ovl':>4} {'score':>5}"]
    for p in plans:
        t = p.target
        cc = t.properties.get("eo:cloud_cover")
        lines.append(f"{'TARGET':<10} {t.id[:70]:<70} {item_time(t):%Y-%m-%d %H:%M} "
                     f"{'' if cc is None else f'{cc:6.1f}':>6}")
        for role, cands in (("ref", p.references), ("sar", p.sar)):
            for i, c in enumerate(cands, 1):
                it = c.item
                cc = it.properties.get("eo:cloud_cover")
                clear = "" if c.clear_fraction != c.clear_fraction else f"{c.clear_fraction:5.2f}"
                lines.append(f"  {role + str(i):<8} {it.id[:70]:<70} {item_time(it):%Y-%m-%d %H:%M} "
                             f"{'' if cc is None else f'{cc:6.1f}':>6} {c.dt_days:6.1f} {clear:>5} {c.overlap:4.2f} "
                             f"{c.score:5.2f}  {c.reason}")
        if not p.references:
            lines.append("  (no reference)")
        if not p.sar:
            lines.append("  (no SAR)")
    return "\n".join(lines)


def search_command(
    catalog_cfg: Any,
    search_cfg: Any,
    aoi_path: str | Path | None = None,
    period: str | None = None,
    out_path: str | Path | None = None,
    fmt: str | None = None,
    *,
    overwrite: bool = False,
    catalog: Any = None,
) -> list[Any]:
    """Plan targets with ``catalog_cfg`` / ``search_cfg`` (``aoi_path`` and ``period`` override the config), echo
    the table, write ``out_path`` as ``fmt`` ("json" or "parquet"; default from the suffix). Returns the plans.

    ``catalog`` may pass an already open catalog (tests, the runner); otherwise ``open_catalog(catalog_cfg)``.
    """
    from catalogs.base import open_catalog
    from stages.search import plan_targets, write_plans

    updates: dict[str, Any] = {}
    if aoi_path is not None:
        updates["aoi"] = str(aoi_path)
    if period is not None:
        updates["period"] = period
    if updates:
        from pydantic import ValidationError

        try:
            search_cfg = type(search_cfg).model_validate({**search_cfg.model_dump(), **updates})
        except ValidationError as exc:
            msgs = "; ".join(f"search.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"--aoi/--period: {msgs}") from None
    if out_path is not None:
        out_path = Path(out_path)
        fmt = (fmt or out_path.suffix.lstrip(".") or "json").lower()
        if fmt not in ("json", "parquet", "geoparquet"):
            raise ConfigError(f"--out {out_path}: unknown format {fmt!r}; use .json or .parquet")
        if out_path.exists() and not overwrite:
            raise OutputExistsError(f"{out_path} exists; pass --overwrite or choose another --out")
    cat = catalog if catalog is not None else open_catalog(catalog_cfg)
    plans = plan_targets(cat, search_cfg, catalog_cfg.collection, catalog_cfg.sar_collection)
    click.echo(format_plans(plans))
    n_ref = sum(bool(p.references) for p in plans)
    click.echo(f"{len(plans)} target(s), {n_ref} with references, {sum(bool(p.sar) for p in plans)} with SAR")
    if out_path is not None:
        write_plans(plans, out_path, fmt)
        click.echo(f"wrote {out_path}")
    return plans
