"""Headless command line: the same trainer as the UI, from the same preset files.

python -m modules.cli train PRESET [--set a.b=value ...] [--run-dir DIR]
python -m modules.cli check PRESET [--set ...]       # validate only
python -m modules.cli demo-data [ROOT]               # write the demo dataset
python -m modules.cli masks CONCEPT_DIR [--mode ...] # write -masklabel masks (masks_command.py)

Exit status: 0 done, 1 training failed, 2 the run could not start (config, data or run folder;
nothing trained), 128 + the signal's number when a signal stopped it (Ctrl-C: 130, SIGTERM: 143,
SIGHUP: 129; the LoRA is saved first).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from modules.cli import masks_command
from modules.config import ConfigError, TrainConfig, apply_overrides, config_warnings, load_preset
from modules.demo.data_folder import DEMO_DATA_ROOT, ensure_demo_data
from modules.signals import POLITE_SIGNALS, signal_name

if TYPE_CHECKING:
    from tqdm import tqdm

    from modules.data.concept import ConceptScan
    from modules.trainer import Event

# The training stack (torch, diffusers) is imported inside the commands that need it, so that
# `check` and a bad config answer in a fraction of a second.

EXIT_OK, EXIT_TRAINING_ERROR, EXIT_CONFIG_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modules.cli", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a LoRA"), ("check", "validate a preset")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("preset", help="preset JSON file (see presets/)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="a.b=value",
            help="override a config field, e.g. --set training.steps=100 (repeatable)",
        )
        sub.add_argument("--run-dir", help="output folder (overrides output.run_dir)")
        if name == "train":
            sub.add_argument(
                "--resume",
                nargs="?",
                const="latest",
                metavar="latest|BACKUP_DIR",
                help="continue from the run folder's latest backup (or the one given)",
            )
    demo = commands.add_parser("demo-data", help="write the demo dataset")
    demo.add_argument("root", nargs="?", default=str(DEMO_DATA_ROOT))
    masks_command.add_parser(commands)
    return parser


def resolve_config(preset: str, overrides: list[str], run_dir: str | None) -> TrainConfig:
    config = apply_overrides(load_preset(preset), overrides)
    if run_dir:
        config = apply_overrides(config, [f"output.run_dir={run_dir}"])
    return config


def _print_event(event: Event, bar: tqdm | None) -> tqdm | None:
    """Print one event; the progress bar appears with the first step, under the banner."""
    from tqdm import tqdm

    from modules.trainer import DriftMeasured, SamplePair, SampleSaved, StatusMessage, StepMetrics

    if isinstance(event, StepMetrics):
        if bar is None:
            bar = tqdm(total=event.total_steps, unit="step", dynamic_ncols=True)
        bar.update(event.step - bar.n)
        bar.set_postfix(
            loss=f"{event.loss_total:.4f}",
            target=f"{event.loss_target:.4f}",
            prior=f"{event.loss_prior:.4f}",
            teacher=f"{event.teacher_fraction:.2f}",
            refresh=False,
        )
    elif isinstance(event, StatusMessage):
        tqdm.write(event.text, file=sys.stderr if event.level == "warning" else sys.stdout)
    elif isinstance(event, SampleSaved):
        tqdm.write(f"sample: {event.path}" + ("" if event.with_lora else " (base model)"))
    elif isinstance(event, SamplePair):
        tqdm.write(f"sample, base | LoRA: {event.path}")
    elif isinstance(event, DriftMeasured):
        tqdm.write(event.line())
    return bar  # FileSaved needs nothing: the trainer also sends a status line for it


class _Signals:
    """The polite signals, turned into requests the main loop reads (a handler only records).
    The first stops after the current step and saves; a second Ctrl-C quits without saving (a
    second SIGTERM or SIGHUP does not)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._handled = 0
        self._previous = {sig: signal.signal(sig, self._record) for sig in POLITE_SIGNALS}

    def _record(self, signum: int, _frame: object) -> None:
        self.received.append(signum)

    def new(self) -> list[int]:
        """The signals that arrived since the last call."""
        fresh = self.received[self._handled :]
        self._handled = len(self.received)
        return fresh

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, resume: str | None = None) -> int:
    from modules.trainer import Command, Finished, GenericTrainer
    from modules.trainer.events import saved_lora_text

    for warning in ensure_demo_data(config):
        print(f"warning: {warning}")
    events: queue.Queue[Event] = queue.Queue()
    commands: queue.Queue[Command] = queue.Queue()
    trainer = GenericTrainer(config, events, commands, resume=resume)
    worker = threading.Thread(target=trainer.run, name="trainer", daemon=True)
    signals = _Signals()
    try:
        worker.start()
        bar: tqdm | None = None
        finished: Finished | None = None
        stopping = False
        while finished is None:
            for signum in signals.new():
                if not stopping:
                    stopping = True
                    _say(
                        f"\n{signal_name(signum)}: stopping after this step and saving the LoRA "
                        "(Ctrl-C again to quit without saving)"
                    )
                    commands.put(Command.STOP)
                elif signum == signal.SIGINT:
                    # Only a person presses Ctrl-C twice; schedulers and service managers
                    # may send SIGTERM and SIGHUP together, which must not cost the LoRA.
                    _say("Ctrl-C again: quitting without saving.")
                    return 128 + signals.received[0]
                else:
                    _say(f"{signal_name(signum)}: already stopping, the LoRA is being saved")
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not worker.is_alive() and events.empty():
                    # The trainer always ends with Finished; should its thread die without it,
                    # say so instead of waiting forever.
                    finished = Finished(
                        step=trainer.step,
                        lora_path=trainer.last_saved,
                        error="the trainer stopped without reporting its end (see above)",
                        error_kind="training",
                    )
                continue
            if isinstance(event, Finished):
                finished = event
            elif trainer.processes.main:  # on several processes, the main one speaks
                bar = _print_event(event, bar)
        if bar is not None:
            bar.close()
        worker.join()
    finally:
        signals.restore()
    if finished.error:
        code = EXIT_CONFIG_ERROR if finished.error_kind == "config" else EXIT_TRAINING_ERROR
    else:
        code = 128 + signals.received[0] if signals.received else EXIT_OK
    if not trainer.processes.main:
        # On several processes the main one speaks; the others' config errors are its own too,
        # a training error may be theirs alone.
        if finished.error and finished.error_kind != "config":
            print(f"error (process {trainer.processes.index}): {finished.error}", file=sys.stderr)
        return code
    if finished.error:
        print(f"error: {finished.error}", file=sys.stderr)
        return code
    state = "stopped" if finished.stopped else "done"
    print(f"{state} at step {finished.step}: LoRA saved to {saved_lora_text(finished.lora_path)}")
    return code


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _SurvivingStream(io.TextIOBase):
    """A standard stream that outlives its reader: once a write fails (a closed pipe, as with
    ``| head``; a terminal that went away), the file descriptor is pointed at the null device
    and everything after is dropped, so training never stops for its output."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dead = False

    def write(self, text: str) -> int:
        if not self.dead:
            try:
                self._stream.write(text)
                if "\n" in text or "\r" in text:
                    self._stream.flush()
            except OSError:
                self._die()
        return len(text)

    def flush(self) -> None:
        if not self.dead:
            try:
                self._stream.flush()
            except OSError:
                self._die()

    def _die(self) -> None:
        self.dead = True
        # Python flushes the real stream again at exit: let that land in the null device.
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def isatty(self) -> bool:
        return not self.dead and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def _guard_output() -> None:
    if not isinstance(sys.stdout, _SurvivingStream):
        sys.stdout = _SurvivingStream(sys.stdout)
    if not isinstance(sys.stderr, _SurvivingStream):
        sys.stderr = _SurvivingStream(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _guard_output()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "demo-data":
        from modules.demo.dataset import write_demo_dataset

        write_demo_dataset(Path(args.root))
        print(f"demo dataset in {args.root}")
        return EXIT_OK
    if args.command == "masks":
        return masks_command.run(args)
    try:
        config = resolve_config(args.preset, args.overrides, args.run_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check":
        return check(config, args.preset)
    return train(config, getattr(args, "resume", None))


def check(config: TrainConfig, preset: str) -> int:
    """Every check ``train`` makes before it loads the model. Nothing is written, except the
    demo dataset on first use (a demo preset's folders are checked too)."""
    from modules.data.concept import DataError
    from modules.models.memory_estimate import estimate_lines
    from modules.trainer.preflight import preflight

    demo_warnings = ensure_demo_data(config)
    try:
        found = preflight(config, create_run_dir=False)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for warning in [*demo_warnings, *config_warnings(config), *found.notes]:
        print(f"warning: {warning}")
    if found.buckets:
        print(found.buckets)
    for line in found.pairs:
        print(line)
    for line in _window_lines(config, found.scans):
        print(line)
    for line in estimate_lines(config):
        print(f"warning: {line}" if "is over" in line else line)
    items = sum(len(scan.items) for scan in found.scans)
    print(f"{preset}: OK ({items} items in {len(found.scans)} concepts)")
    return EXIT_OK


def _window_lines(config: TrainConfig, scans: list[ConceptScan]) -> list[str]:
    """The clips' frame windows (``walk.mp4: 4 windows of 33 frames``), read from their
    headers; none with ``data.frame_windows=head`` (nothing is read then)."""
    from modules.data.frame_windows import in_windows, window_lines

    if not in_windows(config.data):
        return []
    from modules.data.video import window_counts

    items = [item for scan in scans for item in scan.items]
    return window_lines(window_counts(items, config.data), config.data.frames)
