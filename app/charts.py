"""Live charts of a run: the loss breakdown (raw and smoothed) and the weight means.

``ChartData`` keeps the points (plain lists, tested without a display); ``RunCharts`` draws
them with matplotlib's Tk canvas. Redrawing costs tens of milliseconds, so the run panel asks
for it at most a few times a second, not per event.
"""

from __future__ import annotations

import math
import tkinter as tk
from dataclasses import dataclass, field
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

    def clear(self) -> None:
        self.steps.clear()
        for series in (*self.values.values(), *self.smoothed.values()):
            series.clear()
        self._state = dict.fromkeys(LOSSES, 0.0)

    def __len__(self) -> int:
        return len(self.steps)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(power * factor for factor in (1, 2, 5, 10) if power * factor >= value)


class RunCharts(ctk.CTkFrame):
    """The two charts, redrawn by blitting: the axes, ticks and legends (most of the drawing
    cost) are drawn only when a limit changes; a new point redraws just the lines."""

    def __init__(self, parent: tk.Misc, data: ChartData) -> None:
        super().__init__(parent)
        self.data = data
        dark = ctk.get_appearance_mode() == "Dark"
        background, ink = ("#242424", "#dddddd") if dark else ("#f2f2f2", "#222222")
        self.figure = Figure(figsize=(9.6, 3.1), dpi=100, facecolor=background)
        self.loss_axes = self.figure.add_subplot(1, 2, 1)
        self.weight_axes = self.figure.add_subplot(1, 2, 2)
        self.raw_lines: dict[str, Any] = {}
        self.smooth_lines: dict[str, Any] = {}
        for axes, title, names in (
            (self.loss_axes, "loss (thin: raw, thick: smoothed)", LOSSES),
            (self.weight_axes, "weight mean / share of batch", WEIGHTS),
        ):
            axes.set_facecolor(background)
            axes.set_ylabel(title, color=ink, fontsize=9)
            axes.set_xlabel("step", color=ink, fontsize=9)
            axes.tick_params(colors=ink, labelsize=8)
            axes.grid(True, alpha=0.2)
            for spine in axes.spines.values():
                spine.set_color(ink)
                spine.set_alpha(0.4)
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
            # Above the plot, so the legend never hides the newest points.
            legend = axes.legend(
                loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=9, frameon=False
            )
            for text in legend.get_texts():
                text.set_color(ink)
        self.weight_axes.set_ylim(-0.03, 1.03)
        self._set_limits(right=10, loss=(0.0, 1.0))
        self.figure.tight_layout(pad=1.2)
        self.canvas = FigureCanvasTkAgg(self.figure, master=self)
        self.canvas.get_tk_widget().pack(fill="both", expand=True)
        self._background: Any = None
        # Any full draw (first show, resize, new limits) refreshes the saved background.
        self.canvas.mpl_connect("draw_event", self._on_draw)

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
        # A wide margin, so a slowly falling loss does not cross the limit every few steps.
        return right, (low - 0.25 * span, high + 0.25 * span)

    def redraw(self) -> None:
        steps = self.data.steps
        for key, line in self.raw_lines.items():
            line.set_data(steps, self.data.values[key])
        for key, line in self.smooth_lines.items():
            # Weight means and the teacher share describe each batch; shown as they are.
            values = self.data.smoothed[key] if key in LOSSES else self.data.values[key]
            line.set_data(steps, values)
        limits = self._limits_needed() if steps else (10, (0.0, 1.0))
        if self._background is None or limits != (self._right, self._loss_limits):
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
        for line in (*self.raw_lines.values(), *self.smooth_lines.values()):
            line.axes.draw_artist(line)
