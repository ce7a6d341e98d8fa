"""Reading a concept's images and clips as pixels, and writing their masks atomically.

Where masks go (the names ``modules.data.concept`` matches):

- an image ``name.jpg``: ``name-masklabel.png``;
- a folder of frames ``name/``: a folder ``name-masklabel/`` with one PNG per frame, in the
  clip's order (``00000.png``, ``00001.png``, ...);
- a video ``name.mp4`` (or ``.webm``, ``.mov``, ``.mkv``): ``name-masklabel.mkv``, FFV1, which
  is lossless, so every grey level reads back exactly as written.

Every mask appears whole or not at all: it is written under a hidden temporary name next to its
target (``.name-masklabel.png.<random>.tmp``; a dot file, so a scan of the folder skips it) and
renamed over the target when complete. A run that is killed can leave such a temporary file;
:func:`remove_leftovers` clears them at the start of the next run.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from modules.atomic import replacing, write_bytes_atomic
from modules.data.concept import MASK_SUFFIX, VIDEO_EXTENSIONS, list_frames

MASK_VIDEO_EXTENSION = ".mkv"
MASK_VIDEO_CODEC = "FFV1"
"""Lossless, written and read by OpenCV's FFmpeg backend; H.264 and MPEG-4 shift grey levels."""
FALLBACK_FPS = 25.0
"""Frame rate a mask video gets when its clip's is unknown (it is never used for timing: masks
are matched to clip frames by index)."""


def mask_path(item: Path) -> Path:
    """Where the generated mask of an image or clip goes."""
    stem = item.name if item.is_dir() else item.stem
    if item.is_dir():
        return item.parent / f"{stem}{MASK_SUFFIX}"
    if item.suffix.lower() in VIDEO_EXTENSIONS:
        return item.parent / f"{stem}{MASK_SUFFIX}{MASK_VIDEO_EXTENSION}"
    return item.parent / f"{stem}{MASK_SUFFIX}.png"


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright (its EXIF orientation applied), as the
    trainer shows it; transparent pixels over white."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def clip_frames(clip: Path) -> Iterator[np.ndarray]:
    """A clip's frames in order, each (H, W, 3) uint8 RGB."""
    if clip.is_dir():
        for frame in list_frames(clip):
            yield read_rgb(frame)
        return
    capture = cv2.VideoCapture(str(clip))
    if not capture.isOpened():
        capture.release()
        raise OSError(f"cannot read video '{clip}': re-encode it (H.264 mp4) or remove it")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def clip_fps(clip: Path) -> float:
    if clip.is_dir():
        return FALLBACK_FPS
    capture = cv2.VideoCapture(str(clip))
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()
    return fps if fps > 0 else FALLBACK_FPS


def png_bytes(mask: np.ndarray) -> bytes:
    """A uint8 (H, W) mask as an 8-bit grey PNG."""
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask_image(target: Path, mask: np.ndarray) -> None:
    write_bytes_atomic(target, png_bytes(mask))


def write_mask_frames(target: Path, masks: list[np.ndarray]) -> None:
    """A folder of mask frames, built in a hidden temporary folder and renamed into place (an
    existing folder is moved aside first and removed after)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only
        for index, mask in enumerate(masks):
            (staging / f"{index:05d}.png").write_bytes(png_bytes(mask))
        _sync_folder(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_mask_video(target: Path, masks: list[np.ndarray], fps: float) -> None:
    """A lossless (FFV1) mask video, written under a temporary name and renamed into place."""
    with replacing(target) as temporary:
        # OpenCV picks the container by the extension, so the video gets one of its own first.
        video = temporary.with_name(temporary.name + MASK_VIDEO_EXTENSION)
        try:
            height, width = masks[0].shape
            codec = cv2.VideoWriter_fourcc(*MASK_VIDEO_CODEC)
            writer = cv2.VideoWriter(str(video), codec, fps, (width, height))
            if not writer.isOpened():
                raise OSError(
                    f"OpenCV cannot write an {MASK_VIDEO_CODEC} video for '{target}': reinstall "
                    "opencv-python-headless (its wheels include FFmpeg)"
                )
            try:
                for mask in masks:
                    writer.write(cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))
            finally:
                writer.release()
            os.replace(video, temporary)
        finally:
            video.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the hidden temporary masks an interrupted run left in ``folder``; they are named
    ``.<something>-masklabel<...>.tmp<...>`` and no other program writes such names."""
    removed = []
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") and MASK_SUFFIX in name and ".tmp" in name:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old.tmp"))
    old.rmdir()
    target.rename(old)  # moved aside, not deleted, until the new folder is in place
    staging.rename(target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb+") as file:
            os.fsync(file.fileno())
