"""A real HTTP server on loopback for the tests that read shards remotely (no mock of the HTTP
layer): ``http.server`` over a folder, with faults injected per file and every request recorded."""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer(ThreadingHTTPServer):
    """``http.server`` on 127.0.0.1 (a free port) over ``root``, with faults by file name.

    ``cuts``: name -> (bytes, times): the first ``times`` GETs (all when -1) send the full
    Content-Length but only ``bytes`` of the body, then drop the connection. ``unavailable``:
    names answered with 503; ``unavailable_after``: name -> n, its GETs after the first n answered
    with 503; ``forbidden``: names (a pattern) answered with 403. ``ranges``: honour ``Range: bytes=N-`` and ``bytes=N-M`` (206) instead
    of ignoring it. ``keep_alive``: answer in HTTP/1.1 and keep connections open (else HTTP/1.0,
    one request a connection), closing one silently after ``keep_alive`` answers when it is a
    number (as servers close idle connections). ``sent``: (file name, Range header, body bytes
    written) of every answer; ``connections``: connections accepted."""

    daemon_threads = True

    def __init__(self, root: Path, *, ranges: bool = False, cuts: dict | None = None, unavailable: tuple = (),
                 forbidden: str | None = None, unavailable_after: dict | None = None, keep_alive: bool | int = False) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=str(root)))
        self.ranges, self.cuts, self.unavailable = ranges, dict(cuts or {}), set(unavailable)
        self.unavailable_after = dict(unavailable_after or {})
        self.forbidden = forbidden  # names matching this pattern are answered 403 (S3 without ListBucket)
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header) of every GET
        self.sent: list[tuple[str, str | None, int]] = []
        self.keep_alive, self.connections = keep_alive, 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def handle_error(self, request, client_address) -> None:  # the connections dropped on purpose
        pass

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)


class FaultyHandler(SimpleHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.protocol_version = "HTTP/1.1" if self.server.keep_alive else "HTTP/1.0"
        self.answered = 0
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        with self.server.lock:
            self.server.requests.append((path.name, self.headers.get("Range")))
            nth = self.server.count(path.name)
        if self.server.forbidden and re.search(self.server.forbidden, path.name):
            return self.send_error(403)
        if not path.is_file():
            return super().do_GET()  # 404, directory listings
        if path.name in self.server.unavailable or nth > self.server.unavailable_after.get(path.name, nth):
            return self.send_error(503)
        data = path.read_bytes()
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        ranged = bool(asked) and self.server.ranges
        start = int(asked.group(1)) if ranged else 0
        stop = int(asked.group(2)) + 1 if ranged and asked.group(2) else len(data)
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))  # as http.server sends it
        self.end_headers()
        cut, times = self.server.cuts.get(path.name, (None, 0))
        if cut is not None and (times < 0 or nth <= times):
            self.send_body(path.name, data[start : start + cut])
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees the stream end early
            self.close_connection = True
            return
        self.send_body(path.name, data[start:stop])
        self.answered += 1
        limit = self.server.keep_alive
        if limit is not True and limit and self.answered >= limit:
            self.close_connection = True  # silently, as an idle connection times out

    def send_body(self, name: str, body: bytes) -> None:
        with self.server.lock:
            self.server.sent.append((name, self.headers.get("Range"), len(body)))
        self.wfile.write(body)


@contextlib.contextmanager
def serving(root: Path, **faults) -> Iterator[ShardServer]:
    server = ShardServer(root, **faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
