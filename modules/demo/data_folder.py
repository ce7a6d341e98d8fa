"""The ``demo-data/`` folder the demo presets name, written on first use.

The CLI (``train``, ``check``) and the UI (opening a preset, starting a run) both call
:func:`ensure_demo_data`, so a demo preset starts the same way from either.
"""

from __future__ import annotations

from pathlib import Path

from modules.config import TrainConfig

DEMO_DATA_ROOT = Path(__file__).resolve().parents[2] / "demo-data"
"""Where the demo presets' relative ``demo-data/`` paths lead: beside ``modules/``."""


def ensure_demo_data(config: TrainConfig) -> list[str]:
    """Write (or bring up to date) the demo dataset when a concept or a held-out folder of the
    drift meter points into it; the warnings to show (one line each).

    A demo preset started with your own concepts keeps its drift meter's demo folders: they are
    written too, so the run starts, and a warning says that the demo's held-out subject is not
    yours. The dataset's ``.complete`` marker records its version: a current folder is left as
    it is at the cost of one file read; a missing, half-written or older one is written again."""
    from modules.demo.dataset import is_current, write_demo_dataset

    named = [(f"data.concepts[{i}].path", c.path) for i, c in enumerate(config.data.concepts)]
    if config.drift.every:
        named += [
            (f"drift.{name}", path)
            for name, path in (
                ("subject_path", config.drift.subject_path),
                ("world_path", config.drift.world_path),
            )
            if path
        ]
    inside = [name for name, path in named if _in_demo_data(path)]
    if inside and not is_current(DEMO_DATA_ROOT):
        print(f"Writing the demo dataset to {DEMO_DATA_ROOT} (named by {', '.join(inside)})")
        write_demo_dataset(DEMO_DATA_ROOT)
    own_concepts = not any(name.startswith("data.") for name in inside)
    if own_concepts and "drift.subject_path" in inside:
        return [
            f"drift.subject_path={config.drift.subject_path} is the demo dataset's held-out "
            "subject, not your concepts': its held-out subject loss says nothing about your "
            "LoRA; set drift.subject_path to held-out images of your subject, or leave it empty"
        ]
    return []


def _in_demo_data(path: str) -> bool:
    return Path(path).expanduser().resolve().is_relative_to(DEMO_DATA_ROOT)
