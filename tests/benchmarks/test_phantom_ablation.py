"""The ablation benchmark end to end at smoke size: real trainer, real measurements, files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.phantom_ablation import (
    BASELINE,
    GOAL,
    HELDOUT_TIMESTEPS,
    VARIANTS,
    WORK_STAMP,
    Settings,
    _frontier_drift,
    goal_check,
    goal_misses,
    run,
)

pytestmark = pytest.mark.slow


def test_smoke_run_writes_table_plot_grids_and_results(tmp_path: Path) -> None:
    chosen = tuple(v for v in VARIANTS if v.name in (BASELINE, "prior 1"))
    settings = Settings(
        out=tmp_path / "out",
        seeds=(0, 1),
        steps=2,
        sample_steps=2,
        world_prompts=4,
        subject_samples=4,
        variants=chosen,
    )

    payload = run(settings)

    for name in ("table.md", "results.json", "frontier.png", "grids.png"):
        assert (settings.out / name).stat().st_size > 0, name
    table = (settings.out / "table.md").read_text(encoding="utf-8")
    assert f"| {BASELINE} |" in table and "| prior 1 |" in table
    assert "Goal 1" in table and "Goal 2" in table and "Goal 3" in table
    assert "| variant | drift (bg) @ 0.1 |" in table and "world prompt match" in table
    saved = json.loads((settings.out / "results.json").read_text(encoding="utf-8"))
    assert len(saved["runs"]) == 4  # two variants x two seeds
    by_variant = {r["variant"]: r for r in payload["runs"] if r["seed"] == 0}
    # The teacher runs for prior preservation and never for the plain masked loss.
    assert by_variant[BASELINE]["teacher_fraction"] == 0.0
    assert by_variant["prior 1"]["teacher_fraction"] == 1.0
    for run_metrics in payload["runs"]:
        assert run_metrics["drift_background"] >= 0 and run_metrics["subject_loss"] > 0
        # Each noise level alone and the clean-image mean of them (every level alike).
        levels = [run_metrics[f"subject_loss_t{t:g}"] for t in HELDOUT_TIMESTEPS]
        assert run_metrics["subject_loss_clean"] == pytest.approx(sum(levels) / len(levels))
    baseline, base_match = payload["summary"][BASELINE], payload["base_model"]["prompt_match"]
    if base_match:  # the world prompt match as a share of the base model's
        assert baseline["world_kept"] == pytest.approx(baseline["prompt_match"][0] / base_match)
    assert payload["summary"][BASELINE]["drift_reduction"] == pytest.approx(1.0)


def test_frontier_is_the_least_drift_at_no_more_subject_loss() -> None:
    points = [(0.10, 5.0), (0.20, 2.0), (0.30, 1.0)]

    assert _frontier_drift(points, 0.05) is None
    assert _frontier_drift(points, 0.10) == 5.0
    assert _frontier_drift(points, 0.25) == 2.0
    assert _frontier_drift(points, 0.90) == 1.0


def _stats(loss: float, drift: float, reduction: float, change: float, **more) -> dict:
    return {
        "subject_loss_clean": (loss, 0.0),
        "drift_background_clean": (drift, 0.0),
        "drift_reduction": reduction,
        "subject_loss_change": change,
        **more,
    }


def test_goal_check_reads_the_summary_it_is_given() -> None:
    summary = {
        BASELINE: _stats(0.10, 3.0, 1.0, 0.0),
        "unmasked": _stats(0.09, 9.0, 0.33, -0.1),
        "prior 1": _stats(0.11, 0.9, 3.33, 0.1),
        "prior 10": _stats(0.20, 0.5, 6.0, 1.0),
    }
    chosen = tuple(v for v in VARIANTS if v.name in summary)

    goal_one, goal_two, goal_three = goal_check(summary, chosen)

    assert "met by prior 1." in goal_one
    assert "prior 1: on or below" in goal_two and "prior 10: on or below" in goal_two
    # Without sample scores no variant can meet the second round's goal.
    assert "not met by any variant" in goal_three


def test_the_second_goal_needs_every_part_on_the_means() -> None:
    scored = {"subject_score": (0.93, 0.05), "subject_leak": (0.0, 0.0), "world_kept": 0.95}
    summary = {
        BASELINE: _stats(0.10, 3.0, 1.0, 0.0, **scored),
        "prior 10": _stats(0.20, 0.5, 6.0, 1.0, **scored),
        "prior 3": _stats(0.15, 1.0, 3.0, 0.5, **{**scored, "subject_leak": (0.06, 0.01)}),
    }
    assert goal_misses(summary[BASELINE]) == ["drift_reduction"]
    assert goal_misses(summary["prior 10"]) == []
    assert goal_misses(summary["prior 3"]) == ["subject_leak"]
    assert goal_misses({}) == list(GOAL)
    # A mean of 0.8, 1.0 and 0.9 is 0.9 to the goal, whatever its float rounding.
    rounded = {**summary[BASELINE], "subject_score": (sum([0.8, 1.0, 0.9]) / 3, 0.1)}
    assert "subject_score" not in goal_misses(rounded)
    chosen = tuple(v for v in VARIANTS if v.name in summary)
    assert goal_check(summary, chosen)[2].endswith("met by prior 10.")
    del summary["prior 10"]
    nearest = goal_check(summary, chosen)[2].split("the nearest: ")[1]
    assert nearest.startswith(f"{BASELINE} (misses background drift")
    assert nearest.endswith(", prior 3 (misses leak ≤ 0.05).")


def test_a_work_folder_refuses_runs_of_other_settings(tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = Settings(
        out=tmp_path / "out",
        work=work,
        seeds=(0,),
        steps=1,
        sample_steps=1,
        world_prompts=2,
        subject_samples=2,
        variants=tuple(v for v in VARIANTS if v.name == BASELINE),
    )
    run(settings)
    stamp = json.loads((work / WORK_STAMP).read_text(encoding="utf-8"))
    assert stamp["steps"] == 1 and len(stamp["base_weights_sha256"]) == 64
    run(settings)  # the same settings resume (nothing left to train)
    with pytest.raises(SystemExit, match=r"other learning_rate, steps than"):
        run(dataclasses.replace(settings, steps=2, learning_rate=5e-4))
    with pytest.raises(SystemExit, match=r"other lora_targets than"):
        run(dataclasses.replace(settings, lora_targets="attention_ffn"))
    # A stamp from before the targets were recorded: its runs trained the attention layers.
    legacy = {k: v for k, v in stamp.items() if k != "lora_targets"}
    (work / WORK_STAMP).write_text(json.dumps(legacy), encoding="utf-8")
    run(dataclasses.replace(settings, lora_targets="attention"))
    with pytest.raises(SystemExit, match=r"other lora_targets than"):
        run(settings)
    # Another base model is caught the same way.
    stamp["base_weights_sha256"] = "0" * 64
    (work / WORK_STAMP).write_text(json.dumps(stamp), encoding="utf-8")
    with pytest.raises(SystemExit, match="other base_weights_sha256"):
        run(settings)
    (work / WORK_STAMP).unlink()
    with pytest.raises(SystemExit, match="did not record what they were made with"):
        run(settings)


def test_the_task_sets_the_prompts_and_the_stamp(tmp_path: Path) -> None:
    from benchmarks.phantom_ablation import SUBJECT_PROMPTS, subject_prompts, work_stamp

    assert subject_prompts("heart") == SUBJECT_PROMPTS
    assert subject_prompts("crescent")[0] == "a zwx crescent on a plain background"
    heart = work_stamp(Settings(out=tmp_path))
    crescent = work_stamp(Settings(out=tmp_path, task="crescent"))
    assert (heart["task"], crescent["task"]) == ("heart", "crescent")
    assert len(heart["subject_judge_sha256"]) == 64


def test_one_command_plans_both_tasks_and_variants_runs_a_part(tmp_path: Path) -> None:
    from benchmarks.phantom_ablation import CONFIRM_VARIANTS, parse_args, plan

    out, work = tmp_path / "out", tmp_path / "work"
    heart, crescent = plan(parse_args(["--out", str(out), "--work", str(work)]))
    assert (heart.task, heart.out, heart.work, heart.variants) == ("heart", out, work, VARIANTS)
    assert (crescent.task, crescent.out) == ("crescent", out / "crescent")
    assert crescent.work == tmp_path / "work-crescent"
    assert [v.name for v in crescent.variants] == list(CONFIRM_VARIANTS)
    assert heart.seeds == crescent.seeds == (0, 1, 2)

    (only,) = plan(parse_args(["--task", "heart", "--variants", "prior 1", "--seeds", "0"]))
    assert [v.name for v in only.variants] == ["prior 1"] and only.seeds == (0,)
    with pytest.raises(SystemExit):
        parse_args(["--variants", "no such variant"])
