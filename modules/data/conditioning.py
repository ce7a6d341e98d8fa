"""Where an item's conditioning comes from: the source files of each kind a family declares
(:class:`modules.models.spec.ConditioningKind`).

- ``item``: the item's own file (a still image, or a clip whose first frame is used).
- ``references``: the item's reference images. With reference folders (in order), the file of
  the item's name in each (``refs/a.png`` for ``a.png``; another image extension is accepted);
  without them, files beside the item named ``a-ref.png``, ``a-ref1.png``, ``a-ref2.png``, ...
  (in that order). A concept scanned for a family that takes references lists those files as
  references, not as training items (:func:`modules.data.concept.scan_concept`).

Touches only the file system (no torch), like the scan, so the preflight can name every missing
file before anything loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from modules.data.concept import (
    IMAGE_EXTENSIONS,
    REFERENCE_SUFFIX,
    ConceptItem,
    reference_number,
    reference_of,
)
from modules.models.spec import ConditioningKind


def takes_references(kinds: Sequence[ConditioningKind]) -> bool:
    """Whether any of ``kinds`` reads reference images (a scan then keeps them apart)."""
    return any(kind.source == "references" for kind in kinds)


def conditioning_sources(
    item: ConceptItem, kind: ConditioningKind, reference_dirs: Sequence[Path] = ()
) -> tuple[Path, ...]:
    """The source files of ``kind`` for ``item`` that exist, in order (empty: none found)."""
    if kind.source == "item":
        return (item.image,)
    if reference_dirs:
        found = (_named_like(item.image, Path(folder).expanduser()) for folder in reference_dirs)
        return tuple(path for path in found if path is not None)
    return _beside(item.image)


def missing_conditioning(
    items: Sequence[ConceptItem],
    kinds: Sequence[ConditioningKind],
    *,
    concept: str,
    reference_dirs: Sequence[Path] = (),
) -> list[str]:
    """One line per problem with ``items``' conditioning files (every one, by name): a missing
    reference (in the layout the concept uses) or more references than the kind takes.
    ``concept``: how the message names the concept (``data.concepts.0 (folder)``)."""
    problems = []
    for kind in kinds:
        if kind.clips_only:
            problems += [
                f"{concept}: '{item.image.name}' is a still image and this model trains "
                f"image-to-video (each clip's first frame conditions the rest of it): replace "
                f"it with a clip or move it out of the folder"
                for item in items
                if not item.clip
            ]
        if kind.source != "references":
            continue  # the item's own file: the scan found it
        for item in items:
            found = conditioning_sources(item, kind, reference_dirs)
            if reference_dirs:
                missing = [
                    Path(folder).expanduser() / item.image.name
                    for folder in reference_dirs
                    if _named_like(item.image, Path(folder).expanduser()) is None
                ]
                for path in missing:
                    problems.append(
                        f"{concept}: '{item.image.name}' has no reference image '{path}': add "
                        f"it (a file of the same name in each reference folder), or remove "
                        f"'{item.image.name}'"
                    )
            elif not found:
                expected = item.image.parent / f"{_stem(item.image)}{REFERENCE_SUFFIX}.png"
                problems.append(
                    f"{concept}: '{item.image.name}' has no reference image: add '{expected}' "
                    f"beside it ({kind.name} images are named "
                    f"{_stem(item.image)}{REFERENCE_SUFFIX}.png, "
                    f"{_stem(item.image)}{REFERENCE_SUFFIX}1.png, ...), or remove "
                    f"'{item.image.name}'"
                )
            if len(found) > kind.most:
                names = ", ".join(path.name for path in found)
                problems.append(
                    f"{concept}: '{item.image.name}' has {len(found)} reference images ({names}) "
                    f"and this model takes at most {kind.most}: remove the extra ones"
                )
    return problems


def _named_like(image: Path, folder: Path) -> Path | None:
    """The file of ``image``'s name in ``folder``, or of its stem with another image
    extension; None when there is none."""
    exact = folder / image.name
    if exact.is_file():
        return exact
    for extension in sorted(IMAGE_EXTENSIONS):
        candidate = folder / f"{_stem(image)}{extension}"
        if candidate.is_file():
            return candidate
    return None


def _beside(image: Path) -> tuple[Path, ...]:
    """``name-ref.*``, ``name-ref1.*``, ``name-ref2.*``, ... beside ``image``, in that order."""
    stem = _stem(image)
    found = []
    for path in image.parent.iterdir():
        named = reference_of(path.stem)
        if named == stem and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append((reference_number(path.stem), path.name, path))
    return tuple(path for _, _, path in sorted(found))


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem
