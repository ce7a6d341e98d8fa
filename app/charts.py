"""Live charts of a run: the loss breakdown (raw and smoothed), the weight means, and the
drift meter's readings.

``ChartData`` and ``DriftData`` keep the points (plain lists, tested without a display);
``RunCharts`` and ``DriftCharts`` draw them with matplotlib's Tk canvas. Redrawing costs tens of
milliseconds, so the run panel asks for it at most a few times a second, not per event.
"""

from __future__ import annotations

import json
import math
import tkinter as tk
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import customtkinter as ctk
from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg
from matplotlib.figure import Figure

LOSSES = {"loss_total": "total", "loss_target": "target", "loss_prior": "prior"}
WEIGHTS = {
    "target_weight_mean": "mean m (target)",
    "prior_weight_mean": "mean p (prior)",
    "teacher_fraction": "teacher ran",
}
SERIES = (*LOSSES, *WEIGHTS)
COLOURS = {
    "loss_total": "#4ea1ff",
    "loss_target": "#3cdc5a",
    "loss_prior": "#dc3cdc",
    "target_weight_mean": "#3cdc5a",
    "prior_weight_mean": "#dc3cdc",
    "teacher_fraction": "#f0b35a",
}
SMOOTHING = 0.9
DRIFT = {"drift_background": "background", "drift_world": "world"}
DRIFT_SERIES = (*DRIFT, "subject_loss")
DRIFT_COLOURS = {
    # Background drift is what the prior term holds down, the subject loss what the target
    # term lowers: the colours of those two losses.
    "drift_background": "#dc3cdc",
    "drift_world": "#f0b35a",
    "subject_loss": "#3cdc5a",
}
EXPERTS = {"high_noise": "total, high noise", "low_noise": "total, low noise"}
"""A run with one LoRA per expert (WAN 2.2 A14B, expert=both): each expert's smoothed total,
over the steps that trained it, beside the whole run's."""
EXPERT_COLOURS = {"high_noise": "#ff7f50", "low_noise": "#20b2aa"}
LEGEND_TITLES = {"loss": "thin: raw, thick: smoothed"}
_DRIFT_ROW_KEYS = {
    "subject_loss": "heldout_subject_loss",
    "drift_background": "drift_background",
    "drift_world": "drift_world",
}
"""A drift reading's fields → their ``metrics.jsonl`` keys (``modules.trainer.drift``)."""
DRIFT_OFF_HINT = "Drift meter off: set drift.every and a held-out folder (Sampling tab)"


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled
    toward 0): ``s_t = w s_{t-1} + (1 - w) x_t``, reported as ``s_t / (1 - w^t)``."""
    smoothed, state = [], 0.0
    for count, value in enumerate(values, start=1):
        state = weight * state + (1 - weight) * value
        smoothed.append(state / (1 - weight**count))
    return smoothed


@dataclass
class ChartData:
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})
    smoothed: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOSSES})
    """:func:`smooth` of each loss, kept up to date point by point (not recomputed per draw)."""
    _state: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSSES, 0.0))
    expert_steps: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in EXPERTS})
    expert_totals: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in EXPERTS})
    """Each expert's smoothed total loss at its own steps (empty unless the run has experts)."""
    _expert_state: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EXPERTS, 0.0))

    def add(self, metrics: Any) -> None:
        """Append one ``StepMetrics`` (read by attribute name, so no trainer import)."""
        self.steps.append(metrics.step)
        for key in SERIES:
            self.values[key].append(float(getattr(metrics, key)))
        count = len(self.steps)
        for key in LOSSES:
            state = SMOOTHING * self._state[key] + (1 - SMOOTHING) * self.values[key][-1]
            self._state[key] = state
            self.smoothed[key].append(state / (1 - SMOOTHING**count))
        expert = getattr(metrics, "expert", None)
        if expert in EXPERTS:
            steps = self.expert_steps[expert]
            steps.append(metrics.step)
            total = self.values["loss_total"][-1]
            state = SMOOTHING * self._expert_state[expert] + (1 - SMOOTHING) * total
            self._expert_state[expert] = state
            self.expert_totals[expert].append(state / (1 - SMOOTHING ** len(steps)))

    @property
    def has_experts(self) -> bool:
        return any(self.expert_steps.values())

    def clear(self) -> None:
        self.steps.clear()
        for series in (*self.values.values(), *self.smoothed.values()):
            series.clear()
        self._state = dict.fromkeys(LOSSES, 0.0)
        for series in (*self.expert_steps.values(), *self.expert_totals.values()):
            series.clear()
        self._expert_state = dict.fromkeys(EXPERTS, 0.0)

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class DriftData:
    """The drift meter's readings, a (steps, values) pair per series: a part the meter does not
    measure (a None reading) has no point, so each series keeps its own steps."""

    steps: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in DRIFT_SERIES})
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in DRIFT_SERIES})
    readings: int = 0

    def add(self, reading: Any) -> None:
        """Append one ``DriftMeasured`` (read by attribute name, so no trainer import): its
        clean-image averages, where every noise level weighs by what it does to the picture
        (the velocity-space ones, which the lowest level outweighs, without them)."""
        self.readings += 1
        shown = getattr(reading, "clean", None) or reading
        for key in DRIFT_SERIES:
            value = getattr(shown, key)
            if value is not None:
                self.steps[key].append(reading.step)
                self.values[key].append(float(value))

    def clear(self) -> None:
        for series in (*self.steps.values(), *self.values.values()):
            series.clear()
        self.readings = 0

    def __len__(self) -> int:
        return self.readings


def read_history(path: Path, until: int) -> tuple[list[Any], list[Any]]:
    """A run's points from its ``metrics.jsonl`` (``path``) up to step ``until``, as
    ``ChartData.add`` and ``DriftData.add`` take them: (the steps' loss rows, the drift
    readings), in step order.

    Rows after ``until`` are of steps a resume from that step discards. A row whose step does
    not follow the one before it starts the steps again from there (a resume the file was not
    cut back for): the earlier rows from that step on are dropped. A line that does not read
    (the last line of a run that was killed while writing it) is skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return [], []
    points: list[Any] = []
    readings: list[Any] = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or step > until:
            continue
        values = {key: row.get(key) for key in SERIES}
        if all(isinstance(value, int | float) for value in values.values()):
            if points and step <= points[-1].step:
                # The steps start again here: what the earlier rows said from here on is gone.
                points = [point for point in points if point.step < step]
                readings = [earlier for earlier in readings if earlier.step < step]
            points.append(SimpleNamespace(step=step, expert=row.get("expert"), **values))
        reading = _drift_reading(row, step)
        if reading is not None:
            readings = [earlier for earlier in readings if earlier.step < step]
            readings.append(reading)
    return points, readings


def _drift_reading(row: dict[str, Any], step: int) -> Any:
    """A ``metrics.jsonl`` row's drift reading (``DriftMeasured``'s fields), None without one."""
    velocity = {key: row.get(name) for key, name in _DRIFT_ROW_KEYS.items()}
    clean = {key: row.get(f"{name}_clean") for key, name in _DRIFT_ROW_KEYS.items()}
    if all(value is None for value in (*velocity.values(), *clean.values())):
        return None
    has_clean = any(value is not None for value in clean.values())
    return SimpleNamespace(
        step=step, **velocity, clean=SimpleNamespace(**clean) if has_clean else None
    )


class _ShownCanvas(FigureCanvasTkAgg):
    """A figure canvas that draws only while it can be seen: a chart on a hidden tab is not
    drawn (a draw costs a good part of a second) for each size the window passes through,
    but once, when it comes into view."""

    def __init__(self, figure: Figure, master: tk.Misc) -> None:
        super().__init__(figure, master=master)
        self.pending = False
        self.get_tk_widget().bind("<Visibility>", self._shown, add="+")

    def draw(self) -> None:
        if not self.get_tk_widget().winfo_viewable():
            self.pending = True
            return
        self.pending = False
        super().draw()

    def _shown(self, _event: tk.Event) -> None:
        if self.pending:
            self.draw()


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(power * factor for factor in (1, 2, 5, 10) if power * factor >= value)


def _style_axes(axes: Any, ylabel: str, background: str, ink: str, title: str = "") -> None:
    axes.set_facecolor(background)
    # A short y label, which fits beside the shortest chart; what it measures in the title.
    axes.set_ylabel(ylabel, color=ink, fontsize=9)
    if title:
        axes.set_title(title, color=ink, fontsize=9, loc="left")
    # No "step" label under the axis: the steps' numbers say it, in less height.
    axes.tick_params(colors=ink, labelsize=8)
    axes.grid(True, alpha=0.2)
    for spine in axes.spines.values():
        spine.set_color(ink)
        spine.set_alpha(0.4)


class RunCharts(ctk.CTkFrame):
    """The two charts, redrawn by blitting: the axes, ticks and legends (most of the drawing
    cost) are drawn only when a limit changes; a new point redraws just the lines."""

    def __init__(self, parent: tk.Misc, data: ChartData) -> None:
        super().__init__(parent)
        self.data = data
        dark = ctk.get_appearance_mode() == "Dark"
        background, ink = ("#242424", "#dddddd") if dark else ("#f2f2f2", "#222222")
        self._ink, self._experts_shown = ink, False
        # Laid out again at every size (constrained), so no label is cut as the chart shrinks.
        self.figure = Figure(
            figsize=(9.6, 3.1), dpi=100, facecolor=background, layout="constrained"
        )
        self.loss_axes = self.figure.add_subplot(1, 2, 1)
        self.weight_axes = self.figure.add_subplot(1, 2, 2)
        self.raw_lines: dict[str, Any] = {}
        self.smooth_lines: dict[str, Any] = {}
        for axes, ylabel, names in (
            (self.loss_axes, "loss", LOSSES),
            (self.weight_axes, "mean / share", WEIGHTS),
        ):
            _style_axes(axes, ylabel, background, ink)
            for key, label in names.items():
                colour = COLOURS[key]
                if axes is self.loss_axes:
                    (self.raw_lines[key],) = axes.plot(
                        [], [], color=colour, alpha=0.35, lw=0.8, animated=True
                    )
                    width = 1.8
                else:
                    width = 1.5
                # The total is target + prior: dashed and on top, so it stays visible where the
                # prior term is near 0 and the two lines coincide.
                style = "--" if key == "loss_total" else "-"
                (self.smooth_lines[key],) = axes.plot(
                    [], [], color=colour, lw=width, ls=style, label=label, zorder=3, animated=True
                )
            self._legend(axes, ylabel)
        # Each expert's total (expert=both): in the legend once the run has experts.
        self.expert_lines: dict[str, Any] = {
            key: self.loss_axes.plot(
                [], [], color=EXPERT_COLOURS[key], lw=1.4, label="_expert", zorder=2, animated=True
            )[0]
            for key in EXPERTS
        }
        self.weight_axes.set_ylim(-0.03, 1.03)
        self._set_limits(right=10, loss=(0.0, 1.0))
        self.canvas = _ShownCanvas(self.figure, master=self)
        self.canvas.get_tk_widget().pack(fill="both", expand=True)
        self._background: Any = None
        # Any full draw (first show, resize, new limits) refreshes the saved background.
        self.canvas.mpl_connect("draw_event", self._on_draw)

    def _legend(self, axes: Any, ylabel: str) -> None:
        """Above the plot, so the legend never hides the newest points."""
        legend = axes.legend(
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            # Two columns of the longer weight labels: the legend fits the narrowest chart.
            ncols=3 if axes is self.loss_axes else 2,
            fontsize=8,
            columnspacing=1.2,
            handlelength=1.6,
            frameon=False,
            title=LEGEND_TITLES.get(ylabel),
            title_fontsize=8,
        )
        legend.get_title().set_color(self._ink)  # the title is an empty text when None
        for text in legend.get_texts():
            text.set_color(self._ink)

    def _show_experts(self) -> bool:
        """Name the experts' lines in the loss legend the first time the run has them; whether
        the legend changed (a full draw is then due)."""
        shown = self.data.has_experts
        if shown == self._experts_shown:
            return False
        for key, line in self.expert_lines.items():
            line.set_label(EXPERTS[key] if shown else "_expert")
        self._legend(self.loss_axes, "loss")
        self._experts_shown = shown
        return True

    def _set_limits(self, right: float, loss: tuple[float, float]) -> None:
        self._right, self._loss_limits = right, loss
        self.loss_axes.set_xlim(0, right)
        self.weight_axes.set_xlim(0, right)
        self.loss_axes.set_ylim(*loss)

    def _limits_needed(self) -> tuple[float, tuple[float, float]]:
        """Limits that hold every point, changed only when points leave them (or the loss
        settles into a small part of the range), so full redraws stay rare."""
        steps = self.data.steps
        right = self._right if steps[-1] <= self._right else nice_ceiling(steps[-1] * 1.25)
        values = [v for key in LOSSES for v in self.data.values[key][-2000:]]
        low, high = min(values), max(values)
        span = (high - low) or abs(high) or 1.0
        current_low, current_high = self._loss_limits
        inside = current_low <= low and high <= current_high
        if inside and (current_high - current_low) <= 4 * span:
            return right, self._loss_limits
        # A wide margin, so a slowly falling loss does not cross the limit every few steps; none
        # below zero, which a loss never reaches, beyond a sliver that keeps a zero prior term
        # off the frame.
        top, bottom = high + 0.25 * span, low - 0.25 * span
        if low >= 0:
            bottom = max(bottom, -0.03 * top)
        return right, (bottom, top)

    def redraw(self) -> None:
        steps = self.data.steps
        for key, line in self.raw_lines.items():
            line.set_data(steps, self.data.values[key])
        for key, line in self.smooth_lines.items():
            # Weight means and the teacher share describe each batch; shown as they are.
            values = self.data.smoothed[key] if key in LOSSES else self.data.values[key]
            line.set_data(steps, values)
        for key, line in self.expert_lines.items():
            line.set_data(self.data.expert_steps[key], self.data.expert_totals[key])
        limits = self._limits_needed() if steps else (10, (0.0, 1.0))
        legend_changed = self._show_experts()
        if self._background is None or legend_changed or limits != (self._right, self._loss_limits):
            self._set_limits(*limits)
            self.canvas.draw()  # calls _on_draw, which draws the lines too
            return
        self.canvas.restore_region(self._background)
        self._draw_lines()
        self.canvas.blit(self.figure.bbox)

    def _on_draw(self, _event: object) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        lines = (*self.raw_lines.values(), *self.smooth_lines.values())
        for line in (*lines, *self.expert_lines.values()):
            line.axes.draw_artist(line)


class DriftCharts(ctk.CTkFrame):
    """The drift meter: background and world drift (log axis), and the held-out subject loss,
    each as a clean-image error (``DriftData.add``), every noise level weighing alike.

    Readings are rare (every ``drift.every`` steps), so each redraw is a full draw. The first
    reading comes before any training, where both drifts are exactly 0: a log axis cannot show
    0, so the drift lines start at the first reading above it. The step axis spans the whole
    run (:meth:`set_span`), so the readings to come have their place from the start."""

    def __init__(self, parent: tk.Misc, data: DriftData) -> None:
        super().__init__(parent)
        self.data = data
        self._span = 10
        dark = ctk.get_appearance_mode() == "Dark"
        background, ink = ("#242424", "#dddddd") if dark else ("#f2f2f2", "#222222")
        self.figure = Figure(
            figsize=(9.6, 2.2), dpi=100, facecolor=background, layout="constrained"
        )
        grid = self.figure.add_gridspec(1, 2, width_ratios=(3, 2))
        self.drift_axes = self.figure.add_subplot(grid[0])
        self.subject_axes = self.figure.add_subplot(grid[1])
        _style_axes(self.drift_axes, "drift", background, ink, "drift from the base")
        _style_axes(self.subject_axes, "loss", background, ink, "held-out subject loss")
        self.drift_axes.set_yscale("log")
        self.lines: dict[str, Any] = {}
        for key in DRIFT_SERIES:
            axes = self.drift_axes if key in DRIFT else self.subject_axes
            (self.lines[key],) = axes.plot(
                [], [], color=DRIFT_COLOURS[key], lw=1.5, marker="o", ms=3, label=DRIFT.get(key)
            )
        # On the title's line, right: above the readings, in no extra height.
        legend = self.drift_axes.legend(
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncols=2,
            fontsize=8,
            frameon=False,
            borderaxespad=0.1,
            handlelength=1.6,
        )
        for text in legend.get_texts():
            text.set_color(ink)
        self._set_limits()
        self.canvas = _ShownCanvas(self.figure, master=self)
        self.canvas.get_tk_widget().pack(fill="both", expand=True)
        self.hint = ctk.CTkLabel(self, text=DRIFT_OFF_HINT, fg_color=background, corner_radius=6)

    @property
    def hint_shown(self) -> bool:
        return bool(self.hint.winfo_manager())

    def show_hint(self, shown: bool) -> None:
        """Say that the drift meter is off (over the empty charts)."""
        if shown:
            self.hint.place(relx=0.3, rely=0.45, anchor="center")  # over the drift axes
        else:
            self.hint.place_forget()

    def set_span(self, steps: int) -> None:
        """The run's length: the step axis goes from 0 to ``steps`` (further if a reading does)."""
        self._span = max(1, steps)

    def redraw(self) -> None:
        for key, line in self.lines.items():
            steps, values = self.data.steps[key], self.data.values[key]
            if key in DRIFT:
                points = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
                steps, values = [s for s, _ in points], [v for _, v in points]
            line.set_data(steps, values)
        self._set_limits()
        self.canvas.draw_idle()

    def _set_limits(self) -> None:
        last = max((steps[-1] for steps in self.data.steps.values() if steps), default=0)
        right = max(self._span, last)
        for axes in (self.drift_axes, self.subject_axes):
            # A margin, so the end reading's marker is not cut by the frame.
            axes.set_xlim(-0.02 * right, 1.02 * right)
        drift = [v for key in DRIFT for v in self.lines[key].get_ydata()]
        if drift:
            # Whole decades, so the axis reads as orders of magnitude.
            low = 10.0 ** math.floor(math.log10(min(drift)))
            high = 10.0 ** math.ceil(math.log10(max(drift)))
            self.drift_axes.set_ylim(low, high if high > low else 10 * low)
        else:
            self.drift_axes.set_ylim(1e-4, 1e-1)
        loss = self.data.values["subject_loss"]
        if loss:
            low, high = min(loss), max(loss)
            margin = 0.1 * ((high - low) or abs(high) or 1.0)
            self.subject_axes.set_ylim(low - margin, high + margin)
        else:
            self.subject_axes.set_ylim(0.0, 1.0)
