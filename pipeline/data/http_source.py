"""HTTP(S) sources: one resumable GET (:class:`_HTTPStream`), a file read ahead as concurrent
``Range`` pieces (:class:`_ReadAhead`), and the kept connections those pieces reuse.

A piece of a read-ahead is 8 MB; to an object store over TLS a new connection costs a TCP and a
TLS handshake (two to three round trips, tens of ms far away) per piece, about as long as the
piece takes at a store's ~100 MB/s per connection. So pieces ask on kept connections
(:func:`_kept_get`, HTTP/1.1 keep-alive as ``requests``' pools and ``aiohttp`` do): a process keeps the
idle ones per host and a piece read to its end gives its connection back. A kept connection the
server has closed meanwhile is replaced at once, without a retry's wait. Through a proxy (the
``*_proxy`` variables) and on a redirect, a piece asks through ``urllib`` as before. A process's
read-aheads share its connections, and the next shard is read ahead behind the last pieces of
the one being read (``then``), so shard ends cost no request latency.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ClassVar
from urllib.parse import urlsplit

from pipeline.data.tars import read_exact

__all__ = ["NETWORK_ERRORS", "SourceError", "SourceNotFound", "open_http", "reason"]

_CHUNK = 1 << 20  # bytes skipped per read when a server ignores Range
_SMALL_READS = 64 << 10  # an HTTP stream's buffer: only small reads (tar headers, padding) go through it
_AHEAD_CHUNK = 8 << 20  # the piece each read-ahead connection asks for (``open_http(connections=...)``)
_RETRIED_STATUS = {408, 425, 429}  # and every 5xx; other 4xx answers are final
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts and resets are OSErrors
KEPT_PER_HOST = 32  # idle connections kept per (process, host); 0: a new connection for every request


class SourceError(OSError):
    """A source that cannot be read (after its retries); the message is one line naming it."""


class SourceNotFound(SourceError, FileNotFoundError):
    """The source does not exist (no such file, HTTP 404/410): never retried."""


def open_http(url: str, retries: int, timeout: float, backoff: float, start: int = 0, stop: int | None = None,
              connections: int = 1, then: str | None = None) -> io.BufferedReader:
    """An ``http(s)://`` file from byte ``start`` (``remote.open_stream`` says what the arguments mean)."""
    # a large read (a tar member, ``pipeline.data.tars``) goes straight from the socket into its
    # buffer; a 1 MB buffer here made each tar header pull the next member's first MB through
    # it, a second copy of nearly every byte
    if connections > 1:
        ahead = _ReadAhead.prefetched(url, connections) if (start, stop) == (0, None) else None
        raw = ahead.result() if ahead is not None else _ReadAhead.open(url, retries, timeout, backoff, start, stop, connections)
        if then is not None and isinstance(raw, _ReadAhead):
            raw.then = lambda: _ReadAhead.prefetch(then, retries, timeout, backoff, connections)
        return io.BufferedReader(raw, _SMALL_READS)
    return io.BufferedReader(_HTTPStream(url, retries, timeout, backoff, start, stop), _SMALL_READS)


class _HTTPStream(io.RawIOBase):
    """One HTTP GET that survives dropped connections: each failure reopens it at the byte reached.

    ``retries`` counts failures in a row without a byte of progress; any progress resets it, so
    a link that drops every few megabytes still delivers the whole file."""

    def __init__(self, url: str, retries: int, timeout: float, backoff: float, start: int = 0, stop: int | None = None,
                 keep_alive: bool = False) -> None:
        """``keep_alive``: ask on a kept connection (:func:`_kept_get`) and give it back when the
        response was read to its end (read-ahead pieces: a TCP and TLS handshake saved per piece)."""
        super().__init__()
        self.url, self.retries, self.timeout, self.backoff = url, retries, timeout, backoff
        self.pos, self.stop, self.length, self.version, self.failures = start, stop, stop, None, 0
        self.opened = False  # a first response was checked (its length and version recorded)
        self.response: http.client.HTTPResponse | None = None
        self.keep_alive, self.connection = keep_alive, None  # the kept connection the response came on
        while self.response is None:
            self._reopen()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.response is None:
                self._reopen()
                continue
            if self.stop is not None:  # a server that ignores Range would send the rest of the file
                buffer = memoryview(buffer)[: max(0, self.stop - self.pos)]
            try:
                n = self.response.readinto(buffer)
                if n == 0 and len(buffer) and self.length is not None and self.pos < self.length:
                    raise ConnectionError(f"connection closed before the end (of {self.length} bytes)")
            except NETWORK_ERRORS as err:
                self._drop()
                self._failed(err)
                continue
            if n:
                self.pos, self.failures = self.pos + n, 0
            return n

    def close(self) -> None:
        self._drop()
        super().close()

    def _drop(self) -> None:
        if self.response is not None:
            if self.connection is not None:
                _give_back(self.connection, self.response)
                self.connection = None
            self.response.close()
            self.response = None

    def _failed(self, err: BaseException) -> None:
        """Wait before the next attempt, or give up after ``retries`` failures without progress."""
        self.failures += 1
        if self.failures > self.retries:
            where = f" at byte {self.pos}" if self.pos else ""
            raise SourceError(f"{self.url}: {reason(err)}{where} (after {self.retries} retries)") from err
        time.sleep(self.backoff * 2 ** (self.failures - 1))

    def _reopen(self) -> None:
        try:
            self.response = self._request()
        except SourceError:
            raise
        except NETWORK_ERRORS as err:
            self._failed(err)

    def _request(self) -> http.client.HTTPResponse:
        """GET from ``self.pos``; a final HTTP error is a :class:`SourceError`, others are retried."""
        end = "" if self.stop is None else str(self.stop - 1)
        headers = {"Range": f"bytes={self.pos}-{end}"} if self.pos or end else {}
        try:
            kept = _kept_get(self.url, headers, self.timeout) if self.keep_alive else None
            if kept is not None:
                response, self.connection = kept
            else:
                response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (404, 410):
                raise SourceNotFound(f"{self.url}: {reason(err)}") from None
            if err.code < 500 and err.code not in _RETRIED_STATUS:
                raise SourceError(f"{self.url}: {reason(err)}") from None
            raise
        try:
            self._check_resumed(response)
        except BaseException:
            response.close()
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            raise
        return response

    def _check_resumed(self, response: http.client.HTTPResponse) -> None:
        """Position ``response`` at ``self.pos``: a 206 must start there; a 200 is skipped to it.
        The first response records the file's version (ETag / Last-Modified) and where it ends."""
        version = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if not self.opened:
            self.opened, self.version = True, version
            if self.length is None:
                self.length = _total_length(response)
        elif version is not None and self.version is not None and version != self.version:
            raise SourceError(f"{self.url}: changed while being read ({self.version} -> {version})")
        if response.status == 206:
            found = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
            if not found or int(found.group(1)) != self.pos:
                raise SourceError(f"{self.url}: asked for bytes from {self.pos}, got Content-Range "
                                  f"{response.headers.get('Content-Range')!r}")
            return
        left = self.pos  # 200: the server ignores Range (python -m http.server does)
        while left:
            chunk = response.read(min(left, _CHUNK))
            if not chunk:
                raise ConnectionError(f"connection closed while skipping to byte {self.pos}")
            left -= len(chunk)


def _total_length(response: http.client.HTTPResponse) -> int | None:
    """The whole file's length: a 206's ``Content-Range`` total, a 200's ``Content-Length``."""
    if response.status == 206:
        found = re.search(r"/(\d+)$", response.headers.get("Content-Range") or "")
        return int(found.group(1)) if found else None
    size = response.headers.get("Content-Length")
    return int(size) if size is not None else None


class _ReadAhead(io.RawIOBase):
    """An HTTP file read ahead in ``chunk``-byte pieces by ``connections`` concurrent ``Range``
    requests, served in order. Each piece is its own :class:`_HTTPStream` (its retries and
    resumption); a piece that fails for good, or finds another version of the file (ETag /
    Last-Modified) than the first piece did, raises its :class:`SourceError` where the reader
    reaches it, after the bytes before it. Memory: 2 × ``connections`` pieces queued (8 MB each)
    and the one being read; twice that while the next file is read ahead (:meth:`prefetch`).

    The connections are a process's pool for that count (:func:`_pieces_pool`), shared by its
    read-aheads, first come first served: the next file's pieces (``then``, called once this
    file's last piece is asked for) queue behind this file's, so a stream of shards keeps every
    connection busy across shard ends, and never uses more than ``connections``."""

    _ahead: ClassVar[dict[tuple[int, str, int], Future]] = {}  # (pid, url, connections) -> its opening: at most one

    def __init__(self, first: _HTTPStream, fetch, first_stop: int, stop: int, chunk: int, connections: int) -> None:
        """``first``: the first piece's stream (its response already open), read up to ``first_stop``;
        ``fetch(a, b)``: bytes ``[a, b)``."""
        super().__init__()
        self.fetch, self.chunk, self.stop, self.then = fetch, chunk, stop, None
        self.current, self.offset = memoryview(b""), 0
        self.next_start = first_stop
        self.pool = _pieces_pool(connections)
        self.first = first
        self.first_piece = self.pool.submit(self._read_first, first.pos, first_stop)
        self.pending: deque[Future] = deque([self.first_piece])
        for _ in range(2 * connections - 1):  # a piece queued behind each one under way: no connection waits on the reader
            self._submit()

    @classmethod
    def open(cls, url: str, retries: int, timeout: float, backoff: float, start: int, stop: int | None,
             connections: int, chunk: int | None = None) -> io.RawIOBase:
        """The first piece asks with ``Range``: a 206 gives the file's length and the rest is read
        ahead; a server that ignores ``Range`` (200) is read on that one connection instead."""
        chunk = chunk or _AHEAD_CHUNK
        first = _HTTPStream(url, retries, timeout, backoff, start, start + chunk if stop is None else min(stop, start + chunk), True)
        total = _total_length(first.response) if first.response.status == 206 else None
        if total is None:  # the server ignores Range (or names no length): one connection
            first.close()
            return _HTTPStream(url, retries, timeout, backoff, start, stop)
        end = total if stop is None else min(stop, total)
        first_stop = min(first.length, end)

        def fetch(a: int, b: int) -> bytearray:
            with _HTTPStream(url, retries, timeout, backoff, a, b, keep_alive=True) as piece:
                if None not in (piece.version, first.version) and piece.version != first.version:
                    raise SourceError(f"{url}: changed while being read ({first.version} -> {piece.version})")
                return read_exact(piece, b - a)

        return cls(first, fetch, first_stop, end, chunk, connections)

    @classmethod
    def prefetch(cls, url: str, retries: int, timeout: float, backoff: float, connections: int) -> None:
        """Open ``url`` (whole) on the pool, its pieces queued behind those already asked for; a
        whole-file :func:`open_stream` of it takes it (:meth:`prefetched`). One per process: an
        earlier one not taken is closed."""
        for key in [k for k in cls._ahead if k[0] == os.getpid()]:
            cls._ahead.pop(key).add_done_callback(_close_opened)
        opening = _pieces_pool(connections).submit(cls.open, url, retries, timeout, backoff, 0, None, connections)
        cls._ahead[(os.getpid(), url, connections)] = opening

    @classmethod
    def prefetched(cls, url: str, connections: int) -> Future | None:
        """The opening :meth:`prefetch` started for ``url``, taken (its ``result()`` raises what opening raised)."""
        return cls._ahead.pop((os.getpid(), url, connections), None)

    def _read_first(self, start: int, stop: int) -> bytearray:
        with self.first:
            return read_exact(self.first, stop - start)

    def _submit(self) -> None:
        if self.next_start < self.stop:
            a, b = self.next_start, min(self.stop, self.next_start + self.chunk)
            self.pending.append(self.pool.submit(self.fetch, a, b))
            self.next_start = b
        elif self.then is not None:  # every piece asked for: the next file's queue behind them
            then, self.then = self.then, None
            then()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset >= len(self.current):
            if not self.pending:
                return 0
            self.current, self.offset = memoryview(self.pending.popleft().result()), 0  # raises its SourceError
            self._submit()
        n = min(len(buffer), len(self.current) - self.offset)
        buffer[:n] = self.current[self.offset : self.offset + n]
        self.offset += n
        return n

    def close(self) -> None:
        if not self.closed:
            for piece in self.pending:  # queued pieces are dropped; those under way finish and are dropped
                piece.cancel()
            self.pending.clear()
            if self.first_piece.cancelled():  # its response was opened by open(): close it (and its connection)
                self.first.close()
        super().close()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, connections) -> the read-aheads' connections


def _pieces_pool(connections: int) -> ThreadPoolExecutor:
    """This process's ``connections`` threads for read-ahead pieces (a forked data worker makes its own:
    a parent's threads do not exist in the child)."""
    key = (os.getpid(), connections)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(connections, thread_name_prefix="read-ahead")
    return _POOLS[key]


def _close_opened(opening: Future) -> None:
    """A prefetched opening nobody took: close its stream (its queued pieces are dropped)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def reason(err: BaseException) -> str:
    """An exception as one short line (webdataset appends ``@ <stream>`` to tar errors)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    if isinstance(err, OSError) or len(err.args) < 2:
        text = str(err)
    else:  # webdataset appends (stream, url) to the args of tar errors
        text = str(err.args[0])
    text = text.split(" @ ")[0]
    return " ".join(f"{type(err).__name__}: {text}".split()) if text else type(err).__name__


# ---------------------------------------------------------------------------- kept connections

_IDLE: dict[tuple[int, str, str], list[http.client.HTTPConnection]] = {}  # (pid, scheme, host:port) -> idle connections
_IDLE_LOCK = threading.Lock()


def _kept_get(url: str, headers: dict, timeout: float) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection] | None:
    """``GET url`` on a kept connection: ``(response, connection)``; ``None`` when ``urllib`` must
    ask instead (a proxy applies, or the answer is a redirect). An error status raises
    ``urllib.error.HTTPError`` as ``urlopen`` does; a kept connection that fails before an answer
    (the server closed it while idle) is replaced once by a new one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or _proxied(parts.scheme, parts.hostname or ""):
        return None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    for fresh in (False, True):
        connection, reused = _take(parts.scheme, parts.netloc, timeout, fresh)
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            break
        except NETWORK_ERRORS:
            connection.close()
            if not reused:
                raise
    if 300 <= response.status < 400:  # urllib follows redirects (and their rules)
        response.close()
        connection.close()
        return None
    if response.status >= 400:
        connection.close()
        raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, response)
    return response, connection


def _proxied(scheme: str, host: str) -> bool:
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)


def _take(scheme: str, netloc: str, timeout: float, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
    """An idle kept connection to ``netloc`` (reused: True), or a new one."""
    if not fresh:
        with _IDLE_LOCK:
            idle = _IDLE.get((os.getpid(), scheme, netloc))
            connection = idle.pop() if idle else None
        if connection is not None:
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            return connection, True
    if scheme == "https":
        connection = http.client.HTTPSConnection(netloc, timeout=timeout, context=_tls())
    else:
        connection = http.client.HTTPConnection(netloc, timeout=timeout)
    connection.kept_as = (scheme, netloc)  # where _give_back files it
    return connection, False


@functools.cache
def _tls() -> ssl.SSLContext:
    """The TLS settings urllib uses by default (certificates verified), loaded once per process."""
    return ssl.create_default_context()


def _give_back(connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Keep ``connection`` for the next piece when ``response`` was read to its end and the server
    keeps it open; else close it."""
    if not response.isclosed() or response.will_close or connection.sock is None:
        connection.close()
        return
    key = (os.getpid(), *connection.kept_as)
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(key, [])
        if len(idle) < KEPT_PER_HOST:
            idle.append(connection)
            return
    connection.close()
