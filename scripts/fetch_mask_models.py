"""Fetch the person-mask models once: MediaPipe's .tflite files from its PyPI wheel.

    python scripts/fetch_mask_models.py [--wheel mediapipe-0.10.21-....whl] [--force]

Downloads the ``mediapipe`` wheel with pip (no dependencies, never installed), extracts only
the model files the mask generator runs and the wheel's licence (Apache 2.0) into
``modules/masks/models/``, and checks that each loads with LiteRT. Does nothing when the files
are already there. The folder appears whole or not at all: the files are extracted into a
temporary folder next to it, checked, then renamed into place. ``--wheel`` takes a wheel
downloaded before (for a machine without internet access).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.masks.model_files import (
    LICENCE_FILE,
    MEDIAPIPE_VERSION,
    MODEL_DIR,
    MODEL_FILES,
    WHEEL_LICENCE,
    load_interpreter,
    missing_models,
)


def download_wheel(into: Path) -> Path:
    """The mediapipe wheel for Linux x86_64, CPython 3.11 (the models are the same in every
    platform's wheel, so one wheel serves every machine)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
        "--quiet", f"mediapipe=={MEDIAPIPE_VERSION}", "-d", str(into),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    wheels = sorted(into.glob(f"mediapipe-{MEDIAPIPE_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip left no mediapipe {MEDIAPIPE_VERSION} wheel in '{into}'")
    return wheels[0]


def extract(wheel: Path, into: Path) -> None:
    """The model files and the licence from ``wheel`` into the folder ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        wanted = {**MODEL_FILES, LICENCE_FILE: WHEEL_LICENCE}
        absent = [inside for inside in wanted.values() if inside not in names]
        if absent:
            raise SystemExit(f"'{wheel.name}' lacks {', '.join(absent)}: is it mediapipe?")
        for name, inside in wanted.items():
            (into / name).write_bytes(archive.read(inside))


def verify(folder: Path) -> None:
    """Every model file loads and allocates its tensors."""
    for name in MODEL_FILES:
        try:
            load_interpreter(folder / name, threads=1)
        except (RuntimeError, ValueError) as error:
            raise SystemExit(f"model '{folder / name}' does not load ({error})") from error


def install(folder: Path, wheel: Path | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-new-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        with tempfile.TemporaryDirectory() as download:
            extract(wheel or download_wheel(Path(download)), staging)
        verify(staging)
        old = folder.parent / f".{folder.name}-old"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help="use this mediapipe wheel, no download")
    parser.add_argument("--force", action="store_true", help="fetch even when present")
    parser.add_argument("--dir", type=Path, default=MODEL_DIR, help="model folder")
    args = parser.parse_args(argv)
    folder: Path = args.dir
    if not args.force and not missing_models(folder) and (folder / LICENCE_FILE).is_file():
        print(f"mask models present in {folder}")
        return 0
    install(folder, args.wheel)
    print(f"mask models (mediapipe {MEDIAPIPE_VERSION}, Apache 2.0) in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
