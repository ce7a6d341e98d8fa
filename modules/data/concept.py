"""Scanning a concept folder: its images and clips, their captions and their weighted masks.

A concept folder holds images (``name.png``, ``.jpg``, ``.jpeg``, ``.webp``, any case), optional
captions next to them (``name.txt``, per ``CaptionConfig.extension``) and optional masks
``name-masklabel.png`` whose grey levels are per-pixel loss weights (value / 255).

Video families also train clips, listed by the same scan:

- a video file ``name.mp4`` (``.webm``, ``.mov``, ``.mkv``), or
- a sub-folder ``name/`` of frame images (in name order, numbers by value: ``f2`` before ``f10``).

A clip's mask is a mask video ``name-masklabel.mp4``, a folder ``name-masklabel/`` with one mask
image per source frame, or one still ``name-masklabel.png`` for every frame. Its caption is
``name.txt``. Sub-folders without images are ignored; sub-folders are not searched further.

This module touches only the file system (no torch, no PIL), so the UI can import it to show a
folder's counts without loading the training stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modules.config.schema import CaptionConfig, ConceptConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv"})
MASK_SUFFIX = "-masklabel"
REFERENCE_SUFFIX = "-ref"
"""``name-ref.png``, ``name-ref1.png``, ...: reference images beside ``name.png``, for a family
that takes them (:mod:`modules.data.conditioning`)."""
_REFERENCE = re.compile(rf"^(?P<stem>.+){REFERENCE_SUFFIX}(?P<number>\d*)$")
UNSUPPORTED_EXTENSIONS = frozenset(
    {".gif", ".tif", ".tiff", ".bmp", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".ico", ".psd",
     ".exr", ".dng", ".raw", ".cr2", ".nef", ".svg", ".avi", ".wmv", ".flv", ".m4v", ".mpg",
     ".mpeg", ".3gp"}
)  # fmt: skip
"""Image and video formats a user may drop into a concept folder that are not read: the scan
lists them (and broken links) so the run can say once, at the start, what it skipped."""
CaptionSource = Literal["file", "missing", "empty"]


class DataError(ValueError):
    """Training data that cannot be used. The message names the file or folder and the fix."""


@dataclass(frozen=True)
class ConceptItem:
    image: Path
    """The image file; for a clip, the video file or the folder of frames."""
    mask: Path | None
    """The ``-masklabel`` image, video or folder, or None: it then trains with an all-ones mask."""
    caption: str
    """Final caption: prefix and caption text, already joined."""
    clip: bool = False
    """A video file or a folder of frames rather than a still image."""
    caption_source: CaptionSource = "file"
    """Where the caption text came from: its caption file, or the concept's default caption
    because the file is ``missing`` or ``empty``."""
    start: int = 0
    """For a clip trained in windows (``data.frame_windows``), this window's first frame,
    counted at ``data.fps``; 0 for a clip's first window and for stills. A scan lists each clip
    once (start 0); the run's dataset lists each window as an item of its own."""


@dataclass(frozen=True)
class ConceptScan:
    folder: Path
    items: tuple[ConceptItem, ...]
    """One per image or clip, sorted by file name (case-insensitively)."""
    orphan_masks: tuple[Path, ...]
    """Mask files whose image is missing (usually a renamed or deleted image)."""
    unsupported: tuple[Path, ...] = ()
    """Files in a format that is not read (``UNSUPPORTED_EXTENSIONS``)."""
    broken_links: tuple[Path, ...] = ()
    """Links whose target is gone."""
    references: tuple[Path, ...] = ()
    """Reference images beside their items (``name-ref.png``), kept out of the items when the
    folder is scanned for a family that takes references."""
    orphan_references: tuple[Path, ...] = ()
    """Files named as references (``x-ref.png``) whose target (``x.png``) is not in the
    folder; kept out of the items too (a renamed or deleted target, or a misspelt name)."""

    @property
    def images(self) -> int:
        """Training items: still images and clips (``videos`` says how many are clips)."""
        return len(self.items)

    @property
    def videos(self) -> int:
        """Items that are clips (video files or folders of frames)."""
        return sum(item.clip for item in self.items)

    @property
    def masks_found(self) -> int:
        """Images that have a mask (``images == masks_found + images_without_mask``)."""
        return sum(item.mask is not None for item in self.items)

    @property
    def images_without_mask(self) -> int:
        return self.images - self.masks_found

    @property
    def masks_without_image(self) -> int:
        return len(self.orphan_masks)

    def describe(self) -> str:
        """One line for the UI, e.g. ``16 images: 14 with a mask, 2 without.`` (with clips:
        ``5 items (3 clips, 2 images): 4 with a mask, 1 without.``)."""
        counted = f"{self.images} images"
        if self.videos:
            stills = self.images - self.videos
            counted = (
                f"{self.images} items ({count_of(self.videos, 'clip')}, "
                f"{count_of(stills, 'image')})"
            )
        text = f"{counted}: {self.masks_found} with a mask, {self.images_without_mask} without."
        if self.orphan_masks:
            names = name_list(self.orphan_masks)
            text += f" {self.masks_without_image} masks have no image ({names})."
        skipped = self.unsupported + self.broken_links
        if skipped:
            text += f" {count_of(len(skipped), 'file')} not read ({name_list(skipped)})."
        return text


def scan_concept(concept: ConceptConfig, *, references: bool = False) -> ConceptScan:
    """List a concept's images and clips with their masks and final captions.

    ``references``: the model family takes reference images, so ``name-ref.png``,
    ``name-ref1.png``, ... beside an item ``name`` are its references, not items (and such a
    file without its item is listed in ``orphan_references``, not trained on).
    Raises DataError when the folder is missing or holds no images or clips, when two items
    share a name, or when a still image has a video or folder as its mask.
    """
    folder = Path(concept.path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(
            f"concept folder '{folder}' {what}: fix the concept's path or create the folder"
        )
    # A reference folder kept inside the concept's folder holds references, not a clip.
    inside = {Path(each).expanduser().resolve() for each in concept.reference_dirs}
    images, masks, unsupported, broken = _list_images_and_masks(folder, skip=inside)
    kept_apart: list[Path] = []
    orphan_references: list[Path] = []
    if references:
        # Every ``x-ref*.png`` is a reference: one whose target is missing is named, never
        # trained on as a target of its own.
        named = [image for image in images if _names_reference(image)]
        images = [image for image in images if image not in named]
        stems = {_stem(image) for image in images}
        kept_apart = [image for image in named if reference_of(_stem(image)) in stems]
        orphan_references = [image for image in named if image not in kept_apart]
    if not images:
        raise DataError(
            f"concept folder '{folder}' has no images (png, jpg, jpeg, webp; or clips: mp4, "
            "webm, mov, mkv, folders of frames): add images or remove the concept"
        )
    items = []
    for image in images:
        clip = _is_clip(image)
        mask = masks.get(_stem(image))
        if mask is not None and not clip and _is_clip(mask):
            raise DataError(
                f"mask '{mask}' is a video or a folder but '{image.name}' is a still image: "
                f"use one mask image, {_stem(image)}{MASK_SUFFIX}.png"
            )
        caption, source = _read_caption(image, concept.caption)
        items.append(
            ConceptItem(image=image, mask=mask, caption=caption, clip=clip, caption_source=source)
        )
    image_stems = {_stem(image) for image in images}
    orphans = tuple(mask for stem, mask in masks.items() if stem not in image_stems)
    return ConceptScan(
        folder=folder,
        items=tuple(items),
        orphan_masks=orphans,
        unsupported=tuple(unsupported),
        broken_links=tuple(broken),
        references=tuple(kept_apart),
        orphan_references=tuple(orphan_references),
    )


def _names_reference(path: Path) -> bool:
    """A still image named as a reference (``x-ref.png``, ``x-ref2.jpg``)."""
    return not _is_clip(path) and reference_of(_stem(path)) is not None


def reference_of(stem: str) -> str | None:
    """The item a reference's stem names (``a-ref2`` → ``a``), or None for another stem."""
    match = _REFERENCE.match(stem)
    return match.group("stem") if match else None


def reference_number(stem: str) -> int:
    """A reference's place among its item's (``a-ref`` 0, ``a-ref1`` 1, ``a-ref2`` 2)."""
    match = _REFERENCE.match(stem)
    return int(match.group("number") or 0) if match else 0


def read_caption(image: Path, caption: CaptionConfig) -> str:
    """Prefix and caption text (the caption file's, else the default), joined with ", ".

    The caption of ``name.png``, ``name.mp4`` or the frame folder ``name/`` is ``name.txt``.
    """
    return _read_caption(image, caption)[0]


def _read_caption(image: Path, caption: CaptionConfig) -> tuple[str, CaptionSource]:
    source: CaptionSource
    caption_file = image.parent / f"{_stem(image)}{caption.extension}"
    text, source = caption.default, "missing"
    if caption_file.is_file():
        try:
            # utf-8-sig: Windows editors often start UTF-8 files with a byte-order mark.
            written = caption_file.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as error:
            raise DataError(
                f"caption file '{caption_file}' is not valid UTF-8 ({error.reason}): "
                "save it as UTF-8"
            ) from error
        except OSError as error:
            raise DataError(
                f"cannot read caption file '{caption_file}' ({error.strerror}): fix or remove it"
            ) from error
        text, source = (written, "file") if written else (caption.default, "empty")
    parts = (caption.prefix.strip(), text.strip())
    return ", ".join(part for part in parts if part), source


def count_of(n: int, noun: str) -> str:
    """``1 image``, ``3 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


NAMED = 3
"""File names a message lists before "...": enough to find them, short enough to read."""


def name_list(paths: Iterable[Path]) -> str:
    """``a.png, b.png, c.png, ...``: the first ``NAMED`` file names."""
    listed = [Path(path).name for path in paths]
    return ", ".join(listed[:NAMED]) + (", ..." if len(listed) > NAMED else "")


def has_frames(folder: Path) -> bool:
    """Whether ``folder`` holds at least one image (it is then a clip of frames)."""
    return any(_is_image_file(path) for path in folder.iterdir())


def list_frames(folder: Path) -> list[Path]:
    """The images of a frame folder in playing order: by name, numbers by value (f2 < f10)."""
    return sorted((p for p in folder.iterdir() if _is_image_file(p)), key=_natural_key)


def _natural_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    # "frame10" → ("frame", 10): digit runs compare as numbers, text case-insensitively.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in re.split(r"(\d+)", path.name)
        if part
    )


def _is_image_file(path: Path) -> bool:
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def _is_clip(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in VIDEO_EXTENSIONS


def _stem(path: Path) -> str:
    """The name items and masks are matched by: a file's stem, a folder's whole name."""
    return path.name if path.is_dir() else path.stem


def _list_images_and_masks(
    folder: Path, skip: set[Path] | frozenset[Path] = frozenset()
) -> tuple[list[Path], dict[str, Path], list[Path], list[Path]]:
    """Images and clips sorted by name, masks keyed by the stem of the item they belong to, and
    the files skipped: unsupported formats and broken links. ``skip``: folders that are not
    clips (resolved paths: the concept's reference folders)."""
    images: list[Path] = []
    stems: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    unsupported: list[Path] = []
    broken: list[Path] = []
    # Case-insensitive order, as file browsers show it; the exact name breaks ties.
    for path in sorted(folder.iterdir(), key=lambda p: (p.name.casefold(), p.name)):
        # Dot files are skipped: macOS leaves "._name.png" metadata files that are not images.
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            broken.append(path)
            continue
        if path.is_dir():
            if path.resolve() in skip:
                continue
            if not path.name.lower().endswith(MASK_SUFFIX) and not has_frames(path):
                continue  # not a clip: a folder of something else
        elif path.suffix.lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS or not path.is_file():
            if path.suffix.lower() in UNSUPPORTED_EXTENSIONS:
                unsupported.append(path)
            continue
        stem = _stem(path)
        if not stem.lower().endswith(MASK_SUFFIX):
            if stem in stems:
                raise DataError(
                    f"two items named '{stem}' in '{folder}': {stems[stem].name} and "
                    f"{path.name} would share a caption and a mask; rename one"
                )
            stems[stem] = path
            images.append(path)
            continue
        # Any image format counts as a mask, so "name-masklabel.jpg" is never trained on as an
        # image; a second mask for the same image is ambiguous.
        image_stem = stem[: -len(MASK_SUFFIX)]
        if image_stem in masks:
            raise DataError(
                f"two masks for image '{image_stem}' in '{folder}': {masks[image_stem].name} "
                f"and {path.name}: keep one"
            )
        masks[image_stem] = path
    return images, masks, unsupported, broken
