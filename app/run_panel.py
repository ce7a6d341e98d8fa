"""The Run tab: Start, Stop, Save now, Sample now; progress; live charts; the drift meter;
samples; the log.

Events come from :class:`app.trainer_thread.TrainerThread` and are drained here every
``DRAIN_MS`` in batches of at most ``MAX_EVENTS`` (Tk's own thread only). A trainer error
shows a dialog and stays in the log; the panel goes back to idle and can start again.
"""

from __future__ import annotations

import time
import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import customtkinter as ctk
from PIL import Image

from app import dialogs
from app.charts import ChartData, DriftCharts, DriftData, RunCharts, read_history
from app.config_form import Validation
from app.layout import FlowFrame, follow_width
from app.style import ERROR_COLOUR, MUTED_COLOUR, OK_COLOUR, WARNING_COLOUR, mono_font
from app.trainer_thread import TrainerThread, WorkerFailed

if TYPE_CHECKING:
    from modules.config import TrainConfig

DRAIN_MS = 50
MAX_EVENTS = 200
REDRAW_SECONDS = 0.5
LOG_LINES = 5000
SAMPLE_PX = 112


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


ROWS = {3: (4, 150), 4: (3, 120), 5: (2, 64)}
"""Row → (share of the spare height, least height): the charts, the drift charts, the log."""

NO_BACKUP = "no backup"
BACKUPS = "backups"
"""The run folder's backups (``output.backup_every``), listed for Resume."""
BACKUP_WRITTEN = "Backup: "
"""How the trainer's message on a backup it has written begins."""
METRICS = "metrics.jsonl"


class BackupMenu(ctk.CTkOptionMenu):
    """An option menu that reads its choices again (``before_open``) each time it opens."""

    def __init__(self, master: tk.Misc, before_open: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(master, **kwargs)
        self._before_open = before_open

    def _open_dropdown_menu(self) -> None:
        self._before_open()
        super()._open_dropdown_menu()


class RunPanel(ctk.CTkFrame):
    MINIMUM = (900, 450)
    """The least size (logical pixels) at which every part reads; below it the tab scrolls."""

    def __init__(
        self,
        parent: tk.Misc,
        trainer: TrainerThread,
        config: Callable[[], TrainConfig | None],
        before_start: Callable[[TrainConfig], None] = lambda _config: None,
    ) -> None:
        super().__init__(parent, fg_color="transparent")
        self.trainer = trainer
        self._config = config
        self._before_start = before_start
        self._end_listeners: list[Callable[[Any], None]] = []
        self.state = "idle"  # "idle" | "running" | "stopping"
        self.blockers: list[str] = []
        self._run_dir: Path | None = None
        self._backup_chosen: str | None = None
        """The backup the user chose in the menu; None: the newest."""
        self.chart_data = ChartData()
        self.drift_data = DriftData()
        self.last_saved: Path | None = None
        self.last_end: Any = None
        self._end_text = ""
        self._dirty = False
        self._drift_dirty = False
        self._drawn_at = 0.0
        self._sec_per_step: float | None = None
        self.samples: dict[tuple[str, bool], Path] = {}
        """The latest samples by (prompt, with LoRA)."""
        self._sample_step = -1
        self._sample_images: list[ctk.CTkImage] = []
        self.columnconfigure(0, weight=1)
        # The charts and the log share the height the controls leave, each down to a least
        # height that still reads (the tab scrolls below RunPanel.MINIMUM).
        for row, (weight, least) in ROWS.items():
            self.rowconfigure(row, weight=weight, minsize=least)
        self._build_controls()
        self._build_progress()
        self.charts = RunCharts(self, self.chart_data)
        self.charts.grid(row=3, column=0, sticky="nsew", padx=(0, 8), pady=(6, 0))
        self.drift_charts = DriftCharts(self, self.drift_data)
        self.drift_charts.grid(row=4, column=0, sticky="nsew", padx=(0, 8), pady=(6, 6))
        self._build_samples()
        self.log_view = ctk.CTkTextbox(self, font=mono_font(12), wrap="none", height=120)
        self.log_view.grid(row=5, column=0, columnspan=2, sticky="nsew")
        self.log_view.tag_config("warning", foreground=WARNING_COLOUR[1])
        self.log_view.tag_config("error", foreground=ERROR_COLOUR[1])
        self.log_view.configure(state="disabled")
        self._show_state()

    # -------------------------------------------------------------------------------- build

    def _build_controls(self) -> None:
        bar = FlowFrame(self)
        bar.grid(row=0, column=0, columnspan=2, sticky="ew")
        self.start_button = ctk.CTkButton(bar, text="Start", width=100, command=self.start)
        self.stop_button = ctk.CTkButton(bar, text="Stop", width=90, command=self.stop)
        self.save_button = ctk.CTkButton(bar, text="Save now", width=100, command=self.save_now)
        self.sample_button = ctk.CTkButton(
            bar, text="Sample now", width=110, command=self.sample_now
        )
        for button in (self.start_button, self.stop_button, self.save_button, self.sample_button):
            bar.add(button)
        self.resume_button = ctk.CTkButton(bar, text="Resume", width=90, command=self.resume)
        bar.add(self.resume_button, space_before=8)
        # The run folder's backups, read again each time the menu opens and on each backup
        # the running trainer writes.
        self.backup_menu = BackupMenu(
            bar,
            values=[NO_BACKUP],
            width=150,
            before_open=self.refresh_backups,
            command=self._choose_backup,
        )
        bar.add(self.backup_menu)
        self.state_label = ctk.CTkLabel(bar, text="", text_color=MUTED_COLOUR)
        bar.add(self.state_label)
        self.problems = ctk.CTkLabel(
            self, text="", anchor="w", justify="left", text_color=ERROR_COLOUR, wraplength=1300
        )
        self.problems.grid(row=1, column=0, columnspan=2, sticky="w", pady=(4, 0))
        self.problems.grid_remove()  # shown while there is a problem to show
        follow_width(self.problems, self)

    def _build_progress(self) -> None:
        frame = ctk.CTkFrame(self, fg_color="transparent")
        frame.grid(row=2, column=0, columnspan=2, sticky="ew", pady=(6, 0))
        frame.columnconfigure(1, weight=1)
        self.progress = ctk.CTkProgressBar(frame, width=360)
        self.progress.set(0)
        self.progress.grid(row=0, column=0, sticky="w", padx=(0, 12))
        # One line each (20 px, not customtkinter's 28), so the charts keep the height.
        self.progress_text = ctk.CTkLabel(
            frame, text="", anchor="w", justify="left", font=mono_font(12), height=20
        )
        self.progress_text.grid(row=0, column=1, sticky="w")
        self.latest_text = ctk.CTkLabel(
            frame, text="", anchor="w", justify="left", font=mono_font(12), height=20
        )
        self.latest_text.grid(row=1, column=0, columnspan=2, sticky="w")
        self.saved_text = ctk.CTkLabel(
            frame, text="", anchor="w", justify="left", text_color=MUTED_COLOUR, height=20
        )
        self.saved_text.grid(row=2, column=0, columnspan=2, sticky="w")
        for label in (self.latest_text, self.saved_text):
            follow_width(label, frame)
        follow_width(self.progress_text, frame, pad=self.progress.winfo_reqwidth() + 12)

    def _build_samples(self) -> None:
        # Scrolls when the charts beside it are shorter than the samples of every prompt.
        self.samples_frame = ctk.CTkScrollableFrame(self, width=2 * SAMPLE_PX + 24)
        self.samples_frame.grid(row=3, column=1, rowspan=2, sticky="nsew", pady=(6, 6))
        self.samples_title = ctk.CTkLabel(self.samples_frame, text="Latest samples")
        self.samples_title.grid(row=0, column=0, columnspan=2, padx=8, pady=(6, 2))
        self.samples_hint = ctk.CTkLabel(
            self.samples_frame,
            text="None yet: Sample now, or set\nsampling.every with prompts.",
            text_color=MUTED_COLOUR,
        )
        self.samples_hint.grid(row=1, column=0, columnspan=2, padx=8)

    # ------------------------------------------------------------------------------ actions

    def on_run_end(self, listener: Callable[[Any], None]) -> None:
        self._end_listeners.append(listener)

    def set_validation(self, validation: Validation) -> None:
        self.blockers = validation.blockers
        config = validation.config
        self._run_dir = Path(config.output.run_dir) if config is not None else None
        lines = [f"✖ {line}" for line in self.blockers]
        lines += [f"⚠ {line}" for line in validation.warnings]
        colour = ERROR_COLOUR if self.blockers else WARNING_COLOUR
        self.problems.configure(text="\n".join(lines), text_color=colour)
        if lines:
            self.problems.grid()
        else:
            self.problems.grid_remove()
        if self.state == "idle" and not self.drift_data and validation.config is not None:
            # A finished run's readings stay in view; an empty chart says whether it will fill.
            self.drift_charts.show_hint(not validation.config.drift.every)
        self._show_state()

    def resume(self) -> None:
        """Start the run again from the backup chosen in the menu (the run folder's)."""
        config = self._config()
        choice = self.backup_menu.get()
        if config is None or choice == NO_BACKUP:
            return
        self.start(resume=str(Path(config.output.run_dir) / BACKUPS / choice))

    def _show_history(self, backup: Path, total_steps: int) -> None:
        """The charts of a resumed run from its first step: the run folder's ``metrics.jsonl``
        up to the backup's step (the rows after it are of steps the resume discards)."""
        try:
            step = int(backup.name.removeprefix("step"))
        except ValueError:
            return  # not a backup folder's name: the trainer says why
        points, readings = read_history(backup.parent.parent / METRICS, step)
        for point in points:
            self.chart_data.add(point)
        for reading in readings:
            self.drift_data.add(reading)
        if points:
            self.progress.set(min(1.0, step / max(1, total_steps)))
            self.log(f"The charts show steps 1-{step} from {backup.parent.parent / METRICS}")

    def start(self, resume: str | None = None) -> None:
        config = self._config()
        if self.state != "idle" or config is None or self.blockers:
            return
        self._before_start(config)
        self._backup_chosen = None
        self.chart_data.clear()
        self.drift_data.clear()
        self.drift_charts.set_span(config.training.steps)
        self.progress.set(0)
        if resume is not None:
            self._show_history(Path(resume), config.training.steps)
        self.charts.redraw()
        self.drift_charts.redraw()
        self.drift_charts.show_hint(not config.drift.every and not self.drift_data)
        self.progress_text.configure(text="")
        self.latest_text.configure(text="")
        self._sec_per_step = None
        self.last_saved = None
        self.last_end = None
        self._end_text = ""
        self.state_label.configure(text_color=MUTED_COLOUR)
        how = f"Resuming from {resume}" if resume else "Starting a run"
        self.log(f"{how} in {config.output.run_dir} (loading the training engine)")
        self.trainer.start(config, resume=resume)
        self.state = "running"
        self._show_state()
        self.after(DRAIN_MS, self.drain)

    def stop(self) -> None:
        if self.state == "stopping":
            # The trainer tries a failed final save again until it succeeds (a full disk):
            # a second Stop gives up on it, and the last saved LoRA is named.
            self._command("STOP")
            self.log("Stop again: if the LoRA cannot be saved, the run ends without saving it")
            return
        if self.state != "running":
            return
        self._command("STOP")
        self.state = "stopping"
        self.log("Stop requested: the LoRA is saved after the current step")
        self._show_state()

    def save_now(self) -> None:
        if self.state == "running":
            self._command("SAVE")

    def sample_now(self) -> None:
        if self.state == "running":
            self._command("SAMPLE")

    def _command(self, name: str) -> None:
        from modules.trainer.events import Command  # loaded by the running worker already

        self.trainer.request(Command[name])

    def _show_state(self) -> None:
        idle = self.state == "idle"
        can_start = idle and not self.blockers
        self.start_button.configure(state="normal" if can_start else "disabled")
        self.refresh_backups()
        running = "normal" if self.state == "running" else "disabled"
        for button in (self.save_button, self.sample_button):
            button.configure(state=running)
        stoppable = self.state in ("running", "stopping")
        self.stop_button.configure(
            state="normal" if stoppable else "disabled",
            text="Give up saving" if self.state == "stopping" else "Stop",
        )
        text = {"idle": "Idle", "running": "Training", "stopping": "Stopping…"}[self.state]
        if idle and self._end_text:
            text = self._end_text
        if idle and self.blockers:
            text = "Fix the marked fields to start"
        self.state_label.configure(text=text)

    def refresh_backups(self) -> None:
        """List the run folder's backups (the one the user chose, else the newest);
        Resume is on when idle with one to resume from."""
        found = self._backups()
        self.backup_menu.configure(values=found or [NO_BACKUP])
        if self._backup_chosen in found:
            self.backup_menu.set(self._backup_chosen)
        else:
            self.backup_menu.set(found[-1] if found else NO_BACKUP)
        can_resume = self.state == "idle" and not self.blockers and found
        self.resume_button.configure(state="normal" if can_resume else "disabled")

    def _choose_backup(self, name: str) -> None:
        self._backup_chosen = name

    def _backups(self) -> list[str]:
        """The backups in the config's run folder (``stepNNNNNN``), oldest first."""
        if self._run_dir is None:
            return []
        folder = self._run_dir / BACKUPS
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.glob("step*") if (p / "state.pt").is_file())

    # ------------------------------------------------------------------------------- events

    def drain(self) -> None:
        """One tick: handle a bounded batch of events, redraw if due, re-arm while running."""
        for event in self.trainer.poll(MAX_EVENTS):
            self.handle(event)
        now = time.monotonic()
        due = now - self._drawn_at >= REDRAW_SECONDS or self.state == "idle"
        if due and (self._dirty or self._drift_dirty):
            if self._dirty:
                self.charts.redraw()
            if self._drift_dirty:
                self.drift_charts.redraw()
            self._dirty = self._drift_dirty = False
            self._drawn_at = now
        if self.state != "idle":
            self.after(DRAIN_MS, self.drain)

    def handle(self, event: Any) -> None:
        from modules.trainer.events import (
            DriftMeasured,
            FileSaved,
            Finished,
            SamplePair,
            SampleSaved,
            StatusMessage,
            StepMetrics,
        )

        if isinstance(event, StepMetrics):
            self._step(event)
        elif isinstance(event, StatusMessage):
            self.log(event.text, "warning" if event.level == "warning" else None)
            if event.text.startswith(BACKUP_WRITTEN):
                self.refresh_backups()
        elif isinstance(event, FileSaved):
            self.last_saved = Path(event.path)
            self.saved_text.configure(text=f"Last saved: {event.path} (step {event.step})")
        elif isinstance(event, SampleSaved):
            self._keep_sample(event.step, event.prompt, event.with_lora, Path(event.path))
        elif isinstance(event, SamplePair):
            # The base sample is written once per run; each pair shows it again.
            self._keep_sample(event.step, event.prompt, False, Path(event.base_path))
            self._keep_sample(event.step, event.prompt, True, Path(event.lora_path))
        elif isinstance(event, DriftMeasured):
            self._drift(event)
        elif isinstance(event, Finished | WorkerFailed):
            self._end(event)

    def _step(self, metrics: Any) -> None:
        self.chart_data.add(metrics)
        self._dirty = True
        seconds = metrics.sec_per_step
        # Smoothed like the trainer's ETA, so the rate does not flicker with each step.
        if self._sec_per_step is None or metrics.step <= 2:
            self._sec_per_step = seconds
        else:
            self._sec_per_step = 0.9 * self._sec_per_step + 0.1 * seconds
        rate = 1 / self._sec_per_step if self._sec_per_step > 0 else 0.0
        self.progress.set(metrics.step / metrics.total_steps)
        self.progress_text.configure(
            text=(
                f"step {metrics.step}/{metrics.total_steps}   epoch {metrics.epoch}   "
                f"{rate:.2f} it/s   ETA {format_duration(metrics.eta_seconds)}   "
                f"lr {metrics.lr:.2e}"
            )
        )
        expert = getattr(metrics, "expert", None)  # WAN 2.2 A14B, expert=both
        self.latest_text.configure(
            text=(
                (f"{expert.replace('_', '-')} expert   " if expert else "")
                + f"loss {metrics.loss_total:.4f}   target {metrics.loss_target:.4f}   "
                f"prior {metrics.loss_prior:.4f}   mean m {metrics.target_weight_mean:.3f}   "
                f"mean p {metrics.prior_weight_mean:.3f}   "
                f"teacher ran {metrics.teacher_fraction:.0%}"
            )
        )

    def _drift(self, reading: Any) -> None:
        self.drift_data.add(reading)
        self.drift_charts.show_hint(False)
        self._drift_dirty = True
        self.log(reading.line())

    def _keep_sample(self, step: int, prompt: str, with_lora: bool, path: Path) -> None:
        if step != self._sample_step:
            self.samples.clear()
            self._sample_step = step
        if self.samples.get((prompt, with_lora)) != path:
            self.samples[(prompt, with_lora)] = path
            self._show_samples()

    def _show_samples(self) -> None:
        """The latest sampling: a row per prompt, base left and LoRA right (as in the
        side-by-side files), a column only for the kinds the run samples."""
        for widget in self.samples_frame.winfo_children():
            if widget not in (self.samples_title, self.samples_hint):
                widget.destroy()
        self.samples_hint.grid_remove()
        self.samples_title.configure(text=f"Latest samples (step {self._sample_step})")
        self._sample_images = []
        prompts = list(dict.fromkeys(prompt for prompt, _ in self.samples))
        kinds = [kind for kind in (False, True) if any(k == kind for _, k in self.samples)]
        for column, with_lora in enumerate(kinds):
            caption = "with LoRA" if with_lora else "base"
            label = ctk.CTkLabel(self.samples_frame, text=caption, text_color=MUTED_COLOUR)
            label.grid(row=1, column=column)
        for index, prompt in enumerate(prompts):
            for column, with_lora in enumerate(kinds):
                path = self.samples.get((prompt, with_lora))
                if path is None:
                    continue
                with Image.open(path) as source:
                    picture = source.convert("RGB").resize(
                        (SAMPLE_PX, SAMPLE_PX), Image.Resampling.NEAREST
                    )
                image = ctk.CTkImage(picture, picture, size=(SAMPLE_PX, SAMPLE_PX))
                self._sample_images.append(image)
                ctk.CTkLabel(self.samples_frame, text="", image=image).grid(
                    row=2 + 2 * index, column=column, padx=4
                )
            text = prompt if len(prompt) <= 60 else prompt[:57] + "…"
            ctk.CTkLabel(
                self.samples_frame, text=text, wraplength=2 * SAMPLE_PX, text_color=MUTED_COLOUR
            ).grid(row=3 + 2 * index, column=0, columnspan=2, pady=(0, 4))

    def _end(self, event: Any) -> None:
        from modules.trainer.events import saved_lora_text

        self.state = "idle"
        self.last_end = event
        self._dirty = True
        error = event.error
        if error:
            self._end_text = "Failed"
            self.log(f"Training failed: {error}", "error")
        elif event.stopped:
            self._end_text = f"Stopped at step {event.step}"
            self.log(
                f"Stopped at step {event.step}: LoRA saved to {saved_lora_text(event.lora_path)}"
            )
        else:
            self._end_text = f"Done: {event.step} steps"
            self.log(f"Done at step {event.step}: LoRA saved to {saved_lora_text(event.lora_path)}")
        self.state_label.configure(text_color=ERROR_COLOUR if error else OK_COLOUR)
        self._show_state()
        if error:
            dialogs.show_error(self, "Training failed", error)
        # Last: a listener may close the window.
        for listener in self._end_listeners:
            listener(event)

    # ---------------------------------------------------------------------------------- log

    def log(self, text: str, tag: str | None = None) -> None:
        self.log_view.configure(state="normal")
        self.log_view.insert("end", text.rstrip("\n") + "\n", tag or ())
        lines = int(self.log_view.index("end-1c").split(".")[0])
        if lines > LOG_LINES:
            self.log_view.delete("1.0", f"{lines - LOG_LINES}.0")
        self.log_view.see("end")
        self.log_view.configure(state="disabled")

    def log_text(self) -> str:
        return self.log_view.get("1.0", "end")
