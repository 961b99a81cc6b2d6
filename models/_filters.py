"""Shared pure-numpy image filters for the physics-based models (no I/O).

* :func:`box_mean`: mean over a ``(2r+1) x (2r+1)`` window on the last two axes (``scipy.ndimage.uniform_filter``,
  a running-sum filter whose cost does not depend on ``r``), reflecting at the edges.
* :func:`guided_filter`: He, Sun & Tang, "Guided Image Filtering" (ECCV 2010 / TPAMI 2013), with a single-channel
  guide and any number of source bands, optionally *weighted*: every pixel ``k`` of a window enters the local
  linear fit ``q = a I + b`` with weight ``w_k`` (weighted means ``box(w x) / box(w)``), so untrusted pixels do not
  drive the coefficients, which are then averaged with plain box means as in the original filter. Receptive field
  radius ``2 r`` (one box for the coefficients, one for averaging them).
  With ``subsample=s > 1`` it is He & Sun's *Fast Guided Filter* (arXiv:1505.00996, 2015): the coefficients are
  fitted on ``s x s`` block means with radius ``r / s`` and bilinearly upsampled before ``q = A I + B`` on the
  full-resolution guide, so edges still follow the full-resolution guide at ``1/s^2`` of the box-filter cost.
  :func:`guided_filter_coarse` is the same filter for a caller whose source is already on the coarse grid.
* :func:`block_mean` (``s x s`` block means by strided slice sums) and :func:`upsample_bilinear` (separable
  two-tap gathers, half-pixel centres, edges clamped): the Fast Guided Filter's down/up-sampling.
* :func:`laplacian_magnitude`: ``|∇² x|`` with the 5-point stencil (radius 1).
* :func:`gradient_magnitude`: central differences (radius 1).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a ``(2r+1)^2`` window on the last two axes, float32, edges reflected."""
    x = np.asarray(x, np.float32)
    if r <= 0:
        return x.copy()
    size = (1,) * (x.ndim - 2) + (2 * r + 1, 2 * r + 1)
    return ndimage.uniform_filter(x, size=size, mode="reflect")


def guided_filter(
    guide: np.ndarray,
    src: np.ndarray,
    r: int,
    eps: float,
    weights: np.ndarray | None = None,
    subsample: int = 1,
) -> np.ndarray:
    """Edge-preserving smoothing of ``src`` (``(y, x)`` or ``(band, y, x)``) steered by ``guide`` ``(y, x)``.

    Args:
        guide: single-channel guide image.
        src: image(s) to filter; a leading band axis is filtered band by band with the same guide.
        r: window radius in pixels.
        eps: regularisation of the local gain ``a`` (in squared guide units); larger = smoother.
        weights: optional ``(y, x)`` non-negative per-pixel trust; ``None`` = the unweighted filter.
        subsample: fit the coefficients on ``subsample``-times coarser block means (Fast Guided Filter).
    Returns:
        float32 array shaped like ``src``.
    """
    g_full = np.asarray(guide, np.float32)
    s = int(subsample)
    if s > 1 and min(g_full.shape) >= 4 * s:
        g = block_mean(g_full, s)
        p = block_mean(np.asarray(src, np.float32), s)
        weights = None if weights is None else block_mean(np.asarray(weights, np.float32), s)
        return guided_filter_coarse(g_full, g, p, max(1, int(round(r / s))), eps, weights)
    return guided_filter_coarse(g_full, g_full, np.asarray(src, np.float32), r, eps, weights)


def guided_filter_coarse(
    guide: np.ndarray,
    guide_low: np.ndarray,
    src_low: np.ndarray,
    r_low: int,
    eps: float,
    weights_low: np.ndarray | None = None,
) -> np.ndarray:
    """The (weighted) guided filter's coefficients fitted on a coarse grid (``guide_low``, ``src_low``,
    ``weights_low``: block means of the full-resolution images, radius ``r_low`` in coarse pixels), box-averaged,
    bilinearly upsampled to ``guide``'s shape and applied as ``q = A guide + B`` (Fast Guided Filter); with
    ``guide_low is guide`` it is the plain filter. Lets a caller that already works on the coarse grid (e.g. a
    transmission estimated there) skip the block means."""
    g = np.asarray(guide_low, np.float32)
    p = np.asarray(src_low, np.float32)
    r = r_low
    if weights_low is None:
        m_g = box_mean(g, r)
        var_g = box_mean(g * g, r) - m_g * m_g
        m_p = box_mean(p, r)
        cov = box_mean(g * p, r) - m_g * m_p
    else:
        w = np.asarray(weights_low, np.float32)
        wsum = box_mean(w, r) + np.float32(1e-12)
        m_g = box_mean(w * g, r) / wsum
        var_g = box_mean(w * g * g, r) / wsum - m_g * m_g
        wp = w * p
        m_p = box_mean(wp, r) / wsum
        cov = box_mean(wp * g, r) / wsum - m_g * m_p
    a = cov / (np.maximum(var_g, 0) + np.float32(eps))
    b = m_p - a * m_g
    ab = box_mean(np.stack([a, b]), r)  # one filter call (and one upsampling) for both coefficient maps
    g_full = np.asarray(guide, np.float32)
    if ab.shape[-2:] != g_full.shape:
        ab = upsample_bilinear(ab, g_full.shape)
    q = ab[0]
    q *= g_full
    q += ab[1]
    return q.astype(np.float32, copy=False)


def block_mean(x: np.ndarray, s: int) -> np.ndarray:
    """Mean over ``s x s`` blocks of the last two axes (edge blocks padded by edge values), float32.

    Summed as ``s`` strided slices along x then along y (numpy's multi-axis ``mean`` over a reshaped view is
    ~10x slower on these strided layouts)."""
    x = np.asarray(x, np.float32)
    ny, nx = x.shape[-2:]
    py, px = (-ny) % s, (-nx) % s
    if py or px:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, py), (0, px)], mode="edge")
        ny, nx = x.shape[-2:]
    lead = x.shape[:-2]
    r = x.reshape(lead + (ny, nx // s, s))
    acc = r[..., 0].copy()
    for j in range(1, s):
        acc += r[..., j]
    r2 = acc.reshape(lead + (ny // s, s, nx // s))
    out = r2[..., 0, :].copy()
    for j in range(1, s):
        out += r2[..., j, :]
    out *= np.float32(1.0 / (s * s))
    return out


def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps from ``n_in`` block centres to ``n_out = s * n_in`` pixel centres: indices ``i0``, ``i1`` and
    the weight ``f`` of ``i1`` (edges clamped)."""
    c = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    c = np.clip(c, 0, n_in - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (c - i0).astype(np.float32)


def upsample_bilinear(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of block means ``x`` (last two axes) to ``shape``: separable two-tap interpolation by
    gathers along x then y (O(1) per output pixel whatever the factor, and no BLAS threads, which a dense
    interpolation-matrix product needs and which contend with other processes on a small machine)."""
    ny, nx = shape
    by, bx = x.shape[-2:]
    s_y, s_x = -(-ny // by), -(-nx // bx)
    y0, y1, fy = (v[:ny] for v in _taps(by * s_y, by))
    x0, x1, fx = (v[:nx] for v in _taps(bx * s_x, bx))
    x = np.asarray(x, np.float32)
    lo = x[..., x0]
    hi = x[..., x1]
    hi -= lo
    hi *= fx
    lo += hi  # (..., by, nx)
    top = lo[..., y0, :]
    bottom = lo[..., y1, :]
    bottom -= top
    bottom *= fy[:, None]
    top += bottom
    return top


def laplacian_magnitude(x: np.ndarray) -> np.ndarray:
    """``|∇² x|`` (5-point stencil, reflected edges) on the last two axes."""
    x = np.asarray(x, np.float32)
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="reflect")
    lap = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * x
    return np.abs(lap)


def gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """``||∇x||`` by central differences (one-sided at the edges) on a ``(y, x)`` image."""
    gy, gx = np.gradient(np.asarray(x, np.float32))
    return np.hypot(gy, gx).astype(np.float32, copy=False)


def nanmedian_axis0(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring non-finite values (NaN where none is finite); a replacement for
    ``np.nanmedian``, which goes through masked arrays and is ~10x slower for the few observations of a reference
    stack."""
    if stack.shape[0] == 1:
        return np.where(np.isfinite(stack[0]), stack[0], np.nan).astype(np.float32)
    if stack.shape[0] == 2:  # the median of two is their mean; of one, itself
        a, b = stack[0], stack[1]
        fa, fb = np.isfinite(a), np.isfinite(b)
        return np.where(fa & fb, 0.5 * (a + b), np.where(fa, a, np.where(fb, b, np.nan))).astype(np.float32)
    valid = np.isfinite(stack)
    return median_of_valid(stack, valid, valid.sum(axis=0))


#: up to this many observations the median uses a sorting network (elementwise min/max over whole planes, ~2x
#: ``np.sort`` along a short strided axis); more fall back to ``np.sort``.
NETWORK_MAX = 16


def _oddeven_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for ``n`` inputs (the power-of-two network, comparators that
    touch the padding dropped: padding sorts last, so they never swap)."""
    size = 1 << max(0, (n - 1).bit_length())
    pairs, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def median_of_valid(stack: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median over axis 0 of ``stack`` ``(t, ...)`` where ``valid`` (broadcastable to it), ``n`` the number of
    valid observations (``valid.sum(0)``, broadcastable to ``stack.shape[1:]``); NaN where ``n == 0``. Invalid
    entries sort last as +inf, so the median of each pixel is the mean of its sorted valid values at
    ``(n - 1) // 2`` and ``n // 2`` (the same values as ``np.nanmedian``)."""
    nt = stack.shape[0]
    big = np.asarray(np.inf, dtype=stack.dtype)
    if nt <= NETWORK_MAX:
        v = [np.where(valid[min(i, valid.shape[0] - 1)], stack[i], big) for i in range(nt)]
        for a, b in _oddeven_pairs(nt):
            lo = np.minimum(v[a], v[b])
            np.maximum(v[a], v[b], out=v[b])
            v[a] = lo
        srt = np.stack(v)
    else:
        srt = np.sort(np.where(valid, stack, big), axis=0)
    n = np.broadcast_to(n, stack.shape[1:])
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[None], 0)[0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[None], 0)[0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan).astype(np.float32)


def robust_percentile(x: np.ndarray, q: float | list[float], stride: int = 2) -> np.ndarray:
    """Percentile(s) of the finite values of ``x`` estimated on a regular ``stride`` sub-sample (for speed)."""
    sub = np.asarray(x)[..., ::stride, ::stride].ravel()
    sub = sub[np.isfinite(sub)]
    if sub.size == 0:
        return np.full(np.shape(q), np.nan, np.float32)
    return np.percentile(sub, q).astype(np.float32)
