"""Graded alignment fallback (issues 18 and 24), on SIMULATED tiles: no cliff at the trusted-fraction threshold, the
references' consensus when the target cannot be trusted, and a local-fit margin that does not count the mask
stage's dilation twice."""

from __future__ import annotations

import numpy as np

from cloudfree.models import _align
from cloudfree.pipeline.contract import TileInputs

BANDS = ("B02", "B03", "B04", "B08")


def _tile(target, mask, refs, prob=None, ref_masks=None):
    n = refs.shape[0]
    shape = target.shape[1:]
    return TileInputs(BANDS, target.astype(np.float32),
                      (mask.astype(np.float32) if prob is None else prob).astype(np.float32), mask,
                      refs.astype(np.float32),
                      np.zeros((n,) + shape, bool) if ref_masks is None else ref_masks,
                      tuple(f"r{i}" for i in range(n)), tuple(float(5 * (i + 1)) for i in range(n)),
                      target_id="simulated")


def _scene(seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = np.stack([0.02 + 0.01 * rng.random((size, size)), 0.05 + 0.02 * rng.random((size, size)),
                     0.03 + 0.02 * rng.random((size, size)), 0.3 + 0.1 * rng.random((size, size))])
    return base.astype(np.float32)


def test_alignment_weight_has_no_cliff():
    """The fit onto the target fades in with the trustworthy share (0 at MIN_TRUSTED_FRACTION_LOW, 1 at
    MIN_TRUSTED_FRACTION): the cloud mask one dilation step larger no longer flips the alignment to identity."""
    base = _scene()
    size = base.shape[1]
    weights = []
    for clear_rows in range(0, size + 1, 2):
        mask = np.ones((size, size), bool)
        mask[:clear_rows] = False
        weights.append(_align.alignment_weight(_tile(base, mask, base[None])))
    weights = np.array(weights)
    assert weights[0] == 0.0 and weights[-1] == 1.0
    assert (np.diff(weights) >= 0).all()
    assert np.abs(np.diff(weights)).max() < 0.2  # 2 rows of 64 = 3 % of the pixels: a small step, not a cliff
    assert ((weights > 0) & (weights < 1)).sum() >= 5


def test_untrusted_target_maps_a_scene_dark_reference_onto_the_consensus():
    """Target all cloud (nothing trustworthy): a reference whose whole scene is 20 % darker than the two others
    (a scene-wide shadow the mask missed) is mapped onto their consensus, not used as it is (the old identity)."""
    base = _scene(1)
    refs = np.stack([0.8 * base, base * 1.01, base * 0.99])
    cloud = np.full_like(base, 0.7)
    mask = np.ones(base.shape[1:], bool)
    tile = _tile(cloud, mask, refs)
    assert _align.alignment_weight(tile) == 0.0
    (g0, o0), (g1, _), (g2, _) = _align.scene_alignment(tile)
    mapped = g0[:, None, None] * refs[0] + o0[:, None, None]
    err_before = np.abs(refs[0] - base).mean()
    err_after = np.abs(mapped - base).mean()
    assert err_after < 0.2 * err_before
    assert (g0 > 1.1).all()  # brightened towards the others, within the bounds
    assert (g0 <= _align.GAIN_BOUNDS[1] + 1e-6).all()
    np.testing.assert_allclose(g1, 1.0, atol=0.05)
    np.testing.assert_allclose(g2, 1.0, atol=0.05)
    # one reference: no consensus, identity as before
    (g, o), = _align.scene_alignment(_tile(cloud, mask, refs[:1]))
    np.testing.assert_array_equal(g, 1.0)
    np.testing.assert_array_equal(o, 0.0)


def test_hazy_reference_does_not_shield_a_hazy_target():
    """A target pixel hazy in blue (+0.03) passes as trustworthy when one reference is hazy there too under the old
    'brighter than every reference' test; against the references' median it does not."""
    base = _scene(2)
    refs = np.stack([base, base.copy(), base.copy()])
    refs[1, 0] += 0.04  # one reference with haze the mask missed
    target = base.copy()
    target[0] += 0.03
    mask = np.zeros(base.shape[1:], bool)
    tile = _tile(target, mask, refs)
    assert not _align.trusted_clear(tile).any()
    assert _align.trusted_clear(_tile(base, mask, refs)).all()


def test_local_fit_margin_is_measured_from_the_cloud_not_the_dilated_mask():
    """temporal's local fit keeps ``local_margin`` pixels from the cloud (its probability); the mask stage's
    dilation of the mask does not push the fit pixels further away (issue 24)."""
    from scipy import ndimage

    from cloudfree.models.temporal import confidently_clear

    base = _scene(3)
    cloud = np.zeros(base.shape[1:], bool)
    cloud[20:40, 20:40] = True
    prob = cloud.astype(np.float32)
    exact = confidently_clear(_tile(base, cloud, base[None], prob), 0.1, 3)
    dilated = confidently_clear(_tile(base, ndimage.binary_dilation(cloud, iterations=2), base[None], prob), 0.1, 3)
    np.testing.assert_array_equal(exact, dilated)
    assert not (exact & ndimage.binary_dilation(cloud, iterations=3)).any()
    assert exact.sum() == (~ndimage.binary_dilation(cloud, iterations=3)).sum()
