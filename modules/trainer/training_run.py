"""Building a run: everything the loop needs, made in order and returned as one typed object.

:func:`build_run` loads the model and checks its LoRA targets, makes the saver, fills the cache,
encodes the sampling prompts, loads the drift meter, says the run's notes, adds the LoRA (or
starts it from ``lora.init_from``), makes the optimizer, the data order and the generators,
makes the between-steps parts, restores a backup, and, with every check passed, starts the run
folder and the trackers.
:class:`~modules.trainer.generic_trainer.GenericTrainer` keeps the lifecycle and the loop.
"""

from __future__ import annotations

import queue
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from modules.atomic import write_text_atomic
from modules.config import ConfigError, TrainConfig, config_warnings, resolved_config_json
from modules.data.dataset import ConceptDataset
from modules.data.preparation import PreparedData, prepare_dataset
from modules.lora import add_lora, join_adapters
from modules.lora.init_from import InitFromError, init_lora_from
from modules.models import LoadedModel, ModelFamily, get_family, load_model
from modules.models.base import ComfyConverter
from modules.models.compiled import compile_blocks
from modules.models.memory_estimate import estimate_lines, resolve_blocks_to_swap
from modules.models.registry import conditioning_kinds, family_spec
from modules.trainer.backups import Backups, Resume, TrainingState
from modules.trainer.banner import banner_lines
from modules.trainer.batch_stream import BatchStream, make_batches
from modules.trainer.between_steps import BetweenSteps, MetricsRows, between_steps
from modules.trainer.drift import DriftMeter
from modules.trainer.events import Command, Event
from modules.trainer.notes import caption_length_notes, device_notes, family_notes
from modules.trainer.optimizer import make_optimizer, make_scheduler
from modules.trainer.precision import Precision
from modules.trainer.preflight import Preflight, unknown_targets
from modules.trainer.processes import Processes
from modules.trainer.run_folder import MetricsLog, continue_run, keep_previous_run
from modules.trainer.sampling import Samples, sample_size
from modules.trainer.saving import LoraSaver
from modules.trainer.step import StepParts
from modules.trainer.trackers import Trackers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Status = Callable[..., None]
"""``status(text, level="info")``: a line for the front end."""


@dataclass(frozen=True)
class RunContext:
    """What a run is built from, besides its config: the trainer's own objects."""

    preflight: Preflight
    processes: Processes
    backups: Backups
    metrics: MetricsLog
    events: queue.Queue[Event]
    commands: queue.Queue[Command]
    status: Status
    resume: str | None = None
    """``latest`` or a backup folder to continue from (``--resume``); None: a new run."""


@dataclass(frozen=True)
class TrainingRun:
    """A built run: the model with its LoRA, the data, the optimizer, the between-steps parts."""

    accelerator: Accelerator
    trackers: Trackers
    device: torch.device
    precision: Precision
    family: ModelFamily
    model: LoadedModel
    student: LoadedModel
    """The model the student's forward goes through (DDP on several processes)."""
    params: list[torch.nn.Parameter]
    """The LoRA's weights: what the optimizer trains."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: ConceptDataset
    batches: BatchStream
    steps_per_epoch: int
    generator: torch.Generator
    """Noise, timesteps and the data order."""
    state: TrainingState
    """What a backup holds and a resume restores."""
    saver: LoraSaver
    samples: Samples
    drift: DriftMeter | None
    rows: MetricsRows
    """``metrics.jsonl`` and the trackers."""
    between_steps: list[BetweenSteps]
    """What the loop calls between steps (:mod:`modules.trainer.between_steps`)."""
    step_parts: StepParts
    step: int
    """The step the run starts from (0, or a resumed backup's)."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.denoiser


def build_run(config: TrainConfig, context: RunContext) -> TrainingRun:
    """Load, cache, add the LoRA, build optimizer and data order; then, with every check passed,
    move an earlier run's files aside and start this run's (the run folder is locked)."""
    status, processes, main = context.status, context.processes, context.processes.main
    run_dir = Path(config.output.run_dir)
    backup = context.backups.to_resume(context.resume, context.preflight.scans)
    accelerator = new_accelerator(config, run_dir / "logs")
    trackers = Trackers(accelerator, config, status)
    device = accelerator.device
    precision = Precision(config.training.mixed_precision, device)
    family: ModelFamily = get_family(config.model)

    status(f"Loading {config.model.family} model {config.model.path or '(built-in)'}")
    resolved = resolve_blocks_to_swap(config).model  # blocks_to_swap=auto: a count, estimated
    model = load_model(family, resolved, dtype=DTYPES[config.model.dtype], device=device)
    if model.experts is not None and processes.several:
        raise ConfigError(
            f"model.wan.expert=both trains both experts on one process (this run has "
            f"{processes.count}): run it on one GPU, or train one expert per run on several"
        )
    targets = _lora_targets(config, family, model)
    saver = LoraSaver(
        config,
        family=family.name,
        comfyui=_comfyui(config, family, model),
        events=context.events,
        commands=context.commands,
        status=status,
        experts=dict(model.experts.denoisers) if model.experts is not None else None,
    )
    # The main process fills the cache; the others wait, then read it.
    with accelerator.main_process_first():
        prepared = _prepare(config, family, model, context)
    # Sampling prompts are encoded once, now, so the text encoder can be freed for training.
    prompts = list(config.sampling.prompts) if main else []
    samples = Samples(
        config,
        family=family,
        model=model,
        text=family.encode_prompts(model, prompts) if prompts else None,
        size=sample_size(config, prepared.bucket_histogram()),
        folder=run_dir / "samples",
        events=context.events,
        status=status,
        autocast=precision.autocast,
        on_image=trackers.image,
    )
    drift = None
    if config.drift.every and main:  # needs the text encoder; before the LoRA exists
        status("Drift meter: loading the held-out set and the base model's predictions")
        drift = DriftMeter(config, family, model, device=device, autocast=precision.autocast)
    captions = caption_length_notes(family, model, prepared.captions())
    family.release_encoders(model, keep_decoder=bool(prompts))
    captions += family_notes(family, model)
    _say_notes(config, prepared, captions, context.preflight, device, status)

    denoiser = model.denoiser
    params = _add_lora(config, family, model, targets, backup is None, status)
    for trained in _denoisers(model).values():
        if config.training.gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        trained.train()
        if config.training.compile:  # after the LoRA: the compiled blocks include its layers
            count = compile_blocks(trained, family.blocks)
            status(f"Compiling the denoiser's {count} blocks: the first steps take longer")
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer)
    # On several processes the student's forward goes through DDP (gradients averaged);
    # the teacher, the samples and the drift meter call the denoiser itself.
    wrapper = accelerator.prepare_model(denoiser)
    student = model if wrapper is denoiser else replace(model, wrapper=wrapper)
    if not main:  # its own LoRA dropout; the main process goes on as one process would
        torch.manual_seed(processes.seed(config.training.seed))
    generator = torch.Generator().manual_seed(config.training.seed)
    mask_rng = random.Random(config.training.seed)
    batches, steps_per_epoch = make_batches(config, prepared.dataset, generator, processes.count)
    rows = MetricsRows(context.metrics, trackers, main, status)
    parts = between_steps(
        config,
        main=main,
        saver=saver,
        samples=samples,
        backups=context.backups,
        drift=drift,
        denoiser=denoiser,
        events=context.events,
        rows=rows,
    )
    state = context.backups.state = TrainingState(
        denoiser=denoiser,
        experts=dict(model.experts.denoisers) if model.experts is not None else None,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        generator=generator,
        mask_rng=mask_rng,
        scaler=precision.scaler,
        parts=parts,
    )
    if processes.several:
        status(
            f"Training on {processes.count} processes: {config.training.batch_size} "
            f"samples each, {config.training.batch_size * processes.count} per batch"
        )
    step = _start_run_folder(config, context, state, backup)
    if main:
        trackers.start()
        try:
            write_text_atomic(
                run_dir / f"{config.output.name}.json", resolved_config_json(config) + "\n"
            )
        except BaseException:  # the run is not built: nothing else would close them
            trackers.end()
            raise
    step_parts = StepParts(
        family=family,
        model=model,
        student=student,
        mask=config.mask,
        prior=config.prior,
        generator=generator,
        mask_rng=mask_rng,
        device=device,
        autocast=precision.autocast,
        processes=processes,
    )
    return TrainingRun(
        accelerator=accelerator,
        trackers=trackers,
        device=device,
        precision=precision,
        family=family,
        model=model,
        student=student,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=prepared.dataset,
        batches=batches,
        steps_per_epoch=steps_per_epoch,
        generator=generator,
        state=state,
        saver=saver,
        samples=samples,
        drift=drift,
        rows=rows,
        between_steps=parts,
        step_parts=step_parts,
        step=step,
    )


def new_accelerator(config: TrainConfig, logs: Path) -> Accelerator:
    """An Accelerator for this run: the device, the processes and DDP, its trackers writing to
    ``logs``. Mixed precision is left to :class:`Precision`: accelerate keeps that setting for the
    whole process, and the UI runs many trainings, each with its own, in one process."""
    log_with = config.output.log_with
    return Accelerator(
        mixed_precision="no",
        log_with=None if log_with == "none" else log_with,
        project_dir=str(logs),
    )


def _lora_targets(config: TrainConfig, family: ModelFamily, model: LoadedModel) -> list[str]:
    available = family.lora_targets(model)
    if config.lora.targets not in available:
        denoiser = type(model.denoiser).__name__
        raise ConfigError(unknown_targets(config.lora.targets, denoiser, available))
    return available[config.lora.targets]


def _comfyui(config: TrainConfig, family: ModelFamily, model: LoadedModel) -> ComfyConverter | None:
    """ComfyUI's converter for ``output.format=comfyui``: checked now, not at the first save."""
    if config.output.format != "comfyui":
        return None
    try:
        return family.comfyui_converter(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _prepare(
    config: TrainConfig, family: ModelFamily, model: LoadedModel, context: RunContext
) -> PreparedData:
    grid = family_spec(config.model.family).latent_grid(config.model.path)
    return prepare_dataset(
        config.data,
        family=family,
        model=model,
        pixel_multiple=grid.pixel_multiple,
        progress=lambda done, total: context.status(f"Caching latents {done}/{total}"),
        batch_size=config.training.batch_size,
        scans=context.preflight.scans,
        sources=context.preflight.sources,
        mask=config.mask,
        prior=config.prior,
        conditioning=conditioning_kinds(config.model),
    )


def _say_notes(
    config: TrainConfig,
    prepared: PreparedData,
    captions: list[str],
    checks: Preflight,
    device: torch.device,
    status: Status,
) -> None:
    """The data report, the banner, and every warning about this run."""
    for line in [*prepared.report_lines(), *checks.pairs]:
        status(line)
    for level, text in banner_lines(config, prepared.cache_hint()):
        status(text, level)
    for line in estimate_lines(config):
        status(line, "warning" if "is over" in line else "info")
    notes = [*checks.notes, *prepared.notes, *captions, *device_notes(config, device)]
    for warning in [*config_warnings(config), *notes]:
        status(f"warning: {warning}", "warning")


def _add_lora(
    config: TrainConfig,
    family: ModelFamily,
    model: LoadedModel,
    target_modules: list[str],
    new_run: bool,
    status: Status,
) -> list[torch.nn.Parameter]:
    """The run's LoRA, alike on every process: new, or (``lora.init_from``, not on a resume,
    whose backup holds the weights) starting from a LoRA file's weights. A model trained with
    several experts (WAN 2.2 A14B, expert=both) gets one LoRA per expert, all trained by the
    one optimizer: an expert's weights get no gradient on the other's steps, so neither their
    values nor their optimizer state change then."""
    lora = config.lora
    torch.manual_seed(config.training.seed)
    denoisers = _denoisers(model)
    starts = _init_files(lora.init_from, denoisers) if lora.init_from and new_run else {}
    params: list[torch.nn.Parameter] = []
    for name, denoiser in denoisers.items():
        own = add_lora(
            denoiser,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=target_modules,
        )
        params += own
        n_params = sum(p.numel() for p in own)
        whose = f" ({name} expert)" if name else ""
        status(f"LoRA{whose}: {n_params:,} trainable parameters in {len(own) // 2} layers")
        if name in starts:
            loader = family.lora_loader(model)
            try:
                report = init_lora_from(denoiser, starts[name], loader)
            except InitFromError as error:
                raise ConfigError(str(error)) from None
            for line in report.lines(lora.rank):
                status(line, "warning" if line.startswith("warning") else "info")
    if len(denoisers) > 1:
        join_adapters(list(denoisers.values()))  # the teacher: every expert without its LoRA
    return params


def _denoisers(model: LoadedModel) -> dict[str | None, torch.nn.Module]:
    """The denoisers a LoRA trains on, by expert name (None: the model's one denoiser)."""
    if model.experts is None:
        return {None: model.denoiser}
    return dict(model.experts.denoisers)


def _init_files(
    init_from: str, denoisers: dict[str | None, torch.nn.Module]
) -> dict[str | None, str]:
    """``lora.init_from``'s file for each denoiser: the file itself for one denoiser; for
    several experts, the file of each expert's name beside it (``X-high_noise.safetensors``
    and ``X-low_noise.safetensors``, the files a run with expert=both writes)."""
    if list(denoisers) == [None]:
        return {None: init_from}
    path = Path(init_from).expanduser()
    for name in denoisers:
        suffix = f"-{name}"
        if path.stem.endswith(suffix):
            stem = path.stem.removesuffix(suffix)
            files = {other: path.with_name(f"{stem}-{other}{path.suffix}") for other in denoisers}
            missing = [str(file) for file in files.values() if not file.is_file()]
            if missing:
                raise ConfigError(
                    f"lora.init_from: {', '.join(missing)} not found; with model.wan.expert=both "
                    "each expert starts from its own file of the pair the run writes"
                )
            return {other: str(file) for other, file in files.items()}
    names = " and ".join(f"-{name}.safetensors" for name in denoisers)
    raise ConfigError(
        f"lora.init_from: {path} is not one of a pair of expert files (names ending in "
        f"{names}); with model.wan.expert=both each expert starts from its own file: name "
        "either file of the pair"
    )


def _start_run_folder(
    config: TrainConfig, context: RunContext, state: TrainingState, backup: Resume | None
) -> int:
    """The step the run starts from. A resume restores the backup and makes the run folder its
    run up to that step; a new run moves an earlier run's files aside (every check has passed:
    only now)."""
    status, processes, main = context.status, context.processes, context.processes.main
    run_dir = Path(config.output.run_dir)
    if backup is not None:
        step = state.restore(backup.state, processes.index, processes.count)
        status(f"Resuming from {backup.folder} at step {step}")
        if main:  # the run folder becomes the backup's run, up to its step
            for line in continue_run(run_dir, backup.folder, step, context.metrics):
                status(line)
        if main and config.output.log_with == "wandb":
            status("wandb: the resumed steps are logged as a new wandb run")
        return step
    if main:
        kept = keep_previous_run(run_dir)
        if kept is not None:
            status(f"The run folder held an earlier run: moved its files to {kept}")
        context.metrics.start()
    return 0
