"""One trainer for the UI and the CLI: setup, train, save, cleanup.

``setup`` builds the run (:mod:`modules.trainer.training_run`); the loop takes optimizer steps,
each over ``gradient_accumulation`` batches of the step (:mod:`modules.trainer.step`: draws,
teacher, student, loss), and between steps calls the run's other parts, each in its own module:
the LoRA files (``saving``), backups (``backups``), samples (``sampling``), the drift meter
(``drift``), the run folder's metrics (``run_folder``) and the trackers (``trackers``). On
several processes (``accelerate launch``) each runs the step on its share of the batch
(:mod:`modules.trainer.processes`) and the loop sums the parts of the loss.

The trainer never imports Tk. It reports through frozen-dataclass events on a queue and reads
commands (stop, save, sample) from another.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from modules.config import ConfigError, TrainConfig
from modules.data.concept import DataError
from modules.data.dataset import Batch
from modules.loss import LossBreakdown
from modules.loss.prior_levers import prior_weight_at
from modules.models import ModelLoadError
from modules.trainer.backups import Backups, resume_hint
from modules.trainer.events import (
    Command,
    Event,
    Finished,
    StatusMessage,
    StepMetrics,
)
from modules.trainer.preflight import Preflight, preflight
from modules.trainer.processes import Processes, lost_peer, peer_reason
from modules.trainer.run_folder import MetricsLog, RunLock
from modules.trainer.saving import TrainingError
from modules.trainer.step import StepResult, mean_result, train_step
from modules.trainer.training_run import RunContext, TrainingRun, build_run

__all__ = ["GenericTrainer", "StepResult", "TrainingError"]

log = logging.getLogger(__name__)

_LOSS_FIELDS = tuple(LossBreakdown.__dataclass_fields__)
_EXPERT_SERIES = ("loss_total", "loss_target", "loss_prior")
"""The losses a run with one LoRA per expert also records per expert (``loss_total_low_noise``)."""


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
        self.built: TrainingRun | None = None
        """The run's model, data, optimizer and between-steps parts, once ``setup`` built it."""
        self.backups = Backups(config, self.processes, self._status)

    @property
    def last_saved(self) -> Path | None:
        """The last LoRA written; never one with non-finite weights (they are refused)."""
        return self.built.saver.last_saved if self.built is not None else None

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
                self.built.saver.save_final(self.built.denoiser, self.step)
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
            ("close the trackers", self.built.trackers.end if self.built else lambda: None),
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
        elif self.built is None or self.step == 0:
            text += "No step was trained: no LoRA is saved. "
        elif self.built.saver.save(self.built.denoiser, self.built.saver.final_path, self.step):
            text += f"The LoRA of step {self.step} is saved to {self.built.saver.final_path}. "
        else:
            text += f"The LoRA of step {self.step} could not be saved (see the warning above). "
        return text + resume_hint(self.run_dir, self.last_saved)

    def _failed(self, error: str, kind: str) -> Finished:
        return Finished(step=self.step, lora_path=self.last_saved, error=error, error_kind=kind)

    # ----------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Build the run (:func:`build_run`). ``run`` calls it after :func:`preflight` (the
        checks that need no model) and with the run folder locked; a direct caller (tests,
        benchmarks) gets the preflight here."""
        if self.preflight is None:
            self.preflight = preflight(self.config, create_run_dir=True)
        context = RunContext(
            preflight=self.preflight,
            processes=self.processes,
            backups=self.backups,
            metrics=self.metrics,
            events=self.events,
            commands=self.commands,
            status=self._status,
            resume=self.resume,
        )
        self.built = build_run(self.config, context)
        self.step = self.built.step

    # ----------------------------------------------------------------------------------- train

    def _train(self) -> bool:
        """The loop. Returns True when stopped by a command before the last step."""
        config, parts = self.config.training, self.built.between_steps
        started = time.perf_counter()
        sec_per_step = 0.0
        for part in parts:
            part.start(self.step)
        while self.step < config.steps:
            tick = time.perf_counter()
            result = self.optimizer_step()
            elapsed = time.perf_counter() - tick
            # Smoothed step time for a steady ETA; the first step (warm-up) is not representative.
            sec_per_step = elapsed if self.step <= 2 else 0.9 * sec_per_step + 0.1 * elapsed
            # After the step's timing, so measuring never counts as training time; the readings
            # join the step's metrics.jsonl row.
            readings = {}
            for part in parts:
                readings |= part.readings(self.step)
            self._record(result, elapsed, sec_per_step * (config.steps - self.step), readings)
            for part in parts:
                part.after_step(self.step)
            if self._stop_requested():
                self._status(f"Stopping at step {self.step}: saving the LoRA")
                for part in parts:
                    part.on_stop(self.step)
                return self.step < config.steps
        self._status(f"Finished {self.step} steps in {time.perf_counter() - started:.1f} s")
        return False

    def optimizer_step(self) -> StepResult:
        """One optimizer step over ``gradient_accumulation`` batches (after ``setup``). On
        several processes the gradients are averaged once, after the last batch. The step
        counter advances with it, as the learning-rate schedule does, so the prior schedule
        follows a caller that takes the steps itself (the benchmarks).

        A model trained with one LoRA per expert (WAN 2.2 A14B, expert=both) first draws the
        step's expert from the run's generator: every batch of the step draws its timesteps in
        that expert's range, so only it runs (and is on the device) and only its LoRA and its
        optimizer state change."""
        run, accumulation = self.built, self.config.training.gradient_accumulation
        precision, optimizer = run.precision, run.optimizer
        self.backups.mark_step_start()
        experts = run.model.experts
        expert = experts.draw(run.generator) if experts is not None else None
        results = []
        for index in range(accumulation):
            last = index == accumulation - 1
            no_sync = run.accelerator.no_sync(run.student.runner)
            with contextlib.nullcontext() if last else no_sync:
                result = self._train_step(next(run.batches))
                loss = self.processes.whole_loss(result.loss, run.accelerator)
                result = replace(result, loss=loss)
                if not torch.isfinite(result.loss.total):
                    self._nan_stop(_loss_text(result.loss))
                own = result.own * self.processes.count  # DDP averages: the sum of the parts
                precision.backward(own / accumulation)
            results.append(result)
        lr = float(run.scheduler.get_last_lr()[0])  # the rate this step uses
        precision.unscale(optimizer)
        norm = precision.clip(run.params, self.config.training.max_grad_norm)
        # A finite loss can still give an infinite gradient, and one step with it makes every
        # weight NaN. fp16's loss scaler skips such steps itself, so there it is left to it.
        if precision.scaler is None and not torch.isfinite(norm):
            self._nan_stop("the gradients are not finite")
        precision.step(optimizer)
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # One norm over every LoRA weight: a single number to check, so cheap at every step.
        if not torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in run.params])):
            raise TrainingError(self._nan_message("the LoRA weights became non-finite"))
        self.step += 1
        return replace(mean_result(results), lr=lr, expert=expert)

    def _train_step(self, batch: Batch) -> StepResult:
        """One batch (:func:`train_step`) at this step's prior weight."""
        return train_step(batch, self.built.step_parts, self.prior_weight())

    def prior_weight(self, step: int | None = None) -> float:
        """The prior weight (``prior.schedule``) of optimizer step ``step`` (0: the first;
        None: the one being taken)."""
        prior, steps = self.config.prior, self.config.training.steps
        step = self.step if step is None else step
        return prior_weight_at(prior.weight, prior.schedule, prior.schedule_share, step, steps)

    # ------------------------------------------------------------------------- between steps

    def _record(
        self, result: StepResult, elapsed: float, eta: float, readings: dict[str, float | None]
    ) -> None:
        loss = LossBreakdown(**{name: getattr(result.loss, name).detach() for name in _LOSS_FIELDS})
        metrics = StepMetrics(
            step=self.step,
            total_steps=self.config.training.steps,
            epoch=(self.step - 1) // self.built.steps_per_epoch + 1,
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
            expert=result.expert,
        )
        row = {**metrics.__dict__, **readings}
        if result.expert is None:  # a model with one denoiser: its rows as they always were
            del row["expert"]
        else:  # and the trackers' series of each expert (they log numbers only)
            row |= {f"{name}_{result.expert}": row[name] for name in _EXPERT_SERIES}
        self.built.rows.append(row)
        self.events.put(metrics)

    def _stop_requested(self) -> bool:
        """Carry out Save and Sample; whether a Stop came. On several processes they stop
        together, when any of them was asked to (Ctrl-C reaches each at its own moment)."""
        stop, run = False, self.built
        while not stop:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if command is Command.STOP:
                stop = True
            elif command is Command.SAVE and self.processes.main:
                run.saver.save(run.denoiser, run.saver.final_path, self.step)
            elif command is Command.SAMPLE and self.processes.main:
                run.samples.write(self.step)
        if self.processes.several:
            flag = torch.tensor([float(stop)], device=run.device)
            stop = bool(run.accelerator.reduce(flag, reduction="sum") > 0)
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

    def _nan_message(self, what: str) -> str:
        """``what`` went wrong at the step being taken; names the last (finite) saved LoRA."""
        kept = self.built.saver.kept_text() if self.built is not None else "no LoRA was saved"
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
