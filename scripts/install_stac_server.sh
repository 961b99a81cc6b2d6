#!/usr/bin/env bash
# Install the local STAC API used by the `pgstac` tests: Debian PostgreSQL 15 + PostGIS 3 (apt) and
# stac-fastapi-pgstac + pypgstac in their own venv (.venv-stac/), so they never touch the project's .venv.
#
# Idempotent: does nothing when everything is already there. Never fails the build: when something cannot be
# installed it says so and exits 0, and the pgstac tests are then SKIPPED with the reason (tests/stac_server.py).
#
# Usage: scripts/install_stac_server.sh            (from the repository root; PY=python3.11 by default)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}
VENV=.venv-stac
PG_BIN=/usr/lib/postgresql/15/bin
POSTGIS_CTL=/usr/share/postgresql/15/extension/postgis.control
STAMP="$VENV/.installed-7.2.0-0.10.0"

log() { echo "install_stac_server: $*" >&2; }

# 1. PostgreSQL 15 + PostGIS 3 from Debian.
if [[ ! -x "$PG_BIN/initdb" || ! -f "$POSTGIS_CTL" ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing postgresql-15 and postgresql-15-postgis-3 with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (continuing)"
        apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-15-postgis-3 >/dev/null \
            || log "apt-get install failed; pgstac tests will be skipped"
    else
        log "PostgreSQL 15 / PostGIS 3 missing and not root (or no apt-get); pgstac tests will be skipped"
    fi
fi

# 2. The server's Python packages in their own venv.
if [[ ! -f "$STAMP" ]]; then
    if ! command -v "$PY" >/dev/null; then
        log "$PY not found; pgstac tests will be skipped"
        exit 0
    fi
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV" || { log "cannot create $VENV"; exit 0; }
    log "installing stac-fastapi-pgstac==7.2.0 pypgstac[psycopg]==0.10.0 into $VENV"
    if "$VENV/bin/pip" install --quiet --disable-pip-version-check 2> >(grep -v "is ignored: it is neither" >&2) \
        "stac-fastapi-pgstac==7.2.0" "pypgstac[psycopg]==0.10.0" "uvicorn[standard]"; then
        touch "$STAMP"
    else
        log "pip install into $VENV failed; pgstac tests will be skipped"
    fi
fi
exit 0
