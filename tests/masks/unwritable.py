"""A folder no mask can be written to, for the mask tests, whoever runs them."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[Path]:
    """``folder`` made unwritable: read-only for a user; immutable for root, whom permissions
    do not stop (``chattr +i``: even root can create nothing in it). Skips, saying why, where
    neither works."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        try:
            made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("cannot make a folder unwritable for root here: no chattr")
        if made.returncode != 0:
            pytest.skip(f"cannot make a folder unwritable for root here: {made.stderr.strip()}")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)
