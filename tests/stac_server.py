"""A real STAC API on 127.0.0.1 for tests: PostgreSQL 15 + PostGIS + pgstac, served by stac-fastapi-pgstac.

This is the stack Planetary Computer's API runs on. :func:`start_stac_server` starts a throw-away PostgreSQL
cluster in a temporary directory on a free port, runs ``pypgstac migrate``, registers ``eo:cloud_cover`` as a
numeric queryable (``property_wrapper='to_float'``, else sorting / comparisons are on text), loads collections and
the real STAC items under ``../shared/data/stac`` (each under its own collection id; items without one get a
collection named after their source), starts ``uvicorn stac_fastapi.pgstac.app:create_app --factory`` on a free
port and returns a :class:`StacServer`. Its ``stop()`` stops uvicorn and PostgreSQL and removes the directory.

The server's Python packages live in ``.venv-stac/`` (``scripts/install_stac_server.sh``), never in the project
venv. When anything is missing, :class:`StacServerUnavailable` says what and how to install it; the pytest
fixture turns that into a skip with the reason.

Besides the real items, a small clearly labelled DERIVED set is loaded (collection ``s2-l2a-derived``,
``s1-rtc-derived``): copies of one real PC item with shifted dates / cloud cover, and of one real S1 RTC item
moved onto the S2 footprint, because the shared data holds no multi-date stack of one footprint and no co-located
S1/S2 (see ../shared/data/README.md). Every derived item carries ``cloudfree:derived_from`` and
``cloudfree:simulated = true``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "stac"
VENV = REPO / ".venv-stac"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGIS_CONTROL = Path("/usr/share/postgresql/15/extension/postgis.control")
INSTALL_HINT = "run scripts/install_stac_server.sh (needs apt-get for postgresql-15-postgis-3 and PyPI)"

#: collection ids for items that carry none, by source folder.
SOURCE_COLLECTIONS = {"stactools-sentinel2": "stactools-sentinel2"}


class StacServerUnavailable(RuntimeError):
    """The local STAC API cannot be started here; the message says what is missing and how to install it."""


@dataclass
class StacServer:
    url: str
    dsn: str
    workdir: Path
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _pg_cmd: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if self._pg_cmd:
            subprocess.run(self._pg_cmd + ["stop", "-m", "fast", "-w"], capture_output=True, timeout=60)
        shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the items ------------------------------------------------------------------------------------------------------
def _features(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, list):
        return [x for x in obj if isinstance(x, dict) and x.get("type") == "Feature" and "id" in x]
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        return _features(obj["features"])
    if isinstance(obj, dict) and obj.get("type") == "Feature" and "id" in obj:
        return [obj]
    return []


def real_items(data: Path = DATA) -> list[dict[str, Any]]:
    """Every real Sentinel item under ``data``: item / item-collection JSON files and items inside the PC
    cassettes of the stac-geoparquet folder (the pystac-client cassettes hold Landsat / NAIP only)."""
    out: list[dict[str, Any]] = []
    for f in sorted(data.glob("*/*.json")):
        for feat in _features(json.loads(f.read_text())):
            feat = copy.deepcopy(feat)
            feat.setdefault("collection", SOURCE_COLLECTIONS.get(f.parent.name, f.parent.name))
            feat["collection"] = feat["collection"] or SOURCE_COLLECTIONS.get(f.parent.name, f.parent.name)
            out.append(feat)
    for f in sorted((data / "stac-geoparquet").glob("*.yaml")):
        for inter in yaml.safe_load(f.read_text())["interactions"]:
            try:
                body = json.loads(inter["response"]["body"]["string"])
            except (json.JSONDecodeError, TypeError):
                continue
            out.extend(copy.deepcopy(x) for x in _features(body))
    seen: set[tuple[str, str]] = set()
    unique = []
    for it in out:
        key = (it["collection"], it["id"])
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique


def derived_items(real: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A SIMULATED multi-date stack on one real footprint (see module docstring), clearly labelled."""
    base = next(i for i in real if i["id"] == "S2B_MSIL2A_20240419T095549_R122_T47XML_20240419T123458")
    sar = next(i for i in real if i["id"].endswith("_rtc"))
    t0 = datetime.fromisoformat(base["properties"]["datetime"].replace("Z", "+00:00"))
    out = []
    # (day offset, eo:cloud_cover, relative orbit): the target is +0 d with 62 % cloud
    for days, cc, orbit in [(0, 62.0, 122), (-5, 3.0, 122), (5, 12.0, 22), (-10, 0.5, 122), (15, 45.0, 122),
                            (-40, 1.0, 122), (300, 0.1, 122)]:
        it = copy.deepcopy(base)
        dt = t0 + timedelta(days=days)
        it["id"] = f"derived-T47XML-{dt:%Y%m%d}-cc{int(cc)}"
        it["collection"] = "s2-l2a-derived"
        it["properties"].update({
            "datetime": dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "eo:cloud_cover": cc, "sat:relative_orbit": orbit,
            "cloudfree:derived_from": base["id"], "cloudfree:simulated": True,
        })
        it["links"] = []
        out.append(it)
    for hours, platform, sid in [(-30, "SENTINEL-1A", "A"), (50, "SENTINEL-1A", "B"), (-200, "SENTINEL-1A", "C")]:
        s = copy.deepcopy(sar)
        dt = t0 + timedelta(hours=hours)
        s["id"] = f"derived-S1-{sid}-{dt:%Y%m%dT%H%M}"
        s["collection"] = "s1-rtc-derived"
        s["geometry"], s["bbox"] = base["geometry"], base["bbox"]
        s["properties"].update({
            "datetime": dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "platform": platform,
            "cloudfree:derived_from": sar["id"], "cloudfree:simulated": True,
        })
        for k in ("start_datetime", "end_datetime"):
            s["properties"].pop(k, None)
        s["links"] = []
        out.append(s)
    return out


def collection_for(cid: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A minimal valid collection for ``cid`` whose extent covers its items (the real PC S2 collection is reused
    for sentinel-2-l2a)."""
    pc = DATA / "odc-stac" / "sentinel-2-l2a.collection.json"
    if cid == "sentinel-2-l2a" and pc.exists():
        col = json.loads(pc.read_text())
        col["links"] = []
        return col
    bboxes = [i["bbox"] for i in items if i.get("bbox")]
    bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
            max(b[3] for b in bboxes)] if bboxes else [-180, -90, 180, 90]
    return {
        "type": "Collection", "stac_version": "1.0.0", "id": cid, "description": f"test collection {cid}",
        "license": "proprietary", "links": [],
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[None, None]]}},
    }


# -- processes ------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise StacServerUnavailable(f"{what} failed ({' '.join(cmd[:3])} ...): {r.stderr.strip()[-800:]}")
    return r.stdout


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", "postgres", "--"] + cmd
        return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]
    return cmd


def check_installed() -> None:
    missing = []
    if not (PG_BIN / "initdb").exists():
        missing.append(f"PostgreSQL 15 ({PG_BIN}/initdb)")
    if not POSTGIS_CONTROL.exists():
        missing.append("PostGIS 3 for PostgreSQL 15 (postgresql-15-postgis-3)")
    for exe in ("pypgstac", "uvicorn"):
        if not (VENV / "bin" / exe).exists():
            missing.append(f"{VENV.name}/bin/{exe}")
    if missing:
        raise StacServerUnavailable(f"missing: {', '.join(missing)}; {INSTALL_HINT}")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            raise StacServerUnavailable("running as root but there is no 'postgres' user to run PostgreSQL") from None


def start_stac_server(data: Path = DATA, *, startup_timeout: float = 60.0) -> StacServer:
    """Start PostgreSQL + pgstac + stac-fastapi-pgstac with the real items loaded (see the module docstring)."""
    check_installed()
    if not data.is_dir():
        raise StacServerUnavailable(f"shared STAC data not found at {data}; the tests expect ../shared/data/stac")
    work = Path(tempfile.mkdtemp(prefix="cloudfree-pgstac-"))
    os.chmod(work, 0o755)
    pgdata = work / "pgdata"
    pgdata.mkdir()
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(pgdata, "postgres")
    pg_port, api_port = free_port(), free_port()
    server = StacServer(url=f"http://127.0.0.1:{api_port}", dsn=f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
                        workdir=work)
    try:
        t0 = time.monotonic()
        _run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                           "-E", "UTF8", "--no-sync"]), "initdb")
        server._pg_cmd = _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(pgdata)])
        opts = (f"-p {pg_port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off")
        _run(server._pg_cmd + ["start", "-w", "-t", "60", "-l", str(work / "postgres.log"), "-o", opts], "pg_ctl start")
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg_port), "PGUSER": "postgres",
               "PGPASSWORD": "", "PGDATABASE": "postgres"}
        _run([str(VENV / "bin" / "pypgstac"), "migrate", "--dsn", server.dsn], "pypgstac migrate", env, 180)
        sql = ("SET search_path TO pgstac, public; DELETE FROM pgstac.queryables WHERE name = 'eo:cloud_cover'; "
               "INSERT INTO pgstac.queryables (name, definition, property_wrapper) VALUES "
               "('eo:cloud_cover', '{\"type\": \"number\", \"minimum\": 0, \"maximum\": 100}', 'to_float');")
        _run(["psql", server.dsn, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], "register eo:cloud_cover queryable", env)
        real = real_items(data)
        items = real + derived_items(real)
        by_col: dict[str, list[dict[str, Any]]] = {}
        for it in items:
            by_col.setdefault(it["collection"], []).append(it)
        server.items = by_col
        cols = work / "collections.ndjson"
        cols.write_text("\n".join(json.dumps(collection_for(c, its)) for c, its in by_col.items()) + "\n")
        ndjson = work / "items.ndjson"
        ndjson.write_text("\n".join(json.dumps(it) for it in items) + "\n")
        pypgstac = str(VENV / "bin" / "pypgstac")
        _run([pypgstac, "load", "collections", str(cols), "--dsn", server.dsn, "--method", "upsert"],
             "pypgstac load collections", env)
        _run([pypgstac, "load", "items", str(ndjson), "--dsn", server.dsn, "--method", "upsert"],
             "pypgstac load items", env)
        api_env = {**env, "DB_MIN_CONN_SIZE": "1", "DB_MAX_CONN_SIZE": "4"}
        logf = open(work / "uvicorn.log", "wb")
        proc = subprocess.Popen(
            [str(VENV / "bin" / "uvicorn"), "stac_fastapi.pgstac.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
            env=api_env, stdout=logf, stderr=subprocess.STDOUT, cwd=work,
        )
        server._procs.append(proc)
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise StacServerUnavailable(
                    f"uvicorn exited ({proc.returncode}): {(work / 'uvicorn.log').read_text()[-800:]}")
            try:
                with urllib.request.urlopen(server.url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StacServerUnavailable(f"STAC API did not answer on {server.url} within {startup_timeout} s")
            time.sleep(0.2)
        log.info("STAC API %s up in %.1f s with %d items", server.url, time.monotonic() - t0, len(items))
        return server
    except BaseException:
        server.stop()
        raise


def stac_server_fixture() -> Iterator[StacServer]:
    """Body of the session fixture in tests/conftest.py: skip (never pass) when the server cannot start."""
    import pytest

    try:
        server = start_stac_server()
    except (StacServerUnavailable, subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"local STAC API (stac-fastapi-pgstac) unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()
