"""``python -m data_tools.inspect DIR``: validate a folder of WebDataset image shards.

Reads ``*-NNNNNN.tar`` (and img2dataset's ``NNNNN.tar``) with plain ``webdataset``, as a
training job would, and checks every sample: exactly one image member (jpg, jpeg, png,
webp) that Pillow fully decodes, and a non-empty UTF-8 caption in ``KEY.txt``. It reports
invalid samples by reason, image size and caption length statistics, and whether the
totals agree with each ``_stats.json`` and with ``dataset.json``; writes ``inspect.json``
and a contact sheet of a few samples into the folder. Exit status 0 when all is well.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.figures.sheets import contact_sheet
from pipeline.data.remote import SourceNotFound, dataset_meta, is_url, list_shards, read_json, read_shard
from pipeline.data.shards import complete_shards

PROG = "data_tools.inspect"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REASONS = ("no_image", "multiple_images", "undecodable_image", "no_caption", "empty_caption", "caption_not_utf8")
MAX_INVALID_EXAMPLES = 20  # keys of invalid samples listed in the summary


class Running:
    """Min / mean / max of a stream of numbers, in constant memory."""

    def __init__(self) -> None:
        self.count, self.total, self.low, self.high = 0, 0.0, math.inf, -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low, self.high = min(self.low, value), max(self.high, value)

    def summary(self) -> dict | None:
        if not self.count:
            return None
        return {"min": self.low, "mean": round(self.total / self.count, 3), "max": self.high}


class Reservoir:
    """``k`` items of a stream: a uniform sample drawn with ``seed``, or the first ``k`` when None."""

    def __init__(self, k: int, seed: int | None) -> None:
        self.k, self.rng, self.seen, self.items = k, None if seed is None else random.Random(seed), 0, []

    def offer(self, item: object) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append((self.seen, item))
        elif self.rng is not None:
            slot = self.rng.randrange(self.seen)
            if slot < self.k:
                self.items[slot] = (self.seen, item)

    def sample(self) -> list:
        """The kept items in stream order."""
        return [item for _, item in sorted(self.items, key=lambda pair: pair[0])]


def decode_image(data: bytes) -> Image.Image | None:
    """The fully decoded image, or None when Pillow cannot read all of it."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        return None
    return image


def decode_caption(data: bytes | None) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, reason)``."""
    if data is None:
        return None, "no_caption"
    try:
        text = data.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    return (text, None) if text else (None, "empty_caption")


def check_sample(sample: dict) -> tuple[list[str], Image.Image | None, str | None]:
    """Reasons the sample is invalid (empty when valid), its decoded image and its caption."""
    reasons, image = [], None
    images = [ext for ext in sample if ext in IMAGE_EXTS]
    if not images:
        reasons.append("no_image")
    elif len(images) > 1:
        reasons.append("multiple_images")
    else:
        image = decode_image(sample[images[0]])
        if image is None:
            reasons.append("undecodable_image")
    caption, reason = decode_caption(sample.get("txt"))
    if reason:
        reasons.append(reason)
    return reasons, image, caption


class Tally:
    """Everything counted while reading the samples."""

    def __init__(self, k: int, seed: int | None) -> None:
        self.samples, self.valid, self.invalid = 0, 0, Counter()
        self.width, self.height, self.words, self.image_bytes = Running(), Running(), Running(), Running()
        self.examples, self.bad_keys = Reservoir(k, seed), []

    def add(self, sample: dict) -> None:
        reasons, image, caption = check_sample(sample)
        self.samples += 1
        self.invalid.update(reasons)
        images = [sample[ext] for ext in IMAGE_EXTS if ext in sample]
        if len(images) == 1:
            self.image_bytes.add(len(images[0]))
        if image is not None:
            self.width.add(image.width)
            self.height.add(image.height)
        if caption is not None:
            self.words.add(len(caption.split()))
        if reasons and len(self.bad_keys) < MAX_INVALID_EXAMPLES:
            self.bad_keys.append(f"{Path(sample.get('__url__', '?')).name}:{sample['__key__']} ({', '.join(reasons)})")
        if not reasons:
            self.valid += 1
            self.examples.offer((images[0], caption))


def read_all(shards: list[Path | str], tally: Tally, expected: int | None) -> list[str]:
    """Feed every sample into ``tally``; returns problems found at shard level."""
    problems = []
    with tqdm(total=expected, desc=PROG, unit="sample", mininterval=0.5) as bar:
        for path in shards:
            before = tally.samples
            try:
                for sample in read_shard(path):  # strict: an unreadable shard raises (remote: after retries)
                    tally.add(sample)
                    bar.update()
            except (tarfile.TarError, OSError, ValueError, EOFError) as e:
                message = e.args[0] if e.args else e  # webdataset appends the stream and url to args
                problems.append(f"{_name(path)}: unreadable after {tally.samples - before} samples ({message})")
            else:
                problems += check_stats(path, tally.samples - before)
    return problems


def _name(shard: Path | str) -> str:
    """A shard's file name, for a path or a URL."""
    return str(shard).rstrip("/").rsplit("/", 1)[-1]


def check_stats(tar_path: Path | str, count: int) -> list[str]:
    """A problem when the shard's ``_stats.json`` (local or remote) records a different number of successes."""
    path = str(tar_path)[: -len(".tar")] + "_stats.json"
    try:
        stats = read_json(path)
    except SourceNotFound:
        return []
    except (OSError, ValueError) as e:
        return [f"{_name(path)}: unreadable ({e})"]
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(successes, int) and successes != count:
        return [f"{_name(path)}: records {successes} successes but {_name(tar_path)} holds {count} samples"]
    return []


def expected_samples(directory: Path | str) -> tuple[int | None, list[str]]:
    """``dataset.json``'s sample count, or None with a warning saying why it is unknown."""
    try:
        dataset = dataset_meta(directory)
    except SourceNotFound:
        return None, ["no dataset.json: total not cross-checked"]
    except (OSError, ValueError) as e:
        return None, [f"dataset.json unreadable ({e}): total not cross-checked"]
    samples = dataset.get("samples") if isinstance(dataset, dict) else None
    if not isinstance(samples, int):
        return None, ["dataset.json has no integer 'samples': total not cross-checked"]
    return samples, []


def inspect_shards(
    directory: Path | str,
    sheet_path: Path | None = None,
    samples: int = 16,
    columns: int = 4,
    seed: int | None = None,
) -> dict:
    """Check every sample of the shards in ``directory``; returns the summary.

    Also writes ``directory/inspect.json`` (the summary) and, unless ``samples`` is 0, a
    contact sheet of ``samples`` valid samples (the first ones, or drawn with ``seed``)
    to ``sheet_path`` (default ``directory/contact_sheet.png``). ``directory`` may be a folder
    URL or a shard URL pattern (``pipeline.data.remote``): nothing is written there, and the
    sheet only to a given ``sheet_path``.
    """
    remote = is_url(str(directory))
    directory = str(directory) if remote else Path(directory)
    try:
        shards = list_shards(directory) if remote else complete_shards(directory)
    except ValueError as e:  # a URL whose listing cannot be read
        shards, listing = [], [str(e)]
    else:
        listing = [] if shards else [f"no shard tars found in {directory}"]
    expected, warnings = expected_samples(directory)
    tally = Tally(samples, seed)
    problems = listing
    problems += read_all(shards, tally, expected)
    if expected is not None and expected != tally.samples:
        problems.append(f"dataset.json says {expected} samples but the shards hold {tally.samples}")
    if tally.samples > tally.valid:
        problems.append(f"{tally.samples - tally.valid} invalid samples")
    summary = {
        "directory": str(directory),
        "shards": len(shards),
        "samples": tally.samples,
        "valid": tally.valid,
        "invalid": tally.samples - tally.valid,
        "invalid_by_reason": {r: tally.invalid[r] for r in REASONS if tally.invalid[r]},
        "invalid_examples": tally.bad_keys,
        "width": tally.width.summary(),
        "height": tally.height.summary(),
        "caption_words": tally.words.summary(),
        "mean_image_bytes": (tally.image_bytes.summary() or {}).get("mean"),
        "expected_samples": expected,
        "counts_match": None if expected is None else expected == tally.samples,
        "contact_sheet": None,
        "problems": problems,
        "warnings": warnings,
        "ok": not problems,
    }
    chosen = tally.examples.sample()
    if chosen and (sheet_path or not remote):
        sheet_path = Path(sheet_path) if sheet_path else directory / "contact_sheet.png"
        contact_sheet([(decode_image(data), caption) for data, caption in chosen], sheet_path, columns)
        summary["contact_sheet"] = str(sheet_path)
    if not remote:
        (directory / "inspect.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _stat_line(name: str, stat: dict | None) -> str:
    if stat is None:
        return f"{name}: -"
    return f"{name}: min {stat['min']:g} / mean {stat['mean']:g} / max {stat['max']:g}"


def report(summary: dict) -> str:
    """The human-readable summary printed by the command."""
    reasons = ", ".join(f"{k} {v}" for k, v in summary["invalid_by_reason"].items()) or "none"
    expected = summary["expected_samples"]
    lines = [
        f"{PROG}: {summary['directory']}",
        f"shards: {summary['shards']}  samples: {summary['samples']}  "
        f"valid: {summary['valid']}  invalid: {summary['invalid']}",
        f"invalid by reason: {reasons}",
        *(f"  invalid: {key}" for key in summary["invalid_examples"]),
        _stat_line("image width", summary["width"]),
        _stat_line("image height", summary["height"]),
        _stat_line("caption words", summary["caption_words"]),
        f"mean image bytes: {summary['mean_image_bytes'] if summary['mean_image_bytes'] is not None else '-'}",
        f"dataset.json samples: {'-' if expected is None else expected} "
        f"({'not checked' if expected is None else 'match' if summary['counts_match'] else 'MISMATCH'})",
        f"contact sheet: {summary['contact_sheet'] or '-'}",
        *(f"warning: {w}" for w in summary["warnings"]),
        *(f"problem: {p}" for p in summary["problems"]),
        "OK" if summary["ok"] else "FAILED",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="folder with NAME-NNNNNN.tar shards and dataset.json, its URL, or a shard URL pattern")
    p.add_argument("--contact-sheet", type=Path, default=None, help="PNG to write (default DIR/contact_sheet.png)")
    p.add_argument("--samples", type=int, default=16, help="samples on the contact sheet (0: no sheet)")
    p.add_argument("--columns", type=int, default=4, help="contact sheet columns")
    p.add_argument("--seed", type=int, default=None, help="draw the sheet's samples with this seed (default: the first K)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not is_url(args.directory) and not Path(args.directory).is_dir():
        parser.error(f"{args.directory} is not a directory (nor a URL)")
    if args.samples < 0 or args.columns < 1:
        parser.error("--samples must be >= 0 and --columns >= 1")
    summary = inspect_shards(args.directory, args.contact_sheet, args.samples, args.columns, args.seed)
    print(report(summary))
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
