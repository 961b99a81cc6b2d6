"""Small file helpers every layer may use (it imports nothing of the project): a file's sha256 and atomic writes.

Kept apart so that ``models`` (weights hashing), ``stages`` (output items) and ``pipeline.training`` (model cards)
share one implementation without importing each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (e.g. a model's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_target(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``path``, to be ``os.replace``'d onto it when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = atomic_target(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj: dict, path: str | Path) -> None:
    """``obj`` as indented JSON at ``path``, atomically (:func:`write_text_atomic`)."""
    write_text_atomic(json.dumps(obj, indent=2, default=str), path)
