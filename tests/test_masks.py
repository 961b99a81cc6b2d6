"""Mask methods: kernels scored on real labelled data (floors a bit below docs/masks.md), lazy wrappers on the
demo catalog, SCL/MSK_CLDPRB resampling, L2A refusal of s2cloudless."""

from __future__ import annotations

from datetime import datetime, timezone

import dask.array as dsa
import numpy as np
import pystac
import pytest

from cloudfree.pipeline.config import MaskConfig
from cloudfree.pipeline.errors import InputDataError
from cloudfree.pipeline.evaluation.mask_scores import L1C13, score, score_29rkh, score_labels
from cloudfree.stages.masks import (CODE_CLEAR, CODE_CLOUD, CODE_OPENED, S2CLOUDLESS_BANDS, build_masks, cldprb_codes,
                                   cldprb_kernel, s2cloudless_kernel, s2cloudless_mask, spectral_score_kernel)
from tests.conftest import SHARED, shared


def test_spectral_score_on_labelled_l1c():
    shared("s2-l1c-cloudmask-labels")
    (s,) = score_labels(SHARED)
    assert s.f1 >= 0.80 and s.accuracy >= 0.90, s  # measured F1 0.833, accuracy 0.929


def test_spectral_score_against_sen2cor_scl_on_29rkh():
    shared("s2-l2a-tile-29RKH-100m")
    (spectral,) = score_29rkh(SHARED)  # the scl method is not scored against its own layer
    assert spectral.f1 >= 0.14 and spectral.recall >= 0.6, spectral  # measured F1 0.163, recall 0.666 (over-detects)


def test_s2cloudless_on_real_l1c_crop():
    e = np.load(shared("s2-l1c-cloudy-s2cloudless", "input_arrays.npz"))
    crop = np.s_[300:556, 0:256]
    im, ref = e["s2_im"][0][crop], e["cl_mask"][0][crop] > 0
    prob, mask = s2cloudless_kernel(im[..., [L1C13.index(b) for b in S2CLOUDLESS_BANDS]])
    np.testing.assert_allclose(prob, e["cl_probs"][0][crop], atol=1e-4)
    assert score(mask, ref, None, "", "", "").f1 >= 0.93  # measured 0.952 on this crop, 0.961 on the scene


def test_ndsi_snow_is_not_cloud():
    bright = {b: np.full((4, 4), 0.6, np.float32) for b in ("B01", "B02", "B03", "B04", "B11")}
    assert (spectral_score_kernel(bright) == 1).all()
    snow = dict(bright, B11=np.full((4, 4), 0.1, np.float32))  # NDSI = 0.71
    assert (spectral_score_kernel(snow) == 0).all()
    nan = dict(bright, B02=np.full((4, 4), np.nan, np.float32))
    assert np.isnan(spectral_score_kernel(nan)).all()


def test_cldprb_threshold_closing_then_opening():
    prob = np.zeros((40, 40), np.float32)
    prob[10:30, 10:30] = 80  # cloud with a one-pixel hole
    prob[20, 20] = 10
    prob[3, 35] = 90  # isolated confident speck
    prob[36, 5] = 50  # isolated weak speck
    paper = cldprb_codes(prob, threshold=40, closing=2, opening=1, dilation=0)  # PhyVLM-CR: opens every speck
    assert paper[20, 20] == CODE_CLOUD and (paper[11:29, 11:29] == CODE_CLOUD).all()
    assert paper[3, 35] == CODE_OPENED and paper[36, 5] == CODE_OPENED  # flagged, removed, reported
    assert (paper[:9, :30] == CODE_CLEAR).all()
    weak = cldprb_codes(prob, 40, 2, 1, 0, keep_prob=0.65)  # the opening spares the confident speck
    assert weak[3, 35] == CODE_CLOUD and weak[36, 5] == CODE_OPENED
    assert (weak[11:29, 11:29] == CODE_CLOUD).all()
    np.testing.assert_array_equal(cldprb_kernel(prob, 40, 2, 1, 0, 0.65), weak == CODE_CLOUD)
    assert not cldprb_kernel(np.full((8, 8), 39.0), 40, 2, 1, 0).any()


@pytest.mark.parametrize("refinement", ["weak-opening", "paper", "closing-only"])
def test_refinement_modes_lazy_and_in_task_paths_agree(refinement):
    """The lazy mask stage (map_overlap, several chunks) and the in-task LayerMask give the same mask and opened
    layer for every refinement; no flagged pixel is ever neither in the mask nor in ``opened``."""
    import xarray as xr

    from cloudfree.stages.masks import cldprb_layer_mask, cldprb_mask, combine

    rng = np.random.default_rng(3)
    prob = np.where(rng.random((2, 96, 96)) < 0.03, rng.choice([50.0, 100.0], (2, 96, 96)), 0.0).astype(np.float32)
    prob[:, 40:60, 30:70] = 90.0
    cfg = MaskConfig(refinement=refinement)
    da = xr.DataArray(dsa.from_array(prob, chunks=(1, 32, 32)), dims=("time", "y", "x"))
    m_lazy, p_lazy, o_lazy = (np.asarray(a.values) for a in cldprb_mask(da, cfg, with_opened=True))
    m_task, p_task, o_task = cldprb_layer_mask("CLDPRB", cfg)(prob)
    np.testing.assert_array_equal(m_lazy, m_task)
    np.testing.assert_array_equal(o_lazy, o_task)
    flagged = prob >= cfg.cldprb_threshold
    assert (m_task | o_task)[flagged].all() and not (m_task & o_task).any()
    if refinement == "paper":
        assert o_task[prob == 100.0].any()  # the paper's opening removes confident specks (reported)
    else:
        assert not o_task[prob == 100.0].any()  # never a confident one
    if refinement == "closing-only":
        assert not o_task.any()
    m, p, o = combine([(m_task, p_task, o_task), (np.zeros_like(m_task), p_task, None)])
    np.testing.assert_array_equal(o, o_task & ~m)


def _small_geobox(items):

    from cloudfree.pipeline.config import GridConfig
    from cloudfree.stages.load import output_geobox

    gb = output_geobox(items[0], GridConfig())
    return gb[200:456, 400:656]


@pytest.fixture(scope="module")
def demo_items(demo_catalog):
    cat = pystac.Catalog.from_file(str(demo_catalog))
    return sorted(cat.get_items(recursive=True), key=lambda i: i.id)


def test_spectral_and_s2cloudless_methods_are_lazy_and_combine(demo_items):
    items = [i for i in demo_items if i.id.endswith("SIMCLOUDY")]
    gb = _small_geobox(items)
    cfg = MaskConfig(methods=["spectral"])
    m_spec, p_spec = build_masks(items, gb, cfg)
    m_s2c, p_s2c = build_masks(items, gb, cfg.model_copy(update={"methods": ["s2cloudless"]}))
    m_all, p_all = build_masks(items, gb, cfg.model_copy(update={"methods": ["cldprb", "spectral", "s2cloudless"]}))
    for a in (m_spec, p_spec, m_s2c, m_all, p_all):
        assert isinstance(a.data, dsa.Array) and a.shape == (1, 256, 256)
    m_spec, p_spec, m_s2c, m_all, p_all = (np.asarray(a.values) for a in (m_spec, p_spec, m_s2c, m_all, p_all))
    assert (m_all >= m_spec).all() and (m_all >= m_s2c).all()  # OR
    assert (p_all >= np.nan_to_num(p_spec) - 1e-6).all()  # max
    assert 0 <= np.nanmin(p_spec) and np.nanmax(p_spec) <= 1
    # thin and thick both present in the continuous layer (the demo target has both)
    assert ((p_all > 0.05) & (p_all < 0.95)).mean() > 0.01 and (p_all >= 0.95).mean() > 0.01
    # the simulated cloud is found by both optical methods (the target is ~50 % cloudy)
    assert 0.2 < m_spec.mean() < 0.95 and 0.2 < m_s2c.mean() < 0.95


def test_s2cloudless_refuses_l2a_naming_the_item():
    item = pystac.Item("S2A_MSIL2A_X", None, None, datetime(2020, 1, 1, tzinfo=timezone.utc),
                       {"platform": "sentinel-2a", "s2:product_type": "S2MSI2A"})
    for b in S2CLOUDLESS_BANDS[:-3]:
        item.add_asset(b, pystac.Asset(f"{b}.tif"))
    with pytest.raises(InputDataError, match="S2A_MSIL2A_X.*'cldprb', 'scl' or 'spectral'"):
        s2cloudless_mask([item], None, MaskConfig(methods=["s2cloudless"]))


def test_scl_and_cldprb_resampled_to_10m_keep_their_values(demo_items):
    """20 m class/probability layers on the 10 m grid: nearest, so no value outside the source set appears."""
    import rasterio

    from cloudfree.stages.load import load_layer

    item = next(i for i in demo_items if i.id.endswith("SIMCLOUDY"))
    gb = _small_geobox([item])
    for key in ("SCL", "CLDPRB"):
        with rasterio.open(item.assets[key].get_absolute_href()) as ds:
            src = set(np.unique(ds.read(1)).tolist())
        layer = load_layer([item], key, gb).values
        got = set(np.unique(layer[np.isfinite(layer)]).astype(int).tolist())
        assert got <= src | {0}, (key, got - src)


def test_scl_classes_survive_resampling_on_real_29rkh(tmp_path):
    """Real SCL (200 m in the decimated tile) onto a 100 m and a 130 m grid: classes stay in the class set."""
    from odc.geo.geobox import GeoBox

    from cloudfree.pipeline.evaluation.bench import local_29rkh_item
    from cloudfree.stages.load import load_layer

    item = local_29rkh_item(shared("s2-l2a-tile-29RKH-100m"))
    for res in (100, 130):
        gb = GeoBox.from_bbox((199980, 2690220, 309780, 2800020), "EPSG:32629", resolution=res)
        scl = load_layer([item], "SCL", gb).values
        assert set(np.unique(scl[np.isfinite(scl)]).astype(int)) <= {0, 2, 5, 7, 8, 9, 10}
