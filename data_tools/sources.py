"""Finding image–caption pairs: a folder tree, or a CSV/TSV/JSONL/Parquet manifest.

Discovery only lists *candidates* (paths and raw captions); it reads no image. What can be
told from names alone is counted here (a caption without an image, an image without any
caption file, an unreadable manifest row); everything else is judged per sample by the shard
workers, so that the slow part runs in parallel.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_EXTENSIONS = {".csv", ".tsv", ".jsonl", ".parquet"}
IMAGE_COLUMNS = ("image", "image_path", "path", "file_name", "filename", "filepath", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt")
CAPTION_KEYS = ("caption", "text", "prompt")  # in a same-stem .json beside an image


@dataclass(frozen=True)
class Candidate:
    """One image and where its caption comes from (exactly one of the caption fields is set)."""

    image: str  # absolute path
    source: str  # what KEY.json records: path relative to the input folder, or "manifest:row"
    caption_file: str | None = None  # same-stem .txt
    json_file: str | None = None  # same-stem .json (caption field and/or metadata)
    caption: str | bytes | None = None  # from a manifest (may hold undecodable bytes)
    from_manifest: bool = False


@dataclass
class Discovery:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    warnings: Counter = field(default_factory=Counter)


class SourceError(ValueError):
    """The input itself is unusable (missing, unknown kind, manifest without needed columns)."""


def discover(path: Path, image_column: str | None = None, caption_column: str | None = None) -> Discovery:
    """Candidates from a folder tree or a manifest file, in a deterministic (sorted/row) order."""
    path = Path(path)
    if path.is_dir():
        return discover_folder(path)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return discover_manifest(path, image_column, caption_column)
    if not path.exists():
        raise SourceError(f"input {path} does not exist")
    raise SourceError(f"input {path} is neither a folder nor a manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))})")


def _stem_groups(root: Path) -> dict[tuple[str, str], dict[str, list[Path]]]:
    """(relative dir, stem) -> {"image": [...], "txt": [...], "json": [...]} for every file."""
    groups: dict[tuple[str, str], dict[str, list[Path]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for filename in sorted(filenames):
            p = Path(dirpath, filename)
            suffix = p.suffix.lower()
            kind = "image" if suffix in IMAGE_EXTENSIONS else suffix.lstrip(".")
            if kind in ("image", "txt", "json"):
                groups.setdefault((rel, p.stem), {"image": [], "txt": [], "json": []})[kind].append(p)
    return groups


def discover_folder(root: Path) -> Discovery:
    """Images paired with same-stem ``.txt`` captions (or a caption field in same-stem ``.json``)."""
    found = Discovery()
    real_root = root.resolve()  # os.walk does not enter linked folders: a file that is no link resolves under it
    for (_, _), files in sorted(_stem_groups(root).items()):
        images, txt, js = files["image"], files["txt"], files["json"]
        if not images:
            if txt or (js and _json_has_caption(js[0])):
                found.skipped["caption_without_image"] += 1
            continue
        if not txt and not js:
            found.skipped["missing_caption"] += len(images)
            continue
        if len(images) > 1:
            # a.jpg and a.png both pair with a.txt: keep both (nothing valid is lost), say so.
            found.warnings["duplicate_stem"] += len(images) - 1
        for image in images:
            found.candidates.append(
                Candidate(
                    image=str(image.resolve() if image.is_symlink() else real_root / image.relative_to(root)),
                    source=image.relative_to(root).as_posix(),
                    caption_file=str(txt[0]) if txt else None,
                    json_file=str(js[0]) if js else None,
                )
            )
    return found


def _json_has_caption(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(k in data for k in CAPTION_KEYS)


def _pick_column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"manifest {path} has no {what} column '{wanted}' (columns: {', '.join(columns)})")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    flag = f"--{what}-column"
    raise SourceError(f"manifest {path} has no {what} column; name it with {flag} (columns: {', '.join(columns)})")


def _manifest_rows(path: Path) -> Iterator[dict | None]:
    """Rows as dicts; ``None`` for a row that cannot be parsed. Text keeps undecodable bytes
    as surrogates (``surrogateescape``) so one bad caption skips one row, not the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if suffix == ".jsonl":
            for line in f:
                if line.strip():
                    yield _parse_json_row(line)
        else:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")


def _parse_json_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def discover_manifest(path: Path, image_column: str | None, caption_column: str | None) -> Discovery:
    """One candidate per manifest row; image paths are relative to the manifest's folder."""
    found = Discovery()
    columns: tuple[str, str] | None = None
    for index, row in enumerate(_manifest_rows(path)):
        if row is None:
            found.skipped["bad_manifest_row"] += 1
            continue
        if columns is None:
            keys = [str(k) for k in row]
            columns = (
                _pick_column(keys, image_column, IMAGE_COLUMNS, "image", path),
                _pick_column(keys, caption_column, CAPTION_COLUMNS, "caption", path),
            )
        image = row.get(columns[0])
        if not isinstance(image, str) or not image.strip():
            found.skipped["bad_manifest_row"] += 1
            continue
        found.candidates.append(
            Candidate(
                image=str((path.parent / image).resolve()),
                source=f"{path.name}:{index}:{image}",
                caption=row.get(columns[1]),
                from_manifest=True,
            )
        )
    return found
