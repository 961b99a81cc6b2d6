"""Pluggable priors ``J_VLM`` for PhyVLM-CR (paper eq. 2: ``J = J_VLM + E``).

The paper obtains its cognitive prior ``J_VLM`` from Qwen-Image-Edit prompted with "remove cloud" (in Chinese).
Here the prior is anything implementing :class:`Prior` (``name``, ``halo``, ``__call__(tile) -> PriorResult``):

* :class:`ReferencePrior` (``"reference"``): the temporal reference(s), radiometrically aligned to
  the target by :func:`cloudfree.models._align.fit_linear` on pixels clear in both; pixels no clear reference covers fall
  back to a dark-channel dehaze of the target (:func:`cloudfree.models.dcp.dcp_dehaze`), and a tile without any reference
  is entirely the dark-channel fallback (logged). With a scene context (``tile.context["alignment"]``, from
  PhyVLM-CR's ``fit_scene``) the scene-level gains are used instead of a per-tile fit, so tiles do not jump at
  seams.
* :class:`TemporalPrior` (``"temporal"``, PhyVLM-CR's default): per-pixel interpolation in time of the clear
  references at the target date, aligned to the target (globally, then by a local gain/offset field); see
  :mod:`cloudfree.models.temporal`. It doubles as ``I_ref`` of eq. 10 (``PriorResult.reference``).
* :class:`ModelPrior` (``"model"``): any model registered in this project, by name; its ``predict`` output is
  the prior (a baseline such as ``dcp``, or a learned model such as ``ca-mtcr``); it is named for what it is,
  not "learned".
* :class:`DiffusersPrior` (``"diffusers"``): a local image-editing pipeline through the optional ``diffusers``
  package and locally stored weights (e.g. Qwen-Image-Edit). Reflectance is mapped to an 8-bit RGB image
  (B04/B03/B02, fixed reflectance range, gamma 2.2), edited, mapped back with the exact inverse, and the non-RGB
  bands are predicted from the edited RGB by per-band linear regressions fitted on the target's clear pixels.
  ``diffusers`` is imported lazily; without it (or without the weights) a specific error names the fix.

Everything except the diffusers call itself is pure numpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from cloudfree.models._align import (  # noqa: F401  (re-exported: the one implementation lives in models._align)
    MAX_FIT_PIXELS,
    composite_reference,
    fallback_region,
    fill_target,
    reference_validity,
    thin_mask,
)
from cloudfree.pipeline.contract import SOURCE_FAILED, SOURCE_NODATA, TileInputs
from cloudfree.pipeline.errors import ModelError, WeightsError

log = logging.getLogger(__name__)

#: The paper's prompt, "remove cloud" in Chinese.
DEFAULT_PROMPT = "去除云"


class PriorBackendMissingError(ModelError, ImportError):
    """An optional package a prior needs (e.g. ``diffusers``) is not installed."""


@dataclass
class PriorResult:
    """A prior image ``(band, y, x)`` float32, where it is usable, and a one-line provenance."""

    image: np.ndarray
    valid: np.ndarray
    description: str
    #: ``(image, index)``: an aligned reference estimate PhyVLM-CR uses as ``I_ref`` of eq. 10 instead of aligning
    #: the references itself (set by :class:`TemporalPrior`; None = the kernel aligns on high-visibility pixels).
    reference: tuple[np.ndarray, np.ndarray] | None = None


@runtime_checkable
class Prior(Protocol):
    """What PhyVLM-CR needs from a prior: a cloud-free guess of the whole tile."""

    name: str
    #: extra context (pixels) the prior needs around the tile core.
    halo: int

    def __call__(self, tile: TileInputs) -> PriorResult: ...


class ReferencePrior:
    """The aligned temporal reference as prior; dark-channel dehaze of the target where no reference is clear."""

    name = "reference"
    halo = 0

    def __init__(self, dcp_params: dict | None = None, combine: str = "first",
                 fallback_prob: float | None = None) -> None:
        self.dcp_params = dict(dcp_params or {})
        self.combine = combine
        #: see :func:`fallback_region`
        self.fallback_prob = fallback_prob

    def __call__(self, tile: TileInputs) -> PriorResult:
        target_ok = np.isfinite(tile.target).all(axis=0)
        image, index = composite_reference(
            tile.target, tile.references, reference_validity(tile), ~tile.cloud_mask & target_ok, self.combine,
            alignment=tile.context.get("alignment"), fallback=fallback_region(tile, self.fallback_prob),
        )
        desc = dcp_fill(tile, image, index < 0, self.dcp_params, "aligned temporal reference")
        return PriorResult(image, np.isfinite(image).all(axis=0), desc)


def dcp_fill(tile: TileInputs, image: np.ndarray, missing: np.ndarray, dcp_params: dict, what: str) -> str:
    """Fill ``image`` (in place) with a dark-channel dehaze of the target on ``missing`` pixels (no reference
    covers them); returns the prior's one-line description."""
    from cloudfree.models.dcp import dcp_dehaze

    if not missing.any():
        return what
    j, _, _ = dcp_dehaze(fill_target(tile), **dcp_params)
    image[:, missing] = np.maximum(j[:, missing], 0)
    if tile.references.shape[0] == 0:
        log.warning("tile %s: no reference; prior = dark-channel dehaze of the target", tile.target_id)
        return "dark-channel dehaze of the target (no reference)"
    frac = float(missing.mean())
    log.info("tile %s: %.1f%% of pixels without a clear reference use the dark-channel prior", tile.target_id,
             100 * frac)
    return f"{what}, dark-channel dehaze on {100 * frac:.1f}% of pixels"


class TemporalPrior:
    """Per-pixel interpolation in time of the clear references at the target date, aligned to the target
    (:func:`cloudfree.models.temporal.temporal_estimate`, the ``temporal`` model's estimate). It is also returned as
    ``PriorResult.reference`` and becomes PhyVLM-CR's ``I_ref`` (eq. 10), so prior and fusion agree. Pixels no
    reference covers get the dark-channel dehaze of the target, as :class:`ReferencePrior`."""

    name = "temporal"

    def __init__(self, options: dict | None = None, dcp_params: dict | None = None) -> None:
        from cloudfree.models.temporal import TemporalParams

        opts = dict(options or {})
        for k in ("reference_confidence", "one_sided_confidence", "fallback_confidence"):
            opts.pop(k, None)
        self.params = TemporalParams(**opts)
        self.dcp_params = dict(dcp_params or {})

    @property
    def halo(self) -> int:
        from cloudfree.models.temporal import temporal_halo

        return temporal_halo(self.params.local_radius)

    def __call__(self, tile: TileInputs) -> PriorResult:
        from cloudfree.models.temporal import temporal_estimate

        p = self.params
        est = temporal_estimate(tile, method=p.method, tau_days=p.tau_days, min_robust=p.min_robust,
                                local_radius=p.local_radius, local_eps=p.local_eps,
                                local_min_fraction=p.local_min_fraction, local_max_prob=p.local_max_prob,
                                local_margin=p.local_margin, fallback_prob=p.fallback_prob, align=p.align,
                                local_max_change=(p.local_max_change_abs, p.local_max_change_rel))
        reference = (est.image.copy(), est.index)
        image = est.image
        desc = dcp_fill(tile, image, est.index < 0, self.dcp_params,
                        f"temporal interpolation ({p.method}, local alignment r={p.local_radius})")
        return PriorResult(image, np.isfinite(image).all(axis=0), desc, reference)


class ModelPrior:
    """Any registered model of this project, by name, as the prior (its ``predict`` reflectance). Named for what
    it is: it wraps another model (a baseline or a learned one)."""

    name = "model"

    def __init__(self, model_name: str, params: dict | None = None) -> None:
        if model_name == "phyvlm-cr":
            raise ModelError("the model prior of phyvlm-cr cannot be phyvlm-cr itself; pick another model name")
        self.model_name = model_name
        self.model_params = dict(params or {})
        self._model: Any = None

    def _get(self) -> Any:
        if self._model is None:
            from cloudfree.models.registry import build_model

            self._model = build_model(self.model_name, self.model_params)
        return self._model

    @property
    def halo(self) -> int:
        from cloudfree.models.registry import get_model_class

        return int(get_model_class(self.model_name).spec.halo)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}  # rebuilt lazily, once per worker

    def __call__(self, tile: TileInputs) -> PriorResult:
        model = self._get()
        if model.spec.needs_reference and tile.references.shape[0] == 0:
            raise ModelError(
                f"model prior {self.model_name!r} needs a reference and tile {tile.target_id} has none; "
                "pick a reference-free prior model (e.g. 'dcp')"
            )
        res = model.predict(tile)
        valid = np.isfinite(res.reflectance).all(axis=0) & ~np.isin(res.source, (SOURCE_NODATA, SOURCE_FAILED))
        return PriorResult(res.reflectance.astype(np.float32), valid, f"registered model {self.model_name!r}")


# ---------------------------------------------------------------------------------------------- diffusers adapter
def reflectance_to_rgb(image: np.ndarray, rgb_idx: list[int], max_reflectance: float, gamma: float) -> np.ndarray:
    """``(band, y, x)`` reflectance -> ``(y, x, 3)`` uint8: ``255 * clip(R / max_reflectance, 0, 1) ** (1/gamma)``."""
    rgb = np.clip(np.nan_to_num(image[rgb_idx], nan=0.0) / max_reflectance, 0.0, 1.0) ** (1.0 / gamma)
    return np.round(np.moveaxis(rgb, 0, -1) * 255).astype(np.uint8)


def rgb_to_reflectance(rgb: np.ndarray, max_reflectance: float, gamma: float) -> np.ndarray:
    """Exact inverse of :func:`reflectance_to_rgb` (up to 8-bit quantisation): ``(y, x, 3)`` -> ``(3, y, x)``."""
    x = np.asarray(rgb, np.float32)
    if x.dtype.kind != "f" or x.max() > 1.0 + 1e-6:
        x = x / 255.0
    return (np.moveaxis(np.clip(x, 0, 1), -1, 0) ** gamma * max_reflectance).astype(np.float32)


def extend_rgb_to_bands(
    target: np.ndarray, rgb_idx: list[int], edited_rgb: np.ndarray, fit_region: np.ndarray
) -> np.ndarray:
    """Predict every band from an edited RGB ``(3, y, x)``: per band, ``band ~ c0 + c . rgb`` fitted on the target's
    ``fit_region`` (least squares), applied to the edited RGB; the RGB bands themselves are the edited ones."""
    nb = target.shape[0]
    out = np.empty((nb,) + edited_rgb.shape[1:], np.float32)
    x = target[rgb_idx][:, fit_region].T.astype(np.float64)
    ok = np.isfinite(x).all(axis=1)
    design = np.column_stack([np.ones(ok.sum()), x[ok]])
    edited = np.concatenate([np.ones((1,) + edited_rgb.shape[1:], np.float32), edited_rgb])
    for b in range(nb):
        if b in rgb_idx:
            out[b] = edited_rgb[rgb_idx.index(b)]
            continue
        y = target[b][fit_region].astype(np.float64)[ok]
        if design.shape[0] < 16:
            coef = np.zeros(4)
            coef[0] = float(np.nanmedian(target[b])) if np.isfinite(target[b]).any() else 0.0
        else:
            coef = np.linalg.lstsq(design, y, rcond=None)[0]
        out[b] = np.tensordot(coef.astype(np.float32), edited, axes=1)
    return out


def _resize_rgb(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == shape:
        return rgb
    from scipy import ndimage

    zoom = (shape[0] / rgb.shape[0], shape[1] / rgb.shape[1], 1)
    out = ndimage.zoom(rgb.astype(np.float32), zoom, order=1)
    return out[: shape[0], : shape[1]]


class DiffusersPrior:
    """Adapter to a local ``diffusers`` image-editing pipeline (e.g. Qwen-Image-Edit), loaded lazily from disk.

    ``pipeline`` may be injected (any callable ``pipeline(image=PIL.Image | ndarray, prompt=str, **kw)`` returning an
    object with ``.images[0]`` or an array): tests use a fake one; production loads ``weights`` once per worker.
    """

    name = "diffusers"
    halo = 0

    def __init__(
        self,
        weights: str | Path | None,
        *,
        prompt: str = DEFAULT_PROMPT,
        rgb_bands: tuple[str, str, str] = ("B04", "B03", "B02"),
        max_reflectance: float = 0.3,
        gamma: float = 2.2,
        steps: int = 30,
        device: str = "cpu",
        seed: int = 0,
        pipeline: Callable[..., Any] | None = None,
    ) -> None:
        self.weights = None if weights is None else Path(weights)
        self.prompt = prompt
        self.rgb_bands = tuple(rgb_bands)
        self.max_reflectance = float(max_reflectance)
        self.gamma = float(gamma)
        self.steps = int(steps)
        self.device = device
        self.seed = int(seed)
        self._pipeline = pipeline

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipeline": None}

    def load_pipeline(self) -> Callable[..., Any]:
        """The injected pipeline, or ``diffusers.DiffusionPipeline.from_pretrained(weights, local_files_only=True)``."""
        if self._pipeline is not None:
            return self._pipeline
        if self.weights is None or not self.weights.exists():
            raise WeightsError(
                f"diffusers prior: weights folder {self.weights} not found; download an image-editing pipeline "
                "(e.g. Qwen/Qwen-Image-Edit) with `huggingface-cli download <repo> --local-dir <dir>` on a machine "
                "with internet and set model.params.diffusers_weights: <dir>"
            )
        try:
            import diffusers  # noqa: PLC0415 (optional, heavy)
        except ImportError as exc:
            raise PriorBackendMissingError(
                "diffusers prior: the optional package `diffusers` is not installed "
                f"({exc}); install it with `pip install diffusers transformers accelerate` (keep torch==2.13.0 "
                "pinned), or use prior: temporal / reference / model"
            ) from exc
        log.info("loading diffusers pipeline from %s on %s", self.weights, self.device)
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(self.weights), local_files_only=True)
        self._pipeline = pipe.to(self.device)
        return self._pipeline

    def preprocess(self, tile: TileInputs) -> np.ndarray:
        return reflectance_to_rgb(tile.target, tile.band_index(*self.rgb_bands), self.max_reflectance, self.gamma)

    def postprocess(self, tile: TileInputs, edited: Any) -> np.ndarray:
        images = getattr(edited, "images", edited)
        first = images[0] if isinstance(images, (list, tuple)) else images
        rgb = _resize_rgb(np.asarray(first), tile.shape)
        if rgb.ndim != 3 or rgb.shape[-1] < 3:
            raise ModelError(f"diffusers prior: the pipeline returned an image of shape {rgb.shape}, expected (y, x, 3)")
        refl = rgb_to_reflectance(rgb[..., :3], self.max_reflectance, self.gamma)
        rgb_idx = tile.band_index(*self.rgb_bands)
        fit = ~tile.cloud_mask & np.isfinite(tile.target).all(axis=0)
        return extend_rgb_to_bands(tile.target, rgb_idx, refl, thin_mask(fit))

    def __call__(self, tile: TileInputs) -> PriorResult:
        pipe = self.load_pipeline()
        rgb = self.preprocess(tile)
        try:
            from PIL import Image

            image_in: Any = Image.fromarray(rgb)
        except ImportError:
            image_in = rgb
        kwargs: dict[str, Any] = {"image": image_in, "prompt": self.prompt, "num_inference_steps": self.steps}
        try:
            import torch

            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(self.seed)
        except ImportError:
            pass
        out = self.postprocess(tile, pipe(**kwargs))
        return PriorResult(out, np.isfinite(out).all(axis=0), f"diffusers pipeline {self.weights}")


def build_prior(kind: str, **kw: Any) -> Prior:
    """Factory used by PhyVLM-CR's params: ``temporal`` | ``reference`` | ``model`` | ``diffusers``."""
    if kind == "temporal":
        return TemporalPrior(kw.get("temporal_options"), kw.get("dcp_params"))
    if kind == "reference":
        return ReferencePrior(kw.get("dcp_params"), kw.get("combine", "first"), kw.get("fallback_prob"))
    if kind == "model":
        if not kw.get("model_name"):
            raise ModelError("prior 'model' needs prior_model: <registered model name> (see `cloudfree models`)")
        return ModelPrior(kw["model_name"], kw.get("model_params"))
    if kind == "diffusers":
        return DiffusersPrior(kw.get("weights"), **kw.get("options", {}))
    if kind == "learned":
        raise ModelError("prior 'learned' was renamed 'model' (it wraps any registered model, learned or not): "
                         "set prior: model and prior_model: <name>")
    raise ModelError(f"unknown prior {kind!r}; choose temporal, reference, model or diffusers")
