"""One local server on 127.0.0.1 that plays a remote backend for the end-to-end catalog tests
(tests/test_catalogs_e2e.py): a STAC API over recorded real items, a blob store with HTTP Range support, a
Planetary Computer SAS token endpoint, and Sentinel Hub's OAuth, Catalog and Process APIs.

* STAC API (``/stac``): landing page, ``/collections``, ``/search`` (GET and POST: collections, ids, bbox,
  datetime and ``query`` on numeric properties, evaluated here) over the items it was given, whose asset hrefs
  the test rewrote to this server. The items are the real recorded responses in ../shared/data/stac.
* Blobs (``/blob/<account>/<container>/<path>``, path-style like Azurite, and ``/files/<path>``): real COG bytes
  from ``files(path) -> Path | None``, with ``HEAD`` and ``Range`` (206) as GDAL's /vsicurl/ needs them. With
  ``require_sig`` a ``/blob`` request without a ``sig`` this server issued, or with an expired one, gets 403
  (what Azure answers), and is counted in ``refused``.
* SAS tokens (``/sas/token/<account>/<container>``): tokens that live ``token_ttl`` seconds, in PC's format
  (``se=...&sp=rl&sig=...``, ``msft:expiry``).
* Sentinel Hub (``/sh``): OAuth client-credentials token, Catalog API search (the items it was given), and the
  Process API: the request's bbox/CRS/size and the evalscript's input bands are read from the JSON body and the
  answer is a GeoTIFF of those bands on that grid, cut (``rasterio`` warp, nearest) from the real 29RKH COGs.
  ``CLD`` (Sen2Cor cloud probability) and ``CLP`` are not in that tile's files: they are SIMULATED from its SCL
  (CLD: 90 for SCL 8/9, 40 for 10, else 0; CLP = CLD * 2.55) and said so in the response header
  ``X-Cloudfree-Simulated``. Every process request is recorded in ``process_requests``.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np


def _iso(s: str) -> datetime:
    d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _interval(dt: str | None) -> tuple[datetime | None, datetime | None]:
    if not dt:
        return None, None
    a, _, b = dt.partition("/")
    b = b if "/" in dt else a
    return (None if a in ("", "..") else _iso(a)), (None if b in ("", "..") else _iso(b))


_OPS = {"lt": lambda a, b: a < b, "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b, "eq": lambda a, b: a == b, "neq": lambda a, b: a != b}


def filter_items(items: list[dict], body: dict) -> list[dict]:
    """The STAC item-search filters the tests use, evaluated on item dicts."""
    out = []
    start, end = _interval(body.get("datetime"))
    for it in items:
        if body.get("collections") and it.get("collection") not in body["collections"]:
            continue
        if body.get("ids") and it["id"] not in body["ids"]:
            continue
        bb, ib = body.get("bbox"), it.get("bbox")
        if bb and ib and (bb[0] > ib[2] or bb[2] < ib[0] or bb[1] > ib[3] or bb[3] < ib[1]):
            continue
        t = _iso(it["properties"]["datetime"])
        if (start and t < start) or (end and t > end):
            continue
        ok = True
        for prop, ops in (body.get("query") or {}).items():
            v = it["properties"].get(prop)
            ok &= v is not None and all(_OPS[op](v, ref) for op, ref in ops.items() if op in _OPS)
        if ok:
            out.append(it)
    return out[: int(body.get("limit") or 1000)]


class BackendServer:
    def __init__(self, files: Callable[[str], Path | None], *, items: list[dict] | None = None,
                 require_sig: bool = False, token_ttl: float = 3600.0, read_delay: float = 0.0, sh_files: dict[str, Path] | None = None,
                 stall_after_reads: int | None = None, refresh_margin: float = 0.0) -> None:
        self.files = files
        self.items = list(items or [])
        self.require_sig = require_sig
        self.token_ttl = token_ttl
        #: seconds each blob read waits (stretches a run past a short token's life)
        self.read_delay = read_delay
        #: after this many blob reads the server paces the run so that it crosses the first token's expiry whatever
        #: the machine's speed (see ``_pace``); ``refresh_margin`` is the client's sas_refresh_margin
        self.stall_after_reads = stall_after_reads
        self.refresh_margin = refresh_margin
        self.read_times: list[float] = []
        self.sh_files = dict(sh_files or {})
        self.sigs: dict[str, float] = {}
        self.tokens_issued = 0
        self.token_expiries: list[float] = []
        self.refused: list[str] = []
        self.blob_reads = 0
        self.requests: list[tuple[str, str, int]] = []
        self.process_requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "BackendServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- pieces ---------------------------------------------------------------------------------------------------
    def issue_token(self) -> dict:
        exp = time.time() + self.token_ttl
        sig = secrets.token_urlsafe(12)
        with self._lock:
            self.sigs[sig] = exp
            self.tokens_issued += 1
            self.token_expiries.append(exp)
        se = datetime.fromtimestamp(exp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": f"se={se.replace(':', '%3A')}&sp=rl&sv=2024-05-04&sr=c&sig={sig}", "msft:expiry": se}

    def _pace(self, query: str) -> None:
        """Hold a signed blob read (after ``stall_after_reads``): one signed with the first token until the client's
        refresh point (``refresh_margin`` before its expiry: a read then still has its margin left), one signed with a
        later token until the first token has expired. The run so reaches the refresh and outlives the first token,
        and every read is checked on arrival, as Azure does."""
        if self.stall_after_reads is None or self.blob_reads <= self.stall_after_reads or not self.token_expiries:
            return
        sig = (parse_qs(query).get("sig") or [None])[0]
        first = int(self.token_expiries[0])  # the server's clock truncates like the token's se= (whole seconds)
        until = first - self.refresh_margin + 0.1 if self.sigs.get(sig) == self.token_expiries[0] else first + 0.2
        time.sleep(max(0.0, until - time.time()))

    def sig_ok(self, query: str) -> bool:
        sig = (parse_qs(query).get("sig") or [None])[0]
        exp = self.sigs.get(sig) if sig else None
        # the server's clock truncates like the token's se= (whole seconds)
        return exp is not None and time.time() < int(exp)

    def landing(self) -> dict:
        base = self.url + "/stac"
        return {"type": "Catalog", "id": "replay", "description": "recorded items", "stac_version": "1.0.0",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
                               "https://api.stacspec.org/v1.0.0/collections",
                               "https://api.stacspec.org/v1.0.0/item-search#query"],
                "links": [{"rel": "self", "href": base}, {"rel": "root", "href": base},
                          {"rel": "search", "href": base + "/search", "method": "POST",
                           "type": "application/geo+json"},
                          {"rel": "search", "href": base + "/search", "method": "GET",
                           "type": "application/geo+json"},
                          {"rel": "data", "href": base + "/collections"}]}

    def collections(self) -> dict:
        ids = sorted({it.get("collection") for it in self.items if it.get("collection")})
        return {"collections": [{"type": "Collection", "id": c, "stac_version": "1.0.0", "description": c,
                                 "license": "proprietary", "links": [],
                                 "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                            "temporal": {"interval": [[None, None]]}}} for c in ids],
                "links": []}

    def process(self, body: dict) -> tuple[bytes, str]:
        """A Process API answer: the evalscript's input bands on the request's grid, UINT16, cut from 29RKH."""
        import rasterio
        from rasterio.crs import CRS
        from rasterio.enums import Resampling
        from rasterio.transform import from_bounds
        from rasterio.warp import reproject

        self.process_requests.append(body)
        bounds = body["input"]["bounds"]
        crs = CRS.from_user_input(bounds.get("properties", {}).get("crs",
                                                                  "http://www.opengis.net/def/crs/EPSG/0/4326")
                                  .rsplit("/", 1)[-1].join(["EPSG:", ""]))
        w, h = int(body["output"]["width"]), int(body["output"]["height"])
        bbox = bounds["bbox"]
        transform = from_bounds(*bbox, w, h)
        script = body["evalscript"]
        inputs = re.findall(r'"(\w+)"', script.split("bands:", 1)[1].split("]", 1)[0])
        bands = [b for b in inputs if b != "dataMask"]  # dataMask: 0 where the tile has no data (SCL 0)
        out = np.zeros((len(bands), h, w), np.uint16)
        simulated = []

        def warp(path: Path) -> np.ndarray:
            dst = np.zeros((h, w), np.uint16)
            with rasterio.open(path) as src:
                reproject(rasterio.band(src, 1), dst, dst_transform=transform, dst_crs=crs,
                          resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
            return dst

        scl = None
        for i, b in enumerate(bands):
            if b in self.sh_files:
                out[i] = warp(self.sh_files[b])
            elif b in ("CLD", "CLP"):
                if scl is None:
                    scl = warp(self.sh_files["SCL"])
                cld = np.where(np.isin(scl, (8, 9)), 90, np.where(scl == 10, 40, 0)).astype(np.uint16)
                out[i] = cld if b == "CLD" else np.round(cld * 2.55).astype(np.uint16)
                simulated.append(b)
            else:
                raise KeyError(f"band {b} is not served")
        if "dataMask" in inputs:
            if scl is None:
                scl = warp(self.sh_files["SCL"])
            out[:, scl == 0] = 0
        from rasterio.io import MemoryFile

        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=w, height=h, count=len(bands), dtype="uint16", crs=crs,
                          transform=transform) as dst:
                dst.write(out)
            return mem.read(), ",".join(simulated)

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, data: bytes, ctype: str = "application/json",
                      headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                server.requests.append((self.command, self.path, code))

            def _json(self, obj: Any, code: int = 200) -> None:
                self._send(code, json.dumps(obj).encode())

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                ctype = self.headers.get("Content-Type", "")
                if "x-www-form-urlencoded" in ctype:
                    return {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                return json.loads(raw or b"{}")

            def _file(self, path: Path | None, head: bool) -> None:
                if path is None or not path.is_file():
                    self._send(404, b'{"code": "BlobNotFound"}')
                    return
                data = path.read_bytes()
                size = len(data)
                rng = self.headers.get("Range")
                server.blob_reads += 1
                if server.read_delay:
                    time.sleep(server.read_delay)
                server.read_times.append(time.time())
                if rng:
                    m = re.match(r"bytes=(\d+)-(\d*)", rng)
                    a = int(m.group(1))
                    b = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                    if a >= size:
                        self._send(416, b"", headers={"Content-Range": f"bytes */{size}"}, head=head)
                        return
                    self._send(206, data[a:b + 1], "image/tiff",
                               {"Content-Range": f"bytes {a}-{b}/{size}", "Accept-Ranges": "bytes"}, head=head)
                else:
                    self._send(200, data, "image/tiff", {"Accept-Ranges": "bytes"}, head=head)

            def _get(self, head: bool = False) -> None:
                u = urlsplit(self.path)
                path = u.path.rstrip("/")
                if path.startswith("/blob/"):
                    if server.require_sig and not server.sig_ok(u.query):
                        server.refused.append(self.path)
                        self._send(403, b'{"code": "AuthenticationFailed"}', head=head)
                        return
                    server._pace(u.query)
                    self._file(server.files(path[len("/blob/"):]), head)
                elif path.startswith("/files/"):
                    self._file(server.files(path[len("/files/"):]), head)
                elif path.startswith("/sas/token/"):
                    self._json(server.issue_token())
                elif path == "/stac":
                    self._json(server.landing())
                elif path == "/stac/collections":
                    self._json(server.collections())
                elif path.startswith("/stac/collections/") and "/items" not in path:
                    cid = path.rsplit("/", 1)[-1]
                    cols = [c for c in server.collections()["collections"] if c["id"] == cid]
                    self._json(cols[0] if cols else {"code": "NotFound"}, 200 if cols else 404)
                elif path == "/stac/search":
                    q = {k: v[0] for k, v in parse_qs(u.query).items()}
                    body: dict = {}
                    if "collections" in q:
                        body["collections"] = q["collections"].split(",")
                    if "ids" in q:
                        body["ids"] = q["ids"].split(",")
                    if "bbox" in q:
                        body["bbox"] = [float(v) for v in q["bbox"].split(",")]
                    if "datetime" in q:
                        body["datetime"] = q["datetime"]
                    if "query" in q:
                        body["query"] = json.loads(q["query"])
                    self._search(body)
                else:
                    self._send(404, b'{"code": "NotFound"}', head=head)

            def _search(self, body: dict) -> None:
                self._json({"type": "FeatureCollection", "features": filter_items(server.items, body),
                            "links": []})

            def do_HEAD(self) -> None:  # noqa: N802
                self._get(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._get()

            def do_POST(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path.rstrip("/")
                body = self._body()
                if path == "/stac/search":
                    self._search(body)
                elif path.endswith("/openid-connect/token"):
                    self._json({"access_token": "local-access-token", "token_type": "Bearer", "expires_in": 3600,
                                "expires_at": time.time() + 3600})
                elif path == "/sh/api/v1/catalog/1.0.0/search":
                    feats = filter_items(server.items, {**body, "collections": None})
                    self._json({"type": "FeatureCollection", "features": feats, "links": [],
                                "context": {"limit": 100, "returned": len(feats)}})
                elif path == "/sh/api/v1/process":
                    if self.headers.get("Authorization") != "Bearer local-access-token":
                        self._json({"error": {"status": 401, "reason": "Unauthorized"}}, 401)
                        return
                    data, simulated = server.process(body)
                    self._send(200, data, "image/tiff", {"X-Cloudfree-Simulated": simulated or "none"})
                else:
                    self._send(404, b'{"code": "NotFound"}')

        return Handler
