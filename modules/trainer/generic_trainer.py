"""One trainer for the UI and the CLI: setup, train, save, cleanup.

The step (design §4.4) with flow matching:

1. noise and timesteps; noisy input and target from the family;
2. per sample, with probability ``mask.unmasked_probability``, its mask becomes all ones;
3. the samples that need the teacher: prior weight map > 0 somewhere, or from a
   ``prior_prediction`` concept. None → the teacher is skipped;
4. teacher: no-grad forward inside ``lora_disabled`` on exactly those samples' inputs;
5. student forward; ``prior_prediction`` samples take the teacher prediction as their target;
6. ``masked_prior_loss``; backward, optimizer, scheduler.

On several processes (``accelerate launch``) every process draws steps 1-3 for the whole batch
alike and runs 4-6 on its share of it (:mod:`modules.trainer.processes`). Between steps the loop
calls the run's other parts, each in its own module: the LoRA files (``saving``), backups
(``backups``), samples (``sampling``), the drift meter (``drift``), the run folder's metrics
(``run_folder``) and the trackers (``trackers``).

The trainer never imports Tk. It reports through frozen-dataclass events on a queue and reads
commands (stop, save, sample) from another.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import time
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from modules.atomic import write_text_atomic
from modules.config import ConfigError, TrainConfig, config_warnings, resolved_config_json
from modules.data.concept import DataError
from modules.data.dataset import Batch
from modules.data.preparation import prepare_dataset
from modules.lora import add_lora, lora_disabled
from modules.lora.init_from import InitFromError, init_lora_from
from modules.loss import LossBreakdown, masked_prior_loss, process_masks
from modules.loss.prior_levers import in_noise_range, prior_weight_at
from modules.models import LoadedModel, ModelFamily, ModelLoadError, get_family, select_text
from modules.models.registry import family_spec
from modules.trainer.backups import Backups, TrainingState, choose_backup
from modules.trainer.banner import banner_lines
from modules.trainer.batch_stream import make_batches
from modules.trainer.drift import DriftMeter
from modules.trainer.events import (
    Command,
    DriftMeasured,
    Event,
    Finished,
    StatusMessage,
    StepMetrics,
)
from modules.trainer.notes import caption_length_notes, device_notes
from modules.trainer.optimizer import make_optimizer, make_scheduler
from modules.trainer.precision import Precision
from modules.trainer.preflight import Preflight, preflight
from modules.trainer.processes import Processes, lost_peer, peer_reason
from modules.trainer.run_folder import (
    MetricsLog,
    RunLock,
    continue_run,
    keep_previous_run,
    os_error_reason,
)
from modules.trainer.sampling import Samples, sample_size
from modules.trainer.saving import LoraSaver, TrainingError
from modules.trainer.trackers import Trackers

__all__ = ["GenericTrainer", "StepResult", "TrainingError"]

log = logging.getLogger(__name__)

_LOSS_FIELDS = tuple(LossBreakdown.__dataclass_fields__)
_SUMMED = ("total", "target", "prior")
"""The loss parts each process computes a part of (the weight means it has whole)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StepResult:
    loss: LossBreakdown
    """The whole batch's loss (on several processes, the sum of every process's part)."""
    teacher_fraction: float
    lr: float = 0.0
    own: torch.Tensor | None = None
    """This process's part of ``loss.total``, attached to the graph: what it backpropagates."""


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
        self.processes = Processes.current()
        self.run_dir = Path(config.output.run_dir)
        self.step = 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.preflight: Preflight | None = None
        """The checks before the model loads (``run`` makes them before taking the lock)."""
        self.trackers: Trackers | None = None
        """TensorBoard / wandb (``output.log_with``), made by ``setup``."""
        self.saver: LoraSaver | None = None
        self.drift: DriftMeter | None = None
        self.backups = Backups(config, self.processes, self._status)

    @property
    def last_saved(self) -> Path | None:
        """The last LoRA written; never one with non-finite weights (they are refused)."""
        return self.saver.last_saved if self.saver is not None else None

    # ----------------------------------------------------------------------------- entry point

    def run(self) -> Finished:
        """Train to the end (or until stopped). Always emits and returns a ``Finished`` event
        and releases the run folder, whatever fails, the cleanup included: a front end waits
        for that event.

        The error is said once, in ``Finished`` (the front end shows it); an unexpected one
        also sends its traceback as a status line first."""
        lock = RunLock(self.run_dir)
        finished: Finished | None = None
        try:
            finished = self._run(lock)
        finally:
            if finished is None:  # only a BaseException (SystemExit, ...) leaves _run without one
                finished = self._failed("the trainer was interrupted", "training")
            try:
                self._clean_up(lock, finished)
            finally:
                self.events.put(finished)
        return finished

    def _run(self, lock: RunLock) -> Finished:
        trained = False
        try:
            self.preflight = preflight(self.config, create_run_dir=True)
            if self.processes.main:
                lock.acquire()
            self.setup()
            trained = True
            stopped = self._train()
            if self.processes.main:
                self.saver.save_final(self.denoiser, self.step)
            return Finished(step=self.step, lora_path=self.last_saved, stopped=stopped)
        except (ConfigError, DataError, ModelLoadError) as error:
            # Before training: nothing was trained and the run folder is as it was.
            return self._failed(str(error), "training" if trained else "config")
        except TrainingError as error:
            return self._failed(str(error), "training")
        except Exception as error:
            if self.processes.several and lost_peer(error):
                return self._failed(self._peer_lost(error, lock), "training")
            self._status(traceback.format_exc().rstrip(), "warning")
            return self._failed(f"unexpected error: {type(error).__name__}: {error}", "training")

    def _clean_up(self, lock: RunLock, finished: Finished) -> None:
        """Close the trackers, release the run folder, end the process group: each step on its
        own, so that one failing skips none of the others (it is said, as a warning)."""
        steps = (
            ("close the trackers", self.trackers.end if self.trackers else lambda: None),
            ("release the run folder's lock", lock.release),
            ("end the process group", lambda: self.processes.close(finished.error is None)),
        )
        for what, step in steps:
            try:
                step()
            except Exception as error:  # cleanup must reach the end whatever it meets
                reason = f"{type(error).__name__}: {error}"
                self._status(f"warning: could not {what} ({reason})", "warning")

    def _peer_lost(self, error: Exception, lock: RunLock) -> str:
        """Another process of the run ended (killed, crashed, out of memory) and every step needs
        all of them: this one stops too. The weights are still those of the last whole step
        (a step changes them only after its last collective), so the process that owns the run
        folder saves them: the main one, or, when it was the one that ended, the first survivor
        to take the folder's lock. The message names the backup ``--resume latest`` takes."""
        text = f"step {self.step + 1}: another process of this run ended ({peer_reason(error)})"
        text += "; every step needs all of them, so this one stops too. "
        owner = self.processes.main
        if not owner:
            try:
                lock.acquire()  # free only when the main process has ended
                owner = True
            except ConfigError:
                pass
        if not owner:
            text += f"The main process saves the LoRA of step {self.step}. "
        elif self.saver is None or self.step == 0:
            text += "No step was trained: no LoRA is saved. "
        elif self.saver.save(self.denoiser, self.saver.final_path, self.step):
            text += f"The LoRA of step {self.step} is saved to {self.saver.final_path}. "
        else:
            text += f"The LoRA of step {self.step} could not be saved (see the warning above). "
        return text + self._resume_hint()

    def _resume_hint(self) -> str:
        """How to go on after a run ended early: the backup ``--resume latest`` continues from."""
        try:
            folder, state, _ = choose_backup(self.run_dir, "latest", lambda _text, _level: None)
        except ConfigError:
            text = "There is no backup to continue from (output.backup_every makes them)"
            if self.last_saved is not None:
                text += f"; a new run can start from the LoRA with lora.init_from={self.last_saved}"
            return text + "."
        return (
            f"To continue, run the same command with --resume latest: it continues from "
            f"{folder} (step {int(state['step'])})."
        )

    def _failed(self, error: str, kind: str) -> Finished:
        return Finished(step=self.step, lora_path=self.last_saved, error=error, error_kind=kind)

    # ----------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load the model, fill the cache, add the LoRA, build optimizer and data order; then,
        with every check passed, move an earlier run's files aside and start this run's.

        ``run`` calls it after :func:`preflight` (the checks that need no model) and with the
        run folder locked; a direct caller (tests, benchmarks) gets the preflight here."""
        config, main = self.config, self.processes.main
        if self.preflight is None:
            self.preflight = preflight(config, create_run_dir=True)
        backup = self.backups.to_resume(self.resume, self.preflight.scans)
        self.accelerator = _new_accelerator(config, self.run_dir / "logs")
        self.trackers = Trackers(self.accelerator, config, self._status)
        self.device = self.accelerator.device
        self.precision = Precision(config.training.mixed_precision, self.device)
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
        comfyui = None
        if config.output.format == "comfyui":
            try:  # now, not at the first save
                comfyui = self.family.comfyui_converter(self.model)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        self.saver = LoraSaver(
            config,
            family=self.family.name,
            comfyui=comfyui,
            events=self.events,
            commands=self.commands,
            status=self._status,
        )
        grid = family_spec(config.model.family).latent_grid(config.model.path)
        # The main process fills the cache; the others wait, then read it.
        with self.accelerator.main_process_first():
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
        prompts = list(config.sampling.prompts) if main else []
        self.samples = Samples(
            config,
            family=self.family,
            model=self.model,
            text=self.family.encode_prompts(self.model, prompts) if prompts else None,
            size=sample_size(config, prepared.bucket_histogram()),
            folder=self.run_dir / "samples",
            events=self.events,
            status=self._status,
            autocast=self.precision.autocast,
            on_image=self.trackers.image,
        )
        if config.drift.every and main:  # needs the text encoder; before the LoRA exists
            self._status("Drift meter: loading the held-out set and the base model's predictions")
            self.drift = DriftMeter(
                config,
                self.family,
                self.model,
                device=self.device,
                autocast=self.precision.autocast,
            )
        captions = caption_length_notes(self.family, self.model, prepared.captions())
        self.family.release_encoders(self.model, keep_decoder=bool(prompts))
        for line in prepared.report_lines():
            self._status(line)
        for level, text in banner_lines(config, prepared.cache_hint()):
            self._status(text, level)
        notes = [*self.preflight.notes, *prepared.notes, *captions]
        notes += device_notes(config, self.device)
        for warning in [*config_warnings(config), *notes]:
            self._status(f"warning: {warning}", "warning")

        denoiser = self.denoiser = self.model.denoiser
        params = self.params = self._add_lora(available[config.lora.targets], backup is None)
        if config.training.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        self.optimizer = make_optimizer(config, params)
        self.scheduler = make_scheduler(config, self.optimizer)
        # On several processes the student's forward goes through DDP (gradients averaged);
        # the teacher, the samples and the drift meter call the denoiser itself.
        wrapper = self.accelerator.prepare_model(denoiser)
        self.student = self.model if wrapper is denoiser else replace(self.model, wrapper=wrapper)
        if not main:  # its own LoRA dropout; the main process goes on as one process would
            torch.manual_seed(self.processes.seed(config.training.seed))
        self.generator = torch.Generator().manual_seed(config.training.seed)
        self.mask_rng = random.Random(config.training.seed)
        self.batches, self.steps_per_epoch = make_batches(
            config, self.dataset, self.generator, self.processes.count
        )
        self.state = self.backups.state = TrainingState(
            denoiser=denoiser,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            batches=self.batches,
            generator=self.generator,
            mask_rng=self.mask_rng,
            scaler=self.precision.scaler,
        )
        if self.processes.several:
            self._status(
                f"Training on {self.processes.count} processes: {config.training.batch_size} "
                f"samples each, {config.training.batch_size * self.processes.count} per batch"
            )
        if backup is not None:
            self.step = self.state.restore(backup.state, self.processes.index, self.processes.count)
            self._status(f"Resuming from {backup.folder} at step {self.step}")
            if main:  # the run folder becomes the backup's run, up to its step
                for line in continue_run(self.run_dir, backup.folder, self.step, self.metrics):
                    self._status(line)
            if main and config.output.log_with == "wandb":
                self._status("wandb: the resumed steps are logged as a new wandb run")
        elif main:
            # Every check has passed: only now is an earlier run's work moved aside.
            kept = keep_previous_run(self.run_dir)
            if kept is not None:
                self._status(f"The run folder held an earlier run: moved its files to {kept}")
            self.metrics.start()
        if main:
            self.trackers.start()
            write_text_atomic(
                self.run_dir / f"{config.output.name}.json", resolved_config_json(config) + "\n"
            )

    def _add_lora(self, target_modules: list[str], new_run: bool) -> list[torch.nn.Parameter]:
        """The run's LoRA, alike on every process: new, or (``lora.init_from``, not on a resume,
        whose backup holds the weights) starting from a LoRA file's weights."""
        lora = self.config.lora
        torch.manual_seed(self.config.training.seed)
        params = add_lora(
            self.model.denoiser,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=target_modules,
        )
        n_params = sum(p.numel() for p in params)
        self._status(f"LoRA: {n_params:,} trainable parameters in {len(params) // 2} layers")
        if lora.init_from and new_run:
            loader = self.family.lora_loader(self.model)
            try:
                report = init_lora_from(self.model.denoiser, lora.init_from, loader)
            except InitFromError as error:
                raise ConfigError(str(error)) from None
            for line in report.lines(lora.rank):
                self._status(line, "warning" if line.startswith("warning") else "info")
        return params

    # ----------------------------------------------------------------------------------- train

    def _train(self) -> bool:
        """The loop. Returns True when stopped by a command before the last step."""
        config = self.config.training
        started = time.perf_counter()
        sec_per_step = 0.0
        if self.drift is not None and self.step == 0:
            # The baseline, in a row of its own: no drift yet, the untrained subject loss.
            self._append_row({"step": self.step, **DriftMeter.row(self._measure_drift())})
        while self.step < config.steps:
            tick = time.perf_counter()
            result = self.optimizer_step()
            elapsed = time.perf_counter() - tick
            # Smoothed step time for a steady ETA; the first step (warm-up) is not representative.
            sec_per_step = elapsed if self.step <= 2 else 0.9 * sec_per_step + 0.1 * elapsed
            # After the step's timing, so measuring never counts as training time; the reading
            # joins the step's metrics.jsonl row.
            drift = self._measure_drift() if self.drift and self.drift.due(self.step) else None
            self._record(result, elapsed, sec_per_step * (config.steps - self.step), drift)
            if self._between_steps():
                if self.drift is not None and drift is None:
                    # Stopped between readings: measure the LoRA that is about to be saved.
                    self._append_row({"step": self.step, **DriftMeter.row(self._measure_drift())})
                return self.step < config.steps
        self._status(f"Finished {self.step} steps in {time.perf_counter() - started:.1f} s")
        return False

    def optimizer_step(self) -> StepResult:
        """One optimizer step over ``gradient_accumulation`` batches (after ``setup``). On
        several processes the gradients are averaged once, after the last batch. The step
        counter advances with it, as the learning-rate schedule does, so the prior schedule
        follows a caller that takes the steps itself (the benchmarks)."""
        accumulation = self.config.training.gradient_accumulation
        self.backups.mark_step_start()
        results = []
        for index in range(accumulation):
            last = index == accumulation - 1
            no_sync = self.accelerator.no_sync(self.student.runner)
            with contextlib.nullcontext() if last else no_sync:
                result = self._whole_batch(self._train_step(next(self.batches)))
                if not torch.isfinite(result.loss.total):
                    self._nan_stop(_loss_text(result.loss))
                own = result.own * self.processes.count  # DDP averages: the sum of the parts
                self.precision.backward(own / accumulation)
            results.append(result)
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step uses
        self.precision.unscale(self.optimizer)
        norm = self.precision.clip(self.params, self.config.training.max_grad_norm)
        # A finite loss can still give an infinite gradient, and one step with it makes every
        # weight NaN. fp16's loss scaler skips such steps itself, so there it is left to it.
        if self.precision.scaler is None and not torch.isfinite(norm):
            self._nan_stop("the gradients are not finite")
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One norm over every LoRA weight: a single number to check, so cheap at every step.
        if not torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in self.params])):
            raise TrainingError(self._nan_message("the LoRA weights became non-finite"))
        self.step += 1
        return replace(_mean_result(results), lr=lr)

    def _train_step(self, batch: Batch) -> StepResult:
        """One batch. Every process holds the same ``batch`` and draws the same noise,
        timesteps and mask dropouts for it; the forwards run on this process's share, whose
        part of the whole batch's loss it returns (all of it on one process)."""
        family, mask_cfg, prior_cfg = self.family, self.config.mask, self.config.prior
        size = batch.latents.shape[0]
        noise = torch.randn(batch.latents.shape, generator=self.generator)
        timesteps = family.sample_timesteps(
            batch.latents.shape, generator=self.generator, device=self.device
        )
        masks = self._step_masks(batch)  # (B, 1, h, w) or None when masked training is off
        needs_teacher = batch.prior_prediction.clone()
        prior_weight = self.prior_weight()
        in_range = self._prior_noise_range(timesteps, batch.latents.shape).cpu()  # (B,) bool
        if masks is not None and prior_weight > 0:
            weights = process_masks(
                masks,
                gamma=mask_cfg.gamma,
                min_weight=mask_cfg.min_weight,
                prior_threshold=prior_cfg.threshold,
            )
            needs_teacher |= (weights.prior.flatten(1).amax(dim=1).cpu() > 0) & in_range
        teacher_fraction = float(needs_teacher.sum()) / size
        pad = self.processes.padded(size)
        if pad is not None:  # fewer samples than processes: each repeated, with its draws
            batch, noise, timesteps = _take(batch, pad), noise[pad], timesteps[pad]
            masks = None if masks is None else masks[pad]
            needs_teacher, in_range, size = needs_teacher[pad], in_range[pad], len(pad)

        share = self.processes.share(size)
        latents = batch.latents[share].to(self.device)  # (b, C, h, w) or (b, C, F, h, w)
        text = {k: v[share].to(self.device) for k, v in batch.text.items()}
        timesteps = timesteps[share]
        noisy, target = family.noisy_input_and_target(
            latents, noise[share].to(self.device), timesteps
        )

        teacher = None
        index = needs_teacher[share].nonzero().squeeze(1).to(self.device)
        if len(index) > 0:
            with torch.no_grad(), self.precision.autocast(), lora_disabled(self.denoiser):
                sub = family.predict(
                    self.model, noisy[index], timesteps[index], select_text(text, index)
                )
            teacher = torch.zeros_like(target, dtype=torch.float32)
            teacher[index] = sub.float()

        with self.precision.autocast():
            prediction = family.predict(self.student, noisy, timesteps, text).float()

        prior_prediction = batch.prior_prediction[share].to(self.device)
        if prior_prediction.any():
            # A prior-prediction sample learns the base model's prediction, everywhere.
            shape = (-1,) + (1,) * (target.ndim - 1)
            target = torch.where(prior_prediction.view(shape), teacher, target.float())
        # Per-sample concept weight, on both terms (broadcast over C, [F,] h, w).
        weight = batch.loss_weight[share].to(self.device).view((-1,) + (1,) * (target.ndim - 1))
        loss = F.mse_loss(prediction, target.float(), reduction="none") * weight
        prior_loss = None
        if teacher is not None and prior_weight > 0:
            # Outside the prior's noise range the teacher did not run: the prior term is 0.
            gate = in_range[share].to(self.device).view(weight.shape).float()
            prior_loss = F.mse_loss(prediction, teacher, reduction="none") * weight * gate
        # The whole batch's loss with the other processes' samples at 0: this process's part
        # of it, normalised over the whole batch's masks.
        loss, prior_loss = (_in_batch(x, share, size) for x in (loss, prior_loss))
        breakdown = masked_prior_loss(
            loss,
            masks,
            prior_loss=prior_loss,
            prior_weight=prior_weight,
            gamma=mask_cfg.gamma,
            min_weight=mask_cfg.min_weight,
            prior_threshold=prior_cfg.threshold,
            normalize_per_sample=mask_cfg.normalize_per_sample,
            layout=family.loss_layout,
        )
        return StepResult(loss=breakdown, teacher_fraction=teacher_fraction, own=breakdown.total)

    def prior_weight(self, step: int | None = None) -> float:
        """The prior weight (``prior.schedule``) of optimizer step ``step`` (0: the first;
        None: the one being taken)."""
        prior, steps = self.config.prior, self.config.training.steps
        step = self.step if step is None else step
        return prior_weight_at(prior.weight, prior.schedule, prior.schedule_share, step, steps)

    def _prior_noise_range(self, timesteps: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B,) bool: the samples whose noise level lies in ``prior.noise_min``-``noise_max``."""
        prior = self.config.prior
        if not prior.gated:
            return torch.ones(timesteps.shape[0], dtype=torch.bool)
        bounds = torch.tensor([prior.noise_min, prior.noise_max])
        low, high = self.family.timesteps_from_fractions(bounds, shape).tolist()
        return in_noise_range(timesteps.cpu(), low, high)

    def _whole_batch(self, result: StepResult) -> StepResult:
        """Every process's parts of the loss summed into the whole batch's (for the log and
        the NaN check, which every process then makes alike)."""
        if not self.processes.several:
            return result
        parts = torch.stack([getattr(result.loss, name).detach().float() for name in _SUMMED])
        summed = self.accelerator.reduce(parts, reduction="sum")
        loss = replace(result.loss, **dict(zip(_SUMMED, summed.unbind(), strict=True)))
        return replace(result, loss=loss)

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
            prior_weight=self.prior_weight(self.step - 1),
            teacher_fraction=result.teacher_fraction,
            lr=result.lr,
            sec_per_step=elapsed,
            eta_seconds=eta,
        )
        row = {**metrics.__dict__, **(DriftMeter.row(drift) if drift is not None else {})}
        self._append_row(row)
        self.events.put(metrics)

    def _append_row(self, row: dict[str, float | int | None]) -> None:
        """A metrics.jsonl row (the main process's); when the disk refuses it, training goes
        on and the rows are written once it takes them again (said once, and again when it
        recovers)."""
        if not self.processes.main:
            return
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
        if self.processes.main:
            self.saver.between_steps(self.denoiser, self.step)
            if sampling.every and sampling.prompts and self.step % sampling.every == 0:
                self.samples.write(self.step)
        if output.backup_every and self.step % output.backup_every == 0:
            self.backups.write(self.step)
        if self._stop_requested():
            self._status(f"Stopping at step {self.step}: saving the LoRA")
            if output.backup_every and self.step % output.backup_every:
                self.backups.write(self.step)
            return True
        return False

    def _stop_requested(self) -> bool:
        """Carry out Save and Sample; whether a Stop came. On several processes they stop
        together, when any of them was asked to (Ctrl-C reaches each at its own moment)."""
        stop = False
        while not stop:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if command is Command.STOP:
                stop = True
            elif command is Command.SAVE and self.processes.main:
                self.saver.save(self.denoiser, self.saver.final_path, self.step)
            elif command is Command.SAMPLE and self.processes.main:
                self.samples.write(self.step)
        if self.processes.several:
            flag = torch.tensor([float(stop)], device=self.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        return stop

    def _nan_stop(self, what: str) -> None:
        """Stop the run on a non-finite loss or gradient: with backups on, first a backup of
        the last whole step (the weights are still its own), to resume from once the cause
        is fixed. Raises TrainingError."""
        folder = None
        if self.config.output.backup_every and self.backups.step_start is not None:
            folder = self.backups.write(self.step, self.backups.step_start)
        message = self._nan_message(what)
        if folder is not None:
            message += f" A backup of step {self.step} is in {folder}."
        raise TrainingError(message)

    def _measure_drift(self) -> DriftMeasured:
        """The drift meter's reading now, emitted; the caller logs it."""
        assert self.drift is not None
        event = self.drift.measure(self.step)
        self.events.put(event)
        return event

    def _nan_message(self, what: str) -> str:
        """``what`` went wrong at the step being taken; names the last (finite) saved LoRA."""
        kept = self.saver.kept_text() if self.saver is not None else "no LoRA was saved"
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


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    """The samples ``index`` of ``batch``, in that order."""
    taken: dict[str, Any] = {}
    for part in fields(Batch):
        value = getattr(batch, part.name)
        taken[part.name] = select_text(value, index) if isinstance(value, dict) else value[index]
    return Batch(**taken)


def _in_batch(values: torch.Tensor | None, share: slice, size: int) -> torch.Tensor | None:
    """Per-sample ``values`` of this process's share placed in a batch of ``size`` at 0."""
    if values is None or values.shape[0] == size:
        return values
    whole = values.new_zeros((size, *values.shape[1:]))
    whole[share] = values
    return whole


def _loss_text(loss: LossBreakdown) -> str:
    total, target, prior = (float(x.detach()) for x in (loss.total, loss.target, loss.prior))
    return f"the loss is not finite (total {total}, target {target}, prior {prior})"


def _new_accelerator(config: TrainConfig, logs: Path) -> Accelerator:
    """An Accelerator for this run: the device, the processes and DDP, its trackers writing to
    ``logs``. Mixed precision is left to :class:`Precision`: accelerate keeps that setting for the
    whole process, and the UI runs many trainings, each with its own, in one process."""
    log_with = config.output.log_with
    return Accelerator(
        mixed_precision="no",
        log_with=None if log_with == "none" else log_with,
        project_dir=str(logs),
    )


def _mean_result(results: list[StepResult]) -> StepResult:
    if len(results) == 1:
        return results[0]
    mean = {
        name: torch.stack([getattr(r.loss, name).detach().float() for r in results]).mean()
        for name in _LOSS_FIELDS
    }
    fraction = sum(r.teacher_fraction for r in results) / len(results)
    return StepResult(loss=LossBreakdown(**mean), teacher_fraction=fraction)
