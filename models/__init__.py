"""Cloud-removal models: one file per model, each registered in :mod:`cloudfree.models.registry`.

The names below are imported on first use, so importing a light submodule (``cloudfree.models.summary``, which
``cloudfree models`` lists from) does not import xarray, rioxarray or torch.
"""

_NAMES = {"ModelSpec": "cloudfree.models.base", "RemovalModel": "cloudfree.models.base",
          "available_models": "cloudfree.models.registry", "build_model": "cloudfree.models.registry",
          "get_model_class": "cloudfree.models.registry", "register": "cloudfree.models.registry"}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'cloudfree.models' has no attribute {name!r}")
