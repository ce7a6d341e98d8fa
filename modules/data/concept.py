"""Scanning a concept folder: its images, their captions and their weighted masks.

A concept folder holds images (``name.png``, ``.jpg``, ``.jpeg``, ``.webp``, any case), optional
captions next to them (``name.txt``, per ``CaptionConfig.extension``) and optional masks
``name-masklabel.png`` whose grey levels are per-pixel loss weights (value / 255). Sub-folders are
not searched.

This module touches only the file system (no torch, no PIL), so the UI can import it to show a
folder's counts without loading the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modules.config.schema import CaptionConfig, ConceptConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MASK_SUFFIX = "-masklabel"


class DataError(ValueError):
    """Training data that cannot be used. The message names the file or folder and the fix."""


@dataclass(frozen=True)
class ConceptItem:
    image: Path
    mask: Path | None
    """The image's ``-masklabel`` file, or None: it then trains with an all-ones mask."""
    caption: str
    """Final caption: prefix and caption text, already joined."""


@dataclass(frozen=True)
class ConceptScan:
    folder: Path
    items: tuple[ConceptItem, ...]
    """One per image, sorted by file name (case-insensitively)."""
    orphan_masks: tuple[Path, ...]
    """Mask files whose image is missing (usually a renamed or deleted image)."""

    @property
    def images(self) -> int:
        return len(self.items)

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
        """One line for the UI, e.g. ``16 images: 14 with a mask, 2 without.``"""
        text = (
            f"{self.images} images: {self.masks_found} with a mask, "
            f"{self.images_without_mask} without."
        )
        if self.orphan_masks:
            names = ", ".join(path.name for path in self.orphan_masks[:3])
            more = ", ..." if len(self.orphan_masks) > 3 else ""
            text += f" {self.masks_without_image} masks have no image ({names}{more})."
        return text


def scan_concept(concept: ConceptConfig) -> ConceptScan:
    """List a concept's images with their masks and final captions.

    Raises DataError when the folder is missing or holds no images.
    """
    folder = Path(concept.path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(
            f"concept folder '{folder}' {what}: fix the concept's path or create the folder"
        )
    images, masks = _list_images_and_masks(folder)
    if not images:
        raise DataError(
            f"concept folder '{folder}' has no images (png, jpg, jpeg, webp): add images "
            "or remove the concept"
        )
    items = tuple(
        ConceptItem(
            image=image,
            mask=masks.get(image.stem),
            caption=read_caption(image, concept.caption),
        )
        for image in images
    )
    image_stems = {image.stem for image in images}
    orphans = tuple(mask for stem, mask in masks.items() if stem not in image_stems)
    return ConceptScan(folder=folder, items=items, orphan_masks=orphans)


def read_caption(image: Path, caption: CaptionConfig) -> str:
    """Prefix and caption text (the caption file's, else the default), joined with ", "."""
    caption_file = image.with_suffix(caption.extension)
    text = caption.default
    if caption_file.is_file():
        try:
            # utf-8-sig: Windows editors often start UTF-8 files with a byte-order mark.
            text = caption_file.read_text(encoding="utf-8-sig").strip() or caption.default
        except UnicodeDecodeError as error:
            raise DataError(
                f"caption file '{caption_file}' is not valid UTF-8 ({error.reason}): "
                "save it as UTF-8"
            ) from error
    parts = (caption.prefix.strip(), text.strip())
    return ", ".join(part for part in parts if part)


def _list_images_and_masks(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """Images sorted by name, and masks keyed by the stem of the image they belong to."""
    images: list[Path] = []
    masks: dict[str, Path] = {}
    # Case-insensitive order, as file browsers show it; the exact name breaks ties.
    for path in sorted(folder.iterdir(), key=lambda p: (p.name.casefold(), p.name)):
        # Dot files are skipped: macOS leaves "._name.png" metadata files that are not images.
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.is_file():
            continue
        stem = path.stem
        if not stem.lower().endswith(MASK_SUFFIX):
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
    return images, masks
