"""One trainer for the UI and the CLI: setup, train, save, cleanup.

The step (design §4.4) with flow matching:

1. noise and timesteps; noisy input and target from the family;
2. per sample, with probability ``mask.unmasked_probability``, its mask becomes all ones;
3. the samples that need the teacher: prior weight map > 0 somewhere, or from a
   ``prior_prediction`` concept. None → the teacher is skipped;
4. teacher: no-grad forward inside ``lora_disabled`` on exactly those samples' inputs;
5. student forward; ``prior_prediction`` samples take the teacher prediction as their target;
6. ``masked_prior_loss``; backward, optimizer, scheduler.

The trainer never imports Tk. It reports through frozen-dataclass events on a queue and reads
commands (stop, save, sample) from another.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import random
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers.optimization import get_scheduler
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader

from modules.atomic import write_text_atomic
from modules.config import ConfigError, TrainConfig, config_warnings, resolved_config_json
from modules.data.batches import BucketBatchSampler
from modules.data.concept import DataError
from modules.data.dataset import Batch, collate
from modules.data.preparation import prepare_dataset
from modules.lora import (
    NonFiniteLoraError,
    add_lora,
    lora_disabled,
    save_lora,
)
from modules.loss import LossBreakdown, masked_prior_loss, process_masks
from modules.models import LoadedModel, ModelFamily, ModelLoadError, get_family, select_text
from modules.models.registry import family_spec
from modules.trainer.backups import compare_configs, find_backup, read_backup, write_backup
from modules.trainer.banner import banner_lines
from modules.trainer.batch_stream import BatchStream
from modules.trainer.drift import HeldOutSet, measure_drift
from modules.trainer.events import (
    Command,
    DriftMeasured,
    Event,
    FileSaved,
    Finished,
    StatusMessage,
    StepMetrics,
)
from modules.trainer.preflight import Preflight, preflight
from modules.trainer.run_folder import MetricsLog, RunLock, keep_previous_run, os_error_reason
from modules.trainer.sampling import Samples, sample_size
from modules.trainer.trackers import Trackers

log = logging.getLogger(__name__)

_LOSS_FIELDS = tuple(LossBreakdown.__dataclass_fields__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(RuntimeError):
    """The run cannot go on (for example a NaN loss). The message says why and what to change."""


SAVE_RETRY_SECONDS = 10.0
"""How often the final save is tried again after it failed (a full disk, a lost mount)."""
SAVE_RETRY_STEPS = 100
"""How often, in steps, a failed save is tried again between scheduled saves."""


@dataclass(frozen=True)
class StepResult:
    loss: LossBreakdown
    teacher_fraction: float
    lr: float = 0.0


class GenericTrainer:
    def __init__(
        self,
        config: TrainConfig,
        events: queue.Queue[Event] | None = None,
        commands: queue.Queue[Command] | None = None,
        resume: str | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        """``latest`` or a backup folder to continue from (``--resume``); None: a new run."""
        self.events: queue.Queue[Event] = events if events is not None else queue.Queue()
        self.commands: queue.Queue[Command] = commands if commands is not None else queue.Queue()
        self.run_dir = Path(config.output.run_dir)
        self.lora_path = self.run_dir / f"{config.output.name}.safetensors"
        self.last_saved: Path | None = None
        """The last LoRA written; never one with non-finite weights (they are refused)."""
        self.unsaved: Path | None = None
        """A save that failed (e.g. a full disk), tried again at the next save point."""
        self.step = 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.preflight: Preflight | None = None
        """The checks before the model loads (``run`` makes them before taking the lock)."""
        self.trackers: Trackers | None = None
        """TensorBoard / wandb (``output.log_with``), made by ``setup``."""

    # ----------------------------------------------------------------------------- entry point

    def run(self) -> Finished:
        """Train to the end (or until stopped). Always emits and returns a ``Finished`` event.

        The error is said once, in ``Finished`` (the front end shows it); an unexpected one
        also sends its traceback as a status line first."""
        lock = RunLock(self.run_dir)
        trained = False
        try:
            self.preflight = preflight(self.config, create_run_dir=True)
            lock.acquire()
            self.setup()
            trained = True
            stopped = self._train()
            self._save_final()
            finished = Finished(step=self.step, lora_path=self.last_saved, stopped=stopped)
        except (ConfigError, DataError, ModelLoadError) as error:
            # Before training: nothing was trained and the run folder is as it was.
            kind = "training" if trained else "config"
            finished = self._failed(str(error), kind)
        except TrainingError as error:
            finished = self._failed(str(error), "training")
        except Exception as error:
            self._status(traceback.format_exc().rstrip(), "warning")
            finished = self._failed(
                f"unexpected error: {type(error).__name__}: {error}", "training"
            )
        finally:
            if self.trackers is not None:
                self.trackers.end()
            lock.release()
        self.events.put(finished)
        return finished

    def _failed(self, error: str, kind: str) -> Finished:
        return Finished(step=self.step, lora_path=self.last_saved, error=error, error_kind=kind)

    # ----------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load the model, fill the cache, add the LoRA, build optimizer and data order; then,
        with every check passed, move an earlier run's files aside and start this run's.

        ``run`` calls it after :func:`preflight` (the checks that need no model) and with the
        run folder locked; a direct caller (tests, benchmarks) gets the preflight here."""
        config = self.config
        if self.preflight is None:
            self.preflight = preflight(config, create_run_dir=True)
        backup = self._backup_to_resume()
        self.accelerator = _new_accelerator(config, self.run_dir / "logs")
        self.trackers = Trackers(self.accelerator, config)
        self.device = self.accelerator.device
        self.family: ModelFamily = get_family(config.model)

        self._status(f"Loading {config.model.family} model {config.model.path or '(built-in)'}")
        self.model: LoadedModel = self.family.load(
            config.model.path, dtype=DTYPES[config.model.dtype], device=self.device
        )
        available = self.family.lora_targets(self.model)
        if config.lora.targets not in available:
            raise ConfigError(
                f"lora.targets={config.lora.targets}: this model's denoiser "
                f"({type(self.model.denoiser).__name__}) has no such preset; choose one of "
                f"{', '.join(available)}"
            )
        self.comfyui = None
        if config.output.format == "comfyui":
            try:  # now, not at the first save
                self.comfyui = self.family.comfyui_converter(self.model)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        grid = family_spec(config.model.family).latent_grid(config.model.path)
        prepared = prepare_dataset(
            config.data,
            family=self.family,
            model=self.model,
            pixel_multiple=grid.pixel_multiple,
            progress=lambda done, total: self._status(f"Caching latents {done}/{total}"),
            batch_size=config.training.batch_size,
            scans=self.preflight.scans,
            sources=self.preflight.sources,
            mask=config.mask,
            prior=config.prior,
        )
        self.dataset = prepared.dataset
        # Sampling prompts are encoded once, now, so the text encoder can be freed for training.
        prompts = list(config.sampling.prompts)
        self.samples = Samples(
            config,
            family=self.family,
            model=self.model,
            text=self.family.encode_prompts(self.model, prompts) if prompts else None,
            size=sample_size(config, prepared.bucket_histogram()),
            folder=self.run_dir / "samples",
            events=self.events,
            status=self._status,
            autocast=self.accelerator.autocast,
            on_image=self.trackers.image,
        )
        self.heldout = self._build_heldout()  # needs the text encoder; before the LoRA exists
        captions = _caption_length_note(self.family, self.model, prepared.captions())
        self.family.release_encoders(self.model, keep_decoder=bool(prompts))
        for line in prepared.report_lines():
            self._status(line)
        for level, text in banner_lines(config, prepared.cache_hint()):
            self._status(text, level)
        notes = [*self.preflight.notes, *prepared.notes, *captions, *self._device_notes()]
        for warning in [*config_warnings(config), *notes]:
            self._status(f"warning: {warning}", "warning")

        torch.manual_seed(config.training.seed)  # LoRA init
        denoiser = self.model.denoiser
        params = add_lora(
            denoiser,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=available[config.lora.targets],
        )
        if config.training.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        self.params = params
        self.optimizer = _make_optimizer(config, params)
        self.scheduler = get_scheduler(
            _scheduler_name(config),
            self.optimizer,
            num_warmup_steps=config.training.warmup_steps,
            num_training_steps=config.training.steps,
        )
        self.model.denoiser, self.optimizer, self.scheduler = self.accelerator.prepare(
            denoiser, self.optimizer, self.scheduler
        )
        self.generator = torch.Generator().manual_seed(config.training.seed)
        self.mask_rng = random.Random(config.training.seed)
        self.batches = self._batches()
        n_params = sum(p.numel() for p in params)
        self._status(f"LoRA: {n_params:,} trainable parameters in {len(params) // 2} layers")
        if backup is not None:
            self._restore(*backup)
            self.metrics.resume(self.step)
        else:
            # Every check has passed: only now is an earlier run's work moved aside.
            kept = keep_previous_run(self.run_dir)
            if kept is not None:
                self._status(f"The run folder held an earlier run: moved its files to {kept}")
            self.metrics.start()
        self.trackers.start()
        write_text_atomic(
            self.run_dir / f"{config.output.name}.json", resolved_config_json(config) + "\n"
        )

    def _device_notes(self) -> list[str]:
        if self.device.type == "cpu" and self.config.training.mixed_precision == "fp16":
            return [
                "training.mixed_precision=fp16 does nothing on a CPU: this run trains in "
                "float32; use bf16 (CPUs support it) or no"
            ]
        return []

    # ----------------------------------------------------------------------------------- train

    def _train(self) -> bool:
        """The loop. Returns True when stopped by a command before the last step."""
        config = self.config.training
        started = time.perf_counter()
        sec_per_step = 0.0
        if self.heldout is not None and self.step == 0:
            # The baseline, in a row of its own: no drift yet, the untrained subject loss.
            self._append_row({"step": self.step, **_drift_row(self._measure_drift())})
        while self.step < config.steps:
            tick = time.perf_counter()
            result = self.optimizer_step()
            self.step += 1
            elapsed = time.perf_counter() - tick
            # Smoothed step time for a steady ETA; the first step (warm-up) is not representative.
            sec_per_step = elapsed if self.step <= 2 else 0.9 * sec_per_step + 0.1 * elapsed
            # After the step's timing, so measuring never counts as training time; the reading
            # joins the step's metrics.jsonl row.
            drift = self._measure_drift() if self._drift_due() else None
            self._record(result, elapsed, sec_per_step * (config.steps - self.step), drift)
            if self._between_steps():
                if self.heldout is not None and drift is None:
                    # Stopped between readings: measure the LoRA that is about to be saved.
                    self._append_row({"step": self.step, **_drift_row(self._measure_drift())})
                return self.step < config.steps
        self._status(f"Finished {self.step} steps in {time.perf_counter() - started:.1f} s")
        return False

    def optimizer_step(self) -> StepResult:
        """One optimizer step over ``gradient_accumulation`` batches (after ``setup``)."""
        accumulation = self.config.training.gradient_accumulation
        results = []
        for _ in range(accumulation):
            result = self._train_step(next(self.batches))
            if not torch.isfinite(result.loss.total):
                raise TrainingError(self._nan_message(_loss_text(result.loss)))
            self.accelerator.backward(result.loss.total / accumulation)
            results.append(result)
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step uses
        if self.config.training.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.training.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        # A finite loss can still give an infinite gradient, and one step with it makes every
        # weight NaN. fp16's loss scaler skips such steps itself, so there it is left to it.
        if self.accelerator.scaler is None and not torch.isfinite(norm):
            raise TrainingError(self._nan_message("the gradients are not finite"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One norm over every LoRA weight: a single number to check, so cheap at every step.
        if not torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in self.params])):
            raise TrainingError(self._nan_message("the LoRA weights became non-finite"))
        return replace(_mean_result(results), lr=lr)

    def _train_step(self, batch: Batch) -> StepResult:
        family, model, mask_cfg, prior_cfg = (
            self.family,
            self.model,
            self.config.mask,
            self.config.prior,
        )
        latents = batch.latents.to(self.device)  # (B, C, h, w) or (B, C, F, h, w)
        text = {k: v.to(self.device) for k, v in batch.text.items()}
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        timesteps = family.sample_timesteps(
            latents.shape, generator=self.generator, device=self.device
        )
        noisy, target = family.noisy_input_and_target(latents, noise, timesteps)

        masks = self._step_masks(batch)  # (B, 1, h, w) or None when masked training is off
        needs_teacher = batch.prior_prediction.clone()
        if masks is not None and prior_cfg.weight > 0:
            weights = process_masks(
                masks,
                gamma=mask_cfg.gamma,
                min_weight=mask_cfg.min_weight,
                prior_threshold=prior_cfg.threshold,
            )
            needs_teacher |= weights.prior.flatten(1).amax(dim=1).cpu() > 0

        teacher = None
        index = needs_teacher.nonzero().squeeze(1).to(self.device)
        if len(index) > 0:
            with torch.no_grad(), self.accelerator.autocast(), lora_disabled(model.denoiser):
                sub = family.predict(
                    model, noisy[index], timesteps[index], select_text(text, index)
                )
            teacher = torch.zeros_like(target, dtype=torch.float32)
            teacher[index] = sub.float()

        with self.accelerator.autocast():
            prediction = family.predict(model, noisy, timesteps, text).float()

        prior_prediction = batch.prior_prediction.to(self.device)
        if prior_prediction.any():
            # A prior-prediction sample learns the base model's prediction, everywhere.
            shape = (-1,) + (1,) * (target.ndim - 1)
            target = torch.where(prior_prediction.view(shape), teacher, target.float())
        # Per-sample concept weight, on both terms (broadcast over C, [F,] h, w).
        sample_weight = batch.loss_weight.to(self.device).view((-1,) + (1,) * (target.ndim - 1))
        loss = F.mse_loss(prediction, target.float(), reduction="none") * sample_weight
        prior_loss = None
        if teacher is not None and prior_cfg.weight > 0:
            prior_loss = F.mse_loss(prediction, teacher, reduction="none") * sample_weight
        breakdown = masked_prior_loss(
            loss,
            masks,
            prior_loss=prior_loss,
            prior_weight=prior_cfg.weight,
            gamma=mask_cfg.gamma,
            min_weight=mask_cfg.min_weight,
            prior_threshold=prior_cfg.threshold,
            normalize_per_sample=mask_cfg.normalize_per_sample,
            layout=family.loss_layout,
        )
        return StepResult(loss=breakdown, teacher_fraction=len(index) / size)

    def _step_masks(self, batch: Batch) -> torch.Tensor | None:
        """This step's masks: per sample dropped to all ones with ``unmasked_probability``.

        Prior-prediction samples also get all ones: their whole image learns the teacher.
        """
        if not self.config.mask.enabled:
            return None
        masks = batch.masks.to(self.device, torch.float32).clone()
        probability = self.config.mask.unmasked_probability
        for i in range(masks.shape[0]):
            dropped = probability > 0 and self.mask_rng.random() < probability
            if dropped or bool(batch.prior_prediction[i]):
                masks[i] = 1.0
        return masks

    def _batches(self) -> BatchStream:
        """Endless batches: each pass over the loader reshuffles with the run's seed. With
        buckets every batch comes from one bucket (``BucketBatchSampler``); without, a batch
        is any ``batch_size`` samples and the last, smaller one of a pass is dropped."""
        seed, size = self.config.training.seed + 1, self.config.training.batch_size
        collate_fn = functools.partial(collate, generator=self.generator)
        order = torch.Generator().manual_seed(seed)
        if self.config.data.buckets:
            sampler = BucketBatchSampler(self.dataset.latent_shapes(), size, order)
            loader = DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=order
            )
        else:
            loader = DataLoader(
                self.dataset,
                batch_size=size,
                shuffle=True,
                drop_last=len(self.dataset) >= size,
                collate_fn=collate_fn,
                generator=order,
            )
        self.steps_per_epoch = max(1, len(loader) // self.config.training.gradient_accumulation)
        return BatchStream(loader, order)

    # ------------------------------------------------------------------------- between steps

    def _record(
        self, result: StepResult, elapsed: float, eta: float, drift: DriftMeasured | None
    ) -> None:
        loss = LossBreakdown(**{name: getattr(result.loss, name).detach() for name in _LOSS_FIELDS})
        metrics = StepMetrics(
            step=self.step,
            total_steps=self.config.training.steps,
            epoch=(self.step - 1) // self.steps_per_epoch + 1,
            loss_total=float(loss.total),
            loss_target=float(loss.target),
            loss_prior=float(loss.prior),
            target_weight_mean=float(loss.target_weight_mean),
            prior_weight_mean=float(loss.prior_weight_mean),
            teacher_fraction=result.teacher_fraction,
            lr=result.lr,
            sec_per_step=elapsed,
            eta_seconds=eta,
        )
        row = {**metrics.__dict__, **(_drift_row(drift) if drift is not None else {})}
        self._append_row(row)
        self.events.put(metrics)

    def _append_row(self, row: dict[str, float | int | None]) -> None:
        """A metrics.jsonl row; when the disk refuses it, training goes on and the rows are
        written once it takes them again (said once, and again when it recovers)."""
        was_failing = self.metrics.pending > 0
        error = self.metrics.append(row)
        self.trackers.log(row)
        if error is not None and not was_failing:
            self._status(
                f"warning: cannot write {self.metrics.path} ({os_error_reason(error)}): training "
                "goes on; the rows are kept and written when the disk takes them again",
                "warning",
            )
        elif error is None and was_failing:
            self._status(f"{self.metrics.path}: written again, no row lost")

    def _between_steps(self) -> bool:
        """Scheduled saves and samples, then commands. Returns True when asked to stop."""
        output, sampling = self.config.output, self.config.sampling
        if output.save_every and self.step % output.save_every == 0:
            self._save(self.run_dir / f"{output.name}-step{self.step:06d}.safetensors")
        elif self.unsaved is not None and self.step % SAVE_RETRY_STEPS == 0:
            self._save(self.unsaved)
        if sampling.every and sampling.prompts and self.step % sampling.every == 0:
            self.samples.write(self.step)
        if output.backup_every and self.step % output.backup_every == 0:
            self._backup()
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return False
            if command is Command.STOP:
                self._status(f"Stopping at step {self.step}: saving the LoRA")
                if output.backup_every and self.step % output.backup_every:
                    self._backup()
                return True
            if command is Command.SAVE:
                self._save(self.lora_path)
            elif command is Command.SAMPLE:
                self.samples.write(self.step)

    # ------------------------------------------------------------------ backups and resume

    def _backup_to_resume(self) -> tuple[Path, dict[str, Any]] | None:
        """The backup ``--resume`` names, its config checked against this run's (before
        anything loads); None for a new run."""
        if self.resume is None:
            return None
        folder = find_backup(self.run_dir, self.resume)
        state, config = read_backup(folder)
        changed = compare_configs(config, json.loads(resolved_config_json(self.config)))
        if changed:
            self._status(f"Resuming with other settings of {', '.join(changed)} (allowed)")
        return folder, state

    def _restore(self, folder: Path, state: dict[str, Any]) -> None:
        """Put the run back as it was when ``folder`` was written."""
        denoiser = self.accelerator.unwrap_model(self.model.denoiser)
        set_peft_model_state_dict(denoiser, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.restore(state["data"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.generator.set_state(rng["noise"])
        self.mask_rng.setstate(rng["mask"])
        self.step = int(state["step"])
        self._status(f"Resuming from {folder} at step {self.step}")

    def _backup(self) -> None:
        """Write a backup of now; a disk that refuses it is said, and training goes on."""
        denoiser = self.accelerator.unwrap_model(self.model.denoiser)
        lora = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(denoiser).items()}
        state = {
            "step": self.step,
            "lora": lora,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "noise": self.generator.get_state(),
                "mask": self.mask_rng.getstate(),
            },
        }
        config_json = resolved_config_json(self.config)
        try:
            folder = write_backup(
                self.run_dir, self.step, state, config_json, self.config.output.backup_keep
            )
        except OSError as error:
            self._status(
                f"warning: could not write the backup of step {self.step} "
                f"({os_error_reason(error)}): training goes on; the earlier backups are kept",
                "warning",
            )
            return
        self._status(f"Backup: {folder}")

    def _save(self, path: Path) -> bool:
        """Write the LoRA to ``path``. A file system error (a full disk, a lost mount) is said
        with the file and the reason, and training goes on: the weights are in memory, the
        earlier file at ``path`` is intact (atomic write), and the save is tried again at the
        next save point and at the end. Returns whether it was written."""
        denoiser = self.accelerator.unwrap_model(self.model.denoiser)
        try:
            save_lora(
                denoiser,
                path,
                family=self.family.name,
                config_json=resolved_config_json(self.config),
                layout=self.config.output.format,
                comfyui=self.comfyui,
            )
        except NonFiniteLoraError as error:  # the step checks make this unreachable; kept safe
            raise TrainingError(self._nan_message(str(error))) from None
        except OSError as error:
            self.unsaved = path
            self._status(
                f"warning: could not save {path} ({os_error_reason(error)}): training goes on with "
                "the LoRA in memory; the save is tried again at the next save point and at the end"
                + (f" (last saved: {self.last_saved})" if self.last_saved else ""),
                "warning",
            )
            return False
        self.unsaved = None
        self.last_saved = path
        self.events.put(FileSaved(path=path, step=self.step))
        self._status(f"Saved {path} (step {self.step})")
        return True

    def _save_final(self) -> None:
        """The end-of-run save, tried until it succeeds: the trained weights exist only in
        memory. Every ``SAVE_RETRY_SECONDS`` until it is written, or until a Stop gives up."""
        while not self._save(self.lora_path):
            self._status(
                f"The LoRA is not saved yet: free space in (or fix) {self.run_dir}; trying again "
                f"every {SAVE_RETRY_SECONDS:g} s. Stop again to give up on this run's LoRA.",
                "warning",
            )
            try:
                command = self.commands.get(timeout=SAVE_RETRY_SECONDS)
            except queue.Empty:
                continue
            if command is Command.STOP:
                kept = f"; the last saved LoRA is {self.last_saved}" if self.last_saved else ""
                raise TrainingError(f"the LoRA could not be saved to {self.lora_path}{kept}")

    def _build_heldout(self) -> HeldOutSet | None:
        drift = self.config.drift
        if not drift.every:
            return None
        self._status("Drift meter: loading the held-out set and the base model's predictions")
        return HeldOutSet.build(
            self.family,
            self.model,
            subject_path=drift.subject_path,
            world_path=drift.world_path,
            resolution=self.config.data.resolution,
            timesteps=drift.timesteps,
            seed=drift.seed,
            max_images=drift.max_images,
            device=self.device,
            autocast=self.accelerator.autocast,
            batch_size=self.config.training.batch_size,
        )

    def _drift_due(self) -> bool:
        """A reading every ``drift.every`` steps and after the last step."""
        every, last = self.config.drift.every, self.config.training.steps
        return self.heldout is not None and (self.step % every == 0 or self.step == last)

    def _measure_drift(self) -> DriftMeasured:
        """Measure the drift meter's reading now and emit it; the caller logs it."""
        assert self.heldout is not None
        tick = time.perf_counter()
        reading = measure_drift(
            self.family,
            self.model,
            self.heldout,
            batch_size=self.config.training.batch_size,
            autocast=self.accelerator.autocast,
        )
        event = DriftMeasured(
            step=self.step,
            subject_loss=reading.subject_loss,
            drift_background=reading.drift_background,
            drift_world=reading.drift_world,
            seconds=time.perf_counter() - tick,
        )
        self.events.put(event)
        return event

    def _nan_message(self, what: str) -> str:
        """``what`` went wrong at the step being taken; names the last (finite) saved LoRA."""
        kept = (
            f"the last saved LoRA, {self.last_saved}, is kept (its weights are finite)"
            if self.last_saved
            else "no LoRA had been saved yet, and none with non-finite weights is written"
        )
        return (
            f"step {self.step + 1}: {what}; training stopped and {kept}. "
            "Lower training.learning_rate, use mixed_precision bf16 instead of fp16, or check "
            "the images for broken files."
        )

    def _status(self, text: str, level: str = "info") -> None:
        # The events are how a front end hears the trainer; the log has them for library use
        # at DEBUG only, so a front end that also logs to the console shows nothing twice.
        log.debug(text)
        self.events.put(StatusMessage(text, level))


def _loss_text(loss: LossBreakdown) -> str:
    total, target, prior = (float(x.detach()) for x in (loss.total, loss.target, loss.prior))
    return f"the loss is not finite (total {total}, target {target}, prior {prior})"


def _caption_length_note(family: ModelFamily, model: LoadedModel, captions: list[str]) -> list[str]:
    """Captions longer than the text encoder reads: it sees only their start."""
    if not captions:
        return []
    lengths, limit = family.prompt_token_counts(model, captions)
    long = [caption for caption, n in zip(captions, lengths, strict=True) if n > limit]
    if not long:
        return []
    example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
    return [
        f"{len(long)} of {len(captions)} distinct captions are longer than the {limit} tokens "
        f"the text encoder reads and are cut there (e.g. '{example}'): shorten them"
    ]


def _new_accelerator(config: TrainConfig, logs: Path) -> Accelerator:
    """An Accelerator for this run (its trackers writing to ``logs``). accelerate keeps its
    settings in a process-wide singleton that refuses a second mixed-precision mode; the UI runs
    many trainings in one process, each with its own config, so the singleton is cleared first
    (one run at a time per process)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    log_with = config.output.log_with
    return Accelerator(
        mixed_precision=config.training.mixed_precision,
        log_with=None if log_with == "none" else log_with,
        project_dir=str(logs),
    )


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    training = config.training
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.learning_rate, momentum=0.9)
    return torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)


def _scheduler_name(config: TrainConfig) -> str:
    name = config.training.scheduler
    if name == "constant" and config.training.warmup_steps > 0:
        return "constant_with_warmup"
    return name


def _mean_result(results: list[StepResult]) -> StepResult:
    if len(results) == 1:
        return results[0]
    mean = {
        name: torch.stack([getattr(r.loss, name).detach().float() for r in results]).mean()
        for name in _LOSS_FIELDS
    }
    fraction = sum(r.teacher_fraction for r in results) / len(results)
    return StepResult(loss=LossBreakdown(**mean), teacher_fraction=fraction)


def _drift_row(reading: DriftMeasured) -> dict[str, float | None]:
    """A drift reading's metrics.jsonl keys (the subject loss is the held-out set's)."""
    return {
        "heldout_subject_loss": reading.subject_loss,
        "drift_background": reading.drift_background,
        "drift_world": reading.drift_world,
        "drift_seconds": reading.seconds,
    }
