"""Chart data and smoothing (no display needed)."""

import json
from types import SimpleNamespace

import pytest

from app.charts import SERIES, ChartData, nice_ceiling, read_history, smooth


def test_smoothing_is_unbiased_from_the_first_point():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0]) == [1.0]


def test_smoothing_is_an_exponential_moving_average():
    values = [1.0, 0.0]
    # s1 = 0.1, s2 = 0.09; debiased by 1 - 0.9 and 1 - 0.81.
    assert smooth(values, 0.9) == pytest.approx([1.0, 0.09 / 0.19])
    assert smooth([]) == []


def test_chart_data_collects_every_series():
    data = ChartData()
    metrics = SimpleNamespace(step=1, **{key: 0.5 for key in SERIES})
    data.add(metrics)
    data.add(SimpleNamespace(step=2, **{key: 0.25 for key in SERIES}))
    assert data.steps == [1, 2] and len(data) == 2
    assert data.values["loss_prior"] == [0.5, 0.25]
    data.clear()
    assert len(data) == 0 and data.values["teacher_fraction"] == []


def test_chart_data_smooths_point_by_point_like_smooth():
    data = ChartData()
    losses = [1.0, 0.5, 0.8, 0.2, 0.4]
    for step, value in enumerate(losses, start=1):
        data.add(SimpleNamespace(step=step, **dict.fromkeys(SERIES, value)))
    assert data.smoothed["loss_total"] == pytest.approx(smooth(losses))
    data.clear()
    data.add(SimpleNamespace(step=1, **dict.fromkeys(SERIES, 3.0)))
    assert data.smoothed["loss_prior"] == [pytest.approx(3.0)]


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), (1.2, 2), (3, 5), (7, 10), (12.5, 20), (250, 500)]
)
def test_nice_ceiling(value, expected):
    assert nice_ceiling(value) == expected


def test_history_is_the_run_up_to_the_backup_s_step_each_step_once(tmp_path):
    def row(step: int, value: float, **more: float) -> str:
        return json.dumps({"step": step, **dict.fromkeys(SERIES, value), **more})

    lines = [
        json.dumps({"step": 0, "drift_background": 0.0, "heldout_subject_loss": 0.5}),
        row(1, 1.0),
        row(2, 2.0),
        row(3, 3.0, drift_background=0.1),
        # A resume from step 1 whose file was not cut back: its steps replace 2 and 3.
        row(2, 20.0),
        row(3, 30.0),
        json.dumps({"step": 3, "drift_world": 0.2}),  # the stop's own drift row
        row(4, 40.0),
        '{"step": 5, "loss_tot',  # the last line of a run killed while writing it
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    points, readings = read_history(path, until=3)
    assert [p.step for p in points] == [1, 2, 3]
    assert [p.loss_prior for p in points] == [1.0, 20.0, 30.0]
    assert [(r.step, r.drift_background, r.drift_world) for r in readings] == [
        (0, 0.0, None),
        (3, None, 0.2),
    ]
    assert read_history(tmp_path / "missing.jsonl", until=3) == ([], [])
    data = ChartData()
    for point in points:
        data.add(point)
    assert data.values["teacher_fraction"] == [1.0, 20.0, 30.0]


def test_a_run_with_two_experts_has_each_expert_s_total_at_its_own_steps(tmp_path):
    """WAN 2.2 A14B with expert=both: the loss splits by the expert each step trained."""
    data = ChartData()
    experts = ["high_noise", "low_noise", "low_noise", "high_noise", "low_noise"]
    totals = [1.0, 0.2, 0.4, 0.8, 0.3]
    for step, (expert, total) in enumerate(zip(experts, totals, strict=True), start=1):
        values = dict.fromkeys(SERIES, 0.5) | {"loss_total": total}
        data.add(SimpleNamespace(step=step, expert=expert, **values))
    assert data.has_experts
    assert data.expert_steps == {"high_noise": [1, 4], "low_noise": [2, 3, 5]}
    assert data.expert_totals["high_noise"] == pytest.approx(smooth([1.0, 0.8]))
    assert data.expert_totals["low_noise"] == pytest.approx(smooth([0.2, 0.4, 0.3]))
    data.clear()
    data.add(SimpleNamespace(step=1, **dict.fromkeys(SERIES, 0.5)))  # one denoiser: no expert
    assert not data.has_experts and data.expert_steps["low_noise"] == []
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "expert": "low_noise", **dict.fromkeys(SERIES, 0.5)}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    points, _ = read_history(path, until=1)
    data.add(points[0])
    assert points[0].expert == "low_noise" and data.expert_steps["low_noise"] == [1]
