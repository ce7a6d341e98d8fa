"""Masks for every image and clip of a concept folder, with an overwrite policy.

``overwrite``:

- ``"missing"`` (the default): write masks for the items without one; an existing mask is
  kept, and one that cannot be used (it does not decode, or has the wrong size or frame count)
  is reported in ``failed`` with the fix, never replaced: it may be hours of painting;
- ``"never"``: write masks for the items without one; existing masks are not even read;
- ``"all"``: replace every mask.

Every item is counted once: ``written + kept + no_person + failed`` is the number of images
and clips (less ``not_done`` when cancelled). Under ``"all"``, an existing mask of an item in
which nothing is found is left as it was and counted as kept.

Masks are written next to their images, so a folder that cannot be written (read-only, full)
is refused before anything is detected, when some item would get a mask.

``mode`` "difference" makes the masks of an edit concept's pairs: where each target differs
from its first reference (beside it as ``name-ref.png``, or in the first of ``reference_dirs``),
at the tier levels (:mod:`modules.masks.difference`); the references are not items.

Clips get one mask per frame, each frame's the median of its own and its neighbours' (a
temporal median of three keeps the exact tier levels and removes one-frame flicker). A clip in
which no frame shows a person is reported like an image without one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from modules.config.schema import ConceptConfig, MaskTiersConfig
from modules.data.concept import (
    MASK_SUFFIX,
    VIDEO_EXTENSIONS,
    ConceptItem,
    DataError,
    list_frames,
    scan_concept,
)
from modules.data.conditioning import conditioning_sources
from modules.masks.difference import NEAR, THRESHOLD, aspect_note, generate_difference
from modules.masks.generated import GeneratedMask
from modules.masks.mask_files import (
    clip_fps,
    clip_frames,
    mask_path,
    read_rgb,
    remove_leftovers,
    write_mask_frames,
    write_mask_image,
    write_mask_video,
)
from modules.masks.person import generate_tiers
from modules.masks.subject import generate_subject, margin_box
from modules.models.spec import ConditioningKind

Mode = Literal["tiers", "subject", "difference"]
_REFERENCES = ConditioningKind(name="reference", source="references", most=99)
"""Any number of references: a difference mask compares the target with the first."""
Overwrite = Literal["never", "missing", "all"]
_READ_ERRORS = (OSError, ValueError, SyntaxError, cv2.error)


@dataclass(frozen=True)
class MaskSummary:
    written: list[Path]
    """Masks written (the mask files or folders)."""
    kept: list[Path]
    """Existing masks left as they were (with ``overwrite`` "all": those of the items in which
    nothing was found, listed in ``kept_unfound``)."""
    no_person: list[Path]
    """Images and clips in which nothing was found (no person; in subject mode, no subject)
    and that had no mask: they got none."""
    failed: list[tuple[Path, str]]
    """Images and clips that could not be read or written, with the reason."""
    cancelled: bool
    """Stopped by ``cancel`` before every item was done."""
    removed_leftovers: list[Path] = field(default_factory=list)
    """Temporary files an interrupted earlier run had left, removed at the start."""
    kept_unfound: list[Path] = field(default_factory=list)
    """Images and clips in which nothing was found whose existing mask was kept (counted in
    ``kept``; only with ``overwrite`` "all")."""
    total: int = 0
    """Images and clips in the folder."""
    notes: list[str] = field(default_factory=list)
    """What is worth knowing about masks that were written (a reference stretched to its
    target's shape), one line each."""

    @property
    def not_done(self) -> int:
        """Items a cancel left untouched: the four counts and this add up to ``total``."""
        done = len(self.written) + len(self.kept) + len(self.no_person) + len(self.failed)
        return max(self.total - done, 0)

    def line(self, sought: str = "person") -> str:
        """One line for a terminal or a status bar; ``sought``: "person" or "subject"."""
        text = (
            f"{len(self.written)} written, {len(self.kept)} kept, "
            f"{len(self.no_person)} with no {sought} found, {len(self.failed)} failed"
        )
        if self.failed:
            text += " (" + "; ".join(f"{path.name}: {why}" for path, why in self.failed[:3])
            text += "; ...)" if len(self.failed) > 3 else ")"
        if self.cancelled:
            text += f" - cancelled, {self.not_done} not done"
        return text


def masks_for_concept(
    folder: Path,
    *,
    mode: Mode = "tiers",
    overwrite: Overwrite = "missing",
    tiers: MaskTiersConfig | None = None,
    model_path: str | None = None,
    on_progress: Callable[[int, int, Path], None] | None = None,
    cancel: threading.Event | None = None,
    box_margin: float = 0.05,
    value: int = 255,
    reference_dirs: Sequence[Path] = (),
    threshold: float = THRESHOLD,
    near: float = NEAR,
) -> MaskSummary:
    """Generate the masks of a concept folder's images and clips (see the module docstring).

    ``mode`` "tiers" makes face/body/hair person masks at ``tiers``' levels (the defaults when
    None); "subject" makes ``value`` masks of the main subject: with ``model_path`` (an ONNX
    segmentation model) by that model, else by GrabCut from a box ``box_margin`` (a fraction of
    each side) inside the picture's edges; "difference" makes each pair's mask of where the
    target differs from its first reference (in ``reference_dirs`` when given, else beside it)
    by more than ``threshold`` grey levels, with a ``near`` band around it (see
    :mod:`modules.masks.difference`). ``on_progress(done, total, item)`` is called after
    each item; ``cancel`` is checked between items and between a clip's frames.

    Raises ``modules.data.concept.DataError`` when the folder is missing, has no images, or
    cannot be written while some item would get a mask (checked before anything is detected),
    and ``MaskModelsMissing`` when the person models have not been fetched.
    """
    if overwrite not in ("never", "missing", "all"):
        raise ValueError(f"overwrite must be never, missing or all, not {overwrite!r}")
    if mode not in ("tiers", "subject", "difference"):
        raise ValueError(f"mode must be tiers, subject or difference, not {mode!r}")
    folder = Path(folder)
    tiers = tiers or MaskTiersConfig()
    scan = scan_concept(ConceptConfig(path=str(folder)), references=mode == "difference")
    if overwrite == "all" or any(item.mask is None for item in scan.items):
        check_writable(folder)
    leftovers = remove_leftovers(folder)

    notes: list[str] = []

    def generate(image: np.ndarray, item: ConceptItem) -> GeneratedMask:
        if mode == "tiers":
            return generate_tiers(image, tiers)
        if mode == "difference":
            reference = _first_reference(item, reference_dirs)
            pixels = read_rgb(reference)
            note = aspect_note(item.image, _size(image), reference, _size(pixels))
            if note:
                notes.append(note)
            return generate_difference(image, pixels, tiers, threshold=threshold, near=near)
        box = None if model_path else margin_box(image.shape, box_margin)
        return generate_subject(image, box=box, model_path=model_path, value=value)

    written: list[Path] = []
    kept: list[Path] = []
    nothing: list[Path] = []
    kept_unfound: list[Path] = []
    failed: list[tuple[Path, str]] = []
    cancelled = False
    total = len(scan.items)
    for done, item in enumerate(scan.items, start=1):
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        existing = item.mask
        if existing is not None and overwrite != "all":
            problem = None if overwrite == "never" else _unusable(existing, item)
            if problem is None:
                kept.append(existing)
            else:
                failed.append(
                    (
                        existing,
                        f"{problem}; it was kept: fix or delete it, or use overwrite all",
                    )
                )
        else:
            target = mask_path(item.image)
            try:
                outcome = _make(item, generate, target, cancel)
            except _READ_ERRORS as error:
                why = str(error) if existing is None else f"{error}; its mask was kept"
                failed.append((item.image, why))
            else:
                if outcome == "cancelled":
                    cancelled = True
                    break
                if outcome == "nothing" and existing is not None:
                    kept.append(existing)  # "all" found nothing to replace it with
                    kept_unfound.append(item.image)
                elif outcome == "nothing":
                    nothing.append(item.image)
                else:
                    written.append(target)
                    if existing is not None and existing != target:
                        _remove(existing)  # replaced by a mask of another form
        if on_progress is not None:
            on_progress(done, total, item.image)
    return MaskSummary(
        written=written,
        kept=kept,
        no_person=nothing,
        failed=failed,
        cancelled=cancelled,
        removed_leftovers=leftovers,
        kept_unfound=kept_unfound,
        total=total,
        notes=notes,
    )


def _first_reference(item: ConceptItem, reference_dirs: Sequence[Path]) -> Path:
    """The pair's first reference; a ValueError naming the file to add when it has none."""
    if item.clip:
        raise ValueError("difference masks are made for image pairs, not clips")
    found = conditioning_sources(item, _REFERENCES, [Path(d) for d in reference_dirs])
    if found:
        return found[0]
    if reference_dirs:
        where = f"add '{Path(reference_dirs[0]) / item.image.name}'"
    else:
        where = f"add '{item.image.stem}-ref.png' beside it"
    raise ValueError(f"no reference image to compare with: {where}")


def _size(image: np.ndarray) -> tuple[int, int]:
    """(width, height) of an (H, W, 3) image."""
    return image.shape[1], image.shape[0]


def check_writable(folder: Path) -> None:
    """Raise ``DataError`` naming ``folder`` and the fix when no mask can be written there.

    ``os.access`` answers for permissions, but not for every case (root writes past them, a
    full disk or a quota refuses what permissions allow), so a small hidden file is written and
    removed too. Its name is one ``remove_leftovers`` clears should the process die meanwhile.
    """
    reason = None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"
    if reason is None:
        try:
            handle, name = tempfile.mkstemp(
                dir=folder, prefix=f".write-check{MASK_SUFFIX}.", suffix=".tmp"
            )
            try:
                os.write(handle, b"mask")
                os.fsync(handle)
            finally:
                os.close(handle)
                os.unlink(name)
        except OSError as error:
            reason = error.strerror or str(error)
    if reason is not None:
        raise DataError(
            f"concept folder '{folder}' cannot be written ({reason}): masks are written next "
            "to their images; make the folder writable (or free space) and run again, or copy "
            "the concept to a folder you can write"
        )


def _make(
    item: ConceptItem,
    generate: Callable[[np.ndarray, ConceptItem], GeneratedMask],
    target: Path,
    cancel: threading.Event | None,
) -> Literal["written", "nothing", "cancelled"]:
    if not item.clip:
        result = generate(read_rgb(item.image), item)
        if result.mask is None:
            return "nothing"
        write_mask_image(target, result.mask)
        return "written"
    masks: list[np.ndarray | None] = []
    shape: tuple[int, int] | None = None
    for frame in clip_frames(item.image):
        if cancel is not None and cancel.is_set():
            return "cancelled"
        shape = shape or frame.shape[:2]
        masks.append(generate(frame, item).mask)
    if shape is None:
        raise OSError(f"clip '{item.image}' has no frames")
    if all(mask is None for mask in masks):
        return "nothing"
    levels = _smooth_in_time([np.zeros(shape, np.uint8) if m is None else m for m in masks])
    if item.image.is_dir():
        write_mask_frames(target, levels)
    else:
        write_mask_video(target, levels, clip_fps(item.image))
    return "written"


def _smooth_in_time(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each frame's median with its neighbours (the ends with themselves): (F, H, W) uint8."""
    if len(masks) < 3:
        return masks
    stack = np.stack(masks)  # (F, H, W)
    padded = np.concatenate([stack[:1], stack, stack[-1:]])  # (F + 2, H, W)
    windows = np.stack([padded[:-2], padded[1:-1], padded[2:]])  # (3, F, H, W)
    return list(np.median(windows, axis=0).astype(np.uint8))


def _unusable(mask: Path, item: ConceptItem) -> str | None:
    """Why an existing mask cannot be used with its image or clip (it does not decode, or its
    size or frame count differs), or None."""
    try:
        if not item.clip:
            with Image.open(item.image) as image, Image.open(mask) as painted:
                painted.load()
                size, own = _upright(image), _upright(painted)
            if size != own:
                return f"the mask is {own[0]}x{own[1]} and the image {size[0]}x{size[1]}"
            return None
        if mask.is_dir() or mask.suffix.lower() in VIDEO_EXTENSIONS:
            frames, own = _frame_count(item.image), _frame_count(mask)
            if frames != own:
                return f"the mask has {own} frames and the clip {frames}"
            return None
        with Image.open(mask) as painted:
            painted.load()
        return None
    except _READ_ERRORS as error:
        return f"the mask does not decode ({error})"


def _upright(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
    return (height, width) if turned else (width, height)


def _frame_count(clip: Path) -> int:
    if clip.is_dir():
        return len(list_frames(clip))
    capture = cv2.VideoCapture(str(clip))
    try:
        count = 0
        while capture.isOpened() and capture.grab():
            count += 1
    finally:
        capture.release()
    return count


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
