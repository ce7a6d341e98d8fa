"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over
the target. A crash or an error mid-write leaves the old file as it was, never half a file.

The new file gets the mode an ordinary ``open()`` would give it (0o666 less the umask), not the
owner-only mode of :func:`tempfile.mkstemp`, so a LoRA or preset is as readable by other
programs as any file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    """Read once, at import: setting and restoring the umask is not safe while threads run."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write the new content there. On a clean exit it
    is synced and renamed over ``path``; on an exception it is removed and ``path`` kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _FILE_MODE)
        with temporary.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
