"""Write screenshots of the desktop application to docs/screenshots/.

    .venv/bin/python scripts/screenshots.py [--steps-shown 60]

Opens the real window (on a virtual Xvfb display when there is no DISPLAY), visits the tabs,
shows the weight-map preview in both prior modes, starts a short demo run and captures the Run
tab mid-training. User settings go to a temporary folder, so the user's own presets and
last-used config are left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "screenshots"
MAX_BYTES = 300_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-shown", type=int, default=60, help="steps before the Run shot")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)  # the demo presets name demo-data/ relative to the repository

    from app.virtual_display import VirtualDisplay

    virtual = None
    if not os.environ.get("DISPLAY"):
        virtual = VirtualDisplay()
        os.environ["DISPLAY"] = virtual.start()
    with tempfile.TemporaryDirectory(prefix="maskprior-shots-") as scratch:
        os.environ["MASKPRIOR_HOME"] = str(Path(scratch) / "home")
        try:
            take(Path(scratch), args.output, args.steps_shown)
        finally:
            if virtual is not None:
                virtual.stop()
    return 0


def take(scratch: Path, output: Path, steps_shown: int) -> None:
    import customtkinter as ctk

    from app import engine_import
    from app.main_window import MainWindow

    ctk.set_appearance_mode("dark")
    output.mkdir(parents=True, exist_ok=True)
    window = MainWindow(preset=REPO / "presets" / "demo-prior.json")
    form = window.form

    def pump(until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            window.update()
            time.sleep(0.02)

    def shot(tab: str, name: str, settle: float = 0.8) -> None:
        window.tabs.set(tab)
        end = time.monotonic() + settle
        pump(lambda: time.monotonic() > end, settle + 1, "the window to settle")
        grab(window, output / f"{name}.png")

    assert engine_import.wait(120), "the training engine did not load"
    pump(lambda: window.previews[0].maps is not None, 60, "the weight-map preview")
    for tab, name in (
        ("Model", "model"),
        ("Concepts", "concepts"),
        ("Training", "training"),
        ("LoRA", "lora"),
        ("Sampling", "sampling"),
        ("Masked training", "masked-training-preview"),
    ):
        shot(tab, name)
    # The prior tab in threshold mode, to show the other way the prior map is made.
    form.row("prior.threshold").set(0.1)
    shot("Prior preservation", "prior-preservation-preview")
    form.row("prior.threshold").set(None)

    values = {
        "training.steps": 300,
        "sampling.every": 25,
        "data.cache_dir": str(scratch / "cache"),
        "output.run_dir": str(scratch / "run"),
    }
    for path, value in values.items():
        form.row(path).set(value)
    window.tabs.set("Run")
    pump(lambda: window.run_panel.start_button.cget("state") == "normal", 10, "a valid config")
    panel = window.run_panel
    panel.start_button.invoke()
    pump(
        lambda: len(panel.chart_data) >= steps_shown and len(panel.samples) >= 4,
        600,
        f"{steps_shown} steps and a sample",
    )
    shot("Run", "run-panel-training", settle=1.0)
    panel.stop_button.invoke()
    pump(lambda: panel.state == "idle", 300, "the run to stop")
    window.close()


def grab(window: object, path: Path) -> None:
    from PIL import Image, ImageGrab

    x, y = window.winfo_rootx(), window.winfo_rooty()
    box = (x, y, x + window.winfo_width(), y + window.winfo_height())
    image = ImageGrab.grab(bbox=box, xdisplay=os.environ["DISPLAY"])
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        # A 256-colour palette keeps the flat UI exact enough and the file small.
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(
        f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
        f"{path.stat().st_size // 1024} KB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
