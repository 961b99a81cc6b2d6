"""cloudfree: cloudy Sentinel-2 scenes in, cloud-free Cloud-Optimized GeoTIFFs out.

`pipeline` holds what ties the stages together: the typed config, the data contract between stages, the
exception hierarchy, the runner and the CLI.
"""

from cloudfree import __version__  # noqa: F401  (one version, in cloudfree/__init__.py)
