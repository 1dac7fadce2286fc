"""JSON Lines files (prompt lists, edit manifests): one value per non-blank line."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """``(line number, value)`` for every non-blank line; ``ValueError`` naming ``path:line`` for
    one that is not JSON."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
    return rows
