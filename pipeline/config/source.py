"""The config type of a field that names shard data: a local ``Path``, or a ``URL`` kept as text.

``Path("https://host/latents/")`` collapses ``//`` and would break the URL, so a field typed
:data:`Source` (``URL | Path``) keeps anything with a scheme (``https://``, ``s3://``, ``file://``)
or a ``pipe:`` command as a :class:`URL` (a ``str``) and makes everything else a ``Path``: code
that joins a local folder (``cfg.data.latents / "dataset.json"``) keeps working, and readers
(``pipeline.data.remote``) take either.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(source: object) -> bool:
    """True for ``scheme://…`` text and ``pipe:CMD`` (WebDataset's convention); a Path is never one."""
    if isinstance(source, PurePath) or not isinstance(source, str):
        return False
    return bool(_SCHEME.match(source)) or source.startswith("pipe:")


class URL(str):
    """Text that names remote data (``https://…``, ``s3://…``, ``pipe:…``); construction checks it."""

    def __new__(cls, value: str) -> URL:
        if not is_url(value):
            raise ValueError(f"not a URL (scheme://… or pipe:…): {value!r}")
        return super().__new__(cls, value)


Source = URL | Path  # the config schema tries URL first, then Path
