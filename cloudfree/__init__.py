"""cloudfree: cloudy Sentinel-2 scenes in, cloud-free Cloud-Optimized GeoTIFFs out.

The one installed top-level name. The repository keeps the design card's folders at its top (``pipeline/``,
``stages/``, ``models/``, ``catalogs/``); setuptools maps them into this package (``package-dir`` in
``pyproject.toml``), so the code imports as ``cloudfree.pipeline``, ``cloudfree.stages``, ``cloudfree.models`` and
``cloudfree.catalogs``, and ``pip install .`` installs nothing but ``cloudfree``.

Importing this package is cheap: nothing below it is imported until it is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: the Python API (docs/api.md), imported on first use: ``import cloudfree`` stays fast (no dask, torch, GDAL)
_API = {"search": "cloudfree.pipeline.api", "remove": "cloudfree.pipeline.api", "run": "cloudfree.pipeline.api",
        "load_config": "cloudfree.pipeline.config", "Config": "cloudfree.pipeline.config",
        "available_models": "cloudfree.models.registry"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cloudfree' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
