"""The Run tab's loss chart limits: every point inside, and no room below zero beyond a sliver
(losses are never negative; a prior term still at 0 stays visible above the frame); a run with
two experts adds each expert's total."""

from types import SimpleNamespace

import pytest

from app.charts import SERIES

pytestmark = pytest.mark.ui


def test_the_loss_axis_holds_every_point_and_barely_dips_below_zero(window):
    charts = window.run_panel.charts
    charts.data.clear()
    for step in range(1, 41):
        values = dict.fromkeys(SERIES, 0.5)
        values |= {"loss_total": 1.6 - step * 0.02, "loss_target": 1.5 - step * 0.02}
        values["loss_prior"] = 0.0 if step < 10 else 0.01 * step  # 0 while the LoRA equals the base
        charts.data.add(SimpleNamespace(step=step, **values))
    charts.redraw()
    bottom, top = charts.loss_axes.get_ylim()
    assert top >= 1.58  # the highest loss, with a margin
    assert -0.03 * top <= bottom < 0  # a sliver below zero, not a quarter of the range
    # WAN 2.2 A14B with expert=both (the same window: one start of the UI): each expert's
    # total joins the legend once the run has experts, and leaves it with a new run.
    charts.data.clear()
    charts.redraw()
    labels = [t.get_text() for t in charts.loss_axes.get_legend().get_texts()]
    assert "total, high noise" not in labels
    for step in range(1, 7):
        expert = "high_noise" if step % 3 == 0 else "low_noise"
        values = dict.fromkeys(SERIES, 0.5) | {"loss_total": 1.0 / step}
        charts.data.add(SimpleNamespace(step=step, expert=expert, **values))
    charts.redraw()
    labels = [t.get_text() for t in charts.loss_axes.get_legend().get_texts()]
    assert {"total, high noise", "total, low noise"} <= set(labels)
    xs, _ = charts.expert_lines["high_noise"].get_data()
    assert list(xs) == [3, 6]
    charts.data.clear()
    charts.redraw()
    labels = [t.get_text() for t in charts.loss_axes.get_legend().get_texts()]
    assert "total, low noise" not in labels
