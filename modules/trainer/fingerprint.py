"""The dataset a backup was trained on, in a few bytes per item, so that a resumed run can say
whether the images changed since.

Each training item is named by its concept (its place in ``data.concepts``) and its path in the
concept folder, and recorded as its image's (size, modification time, content hash), its
mask's, and a hash of its caption. Comparing two prints counts the items added, removed and
edited (image, mask or caption). Hashing reads every file once; a file whose size and
modification time match the print it is compared with keeps that print's hash unread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from modules.data.concept import ConceptScan, list_frames

VERSION = 1
FilePrint = list[Any]
"""[size in bytes, modification time in ns, content hash]; a frame folder sums its frames' sizes
and takes their newest time."""


def dataset_print(scans: list[ConceptScan], known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The print of every item of ``scans``; ``known``: an earlier print whose hashes are reused
    for files that kept their size and modification time."""
    before = (known or {}).get("items", {})
    items: dict[str, dict[str, Any]] = {}
    for number, scan in enumerate(scans):
        for item in scan.items:
            name = f"{number}/{_relative(item.image, scan.folder)}"
            old = before.get(name) or {}
            items[name] = {
                "image": _file_print(item.image, old.get("image")),
                "mask": _file_print(item.mask, old.get("mask")) if item.mask else None,
                "caption": _hash_bytes(item.caption.encode("utf-8")),
            }
    return {"version": VERSION, "items": items}


def dataset_changes(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``'2 added, 1 removed, 3 edited (image, mask or caption) of the backup's 12 items'``, or
    None when every item is as it was."""
    before, now = old.get("items", {}), new.get("items", {})
    added = len(now.keys() - before.keys())
    removed = len(before.keys() - now.keys())
    edited = sum(1 for name in before.keys() & now.keys() if not _same(before[name], now[name]))
    if not (added or removed or edited):
        return None
    return (
        f"{added} added, {removed} removed, {edited} edited (image, mask or caption) "
        f"of the backup's {len(before)} items"
    )


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    def content(file: FilePrint | None) -> Any:
        return None if file is None else file[2]

    return (
        content(old.get("image")) == content(new.get("image"))
        and content(old.get("mask")) == content(new.get("mask"))
        and old.get("caption") == new.get("caption")
    )


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name


def _file_print(path: Path, known: FilePrint | None) -> FilePrint:
    try:
        return _read_print(path, known)
    except OSError:  # gone or unreadable since the scan: the cache build names it
        return [-1, -1, "unreadable"]


def _read_print(path: Path, known: FilePrint | None) -> FilePrint:
    files = list_frames(path) if path.is_dir() else [path]
    stats = [file.stat() for file in files]
    size = sum(stat.st_size for stat in stats)
    mtime = max((stat.st_mtime_ns for stat in stats), default=0)
    if known is not None and list(known[:2]) == [size, mtime]:
        return [size, mtime, known[2]]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        if path.is_dir():  # the frames' order is part of the clip
            digest.update(file.name.encode("utf-8"))
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return [size, mtime, digest.hexdigest()]


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
