"""WebDataset shard files on disk: naming, atomic writing, listing, clean-up.

One place for the rules of DESIGN.md §4 and §6 that every shard-writing stage follows:

- shards are named ``{name}-{index:06d}.tar``; beside each, ``{name}-{index:06d}_stats.json``;
- a tar appears under its final name only when complete (written to ``*.tmp-PID``,
  flushed, then renamed), so a folder never shows a half-written shard;
- a shard counts as *complete* when its tar exists; its stats file is written first
  (``complete_shards``, defined with the other sources in ``pipeline.data.remote``);
- tar members carry fixed metadata (mtime, owner, mode), so the same samples give
  byte-identical tars and a resumed run equals an uninterrupted one.

The tars are plain tar files that ``webdataset`` reads; :func:`iter_samples` streams them from any
source (``pipeline.data.remote``).
"""

from __future__ import annotations

import json
import os
import socket
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.data.remote import complete_shards, iter_shard  # noqa: F401  (complete_shards re-exported: listing a folder is a source's job)

FIXED_MTIME = 1_700_000_000  # 2023-11-14; any constant works, 0 makes `tar` complain
_TMP_MARK = ".tmp-"


def shard_name(name: str, index: int) -> str:
    """``images-000012.tar``."""
    return f"{name}-{index:06d}.tar"


def stats_path(tar_path: Path) -> Path:
    """``images-000012.tar`` -> ``images-000012_stats.json`` (img2dataset's layout)."""
    return tar_path.with_name(tar_path.name[: -len(".tar")] + "_stats.json")


def _tmp_path(path: Path) -> Path:
    """``NAME.tmp-HOST-PID``: writers on several hosts (preprocessing workers, ``data_tools.split``)
    may write the same final file at once; they never share a temporary."""
    return path.with_name(f"{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it to ``path`` (atomic on POSIX)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete, never partial."""
    path = Path(path)
    tmp = _tmp_path(path)
    tmp.write_bytes(data)
    _commit(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _header_by_tarfile(name: str, size: int) -> bytes:
    """What ``tarfile`` (PAX format) writes before a member's data: a ustar block, preceded by
    pax extended-header blocks when the name is long or not ASCII."""
    return _tar_info(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


_TEMPLATE = _header_by_tarfile("x", 0)  # the fixed fields (mode, owner, mtime, magic) as this Python writes them
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)  # ustar field offsets


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of member ``name`` with ``size`` bytes, byte-identical to ``tarfile``'s.
    A name that fits a ustar block (ASCII, at most 100 bytes) is patched into a template instead
    of going through ``TarInfo`` (0.1 ms a member: a third of the shard tool's writing)."""
    if not name.isascii() or len(name) > 100 or size >= 8**11:
        return _header_by_tarfile(name, size)
    block = bytearray(_TEMPLATE)
    block[_NAME] = name.encode("ascii").ljust(100, b"\0")
    block[_SIZE] = b"%011o\0" % size
    block[_CHKSUM] = b"        "  # the checksum counts its own field as spaces
    block[_CHKSUM.start : _CHKSUM.stop - 1] = b"%06o\0" % sum(block)  # 6 octal digits, NUL; the last space stays
    return bytes(block)


def shard_key(key: str) -> str:
    """A sample key as our writers store it: folders (``part1/000001``, from a tar of folders) joined
    by ``__`` and dots made ``_`` (WebDataset splits a member name at its first dot)."""
    return key.replace("/", "__").replace(".", "_")


def write_tar_atomic(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples as a WebDataset tar; returns the sample count.

    Members are ``key.ext`` in the order given (extensions sorted within a sample), with
    fixed metadata, so equal input gives an equal file. Keys must not contain dots:
    WebDataset splits a member name at the first dot.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    count = 0
    written = 0
    with open(tmp, "wb") as f:
        for key, members in samples:
            if "." in key or "/" in key:
                raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
            for ext in sorted(members):
                data = members[ext]
                padding = -len(data) % tarfile.BLOCKSIZE
                for part in (member_header(f"{key}.{ext}", len(data)), data, b"\0" * padding):
                    f.write(part)
                    written += len(part)
            count += 1
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tarfile closes
        f.write(b"\0" * (end + -(written + end) % tarfile.RECORDSIZE))
    _commit(tmp, path)
    return count


def iter_samples(shards: Iterable[str | Path], skipped: Counter | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of the shards in order, streamed from any
    source (local, ``http(s)://``, ``pipe:``, fsspec URLs: ``pipeline.data.remote.iter_shard``). An
    unreadable shard is cut short with a warning and counted in ``skipped["unreadable_shard"]``.
    No node/worker splitting: callers split."""
    for shard in shards:
        yield from iter_shard(shard, skipped)


def remove_partials(directory: Path) -> int:
    """Delete temporary files left by an interrupted writer; returns how many."""
    removed = 0
    for p in Path(directory).glob(f"*{_TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            removed += 1
    return removed
