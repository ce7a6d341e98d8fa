"""The preflight's checks of an edit model's reference images (``modules.trainer.preflight``
runs them with the others, before anything loads): each concept's pairs counted, every target
without its references and every reference without its target named, caption dropout refused
where the caption is encoded with the references, ``sampling.references`` checked, and the
reference settings a run would ignore said as notes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from modules.config import ConfigError, TrainConfig
from modules.config.schema import ConceptConfig
from modules.data.concept import ConceptScan, DataError, count_of, name_list
from modules.data.conditioning import find_pairs, pair_problems, reference_kind, takes_references
from modules.models.spec import ConditioningKind


def reference_problems(config: TrainConfig, kinds: Sequence[ConditioningKind]) -> list[str]:
    """What stops the run whatever its concepts hold: caption dropout where the caption is
    encoded with the references, and ``sampling.references`` the samples could not use."""
    return _caption_dropout_problem(config, kinds) + _sampling_references_problem(config, kinds)


def concept_pairs(
    number: int, concept: ConceptConfig, scan: ConceptScan, kinds: Sequence[ConditioningKind]
) -> tuple[list[str], str | None]:
    """Concept ``number``'s problems with its conditioning files (each missing or extra file by
    name; none without conditioning) and, for a model that takes references, its pairs in one
    line (``data.concepts.0 (folder): 12 pairs, 2 references each``)."""
    named = f"data.concepts.{number} ({scan.folder})"
    folders = [Path(folder) for folder in concept.reference_dirs]
    found = pair_problems(
        scan, kinds, concept=named, field=f"data.concepts.{number}", reference_dirs=folders
    )
    kind = reference_kind(kinds)
    if kind is None or found:
        return found, None
    pairs = find_pairs(scan, kind, folders)
    return _unreadable_references(pairs.references, named), f"{named}: {pairs.describe()}"


def _caption_dropout_problem(config: TrainConfig, kinds: Sequence[ConditioningKind]) -> list[str]:
    """Caption dropout for a model whose reference encoding reads the caption (an edit
    model's vision-language prompt): the dropped prompt would need its own encoding."""
    reading = [kind.name for kind in kinds if kind.with_caption]
    if not reading:
        return []
    return [
        f"data.concepts.{number}.caption.dropout={concept.caption.dropout}: this model encodes "
        f"the caption together with the {reading[0]} images, so a dropped caption has no "
        f"encoding; set it to 0"
        for number, concept in enumerate(config.data.concepts)
        if concept.caption.dropout > 0
    ]


def _sampling_references_problem(
    config: TrainConfig, kinds: Sequence[ConditioningKind]
) -> list[str]:
    """``sampling.references`` of an edit model that the samples could not use: not one entry
    per prompt, more references than the model takes, a file that cannot be read (its header);
    said here so that a run does not stop at its first sample, after the model loaded."""
    kind = reference_kind(kinds)
    if kind is None or not config.sampling.prompts:
        return []
    from modules.data.images import image_size
    from modules.trainer.sampling import sampling_reference_paths

    try:
        given = sampling_reference_paths(config, kind) or []
    except ConfigError as error:
        return [str(error)]
    problems = []
    for number, paths in enumerate(given):
        for path in paths:
            if not path.is_file():
                problems.append(
                    f"sampling.references: '{path}' (prompt {number + 1}) is not a file: give "
                    "the path of an image (png, jpg, webp)"
                )
                continue
            try:
                image_size(path)
            except DataError as error:
                problems.append(f"sampling.references: prompt {number + 1}'s reference: {error}")
    return problems


def _unreadable_references(references: Sequence[Sequence[Path]], concept: str) -> list[str]:
    """Reference images whose header cannot be read (as the encoding would refuse them)."""
    from modules.data.images import image_size

    problems = []
    for path in dict.fromkeys(path for found in references for path in found):
        try:
            image_size(path)
        except DataError as error:
            problems.append(f"{concept}: reference {error}")
    return problems


def reference_notes(
    config: TrainConfig, kinds: Sequence[ConditioningKind], scans: Sequence[ConceptScan]
) -> list[str]:
    """``reference_dirs`` a run does not read: for a model without references, and the
    ``name-ref.png`` files beside the targets of a concept that has reference folders."""
    notes = []
    takes = takes_references(kinds)
    if config.sampling.references and not takes:
        notes.append(
            f"sampling.references is set but this {config.model.family} model takes no "
            "reference images: the samples do not use them"
        )
    for number, (concept, scan) in enumerate(zip(config.data.concepts, scans, strict=True)):
        if concept.reference_dirs and not takes:
            notes.append(
                f"data.concepts.{number}.reference_dirs is set but this {config.model.family} "
                "model takes no reference images: the folders are ignored (remove them, or "
                "choose an edit model)"
            )
        elif concept.reference_dirs and scan.references:
            notes.append(
                f"data.concepts.{number}: {count_of(len(scan.references), 'reference image')} "
                f"beside the targets ({name_list(scan.references)}) are not read: the "
                f"references come from data.concepts.{number}.reference_dirs (move them there, "
                "or clear reference_dirs to use them)"
            )
    return notes
