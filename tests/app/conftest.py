"""Fixtures of the UI tests: a virtual display, the real window, answered dialogs."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app import dialogs
from app.virtual_display import VirtualDisplay
from tests.app.driving import REPO


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """An Xvfb display for the whole session; UI tests skip (saying why) without Xvfb."""
    if not VirtualDisplay.available():
        pytest.skip("Xvfb is not installed: the UI tests need it (apt-get install xvfb)")
    virtual = VirtualDisplay()
    name = virtual.start()
    previous = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = name
    yield name
    virtual.stop()
    if previous is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = previous


@dataclass
class Dialogs:
    """What the window asked, and what it will be answered."""

    errors: list[tuple[str, str]] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    yes: bool = True
    cancel: bool = False
    """A yes/no/cancel question is answered Cancel (else as ``yes`` says)."""
    text: str | None = None
    directory: Path | None = None
    preset: Path | None = None


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> Dialogs:
    answered = Dialogs()

    def ask_yes_no(_parent: Any, _title: str, message: str) -> bool:
        answered.questions.append(message)
        return answered.yes

    def ask_yes_no_cancel(_parent: Any, _title: str, message: str) -> bool | None:
        answered.questions.append(message)
        return None if answered.cancel else answered.yes

    monkeypatch.setattr(
        dialogs, "show_error", lambda _p, title, message: answered.errors.append((title, message))
    )
    monkeypatch.setattr(dialogs, "ask_yes_no", ask_yes_no)
    monkeypatch.setattr(dialogs, "ask_yes_no_cancel", ask_yes_no_cancel)
    monkeypatch.setattr(dialogs, "ask_text", lambda *_args: answered.text)
    monkeypatch.setattr(dialogs, "ask_directory", lambda *_args: answered.directory)
    monkeypatch.setattr(dialogs, "ask_open_preset", lambda *_args: answered.preset)
    return answered


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("MASKPRIOR_HOME", str(folder))
    return folder


@pytest.fixture
def open_window(
    display: str, home: Path, answers: Dialogs, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Any]]:
    """Opens real main windows (demo presets are relative to the repository root)."""
    import customtkinter as ctk

    from app.main_window import MainWindow

    monkeypatch.chdir(REPO)
    ctk.set_appearance_mode("dark")
    windows: list[MainWindow] = []

    def opener(**kwargs: Any) -> MainWindow:
        window = MainWindow(**kwargs)
        window.update()
        windows.append(window)
        return window

    yield opener
    for window in windows:
        if window.trainer.running:
            window.run_panel.stop()
            window.trainer.join(120)
        if not window.closed:
            window.destroy()
    free_images()


@pytest.fixture
def window(open_window: Callable[..., Any]) -> Any:
    return open_window()


@pytest.fixture(scope="session")
def screens(display: str) -> Iterator[dict[tuple[int, int], str]]:
    """Xvfb displays of other screen sizes, started as tests ask for them and kept to the end
    of the session: Tk ends the process when a display it has used goes away."""
    started: list[VirtualDisplay] = []

    class Displays(dict):
        def __missing__(self, size: tuple[int, int]) -> str:
            virtual = VirtualDisplay(f"{size[0]}x{size[1]}x24")
            started.append(virtual)
            self[size] = virtual.start()
            return self[size]

    yield Displays()
    for virtual in started:
        virtual.stop()


@pytest.fixture
def open_on_screen(
    screens: dict[tuple[int, int], str],
    home: Path,
    answers: Dialogs,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[int, int], Any]]:
    """Opens the real main window on a display of its own, ``width`` x ``height`` pixels (an
    Xvfb screen of that size): the window sizes itself from the screen it opens on."""
    import customtkinter as ctk

    from app.main_window import MainWindow

    monkeypatch.chdir(REPO)
    ctk.set_appearance_mode("dark")
    windows: list[Any] = []

    def opener(width: int, height: int, **kwargs: Any) -> Any:
        monkeypatch.setenv("DISPLAY", screens[(width, height)])
        window = MainWindow(**kwargs)
        windows.append(window)
        window.update()
        return window

    yield opener
    for window in windows:
        if not window.closed:
            window.destroy()
    free_images()


def free_images() -> None:
    """Free the closed windows' images now, on the main thread: freed later by a collection
    that happens to run on a trainer thread, each would wait a second for a Tk main loop that
    no longer runs for its window."""
    gc.collect()


@pytest.fixture
def write_concept() -> Callable[..., Path]:
    """A concept folder with ``images`` images, ``masks`` of them masked, and ``orphans`` masks
    whose image is missing."""
    import numpy as np
    from PIL import Image

    def write(folder: Path, images: int = 2, masks: int = 2, orphans: int = 0) -> Path:
        folder.mkdir(parents=True)
        for index in range(images):
            Image.new("RGB", (48, 40), (200, 40 * index, 30)).save(folder / f"img{index}.png")
        for index in range(masks):
            values = np.zeros((40, 48), dtype=np.uint8)
            values[8:32, 10:38] = 255
            values[14:26, 16:30] = 128
            Image.fromarray(values, "L").save(folder / f"img{index}-masklabel.png")
        for index in range(orphans):
            Image.new("L", (48, 40), 255).save(folder / f"gone{index}-masklabel.png")
        return folder

    return write
