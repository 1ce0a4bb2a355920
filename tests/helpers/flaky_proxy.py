"""A loopback HTTP proxy in front of a real server that answers chosen error statuses first (fault injection)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_FORWARDED_HEADERS = ("content-type", "authorization", "accept")


@contextmanager
def flaky_proxy(upstream: str, failures: dict[str, list[int]]) -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    """Proxy to ``upstream``; a request whose path starts with a key of ``failures`` gets that list's next
    status (MLflow's error JSON) while the list lasts, then goes through.

    Yields:
        The proxy's URL, and the requests it saw as ``(method, path, status answered)``.
    """
    seen: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path = self.path.split("?", 1)[0]
            with lock:
                injected = next((statuses.pop(0) for prefix, statuses in failures.items()
                                 if path.startswith(prefix) and statuses), None)
            if injected is not None:
                code = "TEMPORARILY_UNAVAILABLE" if injected >= 500 else "INVALID_PARAMETER_VALUE"
                status, data = injected, json.dumps({"error_code": code, "message": f"injected {injected}"}).encode()
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED_HEADERS}
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, data = error.code, error.read()
            with lock:
                seen.append((self.command, path, status))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
