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
from dataclasses import dataclass
from pathlib import Path

from modules.data.concept import (
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    REFERENCE_SUFFIX,
    ConceptItem,
    ConceptScan,
    count_of,
    name_list,
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


def reference_kind(kinds: Sequence[ConditioningKind]) -> ConditioningKind | None:
    """The kind of ``kinds`` that reads reference images, or None."""
    return next((kind for kind in kinds if kind.source == "references"), None)


@dataclass(frozen=True)
class Pairs:
    """A concept's targets and their reference images as found on disk (no image is read)."""

    references: tuple[tuple[Path, ...], ...]
    """Per item of the scan, in order, its reference files in order (empty: none found)."""
    without_target: tuple[Path, ...]
    """Reference files that name no target: ``x-ref.png`` without ``x.png``, or a file in a
    reference folder with no target of its name."""

    @property
    def paired(self) -> int:
        return sum(1 for found in self.references if found)

    @property
    def unpaired(self) -> int:
        return sum(1 for found in self.references if not found)

    def describe(self) -> str:
        """``12 pairs, 2 references each``; ``1 to 3 references each`` when they differ; then
        the targets without references and the references without targets, if any."""
        counts = sorted({len(found) for found in self.references if found})
        text = count_of(self.paired, "pair")
        if len(counts) == 1:
            text += f", {count_of(counts[0], 'reference')} each"
        elif counts:
            text += f", {counts[0]} to {counts[-1]} references each"
        if self.unpaired:
            text += f" · {count_of(self.unpaired, 'target')} without a reference"
        if self.without_target:
            listed = name_list(self.without_target)
            text += f" · {count_of(len(self.without_target), 'reference')} without a target"
            text += f" ({listed})"
        return text


def find_pairs(
    scan: ConceptScan, kind: ConditioningKind, reference_dirs: Sequence[Path] = ()
) -> Pairs:
    """Each item's references of ``kind`` (in ``reference_dirs`` when given, else beside the
    items) and the references that name no target. A scan made with ``references=True``."""
    found = tuple(conditioning_sources(item, kind, reference_dirs) for item in scan.items)
    if not reference_dirs:
        return Pairs(references=found, without_target=scan.orphan_references)
    stems = {_stem(item.image) for item in scan.items}
    strays = [
        path
        for folder in reference_dirs
        for path in _folder_images(Path(folder).expanduser())
        if path.stem not in stems
    ]
    return Pairs(references=found, without_target=tuple(strays))


def pair_problems(
    scan: ConceptScan,
    kinds: Sequence[ConditioningKind],
    *,
    concept: str,
    field: str,
    reference_dirs: Sequence[Path] = (),
) -> list[str]:
    """Every problem with a concept's pairs, one line each, naming the file and the fix: a
    reference folder that is not there or more of them than the model takes (``field``: the
    concept's field path, ``data.concepts.0``), a target without a reference or with fewer
    than given, more references than the model takes, a reference without a target. Plus the
    problems of :func:`missing_conditioning`. ``concept``: how a line names the concept."""
    kind = reference_kind(kinds)
    if kind is None:
        return missing_conditioning(scan.items, kinds, concept=concept)
    folders = [Path(folder).expanduser() for folder in reference_dirs]
    problems = [
        f"{field}.reference_dirs.{number}: '{folder}' "
        f"{'is not a folder' if folder.exists() else 'does not exist'}: fix the path (a folder "
        f"holding each target's reference under the target's name) or remove it"
        for number, folder in enumerate(folders)
        if not folder.is_dir()
    ]
    if len(folders) > kind.most:
        problems.append(
            f"{field}.reference_dirs: {len(folders)} reference folders and this model takes at "
            f"most {count_of(kind.most, 'reference image')} per target: keep "
            f"{'one folder' if kind.most == 1 else f'at most {kind.most} folders'}"
        )
    if problems:
        return problems  # every item's lines would repeat them
    problems += missing_conditioning(scan.items, kinds, concept=concept, reference_dirs=folders)
    for path in find_pairs(scan, kind, folders).without_target:
        if folders:
            problems.append(
                f"{concept}: reference '{path}' has no target: add '{path.stem}' (png, jpg, webp) "
                f"to the concept folder, or move the reference out of '{path.parent}'"
            )
        else:
            target = f"{reference_of(path.stem)}.png"
            problems.append(
                f"{concept}: reference '{path.name}' has no target '{target}' beside it: add "
                f"the target, or rename or remove the reference"
            )
    return problems


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


def _folder_images(folder: Path) -> list[Path]:
    """A reference folder's images (masks and dot files aside), by name; none if it is not
    a folder."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not path.stem.lower().endswith(MASK_SUFFIX)
        and path.is_file()
    )


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem
