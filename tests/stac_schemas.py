"""Offline STAC validation against the official JSON schemas.

pystac validates with ``jsonschema`` and ships the STAC core (v1.1.0) and GeoJSON schemas; the extension schemas it
would download. Here they are vendored under ``tests/schemas/`` (copied unchanged from the stac-extensions
repositories at the tags named in ``tests/schemas/README.md``, Apache-2.0, licence beside them), and the validator
refuses to fetch anything: a schema that is not vendored fails the test naming its URL, never a network call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pystac
from pystac.validation import JsonSchemaSTACValidator
from pystac.validation.stac_validator import GetSchemaError

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def vendored_schemas() -> dict[str, dict[str, Any]]:
    """``{schema URL: schema}`` of every vendored extension schema (``schemas/<ext>/<version>/schema.json``)."""
    out = {}
    for path in sorted(SCHEMAS.glob("*/v*/schema.json")):
        ext, version = path.parts[-3], path.parts[-2]
        url = f"https://stac-extensions.github.io/{ext}/{version}/schema.json"
        schema = json.loads(path.read_text())
        schema["$id"] = url
        out[url] = schema
    return out


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's jsonschema validator with a local schema cache and no network."""

    def __init__(self) -> None:
        super().__init__()
        self.schema_cache.update(vendored_schemas())

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        key = schema_uri.rstrip("#")
        if key not in self.schema_cache:
            raise GetSchemaError(schema_uri, LookupError(
                f"schema {schema_uri} is not vendored under {SCHEMAS} (offline tests never download schemas)"))
        return self.schema_cache[key]


_VALIDATOR: OfflineValidator | None = None


def validate(obj: pystac.STACObject | dict | str | Path) -> list[str]:
    """Validate a STAC Item/Collection/Catalog (object, dict or file) against core + every declared extension;
    returns the schema URLs it was validated against, raises ``pystac.STACValidationError`` otherwise."""
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = OfflineValidator()
    href = None
    if isinstance(obj, (str, Path)):
        href = str(obj)
        obj = json.loads(Path(obj).read_text())
    d = obj if isinstance(obj, dict) else obj.to_dict(include_self_link=False, transform_hrefs=False)
    return pystac.validation.validate_dict(d, href=href, validator=_VALIDATOR)
