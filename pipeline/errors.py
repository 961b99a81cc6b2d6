"""One base exception, specific subclasses that also inherit a builtin where it fits.

Every message says what failed, the offending value and the fix (see ../shared/STYLE.md).
"""

from __future__ import annotations


class CloudfreeError(Exception):
    """Base of every error cloudfree raises on purpose."""


class ConfigError(CloudfreeError, ValueError):
    """The YAML config or a CLI option is invalid."""


class ContractError(CloudfreeError, TypeError):
    """Data passed between stages does not satisfy the stage contract (dims, bands, CRS, dtype)."""


class CatalogError(CloudfreeError):
    """A STAC catalog could not be opened or searched."""


class NoItemsFoundError(CatalogError, LookupError):
    """A search matched nothing; the message names catalog, collection and query."""


class HarmonisationError(CatalogError, ValueError):
    """An item's metadata does not say how to convert its DN to reflectance."""


class ReadError(CloudfreeError, OSError):
    """Pixels could not be read after retries (never silently turned into nodata)."""


class ModelError(CloudfreeError):
    """A removal model is unknown, misconfigured or got inputs it cannot use."""


class UnknownModelError(ModelError, KeyError):
    """No model is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsError(ModelError, FileNotFoundError):
    """A model's weights are missing or do not match their recorded hash."""


class OutputExistsError(CloudfreeError, FileExistsError):
    """An output exists and --overwrite was not given."""


class InputDataError(CloudfreeError, ValueError):
    """An input item or raster is unusable (e.g. no clear pixels to fit an alignment)."""


class OutputError(CloudfreeError, OSError):
    """The output side failed (disk full, read-only or not a folder): names the output path and the fix, never the
    inputs."""
