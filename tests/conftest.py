"""Shared fixtures: the real STAC data under ../shared/data/stac and the local STAC API (tests/stac_server.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.stac_server import DATA, StacServer, stac_server_fixture


@pytest.fixture(scope="session")
def stac_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared STAC data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def stac_server() -> Iterator[StacServer]:
    """A real stac-fastapi-pgstac API on 127.0.0.1 with the shared real items loaded; tests using it are
    marked ``pgstac`` and are skipped with the reason when the server cannot be installed or started."""
    yield from stac_server_fixture()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "stac_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pgstac)
