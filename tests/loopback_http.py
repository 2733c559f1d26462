"""A real HTTP server on 127.0.0.1 (an ephemeral port, daemon threads) for tests of fetching code: subclass
:class:`LoopbackServer` for the state a test's routes need, :class:`QuietHandler` for the routes, and run it with
:func:`serving`."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping when the test ends must not keep the process alive

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.hits: Counter[str] = Counter()  # requests per path, query included
        self.lock = threading.Lock()
        self.stop = threading.Event()  # wakes sleeping handlers at teardown

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on purpose (timeouts, size limits) are what these tests are about

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def count(self, path: str) -> int:
        """Record a request for ``path``; returns how many there have been (this one included)."""
        with self.lock:
            self.hits[path] += 1
            return self.hits[path]


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


Server = TypeVar("Server", bound=LoopbackServer)


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    """Serve on a daemon thread until the block ends, then wake sleeping handlers and close."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
