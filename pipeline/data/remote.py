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

Reading (:func:`open_stream`): local files and ``file://`` directly; ``http(s)://`` with
retries and exponential backoff (``pipeline.data.http_source``), where a connection that dies
mid-way is *resumed*: reopened with ``Range: bytes=N-`` (a server that ignores Range answers 200
and its first N bytes are skipped), so a flaky link costs a reconnect, not the shard; ``pipe:`` as a subprocess; any other
scheme through ``fsspec.open`` when fsspec (and its backend, e.g. s3fs) is installed.

Shards are streamed (memory flat in the shard size) through webdataset's own tar grouping, so keys
and extensions are those ``webdataset.WebDataset`` gives. A shard that cannot be read after the
retries (or is truncated or corrupt) is cut short: :func:`iter_shard` counts it in
``skipped["unreadable_shard"]``, prints one warning line and returns; the reader counts the
samples it did not get.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import braceexpand

from pipeline.config.source import is_url
from pipeline.data.http_source import NETWORK_ERRORS, SourceError, SourceNotFound, open_http, reason
from pipeline.data.tars import SPAN, group_samples, tar_members

__all__ = ["SourceError", "SourceNotFound", "complete_shards", "dataset_meta", "is_url", "iter_shard", "list_shards",
           "open_stream", "read_bytes", "read_json", "read_shard", "read_span"]

PROG = "pipeline.data.remote"
BACKOFF_S = 0.5  # the first retry waits this long, each next one twice as long
_CHUNK = 1 << 20  # read buffer (bytes)
_BRACES = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")  # {000000..000099} or {a,b}
_LIST_SEP = re.compile(r"::(?![^\[\]]*\])")  # WebDataset's "a.tar::b.tar" ("::" inside [IPv6] excluded)


# ---------------------------------------------------------------------------- opening one source


def open_stream(source: str | Path, retries: int = 3, timeout: float = 60.0, backoff: float = BACKOFF_S,
                start: int = 0, stop: int | None = None, connections: int = 1, then: str | None = None) -> BinaryIO:
    """A readable binary stream of one file-like source (a local path, ``file://``, ``http(s)://``,
    ``pipe:CMD``, or an fsspec URL) from byte ``start``; :class:`SourceError` when it cannot be opened.

    HTTP: up to ``retries`` reconnections in a row without progress, waiting ``backoff``·2^k
    seconds; ``timeout`` is per connection attempt and socket read; ``start``/``stop`` ask for just
    those bytes (``Range: bytes=start-(stop-1)``). Elsewhere ``stop`` is a hint: read no further.
    ``connections`` > 1: an HTTP file is read ahead as that many concurrent ``Range`` requests
    (``pipeline.data.http_source._ReadAhead``), for servers that cap each connection (object stores); one
    connection when the server ignores ``Range``. ``then``: the HTTP file read next, opened and
    read ahead on the same connections once this one's last piece is asked for (a whole-file
    read of it then starts with its first pieces in memory, not with a request's latency)."""
    text = str(source)
    if text.startswith("pipe:"):
        stream = io.BufferedReader(_PipeStream(text), _CHUNK)
        _skip(stream, start, text)
        return stream
    if urlsplit(text).scheme.lower() in ("http", "https"):
        return open_http(text, retries, timeout, backoff, start, stop, connections, then)
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
        except NETWORK_ERRORS as err:
            raise SourceError(f"{source}: {reason(err)}") from err


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
        raise SourceError(f"{source}: {reason(err)}") from None


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
            raise SourceError(f"{source}: {reason(err)}") from None
        except OSError as err:
            failures += 1
            if failures > retries:
                raise SourceError(f"{source}: {reason(err)} (after {retries} retries)") from err
            time.sleep(backoff * 2 ** (failures - 1))


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
    except (NETWORK_ERRORS + (tarfile.TarError, EOFError, ValueError)) as err:  # truncated, corrupt, duplicate member
        raise SourceError(f"{url}: {reason(err)}") from err


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
    except (NETWORK_ERRORS + (tarfile.TarError, EOFError, ValueError)) as err:
        raise SourceError(f"{url}: bytes {start}-{end}: {reason(err)}") from err
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
