"""The Run tab's loss chart limits: every point inside, and no room below zero beyond a sliver
(losses are never negative; a prior term still at 0 stays visible above the frame)."""

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
