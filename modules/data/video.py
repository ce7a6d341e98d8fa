"""Clips: video files (read with OpenCV) and folders of frames, and their masks.

A clip trains as ``data.frames`` frames taken from its start at ``data.fps`` (a longer clip, per
``data.frame_windows``, also as windows of that many frames further on:
:mod:`modules.data.frame_windows`). Frame ``k`` is shown at time ``k / fps``; the source frame on
screen then is ``round(k * source_fps / fps)`` (halves round up), so a 30 fps video sampled at
15 fps gives frames 0, 2, 4, ... A folder of frames has no rate of its own: it counts as recorded
at ``data.fps`` and gives consecutive frames, as does ``data.fps = 0`` for any clip.

Masks follow the clip frame for frame: a mask video or a folder of mask frames must have the
clip's frame count and size; a still mask image applies to every frame. On the latent grid a
mask is averaged over the pixels (area interpolation) and over the frames each latent frame
encodes (:func:`reduce_frames`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from modules.config.schema import DataConfig
from modules.data.concept import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ConceptItem,
    DataError,
    list_frames,
)
from modules.data.frame_windows import in_windows, sample_frame_indices, windows_of
from modules.data.images import SizeLike, image_to_tensor, mask_image_to_tensor, open_image


@dataclass(frozen=True)
class ClipInfo:
    frames: int
    """Frames in the clip."""
    fps: float
    """The source frame rate; 0 when unknown (folders of frames)."""
    size: tuple[int, int]
    """(width, height) of a frame."""


def clip_info(path: Path, what: str = "clip") -> ClipInfo:
    """Frame count, rate and size of a video file or a folder of frames."""
    if path.is_dir():
        frames = list_frames(path)
        if not frames:
            raise DataError(f"{what} folder '{path}' has no frame images: add them or remove it")
        return ClipInfo(frames=len(frames), fps=0.0, size=open_image(frames[0], what).size)
    capture = _open_video(path, what)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        size = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        capture.release()
    if count <= 0:
        count = _count_frames(path, what)  # some containers do not store the frame count
    return ClipInfo(frames=count, fps=fps if fps > 0 else 0.0, size=size)


def clip_frame_indices(
    path: Path, info: ClipInfo, frames: int, fps: float, start: int = 0
) -> list[int]:
    """The source frames to train on, from frame ``start`` (at ``fps``: a window's); a
    DataError naming the clip when it is too short for its first window."""
    head = sample_frame_indices(frames, source_fps=info.fps, fps=fps)
    if head[-1] >= info.frames:
        rate = info.fps if info.fps > 0 else fps
        have = f"{info.frames} frames" + (f" ({info.frames / rate:.2f} s)" if rate > 0 else "")
        need = f"{head[-1] + 1} source frames"
        if fps > 0 and frames > 1:
            need += f" ({(frames - 1) / fps:.2f} s at data.fps={fps:g})"
        raise DataError(
            f"clip '{path}' has {have} but data.frames={frames} needs {need}: lower "
            "data.frames or data.fps, or replace the clip with a longer one"
        )
    indices = sample_frame_indices(frames, source_fps=info.fps, fps=fps, start=start)
    if indices[-1] >= info.frames:
        raise DataError(
            f"clip '{path}' has {info.frames} frames, too few for its window from frame {start} "
            "(it changed after the windows were counted): start the run again"
        )
    return indices


def clip_window_starts(path: Path, info: ClipInfo, data: DataConfig) -> list[int]:
    """The first frames (at ``data.fps``) of the clip's windows in ``data.frame_windows``
    (:mod:`modules.data.frame_windows`); a DataError naming the clip when it is shorter than
    ``data.frames``."""
    clip_frame_indices(path, info, data.frames, data.fps)  # a clip too short: said with the fix
    return windows_of(info.frames, info.fps, data)


def window_counts(items: Iterable[ConceptItem], data: DataConfig) -> list[tuple[Path, int]]:
    """(clip, windows) for each clip among ``items`` in ``data.frame_windows``, from the clips'
    headers; none for ``head`` or 1-frame clips (:func:`in_windows`). A clip that cannot be
    read or is too short is left out: the cache build names it with the fix."""
    if not in_windows(data):
        return []
    counts = []
    for item in items:
        if not item.clip:
            continue
        try:
            starts = clip_window_starts(item.image, clip_info(item.image), data)
        except DataError:
            continue
        counts.append((item.image, len(starts)))
    return counts


def load_clip(path: Path, indices: Sequence[int], size: SizeLike) -> Tensor:
    """The frames at ``indices`` as (3, F, H, W) in [-1, 1], cropped like still images."""
    frames = [image_to_tensor(image, size) for image in _read_frames(path, indices, "clip")]
    return torch.stack(frames, dim=1)  # F × (3, H, W) → (3, F, H, W)


def load_clip_mask(
    mask: Path, clip: Path, info: ClipInfo, indices: Sequence[int], size: SizeLike
) -> Tensor:
    """The clip's mask at the frames ``indices`` as (1, F, H, W) weights in [0, 1], cut and
    resized as the clip's frames.

    ``mask`` is a mask video, a folder of mask frames (one per clip frame) or one still mask.
    """
    if mask.is_dir() or mask.suffix.lower() in VIDEO_EXTENSIONS:
        check_clip_mask(mask, clip, info)
        images = _read_frames(mask, indices, "mask")
        if mask.is_dir():  # frame folders may mix sizes; each mask frame must match
            for image in images:
                _check_size(mask, image.size, clip, info.size)
        frames = [mask_image_to_tensor(image, size) for image in images]
        return torch.cat(frames, dim=0).unsqueeze(0)  # F × (1, H, W) → (1, F, H, W)
    if mask.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"mask '{mask}' is not an image, a video or a folder of frames")
    still = open_image(mask, "mask")
    _check_size(mask, still.size, clip, info.size)
    weights = mask_image_to_tensor(still, size)  # (1, H, W)
    return weights.unsqueeze(1).expand(1, len(indices), *weights.shape[1:]).contiguous()


def clip_mask_to_latent(mask: Tensor, size: tuple[int, int], latent_frames: int) -> Tensor:
    """A clip mask (1, F, H, W) on the latent grid (1, F', h, w): area-averaged in space, then
    averaged over the frames of each latent frame (:func:`reduce_frames`)."""
    if mask.dim() != 4 or mask.shape[0] != 1:
        raise ValueError(f"clip_mask_to_latent expects (1, F, H, W), got {tuple(mask.shape)}")
    spatial = F.interpolate(mask, size=size, mode="area")  # frames as channels: (1, F, h, w)
    return reduce_frames(spatial, latent_frames)


def reduce_frames(mask: Tensor, latent_frames: int) -> Tensor:
    """Average a per-frame mask (1, F, h, w) over the frames each latent frame encodes.

    WAN's causal VAE encodes frame 0 alone into latent frame 0, then each next ``k`` frames into
    one latent frame (``k = (F - 1) / (F' - 1)``, 4 for WAN): latent frame ``j >= 1`` gets the
    mean of frames ``(j - 1) k + 1 .. j k``.
    """
    frames = mask.shape[1]
    if latent_frames == frames:
        return mask
    if latent_frames < 2 or (frames - 1) % (latent_frames - 1):
        raise ValueError(
            f"{frames} frames do not reduce to {latent_frames} latent frames "
            "(expected F = (F' - 1) k + 1)"
        )
    k = (frames - 1) // (latent_frames - 1)
    rest = mask[:, 1:].unflatten(1, (latent_frames - 1, k)).mean(dim=2)  # (1, F'-1, h, w)
    return torch.cat([mask[:, :1], rest], dim=1)  # (1, F', h, w)


def check_clip_mask(mask: Path, clip: Path, info: ClipInfo) -> None:
    """A DataError naming a mask video or mask frame folder whose frame count or frame size
    (read from its header or first frame) is not its clip's; the pre-flight checks this before
    a run loads its model. A still mask image is checked by :func:`check_still_mask`."""
    mask_info = clip_info(mask, "mask")
    if mask_info.frames != info.frames:
        raise DataError(
            f"mask '{mask}' has {mask_info.frames} frames but its clip '{clip.name}' has "
            f"{info.frames}: re-export the mask with one frame per clip frame"
        )
    _check_size(mask, mask_info.size, clip, info.size)


def check_still_mask(mask: Path, size: tuple[int, int], clip: Path, info: ClipInfo) -> None:
    """A DataError naming a still mask image of ``size`` that is not its clip's frame size."""
    _check_size(mask, size, clip, info.size)


def _check_size(mask: Path, size: tuple[int, int], clip: Path, clip_size: tuple[int, int]) -> None:
    if tuple(size) != tuple(clip_size):
        width, height = clip_size
        raise DataError(
            f"mask '{mask}' is {size[0]}×{size[1]} but its clip '{clip.name}' is "
            f"{width}×{height}: re-export the mask at {width}×{height}"
        )


def _read_frames(path: Path, indices: Sequence[int], what: str) -> list[Image.Image]:
    """The frames at ``indices`` (ascending, repeats allowed) as RGB PIL images."""
    if path.is_dir():
        files = list_frames(path)
        return [open_image(files[index], what) for index in indices]
    wanted = sorted(set(indices))
    wanted_set = set(wanted)
    found: dict[int, Image.Image] = {}
    capture = _open_video(path, what)
    try:
        # Read forward frame by frame: seeking is not frame-exact in every container. Frames
        # before a window's are grabbed without being converted.
        for index in range(wanted[-1] + 1):
            ok = capture.grab()
            if ok and index in wanted_set:
                ok, frame = capture.retrieve()
                if ok:
                    found[index] = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if not ok:
                raise DataError(
                    f"{what} '{path}' ends after {index} frames, before frame {wanted[-1] + 1}: "
                    "lower data.frames or data.fps, or re-encode the file"
                )
    finally:
        capture.release()
    return [found[index] for index in indices]


def _open_video(path: Path, what: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise DataError(
            f"cannot read {what} video '{path}': re-encode it (H.264 mp4 reads everywhere) or "
            "remove it from the concept folder"
        )
    return capture


def _count_frames(path: Path, what: str) -> int:
    capture = _open_video(path, what)
    try:
        count = 0
        while capture.grab():
            count += 1
    finally:
        capture.release()
    return count
