"""``cloudfree evaluate``: run every model on every evaluation case, write ``evaluation.md``/``.json`` and figures.

The pieces live in focused modules: :mod:`~cloudfree.pipeline.evaluation.metrics` (PSNR, SSIM, SAM, MAE),
:mod:`~cloudfree.pipeline.evaluation.cases` (the real Slovakia pair, the simulated set), :mod:`~cloudfree.pipeline.evaluation.romania`
(the REAL multi-date stack through the catalog path), :mod:`~cloudfree.pipeline.evaluation.running` (predict, score,
summarise), :mod:`~cloudfree.pipeline.evaluation.report` (tables, the computed bar, the default-model choice),
:mod:`~cloudfree.pipeline.evaluation.figures`, :mod:`~cloudfree.pipeline.evaluation.bench_models` (speed) and
:mod:`~cloudfree.pipeline.evaluation.mask_loss` (what the mask stage costs the default model, and `temporal`, per case). This module only
orchestrates them. Generic over the registry: ``--models`` takes any registered model name, optionally with
parameters (``phyvlm-cr[prior=reference]``).

Run ``cloudfree evaluate --out docs/`` (= ``python -m pipeline.evaluation.evaluate --out docs/``).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from cloudfree.pipeline.contract import TileResult
from cloudfree.pipeline.errors import ConfigError
from cloudfree.pipeline.evaluation.cases import DEFAULT_DATA_DIR, EvalCase, simulated_set, slovakia_case
from cloudfree.pipeline.evaluation.report import render_report, write_json
from cloudfree.pipeline.evaluation.running import evaluate_models, parse_model_spec, summarise

log = logging.getLogger(__name__)

#: extra rows evaluated next to every registered model: PhyVLM-CR with its previous default prior, so the
#: effect of the temporal prior is measured, not asserted.
EXTRA_VARIANTS = ("phyvlm-cr[prior=reference]",)
CASES = ("romania", "slovakia", "simulated")
#: case groups run only when named (``--cases ...,bigearthnet-sar``): real S1+S2 pairs, no reference date
OPTIONAL_CASES = ("bigearthnet-sar",)
TUNING_SEEDS = (0,)
REPORT_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8, 9)


def default_models() -> list[str]:
    """Every registered model, plus :data:`EXTRA_VARIANTS` of registered models."""
    from cloudfree.models.registry import available_models

    names = list(available_models())
    return names + [v for v in EXTRA_VARIANTS if parse_model_spec(v)[0] in names]


def run_evaluation(
    out: str | Path,
    *,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    models: Sequence[str] | None = None,
    cases: Sequence[str] = CASES,
    seeds: Sequence[int] = TUNING_SEEDS + REPORT_SEEDS,
    tile_size: int | None = None,
    speed: bool = True,
    figures: bool = True,
    mask_loss: bool = True,
) -> dict[str, Any]:
    """Evaluate ``models`` (default: :func:`default_models`) on ``cases``; write ``evaluation.md``,
    ``evaluation.json`` and ``figures/`` to ``out``. Seeds in :data:`TUNING_SEEDS` form the ``simulated-tuning``
    group, the others ``simulated``. Returns the JSON payload."""
    from cloudfree.models.registry import available_models

    t_start = time.perf_counter()
    models = list(models) if models else default_models()
    unknown_cases = sorted(set(cases) - set(CASES) - set(OPTIONAL_CASES))
    if unknown_cases:
        raise ConfigError(f"unknown evaluation case(s) {unknown_cases}; choose from "
                          f"{', '.join(CASES + OPTIONAL_CASES)}")
    registered = available_models()
    unknown = [m for m in models if parse_model_spec(m)[0] not in registered]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; registered: {', '.join(registered)}")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[EvalCase]] = {}
    if "romania" in cases:
        from cloudfree.pipeline.evaluation.romania import romania_cases

        for c in romania_cases(data_dir):
            groups.setdefault(c.group, []).append(c)
    if "slovakia" in cases:
        groups["real"] = [slovakia_case(data_dir)]
    if "simulated" in cases:
        tuning_seeds = [s for s in seeds if s in TUNING_SEEDS]
        report_seeds = [s for s in seeds if s not in TUNING_SEEDS]
        if report_seeds:
            groups["simulated"] = simulated_set(data_dir, report_seeds)
        if tuning_seeds:
            tuning = simulated_set(data_dir, tuning_seeds)
            for c in tuning:
                c.group = "simulated-tuning"
            groups["simulated-tuning"] = tuning
    if "bigearthnet-sar" in cases:
        from cloudfree.pipeline.evaluation.cases import BIGEARTHNET_GROUP, bigearthnet_sar_cases

        groups[BIGEARTHNET_GROUP] = bigearthnet_sar_cases(data_dir)
    all_cases = [c for cs in groups.values() for c in cs]
    if not all_cases:
        raise ConfigError("nothing to evaluate: no case selected (check --cases and --seeds)")
    outputs: dict[str, dict[str, TileResult]] = {}
    priors: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = evaluate_models(all_cases, models, tile_size=tile_size, outputs=outputs, priors=priors)
    summary = summarise(rows)
    loss_rows: list[dict[str, Any]] = []
    loss_model = None
    if mask_loss:  # the mask stage's cost per case for the default model (or the first one evaluated), and for
        # the aligning models of MASK_LOSS_ALSO among those evaluated (their alignment is what the mask can cost)
        from cloudfree.pipeline.config import ModelConfig
        from cloudfree.pipeline.evaluation.mask_loss import MASK_LOSS_ALSO, mask_loss_rows

        loss_model = ModelConfig().name if ModelConfig().name in models else models[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for m in dict.fromkeys([loss_model, *(x for x in MASK_LOSS_ALSO if x in models)]):
                loss_rows += mask_loss_rows(all_cases, m, tile_size=tile_size)
    figure_paths = []
    if figures:
        from cloudfree.pipeline.evaluation.figures import figure

        for cs in groups.values():
            case = cs[min(1, len(cs) - 1)]
            path = out / "figures" / f"{case.name}.png"
            figure(case, outputs[case.name], path)
            figure_paths.append(str(path))
    speeds: dict[str, float] = {}
    if speed:
        from cloudfree.pipeline.evaluation.bench_models import benchmark, best_of, read_window

        speeds = benchmark(models, data_dir)
        read_window(data_dir)  # warm the page cache
        io_s = best_of(lambda: read_window(data_dir), 3)
        speeds["(I/O: read the same 512x512x6 from COGs)"] = 512 * 512 / io_s / 1e6
        speeds["(I/O: target + 2 references)"] = 512 * 512 / io_s / 1e6 / 3
    seconds = time.perf_counter() - t_start
    payload = {
        "rows": rows, "summary": summary, "mask_loss": loss_rows, "speed_mpx_per_s": speeds, "figures": figure_paths, "models": models,
        "priors": priors, "cases": {g: [{"name": c.name, **_jsonable(c.meta), "notes": c.notes} for c in cs]
                                    for g, cs in groups.items()},
        "run_seconds": seconds,
    }
    write_json(out / "evaluation.json", payload)
    (out / "evaluation.md").write_text(render_report(payload, groups))
    log.info("evaluation written to %s (%d cases, %d models, %.0f s)", out, len(all_cases), len(models), seconds)
    return payload


def _jsonable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list, bool)) or v is None}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the removal models; writes evaluation.md/.json + figures")
    ap.add_argument("--out", default="evaluation", help="output folder (docs/ only when asked: --out docs)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding the shared sample data")
    ap.add_argument("--models", default="", help="comma list (default: every registered model + variants)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seeds", default=",".join(str(s) for s in TUNING_SEEDS + REPORT_SEEDS))
    ap.add_argument("--tile-size", type=int, default=None, help="predict by tiles of this size (default: whole)")
    ap.add_argument("--no-mask-loss", action="store_true", help="skip the mask-induced loss table")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    run_evaluation(args.out, data_dir=args.data_dir, models=split_models(args.models) or None,
                   cases=[c for c in args.cases.split(",") if c], seeds=parse_seeds(args.seeds),
                   tile_size=args.tile_size, mask_loss=not args.no_mask_loss)
    return 0


def split_models(text: str) -> list[str]:
    """``"a,b[x=1,y=2],c"`` -> ``["a", "b[x=1,y=2]", "c"]`` (commas inside brackets belong to the model)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def parse_seeds(text: str) -> list[int]:
    """``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"invalid seed list {text!r}: use integers and ranges, e.g. 0,3,5-7") from None
    return seeds


if __name__ == "__main__":
    raise SystemExit(main())
