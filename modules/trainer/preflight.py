"""Every check a run makes before it loads the model, shared by ``train`` and ``check``.

A config that passes validation can still be unable to train: no concepts, a concept folder
that is missing or holds no images, a run folder that is a file or cannot be written, a
``model.path`` that is missing, a file or another family's folder (read from its JSON files:
:mod:`modules.models.folder_check`), a ``transformer_file`` of another family or size (read
from its header: :mod:`modules.models.single_file_check`), a mask whose size is not its
image's, an item without the conditioning files its family needs or an edit model's pairs
that do not match (:mod:`modules.trainer.reference_checks`), a tracker whose ``logs`` folder
cannot be made. Those stop
here, in ``check`` as in ``train``, with a message naming the field or file and the fix, before
the model loads or anything is cached. What is allowed but worth knowing (files skipped,
captions missing, images upscaled) is collected as notes, said once at the start of a run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modules.config import ConfigError, TrainConfig
from modules.data.buckets import Size, crop_box, data_buckets, histogram_text, place
from modules.data.concept import (
    IMAGE_EXTENSIONS,
    ConceptItem,
    ConceptScan,
    DataError,
    count_of,
    name_list,
    scan_concept,
)
from modules.data.conditioning import takes_references
from modules.models.folder_check import model_folder_problem
from modules.models.registry import conditioning_kinds, family_spec
from modules.models.single_file_check import single_file_problem
from modules.trainer.reference_checks import concept_pairs, reference_notes, reference_problems
from modules.trainer.run_folder import check_run_folder


@dataclass(frozen=True)
class Preflight:
    scans: list[ConceptScan]
    notes: list[str]
    """Warnings for the start of the run, one line each."""
    buckets: str | None = None
    """With buckets on: the buckets the items go to, items per bucket and the largest crop."""
    sources: list[list[Size | None]] | None = None
    """Per scan, each item's (width, height) as read from its header (None: unreadable), so
    the run does not read them again."""
    pairs: tuple[str, ...] = ()
    """For a model that takes reference images, each concept's pairs in one line
    (``data.concepts.0 (folder): 12 pairs, 2 references each``); empty for the others."""


def preflight(config: TrainConfig, *, create_run_dir: bool) -> Preflight:
    """Raise ConfigError or DataError for what stops a run; return the scans and the notes.

    ``create_run_dir``: training makes the run folder; ``check`` writes nothing."""
    if not config.data.concepts:
        raise ConfigError("data.concepts: no concepts; add at least one image folder")
    check_run_folder(Path(config.output.run_dir), create=create_run_dir)
    model = _model_problem(config)
    problems = [
        *model,
        *_missing_paths(config),
        # The grid is read from the model folder's configs: only from a folder of the family.
        *([] if model else _resolution_problem(config)),
        *([] if model else _targets_problem(config)),
        *([] if model else _single_file_problem(config)),
        *_format_problem(config),
        *_tracker_problem(config),
        *_logs_problem(config),
        *_init_from_problem(config),
        *_optimizer_problem(config),
    ]
    kinds = conditioning_kinds(config.model)
    problems += reference_problems(config, kinds)
    scans, pairs = [], []
    for number, concept in enumerate(config.data.concepts):
        try:
            scan = scan_concept(concept, references=takes_references(kinds))
        except DataError as error:
            problems.append(str(error))
            continue
        scans.append(scan)
        found, line = concept_pairs(number, concept, scan, kinds)
        problems += found
        pairs += [line] if line else []
    if problems:  # all of them at once: fixing one need not reveal the next
        raise ConfigError("\n".join(problems))
    notes = reference_notes(config, kinds, scans)
    for concept, scan in zip(config.data.concepts, scans, strict=True):
        notes += _skipped_note(scan)
        notes += _caption_notes(scan, concept.caption.default)
    per_scan = [[_source_size(item) for item in scan.items] for scan in scans]
    items = [item for scan in scans for item in scan.items]
    mask_problems = [
        problem
        for scan, sizes in zip(scans, per_scan, strict=True)
        for item, size in zip(scan.items, sizes, strict=True)
        if (problem := _mask_problem(item, size))
    ]
    if mask_problems:
        raise ConfigError("\n".join(mask_problems))
    sources = [size for sizes in per_scan for size in sizes]
    grid = family_spec(config.model.family).latent_grid(config.model.path)
    try:
        buckets = data_buckets(config.data, grid.pixel_multiple)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    readable = [(item, size) for item, size in zip(items, sources, strict=True) if size]
    placement = place([size for _, size in readable], buckets, config.data.resolution)
    notes += _small_images_note(readable, placement.sizes, config.data.resolution)
    line = None
    if buckets is not None and readable:
        names = [item.image.name for item, _ in readable]
        line = f"Buckets ({len(placement.histogram())} used by {len(readable)} items): "
        line += histogram_text(placement, names)
    return Preflight(scans=scans, notes=notes, buckets=line, sources=per_scan, pairs=tuple(pairs))


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""``output.log_with`` → the package it needs."""


def _tracker_problem(config: TrainConfig) -> list[str]:
    """``output.log_with`` naming a tracker whose package is not installed."""
    log_with = config.output.log_with
    package = TRACKER_PACKAGES.get(log_with)
    if package is None or importlib.util.find_spec(package) is not None:
        return []
    return [
        f"output.log_with={log_with}: the {package} package is not installed; install it "
        f"(pip install {package}) or set output.log_with=none"
    ]


OPTIMIZER_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes==0.50.2"),
    "prodigy": ("prodigyopt", "prodigyopt==1.1.2"),
    "came": ("came_pytorch", "came-pytorch==0.1.3"),
}
"""``training.optimizer`` → (the module it imports, its pip requirement), for the optimizers
from outside torch (pinned in requirements.txt)."""


def optimizer_package_problem(name: str) -> str | None:
    """Why ``training.optimizer=name`` cannot be made here (its package is missing), or None."""
    if name not in OPTIMIZER_PACKAGES:
        return None
    module, requirement = OPTIMIZER_PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: an import of it would fail
        found = False
    if found:
        return None
    return (
        f"training.optimizer={name} needs the package {requirement.split('==')[0]}, which is "
        f"not installed: install it with `pip install {requirement}` (it is in "
        "requirements.txt), or choose another training.optimizer"
    )


def _optimizer_problem(config: TrainConfig) -> list[str]:
    problem = optimizer_package_problem(config.training.optimizer)
    return [problem] if problem else []


def _init_from_problem(config: TrainConfig) -> list[str]:
    """``lora.init_from`` naming a file that is not a LoRA (whether it fits the model is
    known once the model loads)."""
    if not config.lora.init_from:
        return []
    from modules.lora.init_from import lora_file_problem  # torch; only when it is set

    problem = lora_file_problem(config.lora.init_from)
    return [problem] if problem else []


def _resolution_problem(config: TrainConfig) -> list[str]:
    """Sizes on the family's latent grid (read from the model folder's config files, so the
    model need not load to say so): the square ``data.resolution`` without buckets (bucket
    sides are made multiples of it), and a set sample size."""
    grid = family_spec(config.model.family).latent_grid(config.model.path)
    multiple = grid.pixel_multiple
    sampling = config.sampling
    sizes = [] if config.data.buckets else [("data.resolution", config.data.resolution)]
    if sampling.width is not None and sampling.height is not None:
        sizes += [("sampling.width", sampling.width), ("sampling.height", sampling.height)]
    problems = []
    for name, side in sizes:
        if side % multiple == 0:
            continue
        lower, upper = side - side % multiple, side - side % multiple + multiple
        fix = f"use {lower} or {upper}" if lower else f"use {upper}"
        problems.append(
            f"{name}: {side} is not a multiple of {multiple}, the pixel multiple of this "
            f"{config.model.family} model ({grid.pixels_per_cell} px per latent cell); {fix}"
        )
    return problems


def _model_problem(config: TrainConfig) -> list[str]:
    """``model.path`` empty where the family has no built-in model, missing, a file, or not a
    folder of the family (another family's, another variant's, parts missing or mixed), read
    from its JSON files alone: what the family's ``load`` would refuse, before anything loads."""
    model = config.model
    problem = model_folder_problem(model.family, model.path, getattr(model, model.family, None))
    return [problem] if problem else []


def _single_file_problem(config: TrainConfig) -> list[str]:
    """The family's ``transformer_file`` holding another family's transformer, or one of
    another size than the folder's config, read from the file's header
    (:mod:`modules.models.single_file_check`)."""
    model = config.model
    options = getattr(model, model.family, None)
    file = getattr(options, "transformer_file", "") if options is not None else ""
    problem = single_file_problem(family_spec(model.family), file, model.path)
    return [problem] if problem else []


def _targets_problem(config: TrainConfig) -> list[str]:
    """``lora.targets`` naming a preset the folder's denoiser does not have (a family whose
    denoiser depends on the folder; the config checked the family's presets already)."""
    targets = family_spec(config.model.family).denoiser_targets
    if targets is None:
        return []
    denoiser, presets = targets(config.model.path)
    if config.lora.targets in presets:
        return []
    return [unknown_targets(config.lora.targets, denoiser, presets)]


def unknown_targets(targets: str, denoiser: str, presets: Iterable[str]) -> str:
    """``lora.targets`` naming a preset the model's ``denoiser`` (its class name) lacks: said
    here from the folder's files, and by the run once the model has loaded."""
    return (
        f"lora.targets={targets}: this model's denoiser ({denoiser}) has no such preset; "
        f"choose one of {', '.join(presets)}"
    )


def _format_problem(config: TrainConfig) -> list[str]:
    """``output.format=comfyui`` for a model whose LoRA has no ComfyUI layout here."""
    check = family_spec(config.model.family).comfyui_check
    if config.output.format != "comfyui" or check is None:
        return []
    problem = check(config.model.path)
    return [problem] if problem else []


def _logs_problem(config: TrainConfig) -> list[str]:
    """A tracker writes under ``RUN_DIR/logs``: a file (or anything else but a folder) there
    would stop the run when the tracker starts."""
    log_with = config.output.log_with
    logs = Path(config.output.run_dir).expanduser() / "logs"
    if log_with == "none" or not (logs.exists() or logs.is_symlink()) or logs.is_dir():
        return []
    what = "a file, not a folder" if logs.is_file() else "not a folder"
    return [
        f"output.log_with={log_with}: {logs} is {what}, and the tracker writes its logs there; "
        "move or delete that file, or set output.log_with=none"
    ]


def _mask_problem(item: ConceptItem, source: Size | None) -> str | None:
    """A mask whose size (or frame count) is not its image's or clip's, or whose header
    cannot be read, as the encoding would refuse it; read from the headers. An unreadable
    image is left to the encoding, which names it with the fix."""
    from modules.data.images import check_mask_size, image_size
    from modules.data.video import check_clip_mask, check_still_mask, clip_info

    mask = item.mask
    if mask is None or source is None:
        return None
    try:
        if not item.clip:
            check_mask_size(mask, image_size(mask), source)
        elif mask.suffix.lower() in IMAGE_EXTENSIONS and not mask.is_dir():
            check_still_mask(mask, image_size(mask), item.image, clip_info(item.image))
        else:
            check_clip_mask(mask, item.image, clip_info(item.image))
    except DataError as error:
        return str(error)
    return None


def _missing_paths(config: TrainConfig) -> list[str]:
    """The family options' files and the held-out paths that are set but not there."""
    model, drift = config.model, config.drift
    problems = []
    options = getattr(model, model.family, None)
    for name, field in type(options).model_fields.items() if options is not None else ():
        value, extra = getattr(options, name), field.json_schema_extra
        is_file = isinstance(extra, dict) and extra.get("file")
        if is_file and value and not Path(value).expanduser().is_file():
            problems.append(
                f"model.{model.family}.{name}: '{value}' is not a file: give the file, or leave "
                "it empty to use the model folder's"
            )
    if drift.every:
        for field, value in (
            ("subject_path", drift.subject_path),
            ("world_path", drift.world_path),
        ):
            if value and not Path(value).expanduser().is_dir():
                problems.append(
                    f"drift.{field}: '{value}' is not a folder: give a held-out folder, or "
                    f"leave drift.{field} empty"
                )
    return problems


def _skipped_note(scan: ConceptScan) -> list[str]:
    parts = []
    if scan.unsupported:
        parts.append(
            f"{count_of(len(scan.unsupported), 'file')} in a format that is not read "
            f"({name_list(scan.unsupported)}): convert them to PNG, JPEG or WebP to train on them"
        )
    if scan.broken_links:
        links = scan.broken_links
        parts.append(f"{count_of(len(links), 'broken link')} ({name_list(links)})")
    return [f"{scan.folder}: skipped {'; '.join(parts)}"] if parts else []


def _caption_notes(scan: ConceptScan, default: str) -> list[str]:
    missing = [item.image for item in scan.items if item.caption_source == "missing"]
    empty = [item.image for item in scan.items if item.caption_source == "empty"]
    if not missing and not empty:
        return []
    counted = []
    if missing:
        counted.append(f"{count_of(len(missing), 'item')} without a caption file")
    if empty:
        counted.append(f"{count_of(len(empty), 'item')} with an empty one")
    used = f"the default caption '{default}'" if default.strip() else "an empty caption"
    listed = name_list([*missing, *empty])
    return [f"{scan.folder}: {' and '.join(counted)} ({listed}): they train with {used}"]


def _small_images_note(
    readable: Sequence[tuple[ConceptItem, Size]], sizes: Sequence[Size], resolution: int
) -> list[str]:
    """Images whose crop is smaller than their training size (bucket, or the square of
    ``resolution``) in either direction: they are upscaled."""
    small = [
        item.image
        for (item, source), size in zip(readable, sizes, strict=True)
        if _crop_scale(source, size) > 1.0
    ]
    if not small:
        return []
    return [
        f"{count_of(len(small), 'image')} upscaled to the training size (data.resolution="
        f"{resolution}, bucketed or square), which blurs them ({name_list(small)})"
    ]


def _crop_scale(source: Size, size: Size) -> float:
    left, top, right, bottom = crop_box(source, size)
    return max(size[0] / (right - left), size[1] / (bottom - top))


def _source_size(item: ConceptItem) -> Size | None:
    """An image's size (its header only) or a clip's frames'; None when it cannot be read,
    which the encoding reports with the fix."""
    from modules.data.preparation import source_size

    try:
        return source_size(item)
    except DataError:
        return None
