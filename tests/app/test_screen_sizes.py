"""The window at the screen sizes people have: it opens inside the screen, every part of the Run
and Masks tabs is in view (or, on the smallest screen, a scroll away), the charts' labels are
inside their charts, and the preset description stays one line in the top bar.

Each test opens the window on an Xvfb screen of its own size and writes screenshots of the
Run and Masks tabs: to a temporary folder, or where ``MASKPRIOR_SCREENSHOTS`` says (the
README's shots in docs/screenshots/ come from there).
"""

import os
from pathlib import Path
from tkinter import TclError

import pytest
from PIL import Image, ImageGrab

from modules.trainer.events import DriftBand, DriftMeasured, SamplePair, StepMetrics
from tests.app.driving import pump, settle

pytestmark = pytest.mark.ui

PROMPTS = ("a sks heart on a plain background", "a red cup on a table", "a sks heart in snow")


def rect(widget) -> tuple[int, int, int, int]:
    x, y = widget.winfo_rootx(), widget.winfo_rooty()
    return x, y, x + widget.winfo_width(), y + widget.winfo_height()


def inside(inner: tuple, outer: tuple) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2]) and inner[
        3
    ] <= outer[3]


def overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def any_overlap(widgets: list) -> bool:
    boxes = [rect(widget) for widget in widgets]
    return any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def in_view(widget, window) -> None:
    """Shown, and wholly inside the window and the scrolling pane around it."""
    try:
        name = widget.cget("text")
    except (ValueError, TclError):
        name = str(widget)
    assert widget.winfo_viewable(), f"{name} is not shown"
    assert inside(rect(widget), rect(window)), f"{name} {rect(widget)} is cut by the window"
    for pane in (window.run_pane, window.masks_pane):
        if str(widget).startswith(str(pane.inner)):
            view = rect(pane._canvas)
            assert inside(rect(widget), view), f"{name} {rect(widget)} is outside {view}"


def shown_ticks(labels, places, limits) -> list:
    """The tick labels matplotlib draws: those inside the axis' limits."""
    low, high = sorted(limits)
    return [label for label, place in zip(labels, places, strict=True) if low <= place <= high]


def cut_texts(figure) -> list[str]:
    """The texts of a chart (labels, titles, ticks, legends) that reach past its edges."""
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    cut = []
    for axes in figure.axes:
        texts = [axes.yaxis.label, axes.xaxis.label, axes.title]
        texts += shown_ticks(axes.get_xticklabels(), axes.get_xticks(), axes.get_xlim())
        texts += shown_ticks(axes.get_yticklabels(), axes.get_yticks(), axes.get_ylim())
        legend = axes.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
        for text in texts:
            if not text.get_visible() or not text.get_text():
                continue
            extent = text.get_window_extent(renderer)
            if not (
                box.x0 - 1 <= extent.x0
                and extent.x1 <= box.x1 + 1
                and box.y0 - 1 <= extent.y0
                and extent.y1 <= box.y1 + 1
            ):
                cut.append(text.get_text())
    return cut


def overlapping_axes(figure) -> list[tuple[str, str]]:
    """Pairs of a chart's axes whose drawn parts (labels and legends included) overlap."""
    renderer = figure.canvas.get_renderer()
    boxes = [(axes.get_ylabel(), axes.get_tightbbox(renderer)) for axes in figure.axes]
    return [
        (a, b)
        for i, (a, first) in enumerate(boxes)
        for b, second in boxes[i + 1 :]
        if first.overlaps(second)
    ]


def check_charts(panel) -> None:
    for chart in (panel.charts, panel.drift_charts):
        # Drawn once it came into view (not while its tab was hidden), at the size shown.
        assert not chart.canvas.pending
        chart.canvas.draw()
        assert cut_texts(chart.figure) == []
        assert overlapping_axes(chart.figure) == []


def feed_a_run(panel, folder: Path) -> None:
    """A run's worth of the trainer's events: 60 steps, drift readings, a sampling."""
    for step in range(1, 61):
        panel.handle(
            StepMetrics(
                step=step,
                total_steps=100,
                epoch=1 + step // 20,
                loss_total=0.3 / step**0.3,
                loss_target=0.2 / step**0.3,
                loss_prior=0.1 / step**0.3,
                target_weight_mean=0.4,
                prior_weight_mean=0.6,
                prior_weight=1.0,
                teacher_fraction=1.0,
                lr=1e-4,
                sec_per_step=0.5,
                eta_seconds=20,
            )
        )
    for step in (0, 20, 40, 60):
        clean = DriftBand(None, 0.05 - step / 4000, 1e-4 * (1 + step), 5e-5 * (1 + step))
        panel.handle(DriftMeasured(step, 0.1, 1e-3, 1e-3, 0.1, clean=clean))
    for index, prompt in enumerate(PROMPTS):
        paths = []
        for kind, colour in (("base", (200, 120, 60)), ("lora", (60, 120 + 40 * index, 200))):
            path = folder / f"{index}-{kind}.png"
            Image.new("RGB", (64, 64), colour).save(path)
            paths.append(path)
        panel.handle(SamplePair(folder / f"{index}.png", 60, prompt, *paths))
    panel.charts.redraw()
    panel.drift_charts.redraw()


def show(window, tab: str) -> None:
    window.tabs.set(tab)
    window._tab_shown()
    settle(window, 0.6)


def shoot(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MASKPRIOR_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    # The whole screen: that the window fits it is what the picture shows.
    image = ImageGrab.grab(xdisplay=os.environ["DISPLAY"])
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


@pytest.mark.parametrize(("width", "height"), [(1400, 900), (1024, 700)])
def test_the_window_fits_the_screen_and_every_part_is_in_view(
    open_on_screen, tmp_path, width, height
):
    window = open_on_screen(width, height)
    assert inside(rect(window), (0, 0, width, height)), rect(window)
    settle(window, 0.3)

    # The preset description: one line in the top bar, whole on hover.
    description = window.preset_label
    assert window.preset_description and description.cget("text").endswith("…")
    assert window.preset_tooltip.text == window.preset_description
    assert inside(rect(description), rect(description.master))
    assert description.winfo_height() < 2 * description.winfo_reqheight()
    family = window.top_rows[0]
    for control in (window.preset_menu, window.save_as_button, family.label, family.control.menu):
        in_view(control, window)

    # A concept card too wide for the window puts its caption fields under the others.
    show(window, "Concepts")
    card = window.concepts.cards[0]
    assert card.stacked == (width < 1200)
    for form in (card.form, card.caption_form):
        assert rect(form)[2] <= rect(window)[2], rect(form)

    panel = window.run_panel
    feed_a_run(panel, tmp_path)
    show(window, "Run")
    # The charts redraw at their new size and the pane lays out again after them: wait for
    # the layout to come to rest (a layout that never fits still fails, here or below).
    pump(window, lambda: inside(rect(panel.log_view), rect(window)), 5, "the Run tab's layout")
    assert window.run_pane.scrolls == (False, False)
    parts = [panel.charts, panel.drift_charts, panel.samples_frame._parent_frame, panel.log_view]
    for part in (panel.start_button, panel.backup_menu, panel.state_label, *parts):
        in_view(part, window)
    assert not any_overlap(parts)
    check_charts(panel)
    shoot(f"window-{width}x{height}-run", tmp_path)

    show(window, "Masks")
    masks = window.masks
    assert window.masks_pane.scrolls == (False, False)
    assert masks.layer is not None, masks.status.cget("text")
    settle(window, 0.5)  # the weight-map preview
    for part in (masks.canvas, masks.preview, masks.preview_text, masks.grey):
        in_view(part, window)
    for button in masks.tool_buttons.values():
        in_view(button, window)
    shoot(f"window-{width}x{height}-masks", tmp_path)


def test_on_a_640x480_screen_the_tools_are_in_reach_and_nothing_overlaps(open_on_screen):
    window = open_on_screen(640, 480)
    assert inside(rect(window), (0, 0, 640, 480)), rect(window)
    show(window, "Masks")
    masks = window.masks
    # Undo, redo, zoom and the grey levels wrap onto lines of their own, all in view at once.
    for text in ("Undo", "Redo", "−", "+", "Fit"):
        in_view(masks.tool_buttons[text], window)
    in_view(masks.grey, window)

    show(window, "Run")
    panel = window.run_panel
    # Below its least size the tab scrolls: the parts keep their room and never overlap.
    assert window.run_pane.scrolls[1]
    parts = [panel.charts, panel.drift_charts, panel.samples_frame._parent_frame, panel.log_view]
    inner = rect(window.run_pane.inner)
    for part in parts:
        assert inside(rect(part), inner)
        assert part.winfo_height() >= 60
    assert not any_overlap(parts)
    # Scrolled to the end, the log is in view from top to bottom (and the charts scroll away).
    view = rect(window.run_pane._canvas)
    window.run_pane._canvas.yview_moveto(1.0)
    settle(window, 0.3)
    log = rect(panel.log_view)
    assert view[1] <= log[1] and log[3] <= view[3], (log, view)
    check_charts(panel)
