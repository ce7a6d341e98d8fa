"""Small video files and frame folders (clips and mask clips) for the data and WAN tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def moving_square(frames: int, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames (F, H, W, 3) of a square moving over stripes, and its masks (F, H, W)."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(60, 255, size=3)
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    masks = np.zeros((frames, size, size), dtype=np.uint8)
    video[:, :, ::8] = 200  # vertical stripes
    side = size // 3
    for index in range(frames):
        left = (index * 2) % (size - side)
        video[index, side : 2 * side, left : left + side] = colour
        masks[index, side : 2 * side, left : left + side] = 255
    return video, masks


def write_video(path: Path, frames: np.ndarray, fps: float = 16.0) -> Path:
    """Write (F, H, W, 3) RGB or (F, H, W) grey uint8 frames as an mp4v video."""
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame in frames:
        rgb = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_frames(folder: Path, frames: np.ndarray, prefix: str = "frame") -> Path:
    """Write frames as ``prefix1.png, prefix2.png, ...`` (unpadded: the order is numeric)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames, start=1):
        Image.fromarray(frame).save(folder / f"{prefix}{index}.png")
    return folder
