"""A small fault-injecting HTTP server on 127.0.0.1 for the fault suite (tests/test_faults.py).

It answers as a minimal STAC API (landing page, ``/collections``, ``/search`` GET/POST with one item), as a
Planetary Computer SAS token endpoint (``/sas/token/<account>/<container>``) and as a Sentinel Hub deployment
(OAuth token endpoint, Catalog API search), and fails on demand: ``faults[path] = [429, 500, "timeout", ...]``
answers the next requests to ``path`` with those statuses (``"timeout"`` sleeps past the client's timeout, ``"html"``
answers an HTML page with status 200) before
answering normally. Every request is recorded (method, path, body), so a test can assert that a retry happened
and what the client sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEM = {
    "type": "Feature", "stac_version": "1.0.0", "id": "S2A_FAULT_1", "collection": "sentinel-2-l2a",
    "geometry": {"type": "Polygon", "coordinates": [[[10, 45], [11, 45], [11, 46], [10, 46], [10, 45]]]},
    "bbox": [10, 45, 11, 46], "properties": {"datetime": "2024-06-01T10:00:00Z", "eo:cloud_cover": 50.0},
    "links": [], "assets": {},
}


class FaultServer:
    def __init__(self, timeout_sleep: float = 3.0, token_ttl: float = 3600.0) -> None:
        self.faults: dict[str, list] = defaultdict(list)
        self.requests: list[tuple[str, str, bytes]] = []
        self.timeout_sleep = timeout_sleep
        self.token_ttl = token_ttl
        self.tokens_issued = 0
        self.collections = ["sentinel-2-l2a"]
        #: the features /search answers (None: the one ITEM); may hold malformed ones
        self.features: list | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code: int, obj=None, headers=None) -> None:
                data = json.dumps(obj if obj is not None else {"code": code, "description": "injected"}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = self._body() if method == "POST" else b""
                path = self.path.split("?", 1)[0]
                server.requests.append((method, self.path, body))
                key = next((k for k in server.faults if path.startswith(k) and server.faults[k]), None)
                if key is not None:
                    fault = server.faults[key].pop(0)
                    if fault == "html":  # a login or proxy page where the API should answer JSON
                        page = b"<html><body>Please sign in</body></html>"
                        self.send_response(200)
                        self.send_header("Content-Type", "text/html")
                        self.send_header("Content-Length", str(len(page)))
                        self.end_headers()
                        self.wfile.write(page)
                        return
                    if fault == "timeout":
                        time.sleep(server.timeout_sleep)
                        with_close = {"Connection": "close"}
                        try:
                            self._send(503, headers=with_close)
                        except OSError:
                            pass
                        return
                    self._send(int(fault), headers={"Retry-After": "0"} if int(fault) == 429 else None)
                    return
                self._route(method, path, body)

            def _route(self, method: str, path: str, body: bytes = b"") -> None:
                base = f"http://127.0.0.1:{server.port}"
                if path in ("", "/"):
                    self._send(200, {
                        "type": "Catalog", "id": "fault", "description": "fault-injecting STAC API",
                        "stac_version": "1.0.0",
                        "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                       "https://api.stacspec.org/v1.0.0/item-search",
                                       "https://api.stacspec.org/v1.0.0/collections"],
                        "links": [{"rel": "self", "href": base + "/"}, {"rel": "root", "href": base + "/"},
                                  {"rel": "search", "href": base + "/search", "method": "POST",
                                   "type": "application/geo+json"},
                                  {"rel": "data", "href": base + "/collections"}]})
                elif path == "/collections":
                    self._send(200, {"collections": [
                        {"type": "Collection", "id": c, "stac_version": "1.0.0", "description": c, "license": "x",
                         "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                    "temporal": {"interval": [[None, None]]}}, "links": []}
                        for c in server.collections], "links": []})
                elif path == "/search":
                    asked = (json.loads(body or b"{}").get("collections") or []) if method == "POST" else []
                    hit = not asked or ITEM["collection"] in asked
                    feats = server.features if server.features is not None else [ITEM]
                    self._send(200, {"type": "FeatureCollection", "features": feats if hit else [], "links": []})
                elif path.startswith("/sas/token/"):
                    server.tokens_issued += 1
                    exp = datetime.now(timezone.utc) + timedelta(seconds=server.token_ttl)
                    se = exp.strftime("%Y-%m-%dT%H:%M:%SZ")
                    self._send(200, {"token": f"se={se}&sp=rl&sig=TOKEN{server.tokens_issued}",
                                     "msft:expiry": se})
                elif path.endswith("/openid-connect/token"):
                    self._send(200, {"access_token": "ACCESS-TOKEN-VALUE-123", "token_type": "Bearer",
                                     "expires_in": 3600, "expires_at": time.time() + 3600})
                elif path.startswith("/api/v1/catalog"):
                    self._send(200, {"type": "FeatureCollection", "features": [], "links": [],
                                     "context": {"limit": 100, "returned": 0}})
                else:
                    self._send(404)

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, path: str) -> int:
        return sum(p.split("?", 1)[0] == path for _, p, _ in self.requests)
