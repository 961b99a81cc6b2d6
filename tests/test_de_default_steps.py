"""Diffusion Enhancement's default DDIM steps are the pick of the committed steps-vs-quality table (issue 22)."""

import json
from pathlib import Path

from cloudfree.models.diffusion_enhancement import DEParams
from cloudfree.pipeline.evaluation.generative_steps import pick_de_steps

TABLE = Path(__file__).resolve().parents[1] / "docs" / "generative.json"


def test_de_default_steps_is_the_pick_of_the_committed_steps_table():
    rows = json.loads(TABLE.read_text())["rows"]
    de = {r["params"]["steps"] for r in rows if r["model"] == "diffusion-enhancement"}
    assert len(de) >= 3, "the steps table must measure several DE step counts"
    pick = pick_de_steps(rows)
    assert pick in de
    assert DEParams().steps == pick
    assert pick < 50  # the table, not the paper's 50, decides


def test_pick_takes_the_fewest_steps_within_the_tolerance_of_the_best_mean_psnr():
    def row(steps, a, b):
        return {"model": "diffusion-enhancement", "params": {"steps": steps},
                "simulated-256": {"psnr": a}, "romania-val-96": {"psnr": b}}

    rows = [{"model": "-", "params": {}}, row(1, 20.0, 20.0), row(2, 30.0, 29.0), row(8, 30.0, 29.3),
            row(50, 30.1, 29.3)]
    assert pick_de_steps(rows, 0.1) == 8  # mean 29.5 vs best 29.7: 2 steps is 0.2 dB short
    assert pick_de_steps(rows, 0.25) == 2
