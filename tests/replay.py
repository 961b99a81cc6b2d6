"""Replay recorded VCR cassettes (real Planetary Computer responses) from a local HTTP server on 127.0.0.1.

pystac-client talks real HTTP to it, so nothing of pystac-client or requests is mocked. Requests are matched on
method, path, query string and (for POST) the JSON body, ignoring ``limit`` (a page-size hint); the recorded host
``https://planetarycomputer.microsoft.com`` is rewritten to the local server in response bodies so that ``next``,
``self`` and ``root`` links come back here. An unmatched request gets 404 with the list of recorded requests.

Test knobs: ``fail_first`` (status codes served before the recorded answer, e.g. ``[503, 429]``, to exercise the
retry policy), ``delay`` (seconds to sleep before answering, to exercise timeouts) and ``extra`` routes
(path -> JSON body) for endpoints no cassette recorded (the SAS token endpoint).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml

RECORDED_HOST = "https://planetarycomputer.microsoft.com"


def _norm_query(q: str) -> str:
    return urlencode(sorted((k, v) for k, v in parse_qsl(q) if k != "limit"))


def _norm_body(body: Any) -> Any:
    if body in (None, "", b""):
        return None
    d = json.loads(body) if isinstance(body, (str, bytes)) else body
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k != "limit"}
    return d


class ReplayServer:
    def __init__(self, cassettes: list[Path]) -> None:
        self.routes: list[tuple[str, str, str, Any, int, str]] = []
        for c in cassettes:
            for inter in yaml.safe_load(Path(c).read_text())["interactions"]:
                req, resp = inter["request"], inter["response"]
                u = urlsplit(req["uri"])
                ctype = (resp.get("headers", {}).get("Content-Type") or ["application/json"])[0]
                self.routes.append((req["method"], u.path.rstrip("/"), _norm_query(u.query), _norm_body(req.get("body")),
                                    int(resp["status"]["code"]), resp["body"]["string"], ctype))
        self.fail_first: list[int] = []
        self.delay = 0.0
        self.extra: dict[str, Any] = {}
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "ReplayServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def find(self, method: str, path: str, query: str, body: Any) -> tuple[int, str, str] | None:
        for m, p, q, b, status, text, ctype in self.routes:
            if m == method and p == path.rstrip("/") and q == _norm_query(query) and b == _norm_body(body):
                return status, text.replace(RECORDED_HOST, self.url), ctype
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                u = urlsplit(self.path)
                if server.delay:
                    time.sleep(server.delay)
                with server._lock:
                    fail = server.fail_first.pop(0) if server.fail_first else None
                if fail is not None:
                    status, text, ctype = fail, json.dumps({"code": "injected", "description": str(fail)}), "application/json"
                elif u.path in server.extra:
                    status, text, ctype = 200, json.dumps(server.extra[u.path]), "application/json"
                else:
                    found = server.find(method, u.path, u.query, body)
                    if found is None:
                        recorded = [f"{m} {p}?{q} {json.dumps(b)[:80] if b else ''}" for m, p, q, b, *_ in server.routes]
                        status, ctype = 404, "application/json"
                        text = json.dumps({"code": "NotRecorded", "description": f"{method} {self.path} not in cassettes",
                                           "recorded": recorded})
                    else:
                        status, text, ctype = found
                server.log.append((method, self.path, status))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

        return Handler
