"""Model registry: built-ins register with ``@register``; third parties through the ``cloudfree.models`` entry
point group (as rasterio/rioxarray plug-ins do). Unknown names fail with the list of available ones."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from pydantic import ValidationError

from cloudfree.pipeline.errors import ConfigError, UnknownModelError

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type] = {}
#: Built-in models by name -> module, imported on first use so `cloudfree --help` stays fast; building one model
#: imports its module only (the learned models' modules import torch: ~1.3 s a process, paid by every dask worker).
BUILTIN = {
    "reference-replace": "cloudfree.models.reference_replace",
    "none": "cloudfree.models.none",
    "mean-fill": "cloudfree.models.mean_fill",
    "dcp": "cloudfree.models.dcp",
    "median-composite": "cloudfree.models.median_composite",
    "phyvlm-cr": "cloudfree.models.phyvlm",
    "temporal": "cloudfree.models.temporal",
    "temporal-ssl": "cloudfree.models.temporal",
    "temporal-residual": "cloudfree.models.temporal_residual",
    "ca-mtcr": "cloudfree.models.ca_mtcr",
    "sar-optical-fusion": "cloudfree.models.sar_optical_fusion",
    "diffusion-enhancement": "cloudfree.models.diffusion_enhancement",
    "cm-cr": "cloudfree.models.cm_cr",
}
BUILTIN_MODULES = tuple(dict.fromkeys(BUILTIN.values()))
_loaded = False


def register(cls: type) -> type:
    """Class decorator: register a model under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no `name`; set a class attribute name = '...'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"model name {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group="cloudfree.models"):
        if ep.name in _REGISTRY:
            continue
        try:
            register(ep.load())
        except Exception as exc:  # a broken plug-in must not break the built-ins
            log.warning("model plug-in %s (%s) failed to load: %s", ep.name, ep.value, exc)
    _loaded = True


def available_models() -> dict[str, type]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_model_class(name: str) -> type:
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
        if _REGISTRY.get(name) is not None:
            return _REGISTRY[name]
    models = available_models()
    if name not in models:
        raise UnknownModelError(
            f"no removal model named {name!r}; available: {', '.join(models)} (see `cloudfree models`)"
        )
    return models[name]


def check_usable(model, allow_experimental: bool = False, where: str = "model.name") -> None:
    """Refuse a model whose spec marks it experimental (``spec.experimental``: why it is not usable, e.g. its
    shipped weights do not beat the ``mean-fill`` floor) unless ``allow_experimental``; with it, log a warning."""
    why = getattr(getattr(model, "spec", None), "experimental", "")
    if not why:
        return
    name = getattr(model, "name", type(model).__name__)
    if not allow_experimental:
        raise ConfigError(
            f"{where}: model {name!r} is experimental, not shipped as usable: {why}. Use a usable model (see "
            "`cloudfree models`; the default is the measured best), or set model.allow_experimental: true to run "
            "it anyway")
    log.warning("running EXPERIMENTAL model %s (model.allow_experimental is set): %s", name, why)


def check_level(model, items, allow_mismatch: bool = False, where: str = "model.allow_level_mismatch") -> None:
    """Refuse to run a model built for one processing level (``spec.level`` ``"L1C"``/``"L2A"``) on items of the
    other: its weights or its physics saw the other reflectance (top-of-atmosphere vs surface), so its output would
    be out of domain without a word. Items whose level cannot be told (not a Sentinel-2 MSI product, e.g. a
    simulated or foreign catalog) and models of level ``"any"`` pass. With ``allow_mismatch`` a warning is logged
    instead. Raises :class:`~cloudfree.pipeline.errors.ModelError` naming the item, both levels and the fix."""
    from cloudfree.catalogs.harmonise import processing_level
    from cloudfree.pipeline.errors import ModelError

    want = getattr(getattr(model, "spec", None), "level", "any")
    if want not in ("L1C", "L2A"):
        return
    name = getattr(model, "name", type(model).__name__)
    for item in items:
        got = processing_level(item)
        if got is None or got == want:
            continue
        msg = (f"item {item.id!r} is Sentinel-2 {got} but model {name!r} was built for {want} (spec.level): its "
               f"output would be out of domain. Search a {want} collection (catalog.collection), pick a model of "
               f"level {got} or 'any' (see `cloudfree models`), or set {where}: true to run it anyway")
        if not allow_mismatch:
            raise ModelError(msg)
        log.warning("level mismatch allowed (%s): %s", where, msg)


def build_model(name: str, params: dict | None = None):
    """Instantiate model ``name`` with validated ``params``."""
    cls = get_model_class(name)
    try:
        return cls(params or {})
    except ValidationError as exc:
        raise ConfigError(f"model {name!r}: invalid params {params}: {exc}") from None
