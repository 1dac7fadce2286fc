"""Where shards come from: the one place that knows about sources (DESIGN.md §10).

A *source* is anything a stage accepts where a shard folder is accepted (``data.latents``,
``data.shards``, ``--input``):

- a local folder: its complete shards (:func:`complete_shards`);
- a folder URL (``https://host/latents/``, ``s3://bucket/latents``: ends in ``/`` or names no
  ``.tar``): the shards its ``dataset.json`` lists (``"shards"``, names relative to the folder);
- a WebDataset brace pattern or ``::`` list (``https://host/latents/latents-{000000..000099}.tar``,
  ``a.tar::b.tar``), expanded with ``braceexpand`` as webdataset does;
- ``pipe:CMD``: the command's standard output (``pipe:aws s3 cp s3://b/x.tar -``);
- one ``.tar`` (a path, ``file://``, or URL), or a list of any of these shards, taken as given.

Reading (:func:`open_stream`): local files and ``file://`` directly; ``http(s)://`` through urllib
with retries and exponential backoff, where a connection that dies mid-way is *resumed*: reopened
with ``Range: bytes=N-`` (a server that ignores Range answers 200 and its first N bytes are
skipped), so a flaky link costs a reconnect, not the shard; ``pipe:`` as a subprocess; any other
scheme through ``fsspec.open`` when fsspec (and its backend, e.g. s3fs) is installed.

Shards are streamed (memory flat in the shard size) through webdataset's own tar grouping, so keys
and extensions are those ``webdataset.WebDataset`` gives. A shard that cannot be read after the
retries (or is truncated or corrupt) is cut short: :func:`iter_shard` counts it in
``skipped["unreadable_shard"]``, prints one warning line and returns; the reader counts the
samples it did not get.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import braceexpand
from pipeline.config.source import is_url
from pipeline.data.tars import SPAN, group_samples, read_exact, tar_members

__all__ = ["SourceError", "SourceNotFound", "complete_shards", "dataset_meta", "is_url", "iter_shard", "list_shards",
           "open_stream", "read_bytes", "read_json", "read_shard", "read_span"]

PROG = "pipeline.data.remote"
BACKOFF_S = 0.5  # the first retry waits this long, each next one twice as long
_CHUNK = 1 << 20  # read buffer (bytes)
_SMALL_READS = 64 << 10  # an HTTP stream's buffer: only small reads (tar headers, padding) go through it
_AHEAD_CHUNK = 8 << 20  # the piece each read-ahead connection asks for (``open_stream(connections=...)``)
_BRACES = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")  # {000000..000099} or {a,b}
_LIST_SEP = re.compile(r"::(?![^\[\]]*\])")  # WebDataset's "a.tar::b.tar" ("::" inside [IPv6] excluded)
_RETRIED_STATUS = {408, 425, 429}  # and every 5xx; other 4xx answers are final
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts and resets are OSErrors


class SourceError(OSError):
    """A source that cannot be read (after its retries); the message is one line naming it."""


class SourceNotFound(SourceError, FileNotFoundError):
    """The source does not exist (no such file, HTTP 404/410): never retried."""


# ---------------------------------------------------------------------------- opening one source


def open_stream(source: str | Path, retries: int = 3, timeout: float = 60.0, backoff: float = BACKOFF_S,
                start: int = 0, stop: int | None = None, connections: int = 1, then: str | None = None) -> BinaryIO:
    """A readable binary stream of one file-like source (a local path, ``file://``, ``http(s)://``,
    ``pipe:CMD``, or an fsspec URL) from byte ``start``; :class:`SourceError` when it cannot be opened.

    HTTP: up to ``retries`` reconnections in a row without progress, waiting ``backoff``·2^k
    seconds; ``timeout`` is per connection attempt and socket read; ``start``/``stop`` ask for just
    those bytes (``Range: bytes=start-(stop-1)``). Elsewhere ``stop`` is a hint: read no further.
    ``connections`` > 1: an HTTP file is read ahead as that many concurrent ``Range`` requests
    (:class:`_ReadAhead`), for servers that cap each connection (object stores); one
    connection when the server ignores ``Range``. ``then``: the HTTP file read next, opened and
    read ahead on the same connections once this one's last piece is asked for (a whole-file
    read of it then starts with its first pieces in memory, not with a request's latency)."""
    text = str(source)
    if text.startswith("pipe:"):
        stream = io.BufferedReader(_PipeStream(text), _CHUNK)
        _skip(stream, start, text)
        return stream
    if urlsplit(text).scheme.lower() in ("http", "https"):
        # a large read (a tar member, ``pipeline.data.tars``) goes straight from the socket into its
        # buffer; a 1 MB buffer here made each tar header pull the next member's first MB through
        # it, a second copy of nearly every byte
        if connections > 1:
            ahead = _ReadAhead.prefetched(text, connections) if (start, stop) == (0, None) else None
            raw = ahead.result() if ahead is not None else _ReadAhead.open(text, retries, timeout, backoff, start, stop, connections)
            if then is not None and isinstance(raw, _ReadAhead):
                raw.then = lambda: _ReadAhead.prefetch(then, retries, timeout, backoff, connections)
            return io.BufferedReader(raw, _SMALL_READS)
        return io.BufferedReader(_HTTPStream(text, retries, timeout, backoff, start, stop), _SMALL_READS)
    stream = _open_local(text) if not is_url(text) or text.startswith("file://") else _open_fsspec(text, retries, backoff)
    if start:
        stream.seek(start)
    return stream


def _skip(stream: BinaryIO, count: int, source: str) -> None:
    """Read and drop ``count`` bytes of a stream that cannot seek."""
    while count:
        chunk = stream.read(min(count, _CHUNK))
        if not chunk:
            raise SourceError(f"{source}: ended while skipping to byte {count}")
        count -= len(chunk)


def read_bytes(source: str | Path, retries: int = 3, timeout: float = 60.0) -> bytes:
    """The whole content of a small source (``dataset.json``, ``*_stats.json``)."""
    with open_stream(source, retries, timeout) as stream:
        try:
            return stream.read()
        except SourceError:
            raise
        except _NETWORK_ERRORS as err:
            raise SourceError(f"{source}: {_reason(err)}") from err


def read_json(source: str | Path, retries: int = 3, timeout: float = 60.0) -> dict:
    """A JSON source parsed; :class:`SourceError` (one line) when it is not JSON."""
    data = read_bytes(source, retries, timeout)
    try:
        return json.loads(data)
    except ValueError as err:
        raise SourceError(f"{source}: not valid JSON ({err})") from None


def _open_local(source: str) -> BinaryIO:
    path = urllib.request.url2pathname(urlsplit(source).path) if source.startswith("file://") else source
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SourceNotFound(f"{source}: no such file") from None
    except OSError as err:
        raise SourceError(f"{source}: {_reason(err)}") from None


def _open_fsspec(source: str, retries: int, backoff: float) -> BinaryIO:
    """Any other scheme (``s3://``, ``gs://``, ``hf://``…) through fsspec, an optional package."""
    scheme = urlsplit(source).scheme
    try:
        import fsspec  # optional (not a declared dependency): only these schemes need it
    except ImportError:
        raise SourceError(f"{source}: reading {scheme}:// URLs needs the fsspec package "
                          f"(pip install fsspec, plus its {scheme} backend, e.g. s3fs for s3://)") from None
    failures = 0
    while True:  # the backends retry reads themselves; here only the opening is retried
        try:
            return fsspec.open(source, "rb").open()
        except FileNotFoundError:
            raise SourceNotFound(f"{source}: not found") from None
        except (ImportError, ValueError) as err:  # no backend for the scheme, an unknown protocol
            raise SourceError(f"{source}: {_reason(err)}") from None
        except OSError as err:
            failures += 1
            if failures > retries:
                raise SourceError(f"{source}: {_reason(err)} (after {retries} retries)") from err
            time.sleep(backoff * 2 ** (failures - 1))


def _reason(err: BaseException) -> str:
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


class _HTTPStream(io.RawIOBase):
    """One HTTP GET that survives dropped connections: each failure reopens it at the byte reached.

    ``retries`` counts failures in a row without a byte of progress; any progress resets it, so
    a link that drops every few megabytes still delivers the whole file."""

    def __init__(self, url: str, retries: int, timeout: float, backoff: float, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        self.url, self.retries, self.timeout, self.backoff = url, retries, timeout, backoff
        self.pos, self.stop, self.length, self.version, self.failures = start, stop, stop, None, 0
        self.opened = False  # a first response was checked (its length and version recorded)
        self.response: http.client.HTTPResponse | None = None
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
            except _NETWORK_ERRORS as err:
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
            self.response.close()
            self.response = None

    def _failed(self, err: BaseException) -> None:
        """Wait before the next attempt, or give up after ``retries`` failures without progress."""
        self.failures += 1
        if self.failures > self.retries:
            where = f" at byte {self.pos}" if self.pos else ""
            raise SourceError(f"{self.url}: {_reason(err)}{where} (after {self.retries} retries)") from err
        time.sleep(self.backoff * 2 ** (self.failures - 1))

    def _reopen(self) -> None:
        try:
            self.response = self._request()
        except SourceError:
            raise
        except _NETWORK_ERRORS as err:
            self._failed(err)

    def _request(self) -> http.client.HTTPResponse:
        """GET from ``self.pos``; a final HTTP error is a :class:`SourceError`, others are retried."""
        end = "" if self.stop is None else str(self.stop - 1)
        headers = {"Range": f"bytes={self.pos}-{end}"} if self.pos or end else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (404, 410):
                raise SourceNotFound(f"{self.url}: {_reason(err)}") from None
            if err.code < 500 and err.code not in _RETRIED_STATUS:
                raise SourceError(f"{self.url}: {_reason(err)}") from None
            raise
        try:
            self._check_resumed(response)
        except BaseException:
            response.close()
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

    _ahead: dict[tuple[int, str, int], Future] = {}  # (pid, url, connections) -> its opening: at most one

    def __init__(self, first, fetch, first_stop: int, stop: int, chunk: int, connections: int) -> None:
        """``first()``: the first piece's bytes (its response already open), up to ``first_stop``;
        ``fetch(a, b)``: bytes ``[a, b)``."""
        super().__init__()
        self.fetch, self.chunk, self.stop, self.then = fetch, chunk, stop, None
        self.current, self.offset = memoryview(b""), 0
        self.next_start = first_stop
        self.pool = _pieces_pool(connections)
        self.pending: deque[Future] = deque([self.pool.submit(first)])
        for _ in range(2 * connections - 1):  # a piece queued behind each one under way: no connection waits on the reader
            self._submit()

    @classmethod
    def open(cls, url: str, retries: int, timeout: float, backoff: float, start: int, stop: int | None,
             connections: int, chunk: int | None = None) -> io.RawIOBase:
        """The first piece asks with ``Range``: a 206 gives the file's length and the rest is read
        ahead; a server that ignores ``Range`` (200) is read on that one connection instead."""
        chunk = chunk or _AHEAD_CHUNK
        first = _HTTPStream(url, retries, timeout, backoff, start, start + chunk if stop is None else min(stop, start + chunk))
        total = _total_length(first.response) if first.response.status == 206 else None
        if total is None:  # the server ignores Range (or names no length): one connection
            first.close()
            return _HTTPStream(url, retries, timeout, backoff, start, stop)
        end = total if stop is None else min(stop, total)
        first_stop = min(first.length, end)

        def read_first() -> bytearray:
            with first:
                return read_exact(first, first_stop - start)

        def fetch(a: int, b: int) -> bytearray:
            with _HTTPStream(url, retries, timeout, backoff, a, b) as piece:
                if None not in (piece.version, first.version) and piece.version != first.version:
                    raise SourceError(f"{url}: changed while being read ({first.version} -> {piece.version})")
                return read_exact(piece, b - a)

        return cls(read_first, fetch, first_stop, end, chunk, connections)

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


class _PipeStream(io.RawIOBase):
    """``pipe:CMD``: the shell command's standard output; a non-zero exit status is an error at its end."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        command = source[len("pipe:"):]  # a shell command, as in webdataset: a trusted source only
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)  # noqa: S602

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.process.stdout.readinto(buffer)
        if n == 0 and len(buffer):
            status = self.process.wait()
            if status != 0:
                raise SourceError(f"{self.source}: the command exited with status {status}")
        return n

    def close(self) -> None:
        if not self.closed:
            if self.process.poll() is None:  # stopped early: the rest is not wanted
                self.process.kill()
            self.process.stdout.close()
            self.process.wait()
        super().close()


# ---------------------------------------------------------------------------- listing a source


def complete_shards(directory: Path, name: str | None = None) -> list[Path]:
    """The complete ``{name}-NNNNNN.tar`` files in a local ``directory``, sorted by name (a tar
    appears under its final name only when complete: ``pipeline.data.shards``).

    Without ``name``, any ``PREFIX-NNNN.tar`` or img2dataset's ``NNNNN.tar``; temporaries never match.
    """
    prefix = rf"{re.escape(name)}-" if name else r"(?:.+-)?"
    pattern = re.compile(rf"^{prefix}\d+\.tar$")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and pattern.match(p.name))


def list_shards(source: str | Path | list[str]) -> list[str]:
    """The shards of a source (see the module docstring), in order; ``ValueError`` (one line) when
    there are none or the listing cannot be read."""
    if isinstance(source, (list, tuple)):
        shards = [str(s) for s in source]
    elif _is_pattern(text := str(source)):
        shards = _expand(text)
    elif text.startswith("pipe:"):
        shards = [text]
    elif is_url(text):
        shards = _listed_shards(text) if _is_folder_url(text) else [text]
    elif Path(text).is_dir():
        shards = [str(p) for p in complete_shards(Path(text))]
    elif Path(text).is_file():
        shards = [text]
    else:
        raise ValueError(f"no shards at {text}: no such folder or file")
    if not shards:
        raise ValueError(f"no shards in {source}")
    return shards


def dataset_meta(source: str | Path | list[str]) -> dict:
    """The ``dataset.json`` of a source: a local folder's, a folder URL's, or that of the folder
    holding a shard, a pattern's or a list's first shard. :class:`SourceNotFound` without one."""
    return read_json(dataset_json_of(source))


def dataset_json_of(source: str | Path | list[str]) -> str:
    """Where the ``dataset.json`` of a source is (a path or a URL)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("an empty shard list has no dataset.json")
        first = str(source[0])
    else:
        text = str(source)
        if _is_pattern(text):
            first = _expand(text)[0]
        elif is_url(text) and not text.startswith("pipe:") and _is_folder_url(text):
            return text.rstrip("/") + "/dataset.json"
        elif not is_url(text) and Path(text).is_dir():
            return str(Path(text) / "dataset.json")
        else:
            first = text
    if first.startswith("pipe:"):
        raise ValueError(f"{first}: a pipe: source has no folder to read dataset.json from")
    return first.rsplit("/", 1)[0] + "/dataset.json" if is_url(first) else str(Path(first).parent / "dataset.json")


def _is_pattern(text: str) -> bool:
    return bool(_BRACES.search(text)) or bool(_LIST_SEP.search(text))


def _expand(text: str) -> list[str]:
    """WebDataset's URL list: ``::``-separated parts, each brace-expanded."""
    return [url for part in _LIST_SEP.split(text) if part for url in braceexpand.braceexpand(part)]


def _is_folder_url(url: str) -> bool:
    """A URL that ends in ``/`` or whose last path part names no tar file."""
    path = urlsplit(url).path
    return path.endswith("/") or not re.search(r"\.(?:tar|tgz)", path.rsplit("/", 1)[-1])


def _listed_shards(folder: str) -> list[str]:
    """A folder URL -> the full URLs of the shards its ``dataset.json`` lists."""
    base = folder if folder.endswith("/") else folder + "/"
    try:
        meta = read_json(base + "dataset.json")
    except SourceError as err:
        raise ValueError(f"cannot list the shards of {folder}: {err}") from None
    names = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise ValueError(f"{base}dataset.json lists no 'shards': give the shards as a brace pattern "
                         f"({base}NAME-{{000000..000099}}.tar) instead")
    return [base + str(name) for name in names]


# ---------------------------------------------------------------------------- reading shards


def read_shard(source: str | Path, *, retries: int = 3, timeout: float = 60.0, backoff: float = BACKOFF_S,
               spans: bool = False, connections: int = 1, then: str | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard, streamed, grouped as
    ``webdataset.WebDataset`` groups them (``pipeline.data.tars``; with ``spans``, each sample's
    byte span as ``"__span__"``); :class:`SourceError` (one line) when the shard cannot be read to
    its end. The samples before the error have been yielded, whole. ``then``: the shard read next
    (read ahead behind this one with ``connections`` > 1: :func:`open_stream`)."""
    url = str(source)
    try:
        with open_stream(url, retries, timeout, backoff, connections=connections, then=then) as stream:
            yield from group_samples(tar_members(stream), url, spans)
    except SourceError:
        raise
    except (_NETWORK_ERRORS + (tarfile.TarError, EOFError, ValueError)) as err:  # truncated, corrupt, duplicate member
        raise SourceError(f"{url}: {_reason(err)}") from err


def read_span(source: str | Path, start: int, end: int, *, retries: int = 3, timeout: float = 60.0,
              backoff: float = BACKOFF_S) -> dict:
    """The one sample whose bytes are ``[start, end)`` of a shard (a span :func:`read_shard` gave),
    reading only those bytes (a seek, an HTTP ``Range``; a ``pipe:`` skips the bytes before it);
    :class:`SourceError` when they cannot be read or do not hold one whole sample."""
    url = str(source)
    try:
        with open_stream(url, retries, timeout, backoff, start=start, stop=end) as stream:
            data = stream.read(end - start)
        samples = list(group_samples(tar_members(io.BytesIO(data)), url, spans=True))
    except SourceError:
        raise
    except (_NETWORK_ERRORS + (tarfile.TarError, EOFError, ValueError)) as err:
        raise SourceError(f"{url}: bytes {start}-{end}: {_reason(err)}") from err
    if len(samples) != 1 or len(data) != end - start:
        raise SourceError(f"{url}: bytes {start}-{end} do not hold one whole sample (the shard changed?)")
    samples[0][SPAN] = (start, end)
    return samples[0]


def iter_shard(source: str | Path, skipped: Counter | None = None, *, retries: int = 3, timeout: float = 60.0,
               backoff: float = BACKOFF_S, spans: bool = False, connections: int = 1, then: str | None = None) -> Iterator[dict]:
    """:func:`read_shard` that stops a shard it cannot read: one warning line on stderr, one more
    ``skipped["unreadable_shard"]``, and a normal return (the caller counts what it did not get)."""
    count = 0
    try:
        for sample in read_shard(source, retries=retries, timeout=timeout, backoff=backoff, spans=spans, connections=connections,
                                 then=then):
            count += 1
            yield sample
    except SourceError as err:
        if skipped is not None:
            skipped["unreadable_shard"] += 1
        print(f"{PROG}: warning: skipped the rest of an unreadable shard after {count} sample(s): {err}",
              file=sys.stderr, flush=True)
