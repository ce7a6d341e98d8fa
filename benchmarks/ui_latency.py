"""How late the window's event loop runs while a demo training runs in its trainer thread.

    .venv/bin/python benchmarks/ui_latency.py [--seconds 10] [--preset presets/demo-prior.json]

A Tk ``after(10)`` tick reschedules itself; its lateness (time fired minus time due) is what a
click or a redraw waits. It is measured for ``--seconds`` with the window idle, then for as long
while the run panel trains (the trainer thread computing, the panel draining events and
redrawing charts), in one process, and printed side by side (median, p99, max).
Needs a display; without DISPLAY it starts a virtual one (Xvfb).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class Ticker:
    """Reschedules ``after(interval)`` and records each tick's lateness in milliseconds."""

    def __init__(self, window: object, interval_ms: int) -> None:
        self.window = window
        self.interval_ms = interval_ms
        self.lateness: list[float] = []
        self._due = 0.0

    def run_for(self, seconds: float) -> list[float]:
        self.lateness = []
        self._end = time.perf_counter() + seconds
        self._arm()
        self.window.mainloop()  # until _tick calls quit
        return self.lateness

    def _arm(self) -> None:
        self._due = time.perf_counter() + self.interval_ms / 1000
        self.window.after(self.interval_ms, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.lateness.append((now - self._due) * 1000)
        if now >= self._end:
            self.window.quit()
        else:
            self._arm()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--preset", type=Path, default=REPO / "presets" / "demo-prior.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)

    from app.virtual_display import VirtualDisplay

    virtual = None
    if not os.environ.get("DISPLAY"):
        virtual = VirtualDisplay()
        os.environ["DISPLAY"] = virtual.start()
    try:
        with tempfile.TemporaryDirectory(prefix="maskprior-latency-") as scratch:
            os.environ["MASKPRIOR_HOME"] = str(Path(scratch) / "home")
            measure(args, Path(scratch))
    finally:
        if virtual is not None:
            virtual.stop()
    return 0


def measure(args: argparse.Namespace, scratch: Path) -> None:
    import customtkinter as ctk

    from app import engine_import
    from app.main_window import MainWindow

    ctk.set_appearance_mode("dark")
    window = MainWindow(preset=args.preset)
    panel = window.run_panel
    assert engine_import.wait(120), "the training engine did not load"
    window.tabs.set("Run")
    # Long enough to outlast the measurement; stopped afterwards.
    for path, value in {
        "training.steps": 100_000,
        "data.cache_dir": str(scratch / "cache"),
        "output.run_dir": str(scratch / "run"),
        "output.save_every": 0,
        "sampling.every": 0,
    }.items():
        window.form.row(path).set(value)
    wait(window, lambda: panel.start_button.cget("state") == "normal", 30)
    ticker = Ticker(window, args.interval_ms)

    idle = ticker.run_for(args.seconds)
    panel.start_button.invoke()
    wait(window, lambda: len(panel.chart_data) >= 3, 300)  # past model loading and warm-up
    first = panel.chart_data.steps[-1]
    training = ticker.run_for(args.seconds)
    steps = panel.chart_data.steps[-1] - first
    panel.stop_button.invoke()
    wait(window, lambda: panel.state == "idle", 300)
    window.close()

    config = window.form.validation.config
    print(
        f"Tk after({args.interval_ms}) tick lateness in ms, {args.seconds:g} s per phase; "
        f"{args.preset.name}, resolution {config.data.resolution}, "
        f"batch {config.training.batch_size}, {os.cpu_count()} CPU cores"
    )
    print(f"{'':<10}{'ticks':>7}{'median':>9}{'p99':>9}{'max':>9}")
    rows = {"idle": np.array(idle), "training": np.array(training)}
    for name, values in rows.items():
        median, p99 = np.percentile(values, [50, 99])
        print(f"{name:<10}{len(values):>7}{median:>9.2f}{p99:>9.2f}{values.max():>9.2f}")
    ratio = [
        np.percentile(rows["training"], q) / max(np.percentile(rows["idle"], q), 1e-3)
        for q in (50, 99)
    ]
    print(f"{'ratio':<10}{'':>7}{ratio[0]:>8.1f}x{ratio[1]:>8.1f}x")
    print(f"training ran {steps} steps during its phase ({steps / args.seconds:.2f} it/s)")


def wait(window: object, until: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not reach the expected state")
        window.update()
        time.sleep(0.02)


if __name__ == "__main__":
    raise SystemExit(main())
