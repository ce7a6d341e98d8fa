"""Whether ``model.path`` holds a model of ``model.family``, from its JSON files alone.

A family loads whatever its classes can read from a folder: a FLUX.1 folder read as FLUX.2
gives a FLUX.2 VAE with FLUX.1's weights and a default-size Mistral 3 built from a CLIP config
(tens of GB before anything fails), a FLUX.1 folder read as WAN or a WAN folder read as
Qwen-Image a TypeError deep inside diffusers. So before anything is built the folder is read
as a user would read it: ``model_index.json``'s pipeline class (``_class_name``), then each
part's config type (``transformer/config.json``'s ``_class_name``, ``text_encoder/config.json``'s
``architectures`` or ``model_type``), against the :class:`~modules.models.spec.FolderKind` the
families declare. Another family's folder is named with the ``model.family`` to use, a folder
mixing two models' parts by the part, a single-file checkpoint with the family's
``transformer_file`` option.

No torch: the pre-flight (``train`` and ``check``) runs this before the model loads, and every
family's ``load`` runs it too (:func:`modules.models.model_folder.check_model_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules.models.registry import SPECS, family_spec
from modules.models.spec import FamilySpec, FolderKind

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
"""Single-file checkpoints, which a family with a ``transformer_file`` option can train from."""


class FolderProblem(Exception):
    """A model folder that cannot be read as its family's: the message names the field and
    the fix."""


def model_folder_problem(family: str, path: str, options: Any = None) -> str | None:
    """Why ``path`` cannot be loaded as ``family`` (its ``model.<family>`` ``options``, for the
    family's own checks), or None. Reads JSON files and folder listings only."""
    try:
        check_folder(family_spec(family), path, options)
    except FolderProblem as problem:
        return str(problem)
    return None


def check_folder(spec: FamilySpec, path: str, options: Any = None) -> Path | None:
    """The folder at ``path`` (None: a family's built-in model, ``path`` empty), checked as
    :func:`model_folder_problem` says; a :class:`FolderProblem` otherwise."""
    if not path:
        if not spec.needs_path:
            return None
        raise FolderProblem(
            f"model.path: the {spec.name} family has no built-in weights; set model.path to "
            f"{_folder_words(spec)}"
        )
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FolderProblem(
            f"model.path: '{path}' does not exist; point model.path at {_folder_words(spec)}"
        )
    if not folder.is_dir():
        if spec.file_check is None:
            raise FolderProblem(_file_problem(spec, folder))
        problem = spec.file_check(folder, options)
        if problem:
            raise FolderProblem(problem)
        return folder  # a single-file checkpoint the family reads
    index = _read(folder / "model_index.json") or {}
    named = index.get("_class_name")
    kinds = spec.folders
    if isinstance(named, str) and named:
        _check_pipeline(spec, folder, named)
        kinds = tuple(kind for kind in spec.folders if kind.pipeline == named) or kinds
    missing = [part for part in spec.parts if not (folder / part).is_dir()]
    if missing:
        if not index:
            _check_transformer_family(spec, folder)
        raise FolderProblem(
            f"model.path: {folder} has no {', '.join(f'{m}/' for m in missing)} subfolder; "
            f"a {spec.name} diffusers folder holds {_listed(spec.parts)} (e.g. {spec.example})"
        )
    if kinds:
        _check_parts(spec, folder, kinds, from_index=bool(index))
    if spec.folder_check is not None:
        problem = spec.folder_check(folder, index, options)
        if problem:
            raise FolderProblem(problem)
    return folder


def pipeline_owners() -> dict[str, tuple[FamilySpec, FolderKind]]:
    """Every declared pipeline class → the family that trains it and its folder kind."""
    return {kind.pipeline: (spec, kind) for spec in SPECS.values() for kind in spec.folders}


def _check_pipeline(spec: FamilySpec, folder: Path, named: str) -> None:
    """``model_index.json`` naming another family's pipeline, or one of a model no family here
    trains; a pipeline nobody declares is refused by families with folder kinds."""
    owner = pipeline_owners().get(named)
    if owner is not None:
        other, kind = owner
        if other.name != spec.name:
            raise FolderProblem(
                f"model.path holds a {kind.title} folder ({named}), not {_label(spec)}: use "
                f"model.family={other.name}"
            )
        return
    for other in SPECS.values():
        reason = other.not_trained.get(named)
        if reason is not None:
            raise FolderProblem(
                f"model.path holds {reason} ({named} in {folder / 'model_index.json'}); the "
                f"{spec.name} family trains {_trained_words(spec)}: point model.path at one"
            )
    if not spec.folders:  # a layout of its own, without model_index.json
        raise FolderProblem(
            f"model.path: {folder / 'model_index.json'} names {named}, a diffusers pipeline; "
            f"point model.path at {_folder_words(spec)}"
        )
    pipelines = " or ".join(kind.pipeline for kind in spec.folders)
    raise FolderProblem(
        f"model.path: {folder / 'model_index.json'} names {named}, not a {_label(spec)} "
        f"pipeline ({pipelines}); point model.path at {_folder_words(spec)}"
    )


def _check_transformer_family(spec: FamilySpec, folder: Path) -> None:
    """A folder without ``model_index.json`` whose transformer is another family's."""
    found = _types(folder / "transformer")
    if not found:
        return
    for other in SPECS.values():
        if other.name == spec.name:
            continue
        for kind in other.folders:
            if found & set(kind.parts.get("transformer", ())):
                raise FolderProblem(
                    f"model.path holds a {kind.title} folder (its transformer is a "
                    f"{_type_name(folder / 'transformer')}), not {_label(spec)}: use "
                    f"model.family={other.name}"
                )


def _check_parts(
    spec: FamilySpec, folder: Path, kinds: tuple[FolderKind, ...], *, from_index: bool
) -> None:
    """Every part of one of ``kinds`` holding a type that kind names."""
    if not from_index:  # no model_index.json: the transformer may tell the family
        _check_transformer_family(spec, folder)
    best: list[tuple[str, FolderKind]] | None = None
    for kind in kinds:
        wrong = []
        for part, types in kind.parts.items():
            if not (folder / part).is_dir():
                continue
            found = _types(folder / part)
            if found is None:
                raise FolderProblem(
                    f"model.path: {folder / part} has no config.json; complete or re-download "
                    f"the model (e.g. {spec.example})"
                )
            if not found & set(types):
                wrong.append((part, kind))
        if not wrong:
            return
        if best is None or len(wrong) < len(best):
            best = wrong
    assert best is not None
    part, kind = best[0]
    whose = _owner_of(folder / part, part)
    raise FolderProblem(
        f"model.path: {folder / part} holds a {_type_name(folder / part)}{whose}, not "
        f"{kind.title}'s {kind.parts[part][0]}: the folder mixes parts of different models; "
        f"point model.path at a complete {kind.title} folder (e.g. {spec.example})"
    )


def _owner_of(part_folder: Path, part: str) -> str:
    """ " (FLUX.1's)" when the part's type is what another declared model has there."""
    found = _types(part_folder) or set()
    for spec in SPECS.values():
        for kind in spec.folders:
            if found & set(kind.parts.get(part, ())):
                return f" ({kind.title}'s)"
    return ""


def _file_problem(spec: FamilySpec, file: Path) -> str:
    option = "transformer_file" in spec.options.model_fields
    encoders = "encoders" if "text_encoder_2" in spec.parts else "encoder"
    if option and file.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return (
            f"model.path: {file} is a file, not a folder: model.path is {_folder_words(spec)}. "
            f"To train this single-file transformer, set model.{spec.name}.transformer_file="
            f"{file} and model.path to the diffusers folder of the same model, which gives its "
            f"config, the VAE and the text {encoders}"
        )
    return f"model.path: {file} is a file, not a folder; point model.path at {_folder_words(spec)}"


def _types(part_folder: Path) -> set[str] | None:
    """The types a part's ``config.json`` names (``_class_name``, ``architectures``,
    ``model_type``); None without the file. A scheduler's config is not read."""
    config = _read(part_folder / "config.json")
    if config is None:
        return None
    found = {config.get("_class_name"), config.get("model_type")}
    architectures = config.get("architectures")
    if isinstance(architectures, list):
        found.update(architectures)
    return {name for name in found if isinstance(name, str) and name}


def _type_name(part_folder: Path) -> str:
    """The part's type as its config names it, the class first."""
    config = _read(part_folder / "config.json") or {}
    architectures = config.get("architectures")
    for name in (
        config.get("_class_name"),
        architectures[0] if isinstance(architectures, list) and architectures else None,
        config.get("model_type"),
    ):
        if isinstance(name, str) and name:
            return name
    return "model of an unknown type"


def _read(path: Path) -> Mapping[str, Any] | None:
    """A JSON file of the folder; None when absent, a FolderProblem naming it when it cannot
    be read (a corrupt config must not silently pass)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise FolderProblem(
            f"model.path: cannot read {path} ({error}); repair or re-download the file"
        ) from error
    if not isinstance(data, dict):
        raise FolderProblem(
            f"model.path: {path} is not a JSON object; repair or re-download the file"
        )
    return data


def _label(spec: FamilySpec) -> str:
    return spec.label or f"a {spec.name} model"


def _listed(parts: tuple[str, ...]) -> str:
    return ", ".join(f"{part}/" for part in parts)


def _folder_words(spec: FamilySpec) -> str:
    """ "a local FLUX.2 diffusers folder (transformer/, ...; e.g. a download of ...)"."""
    if not spec.folders:
        built_in = "" if spec.needs_path else ", or leave it empty for the built-in model"
        return f"a {spec.name} model folder ({spec.example}){built_in}"
    return f"a local {_label(spec)} diffusers folder ({_listed(spec.parts)}; e.g. {spec.example})"


def _trained_words(spec: FamilySpec) -> str:
    kinds = [f"{kind.title} ({kind.pipeline})" for kind in spec.folders]
    return " and ".join(kinds) + " folders" if kinds else "its own model folders"
