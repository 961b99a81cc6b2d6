"""The shipped generative weights through the pipeline's tile stage, and their training through the shared loop.

Real pixels: a 29RKH crop outside the evaluation crops, with SIMULATED clouds (most of the scene generated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloudfree.pipeline.evaluation.cases import load_29rkh
from cloudfree.pipeline.evaluation.simulate import CloudSpec, simulate_clouds
from cloudfree.stages.mosaic import seam_ratio
from cloudfree.stages.tile import plan_tiles

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"
BANDS = ("B02", "B03", "B04", "B08")


@pytest.fixture(scope="module")
def cloudy_scene():
    """128 x 128 real 29RKH pixels (rows 760.., outside every evaluation crop), 95 % SIMULATED cloud."""
    import xarray as xr

    from cloudfree.stages.remove import SceneInputs

    clear = load_29rkh(DATA, BANDS)[:, 760:888, 100:228]
    sim = simulate_clouds(clear, BANDS, CloudSpec(cover=0.95, thick_fraction=0.8, scale=48.0), seed=11)
    mask = (sim.transmission < 0.95) | (sim.shadow < 0.95)
    ny, nx = mask.shape
    coords = {"y": np.arange(ny), "x": np.arange(nx)}
    target = xr.DataArray(sim.cloudy, dims=("band", "y", "x"), coords={"band": list(BANDS), **coords})
    inputs = SceneInputs(target, xr.DataArray(mask, dims=("y", "x"), coords=coords),
                         xr.DataArray(sim.cloud_probability / 100, dims=("y", "x"), coords=coords), None, None,
                         target_id="sim-29RKH-760-100")
    return inputs, mask, clear


def _mosaic(model, inputs, size=64, halo=16):
    import dask

    from cloudfree.stages.remove import remove_clouds

    with dask.config.set(scheduler="synchronous"):
        ds = remove_clouds(inputs, model, plan_tiles(inputs.target.shape[1:], size, halo), halo, blend="feather")
        return ds.reflectance.values


def _whole(model, inputs):
    from cloudfree.pipeline.contract import TileInputs

    ny, nx = inputs.cloud_mask.shape
    return model.predict(TileInputs(BANDS, inputs.target.values, inputs.cloud_prob.values, inputs.cloud_mask.values,
                                    np.zeros((0, 4, ny, nx), np.float32), np.zeros((0, ny, nx), bool),
                                    target_id=inputs.target_id)).reflectance


@pytest.mark.parametrize("name,params", [("cm-cr", {"steps": 1, "require_sar": False}),
                                         ("diffusion-enhancement", {"steps": 4, "reference_model": "none"})])
def test_shared_scene_noise_keeps_tiles_seamless(cloudy_scene, name, params):
    """The seam metric of stages/mosaic.py on the generated pixels, at the tile borders (every 64 px), for the
    mosaic of tiles predicted through the remove stage (halo 16, feathered blend) and for the untiled prediction
    of the whole scene (no border at all: the metric's baseline for this content, which is not exactly 1 on a
    128 px scene). With the scene's coordinate noise the tiled mosaic measures as the untiled one; with
    independent noise per tile (the ablation) the overlap bands average two different samples and the metric
    moves away (a blurred band reads below the baseline, a halo-discard mosaic far above it)."""
    from cloudfree.models.registry import build_model

    inputs, mask, _ = cloudy_scene

    def ratio(img):
        return seam_ratio(np.where(mask[None], img, np.nan), 64)

    base = ratio(_whole(build_model(name, {**params, "device": "cpu"}), inputs))
    ratios = {noise: ratio(_mosaic(build_model(name, {**params, "noise": noise, "device": "cpu"}), inputs))
              for noise in ("scene", "tile")}
    print(name, "seam ratios on generated pixels:", {k: round(v, 3) for k, v in ratios.items()}, "untiled",
          round(base, 3))
    assert abs(ratios["scene"] - base) < 0.03, (ratios, base)
    assert abs(ratios["tile"] - base) > 0.1, (ratios, base)


def test_tiled_equals_whole_scene_closely(cloudy_scene):
    """Shared noise: the tiled mosaic and the one-tile prediction of the scene differ only by halo truncation."""
    from cloudfree.models.registry import build_model

    inputs, mask, _ = cloudy_scene
    model = build_model("cm-cr", {"steps": 1, "device": "cpu", "require_sar": False})
    diff = np.abs(_mosaic(model, inputs, 64, 32) - _whole(model, inputs))[:, mask]
    assert np.median(diff) < 0.005, np.median(diff)
    tile_noise = build_model("cm-cr", {"steps": 1, "device": "cpu", "noise": "tile", "require_sar": False})
    assert np.median(np.abs(_mosaic(tile_noise, inputs, 64, 32) - _whole(model, inputs))[:, mask]) > 2 * np.median(diff)


def test_shipped_weights_cards_and_sizes():
    for stem, model in (("diffusion_enhancement", "diffusion-enhancement"), ("cm_cr", "cm-cr")):
        w = WEIGHTS / f"{stem}.safetensors"
        card = json.loads((WEIGHTS / f"{stem}.card.json").read_text())
        from cloudfree.models._weights import file_sha256

        assert w.stat().st_size < 20e6
        assert card["sha256"] == file_sha256(w)
        assert card["model"] == model
        assert card["wall_seconds"] > 0 and card["steps"] > 0
        assert "SIMULATED" in json.dumps(card["data"])


def test_trained_cmcr_beats_doing_nothing_under_cloud(cloudy_scene):
    """Not a quality claim: the trained student must at least move cloudy pixels towards the surface."""
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.evaluation.metrics import psnr

    inputs, mask, clear = cloudy_scene
    out = _whole(build_model("cm-cr", {"steps": 1, "device": "cpu", "require_sar": False}), inputs)
    assert psnr(out, clear, mask) > psnr(inputs.target.values, clear, mask) + 3


def test_train_resume_matches_uninterrupted(tmp_path):
    """Both models on the shared loop, tiny networks on the real Romania stack: a run interrupted after its first
    stage and resumed ends with the same weights as an uninterrupted run (stage switch and DE/CM-CR state included)."""
    import torch

    from cloudfree.pipeline.training.loop import load_train_config, train
    from cloudfree.models._weights import read_weights

    for model, net, extra in (("diffusion-enhancement", {"cnp_base": 8, "wa_base": 8, "stage_fractions": [0.34, 0.33, 0.33]},
                               {"sar": "none", "sar_dropout": 0.0}),
                              ("cm-cr", {"base": 8, "stage_fractions": [0.5, 0.5]}, {"sar": "simulated"})):
        runs = {}
        for label in ("straight", "resumed"):
            cfg = load_train_config(None, model=model, out=str(tmp_path / f"{model}-{label}"), steps=6, batch_size=2,
                                    patch=32, checkpoint_every=100, log_every=1, val_every=100, val_batches=1,
                                    network=net, threads=1, device="cpu",
                                    data={"clouds": "simulate", **extra})
            if label == "straight":
                s = train(cfg, progress=False)
            else:
                first = train(cfg, progress=False, stop_after=3)
                assert first["step"] == 3 and "weights" not in first
                s = train(cfg, progress=False, resume=True)
            runs[label] = read_weights(s["weights"], s["sha256"])[0]
            stages = [json.loads(ln).get("stage") for ln in Path(s["metrics"]).read_text().splitlines()]
            assert len(set(x for x in stages if x)) >= 2, stages
        for k, v in runs["straight"].items():
            torch.testing.assert_close(runs["resumed"][k], v, atol=1e-5, rtol=1e-4, msg=f"{model} {k}")


def test_steps_benchmark_writes_table_json_and_figure(tmp_path):
    """The steps-vs-quality benchmark end to end on one simulated case and one in-domain case, 1 step each."""
    from cloudfree.pipeline.evaluation import generative_steps as gs

    payload = gs.run(tmp_path, DATA, seeds=[1], steps=[1], threads=1)
    labels = [r["label"] for r in payload["rows"]]
    assert labels == ["clear-pixel mean fill (trivial baseline)", "phyvlm-cr (DE's reference)",
                      "diffusion-enhancement 1", "cm-cr student 1", "cm-cr teacher 1"]
    assert [r["nfe"] for r in payload["rows"]] == [0, 0, 2, 1, 1]
    for r in payload["rows"][1:]:
        for s in ("simulated-256", "romania-val-96"):
            assert np.isfinite(r[s]["psnr"]) and r[s]["seconds_per_tile"] > 0
    assert (tmp_path / "figures" / "steps.png").stat().st_size > 10_000
    table = (tmp_path / "generative_steps.md").read_text()
    assert table.count("\n") == 2 + len(labels) and "romania-val-96" in table
