"""The run report (what one ``cloudfree run`` produced; the model evaluation's report is
:mod:`cloudfree.pipeline.evaluation.report`): a Markdown page (plus a minimal HTML rendering) and PNGs per run, under
``<output.dir>/reports/<run id>/``.

Per output: the before/after quicklook written by the runner, a confidence map and a source map PNG (read
decimated from the COGs), cloud cover before (share of target pixels a mask method flagged) and after (share
still low-confidence), per-tile model timings; per failed target: the error. Written by :func:`cloudfree.pipeline.runner.run`
at the end of a run.
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_SIDE = 800


def _read_decimated(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as ds:
        k = max(1, int(np.ceil(max(ds.shape) / max_side)))
        return ds.read(1, out_shape=(max(1, ds.height // k), max(1, ds.width // k)), resampling=Resampling.nearest)


def confidence_png(confidence_cog: Path, dst: Path, title: str = "") -> Path:
    """Confidence (percent) as a colour map with a colour bar; nodata (255) grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = _read_decimated(confidence_cog).astype(np.float32)
    conf = np.ma.masked_equal(conf, 255)
    fig, ax = plt.subplots(figsize=(8, 8 * conf.shape[0] / max(conf.shape[1], 1) + 0.8), constrained_layout=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    im = ax.imshow(conf, cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="confidence (%)", shrink=0.8)
    ax.set_title(title or "per-pixel confidence")
    ax.set_axis_off()
    return _save(fig, dst)


def source_png(source_cog: Path, dst: Path, labels: dict[str, str], title: str = "") -> Path:
    """Per-pixel source codes as categories with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    src = _read_decimated(source_cog)
    codes = [int(c) for c in np.unique(src)]
    lut = {c: i for i, c in enumerate(codes)}
    idx = np.vectorize(lut.get)(src) if codes else src
    cmap = matplotlib.colormaps["tab10"]
    fig, ax = plt.subplots(figsize=(8, 8 * src.shape[0] / max(src.shape[1], 1) + 1.2), constrained_layout=True)
    ax.imshow(idx, cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
    ax.legend(handles=[Patch(color=cmap(lut[c] % 10), label=f"{c}: {labels.get(str(c), '?')}") for c in codes],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    ax.set_title(title or "per-pixel source")
    ax.set_axis_off()
    return _save(fig, dst)


def _save(fig, dst: Path) -> Path:
    import matplotlib.pyplot as plt

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(dst)
    return dst


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def render_markdown(results: Sequence, run_id: str, model_name: str, report_dir: Path, out_dir: Path,
                    skipped: Sequence = ()) -> str:
    """The report's Markdown; writes the confidence/source PNGs into ``report_dir`` as it goes. ``skipped``: catalog
    items the search skipped (:class:`cloudfree.catalogs.base.SkippedItem`: id, reason)."""
    import json

    from cloudfree.pipeline.redact import redact

    def pct(st: dict, key: str) -> str:
        return f"{100 * st[key]:.1f} %" if st.get(key) is not None else "-"

    done = [r for r in results if r.status in ("done", "unrestored") and "reflectance" in r.outputs]
    lines = [f"# cloudfree run {run_id}", "",
             f"Model `{model_name}`; outputs in `{out_dir}`.", "",
             "| target | status | references | seconds | masked before | low-confidence after | unusable after |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        st = getattr(r, "stats", {}) or {}
        lines.append(f"| {_md(r.target_id)} | {r.status} | {', '.join(map(_md, r.references)) or '-'} | "
                     f"{r.seconds:.1f} | {pct(st, 'masked_before')} | {pct(st, 'low_confidence_after')} | "
                     f"{pct(st, 'unusable_after')} |")
    lines.append("")
    failed = [r for r in results if r.status == "failed"]
    lines += ["## Failures", ""]
    lines += [f"- **{_md(r.target_id)}**: {_md(redact(r.error))}" for r in failed] or ["None."]
    lines.append("")
    if skipped:
        lines += ["## Catalog items skipped by the search (malformed or duplicate)", ""]
        lines += [f"- **{_md(s.id)}**: {_md(redact(s.reason))}" for s in skipped]
        lines.append("")
    warned = [r for r in results if getattr(r, "warnings", None) or (r.status == "skipped" and r.error)]
    if warned:
        lines += ["## Warnings", ""]
        for r in warned:
            for w in [*(getattr(r, "warnings", None) or []), *([r.error] if r.status == "skipped" and r.error else [])]:
                lines.append(f"- **{_md(r.target_id)}**: {_md(redact(w))}")
        lines.append("")
    unrestored = [r for r in results if r.status == "unrestored"]
    if unrestored:
        lines += ["## Not restored (written, labelled `unrestored`, retried by the next run)", ""]
        lines += [f"- **{_md(r.target_id)}**: {_md(redact(r.error))}" for r in unrestored]
        lines.append("")
    for r in done:
        lines += [f"## {_md(r.target_id)}", ""]
        st = r.stats or {}
        if st:
            lines.append(f"Cloud cover: {pct(st, 'masked_before')} of the target's valid pixels flagged by "
                         f"the mask before; {pct(st, 'low_confidence_after')} of the valid output below "
                         f"{100 * st['low_confidence_threshold']:.0f} % confidence after; "
                         f"{pct(st, 'nodata_after')} nodata, {pct(st, 'unfilled_after')} cloudy and not restored, "
                         f"{pct(st, 'failed_after')} failed reads: {pct(st, 'unusable_after')} not usable "
                         "(the output's eo:cloud_cover).")
            lines.append("")
        if "quicklook" in r.outputs:
            lines += [f"![before / after / mask]({_rel(r.outputs['quicklook'], report_dir)})", ""]
        stem = Path(r.outputs["reflectance"]).name.removesuffix("_reflectance.tif")
        if "confidence" in r.outputs:
            png = confidence_png(r.outputs["confidence"], report_dir / f"{stem}_confidence.png",
                                 f"{r.target_id}: confidence")
            lines += [f"![confidence]({png.name})", ""]
        if "source" in r.outputs and "item" in r.outputs:
            labels = json.loads(Path(r.outputs["item"]).read_text())["properties"].get("cloudfree:source_codes", {})
            png = source_png(r.outputs["source"], report_dir / f"{stem}_source.png", labels, f"{r.target_id}: source")
            lines += [f"![source]({png.name})", ""]
        if r.tile_seconds:
            secs = np.array(list(r.tile_seconds.values()))
            slow = sorted(r.tile_seconds.items(), key=lambda kv: -kv[1])[:5]
            lines += [f"Model time per tile ({len(secs)} tiles): min {secs.min():.2f} s, median "
                      f"{np.median(secs):.2f} s, max {secs.max():.2f} s, total {secs.sum():.1f} s. Slowest: "
                      + ", ".join(f"tile {k} {v:.2f} s" for k, v in slow) + ".", ""]
        lines += ["Files: " + ", ".join(f"[{k}]({_rel(Path(v), report_dir)})" for k, v in sorted(r.outputs.items())
                                        if not k.startswith("band:")), ""]
    return "\n".join(lines) + "\n"


def _md(text: object) -> str:
    """Untrusted text (item ids, error messages) as inert Markdown: no table breaks, links, images or HTML; control
    characters (newline, CR, ANSI escapes) escaped."""
    from cloudfree.pipeline.redact import printable

    s = printable(text)
    for ch in "\\|[]()!*`<>":
        s = s.replace(ch, "\\" + ch)
    return s


_INLINE = [(re.compile(r"!\[([^\]]*)\]\(([^)]+)\)"), r'<img alt="\1" src="\2" style="max-width:100%">'),
           (re.compile(r"\[([^\]]+)\]\(([^)]+)\)"), r'<a href="\2">\1</a>'),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>"),
           (re.compile(r"`([^`]+)`"), r"<code>\1</code>")]


def markdown_to_html(md: str, title: str = "cloudfree run") -> str:
    """A tiny converter for the subset the report uses: headings, tables, bullet lists, images, links, bold,
    code spans, paragraphs."""

    def inline(text: str) -> str:
        text = html.escape(text, quote=False)
        for pat, rep in _INLINE:
            text = pat.sub(rep, text)
        return text

    out, in_table, in_list = [], False, False
    for line in md.splitlines():
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append('<table border="1" cellspacing="0" cellpadding="4">')
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    body = "\n".join(out)
    return f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n" \
           f"<body>\n{body}\n</body></html>\n"


def write_report(results: Sequence, cfg, run_id: str, model_name: str, skipped: Sequence = ()) -> Path:
    """Write ``report.md`` and ``report.html`` (and PNGs) under ``<output.dir>/reports/<run_id>/``; return the
    Markdown path. Also writes ``<output.dir>/reports/latest.md`` pointing at it."""
    out_dir = Path(cfg.output.dir)
    report_dir = out_dir / "reports" / run_id
    report_dir.mkdir(parents=True, exist_ok=True)
    save_results(results, report_dir, run_id, model_name, out_dir, skipped)
    md = render_markdown(results, run_id, model_name, report_dir, out_dir, skipped)
    for name, text in (("report.md", md), ("report.html", markdown_to_html(md, f"cloudfree run {run_id}"))):
        tmp = report_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(report_dir / name)
    latest = out_dir / "reports" / ".latest.md.tmp"
    latest.write_text(f"# Latest cloudfree run\n\n[{run_id}]({run_id}/report.md)\n")
    latest.replace(out_dir / "reports" / "latest.md")
    return report_dir / "report.md"


RESULTS = "results.json"


def save_results(results: Sequence, report_dir: Path, run_id: str, model_name: str, out_dir: Path,
                 skipped: Sequence = ()) -> Path:
    """The run's results as JSON beside its report (output paths relative to ``out_dir``), so ``cloudfree report``
    can list runs and re-render a report later."""
    import dataclasses
    import json
    from datetime import datetime, timezone

    def rel(v):
        try:
            return Path(v).resolve().relative_to(Path(out_dir).resolve()).as_posix()
        except ValueError:
            return str(v)

    rows = []
    for r in results:
        d = dataclasses.asdict(r)
        d["outputs"] = {k: rel(v) for k, v in r.outputs.items()}
        rows.append(d)
    payload = {"run_id": run_id, "model": model_name, "created": datetime.now(timezone.utc).isoformat(),
               "results": rows, "skipped": [{"id": str(k.id), "reason": str(k.reason)} for k in skipped]}
    path = Path(report_dir) / RESULTS
    tmp = path.with_name(f".{RESULTS}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    return path


def list_reports(out_dir: str | Path) -> list[dict]:
    """The run reports under ``<out_dir>/reports/``, newest first: run id, when, model, counts by status."""
    import json
    from collections import Counter
    from datetime import datetime, timezone

    rows = []
    for d in (Path(out_dir) / "reports").glob("*/"):
        stamp = next((f for f in (d / "report.md", d / RESULTS) if f.exists()), None)
        if stamp is None:
            continue
        row = {"run_id": d.name, "path": d / "report.md", "model": "?", "counts": {},
               "created": datetime.fromtimestamp(stamp.stat().st_mtime, timezone.utc).isoformat()}
        if (d / RESULTS).exists():
            payload = json.loads((d / RESULTS).read_text())
            row.update(model=payload["model"], created=payload["created"],
                       counts=dict(Counter(r["status"] for r in payload["results"])))
        rows.append(row)
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def rerender(out_dir: str | Path, run_id: str = "latest") -> Path:
    """Re-render ``report.md``/``report.html`` and the PNGs of run ``run_id`` (``latest``: the newest) from its
    saved results and the outputs as they are now; returns the Markdown path."""
    import json

    from cloudfree.pipeline.errors import ConfigError
    from cloudfree.pipeline.runner import TargetResult

    out_dir = Path(out_dir)
    reports = list_reports(out_dir)
    if run_id == "latest":
        if not reports:
            raise ConfigError(f"no run reports under {out_dir / 'reports'}; run `cloudfree run` first or pass --out")
        run_id = reports[0]["run_id"]
    report_dir = out_dir / "reports" / run_id
    if not (report_dir / RESULTS).exists():
        known = ", ".join(r["run_id"] for r in reports) or "none"
        raise ConfigError(f"run {run_id!r} has no saved results under {report_dir} (runs listed: {known}); "
                          "reports written before results were saved cannot be re-rendered")
    payload = json.loads((report_dir / RESULTS).read_text())
    results = []
    for d in payload["results"]:
        d["outputs"] = {k: out_dir / v for k, v in d["outputs"].items()}
        results.append(TargetResult(**d))
    from types import SimpleNamespace

    skipped = [SimpleNamespace(**k) for k in payload.get("skipped", [])]
    md = render_markdown(results, run_id, payload["model"], report_dir, out_dir, skipped)
    for name, text in (("report.md", md), ("report.html", markdown_to_html(md, f"cloudfree run {run_id}"))):
        tmp = report_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(report_dir / name)
    return report_dir / "report.md"
