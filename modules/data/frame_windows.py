"""Frame windows: which stretches of ``data.frames`` frames a long clip trains
(``data.frame_windows``).

Everything here counts frames at ``data.fps``, the rate clips are sampled at
(:mod:`modules.data.video`): frame ``k`` of a clip is source frame ``round(k * source_fps / fps)``
(halves round up), and a window starting at frame ``s`` takes frames ``s .. s + frames - 1``:
its source frames continue the clip's own at the same rate (a window from 4 takes the source
frames the first window's 5th, 6th, ... frames would). A clip of ``n`` frames at ``data.fps``
gives windows starting at

- ``head``: 0 only (what a clip trained before windows existed: its cache keys are unchanged);
- ``chunk``: 0, ``frames``, ``2 frames``, ...: consecutive windows end to end, as many as fit;
- ``slide``: 0, ``window_stride``, ``2 window_stride``, ...: while a whole window fits;
- ``uniform``: ``window_count`` starts spread evenly from 0 to the last start that fits,
  ``n - frames`` (fewer when the clip has fewer distinct starts).

A clip shorter than one window has none (the cache build names it with the fix). With
``data.frames = 1`` a clip trains its first frame only, as a still image, whatever the mode.

No torch and no OpenCV here: the UI counts a concept's windows from its clips' headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from modules.config.schema import DataConfig
from modules.data.concept import NAMED, count_of

WindowMode = Literal["head", "chunk", "slide", "uniform"]


def in_windows(data: DataConfig) -> bool:
    """Whether ``data`` cuts clips into windows: a mode other than ``head``, and clips of more
    than one frame (``data.frames = 1`` trains a clip's first frame, as a still)."""
    return data.frame_windows != "head" and data.frames > 1


def sample_frame_indices(count: int, *, source_fps: float, fps: float, start: int = 0) -> list[int]:
    """Indices of ``count`` frames at ``fps`` taken from a clip at ``source_fps``, from frame
    ``start`` (counted at ``fps``).

    ``fps`` 0 or an unknown source rate (0) take consecutive frames. A target rate above the
    source's repeats frames.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if start < 0:
        raise ValueError(f"start must be at least 0, got {start}")
    if fps <= 0 or source_fps <= 0:
        return list(range(start, start + count))
    return [_source_index(k, source_fps / fps) for k in range(start, start + count)]


def frames_at_rate(source_frames: int, *, source_fps: float, fps: float) -> int:
    """How many frames at ``fps`` a clip of ``source_frames`` frames at ``source_fps`` shows:
    the frames ``k`` whose source frame (:func:`sample_frame_indices`) is in the clip."""
    if source_frames <= 0:
        return 0
    if fps <= 0 or source_fps <= 0:
        return source_frames
    step = source_fps / fps
    last = int((source_frames - 0.5) / step)  # close; the loops settle float rounding
    while _source_index(last + 1, step) < source_frames:
        last += 1
    while last >= 0 and _source_index(last, step) >= source_frames:
        last -= 1
    return last + 1


def window_starts(
    available: int, frames: int, mode: WindowMode, *, stride: int = 1, count: int = 1
) -> list[int]:
    """The first frames (at ``data.fps``) of the windows of ``frames`` frames that a clip of
    ``available`` frames gives in ``mode``; empty when no window fits."""
    if frames < 1 or stride < 1 or count < 1:
        raise ValueError(f"frames, stride, count must be at least 1: {frames}, {stride}, {count}")
    last = available - frames  # the last start at which a whole window fits
    if last < 0:
        return []
    if mode == "head":
        return [0]
    if mode == "chunk":
        return list(range(0, last + 1, frames))
    if mode == "slide":
        return list(range(0, last + 1, stride))
    if mode == "uniform":
        if count == 1 or last == 0:
            return [0]
        # round(i * last / (count - 1)), halves up, in integers; a short clip repeats starts.
        spread = ((2 * i * last + count - 1) // (2 * (count - 1)) for i in range(count))
        return sorted(set(spread))
    raise ValueError(f"unknown frame window mode {mode!r}: head, chunk, slide or uniform")


def windows_of(source_frames: int, source_fps: float, data: DataConfig) -> list[int]:
    """The first frames (at ``data.fps``) of the windows ``data`` takes from a clip of
    ``source_frames`` frames at ``source_fps`` (0: unknown); empty when it is too short."""
    available = frames_at_rate(source_frames, source_fps=source_fps, fps=data.fps)
    return window_starts(
        available,
        data.frames,
        data.frame_windows,
        stride=data.window_stride,
        count=data.window_count,
    )


def window_lines(counts: Sequence[tuple[Path, int]], frames: int) -> list[str]:
    """What the start of a run (and ``check``) says about the windows: one line per clip that
    gives more than one (``walk.mp4: 4 windows of 33 frames``), or one summary line when there
    are many such clips. ``counts``: (clip, windows) for each clip."""
    several = [(path, n) for path, n in counts if n > 1]
    if not several:
        return []
    size = count_of(frames, "frame")
    if len(several) <= 2 * NAMED:
        return [f"{path.name}: {n} windows of {size}" for path, n in several]
    total = sum(n for _, n in counts)
    named = ", ".join(f"{path.name} {n}" for path, n in several[:NAMED])
    return [
        f"{len(counts)} clips give {total} windows of {size} ({named}, ...; "
        f"{len(several)} clips give more than one)"
    ]


def _source_index(k: int, step: float) -> int:
    return int(k * step + 0.5)
