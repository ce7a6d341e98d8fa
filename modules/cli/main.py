"""Headless command line: the same trainer as the UI, from the same preset files.

python -m modules.cli train PRESET [--set a.b=value ...] [--run-dir DIR]
python -m modules.cli check PRESET [--set ...]       # validate only
python -m modules.cli demo-data [ROOT]               # write the demo dataset
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from modules.config import ConfigError, TrainConfig, apply_overrides, config_warnings, load_preset

if TYPE_CHECKING:
    from tqdm import tqdm

    from modules.trainer import Event

# The training stack (torch, diffusers) is imported inside the commands that need it, so that
# `check` and a bad config answer in a fraction of a second.

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA_ROOT = REPO_ROOT / "demo-data"

EXIT_OK, EXIT_TRAINING_ERROR, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    demo = commands.add_parser("demo-data", help="write the demo dataset")
    demo.add_argument("root", nargs="?", default=str(DEMO_DATA_ROOT))
    return parser


def resolve_config(preset: str, overrides: list[str], run_dir: str | None) -> TrainConfig:
    config = apply_overrides(load_preset(preset), overrides)
    if run_dir:
        config = apply_overrides(config, [f"output.run_dir={run_dir}"])
    return config


def ensure_demo_data(config: TrainConfig) -> None:
    """Write (or bring up to date) the demo dataset when a concept points into it.

    The dataset's ``.complete`` marker records its version: a current folder is left as it is
    at the cost of one file read; a missing, half-written or older one is written again."""
    from modules.data.demo_dataset import is_current, write_demo_dataset

    for concept in config.data.concepts:
        path = Path(concept.path).resolve()
        if path.is_relative_to(DEMO_DATA_ROOT) and not is_current(DEMO_DATA_ROOT):
            print(f"Writing the demo dataset to {DEMO_DATA_ROOT}")
            write_demo_dataset(DEMO_DATA_ROOT)
            return


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


def train(config: TrainConfig) -> int:
    from modules.trainer import Command, Finished, GenericTrainer

    ensure_demo_data(config)
    events: queue.Queue[Event] = queue.Queue()
    commands: queue.Queue[Command] = queue.Queue()
    trainer = GenericTrainer(config, events, commands)
    worker = threading.Thread(target=trainer.run, name="trainer", daemon=True)
    worker.start()
    bar: tqdm | None = None
    interrupted = False
    finished: Finished | None = None
    while finished is None:
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if interrupted:
                print("Second Ctrl-C: quitting without saving.", file=sys.stderr)
                return EXIT_INTERRUPTED
            interrupted = True
            print(
                "\nCtrl-C: stopping after this step and saving the LoRA (Ctrl-C again to quit)",
                file=sys.stderr,
            )
            commands.put(Command.STOP)
            continue
        if isinstance(event, Finished):
            finished = event
        else:
            bar = _print_event(event, bar)
    if bar is not None:
        bar.close()
    worker.join()
    if finished.error:
        print(f"error: {finished.error}", file=sys.stderr)
        return EXIT_TRAINING_ERROR
    state = "stopped" if finished.stopped else "done"
    print(f"{state} at step {finished.step}: LoRA saved to {finished.lora_path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "demo-data":
        from modules.data.demo_dataset import write_demo_dataset

        write_demo_dataset(Path(args.root))
        print(f"demo dataset in {args.root}")
        return EXIT_OK
    try:
        config = resolve_config(args.preset, args.overrides, args.run_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check":
        for warning in config_warnings(config):
            print(f"warning: {warning}")
        print(f"{args.preset}: OK")
        return EXIT_OK
    return train(config)
