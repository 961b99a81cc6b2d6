"""cloudfree: cloudy Sentinel-2 scenes in, cloud-free Cloud-Optimized GeoTIFFs out.

The one installed top-level name. The repository keeps the design card's folders at its top (``pipeline/``,
``stages/``, ``models/``, ``catalogs/``); setuptools maps them into this package (``package-dir`` in
``pyproject.toml``), so the code imports as ``cloudfree.pipeline``, ``cloudfree.stages``, ``cloudfree.models`` and
``cloudfree.catalogs``, and ``pip install .`` installs nothing but ``cloudfree``.

Importing this package is cheap: nothing below it is imported until it is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
