"""The phantom-limb ablation: what masked prior preservation buys against background drift.

Every variant trains a LoRA on the demo LoRA task (``modules.data.demo_dataset``: the "sks
heart", or with ``--task crescent`` the "zwx crescent", a shape and pattern the pretrained demo
base model never saw, on cluttered backgrounds with weighted masks) with the same data, steps,
batch, learning rate and seeds; only the masked-training settings change. Each trained LoRA is
then measured:

- ``subject loss``: mask-weighted denoising loss on held-out subject images (new backgrounds
  and clutter), at fixed noise and timesteps (``modules.trainer.drift``);
- ``subject score``: share of samples of "a sks heart on a ... background" prompts (or the
  ``--task crescent`` subject's, "a zwx crescent on a ... background") that the
  subject judge (``modules.models.demo_subject_judge``, trained on the subject's renderings at
  any size) reads as the subject; ``subject score (colour)`` is the older colour-area test
  (``subject_presence``), which calls a small subject absent;
- ``drift (bg)``: mean squared difference between the LoRA's and the base model's predictions
  on the background of the held-out subject images;
- ``drift (world)``: the same over whole base-world images whose prompts never name the
  subject;
- ``subject leak``: the same judge on samples of base-world prompts, which never name the
  subject: the share of them that show it anyway (phantom limbs); ``subject leak (colour)``
  by the colour test;
- ``prompt match``: the world classifier's score (background, shape and colour all right) on
  samples of base-world prompts, with the LoRA, and its background and colour accuracy alone
  (the base model's shapes are near chance, see ``docs/demo-model.md``);
- seconds per step and the share of samples the teacher ran on.

Writes ``table.md``, ``results.json``, ``frontier.png`` and ``grids.png`` to ``--out``
(default ``docs/ablation``):

    python benchmarks/phantom_ablation.py                 # 3 seeds, every variant
    python benchmarks/phantom_ablation.py --seeds 0 --steps 20 --out runs/quick --work runs/q
    python benchmarks/phantom_ablation.py --task crescent --out runs/crescent --work runs/c

The variants run one after another in one process; seconds per step are comparable within a
run only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.atomic import replacing, write_text_atomic
from modules.config import config_from_dict
from modules.data.demo_dataset import (
    SUBJECT_PRESENT,
    TASKS,
    TRIGGERS,
    DemoDataset,
    subject_presence,
    write_demo_dataset,
)
from modules.data.world import BACKGROUNDS, SceneLabels, scene
from modules.lora import lora_disabled
from modules.models.demo.family import BUILTIN_WEIGHTS, GUIDANCE, TIME_SHIFT
from modules.models.demo_classifier import load_classifier, score_prompt_match
from modules.models.demo_subject_judge import SHIPPED_WEIGHTS as SUBJECT_JUDGE_WEIGHTS
from modules.models.demo_subject_judge import load_judge, share_showing
from modules.trainer import GenericTrainer
from modules.trainer.drift import HeldOutSet, measure_drift

BASELINE = "masked, min weight 0.05"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    prior: bool
    """Uses the base model's prediction as a target (masked prior or a prior concept)."""
    steps_factor: int = 1
    prior_concept: bool = False


VARIANTS = (
    Variant(BASELINE, {"mask": {"min_weight": 0.05}}, prior=False),
    Variant("masked, min weight 0", {}, prior=False),
    Variant("unmasked", {"mask": {"enabled": False}}, prior=False),
    Variant("unmasked, 2x steps", {"mask": {"enabled": False}}, prior=False, steps_factor=2),
    Variant("prior 0.5", {"prior": {"weight": 0.5}}, prior=True),
    Variant("prior 1", {"prior": {"weight": 1.0}}, prior=True),
    Variant("prior 3", {"prior": {"weight": 3.0}}, prior=True),
    Variant("prior 10", {"prior": {"weight": 10.0}}, prior=True),
    Variant("prior 1, threshold 0.5", {"prior": {"weight": 1.0, "threshold": 0.5}}, prior=True),
    Variant(
        "prior 1, unmasked p 0.1",
        {"prior": {"weight": 1.0}, "mask": {"unmasked_probability": 0.1}},
        prior=True,
    ),
    Variant(
        "prior concept, min weight 0.05",
        {"mask": {"min_weight": 0.05}},
        prior=True,
        prior_concept=True,
    ),
    Variant("prior concept + prior 1", {"prior": {"weight": 1.0}}, prior=True, prior_concept=True),
)
"""Every variant shares mask.gamma 1 and per-sample normalisation; prior weights act on
``1 - mask`` (continuous mode) unless a threshold is given."""

METRICS = (
    ("subject_loss", "subject loss", "{:.4f}"),
    ("subject_score", "subject score", "{:.2f}"),
    ("subject_leak", "subject leak", "{:.2f}"),
    ("subject_colour_score", "subject score (colour)", "{:.2f}"),
    ("subject_colour_leak", "subject leak (colour)", "{:.2f}"),
    ("drift_background", "drift (bg)", "{:.2e}"),
    ("drift_world", "drift (world)", "{:.2e}"),
    ("prompt_match", "prompt match", "{:.2f}"),
    ("world_background", "world bg right", "{:.2f}"),
    ("world_colour", "world colour right", "{:.2f}"),
    ("sec_per_step", "s/step", "{:.3f}"),
    ("teacher_fraction", "teacher ran", "{:.2f}"),
)


def subject_prompts(task: str = "heart") -> tuple[str, ...]:
    """The subject prompts of ``task``: its trigger caption on every background."""
    return tuple(f"a {TRIGGERS[task]} {task} on a {kind} background" for kind in BACKGROUNDS)


SUBJECT_PROMPTS = subject_prompts("heart")
WORLD_PROMPT_OFFSET = 3_000_000
"""World scenes for the prompt-match score: ``train``-split prompts the pretraining never drew
(it drew scenes 0 … steps × batch)."""
GRID_COLUMNS = 4


@dataclass
class Settings:
    out: Path
    work: Path | None = None
    """Keeps finished runs so a stopped benchmark resumes; None: a temporary folder."""
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 2e-3
    rank: int = 16
    lora_targets: str = "attention_conv"
    """``lora.targets`` of every run, as in the demo presets (the built-in UNet's attention and
    convolutions)."""
    sample_steps: int = 20
    world_prompts: int = 32
    subject_samples: int = 10
    variants: tuple[Variant, ...] = VARIANTS
    task: str = "heart"
    """The demo subject task (``modules.data.demo_dataset.TASKS``) every variant trains."""
    report_only: bool = False
    """Train nothing: report the runs the work folder holds."""


@dataclass
class RunResult:
    variant: str
    seed: int
    metrics: dict[str, float]
    samples: torch.Tensor | None = field(repr=False)
    """(GRID_COLUMNS * 2, 3, H, W): subject prompts, then world prompts, for the grid."""


def run_variant(
    variant: Variant,
    seed: int,
    settings: Settings,
    demo: DemoDataset,
    work: Path,
    evaluation: Evaluation,
) -> RunResult:
    """Train one LoRA with the real trainer, then measure it."""
    concepts: list[dict[str, Any]] = [{"path": str(demo.subject)}]
    if variant.prior_concept:
        concepts.append({"path": str(demo.prior), "type": "prior_prediction"})
    overrides = variant.overrides
    config = config_from_dict(
        {
            "data": {"concepts": concepts, "resolution": 64, "cache_dir": str(work / "cache")},
            "mask": {"enabled": True, "normalize_per_sample": True, **overrides.get("mask", {})},
            "prior": overrides.get("prior", {"weight": 0.0}),
            "lora": {
                "rank": settings.rank,
                "alpha": float(settings.rank),
                "targets": settings.lora_targets,
            },
            "training": {
                "steps": settings.steps * variant.steps_factor,
                "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate,
                "seed": seed,
            },
            "output": {"run_dir": str(work / "runs" / f"{_slug(variant.name)}-seed{seed}")},
        }
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    seconds, teacher = [], []
    for _ in range(config.training.steps):
        tick = time.perf_counter()
        result = trainer.optimizer_step()
        seconds.append(time.perf_counter() - tick)
        teacher.append(result.teacher_fraction)
    trainer.model.denoiser.eval()
    metrics, samples = evaluation.measure(trainer)
    metrics["sec_per_step"] = statistics.median(seconds)
    metrics["teacher_fraction"] = statistics.mean(teacher)
    return RunResult(variant.name, seed, metrics, samples)


class Evaluation:
    """The fixed held-out measurements, shared by every run."""

    def __init__(self, settings: Settings, demo: DemoDataset) -> None:
        self.settings = settings
        self.demo = demo
        self.classifier = load_classifier()
        self.subject_judge = load_judge()
        world = [scene(WORLD_PROMPT_OFFSET + i, "train") for i in range(settings.world_prompts)]
        self.world_prompts = [s.caption for s in world]
        self.world_labels: list[SceneLabels] = [s.labels for s in world]
        count = settings.subject_samples
        prompts = subject_prompts(settings.task)
        self.subject_prompts = [prompts[i % len(prompts)] for i in range(count)]
        self.base: dict[str, float] | None = None
        self.base_samples: torch.Tensor | None = None
        self.heldout: HeldOutSet | None = None
        """Built at the first measurement and kept: every run starts from the same base."""

    def measure(self, trainer: GenericTrainer) -> tuple[dict[str, float], torch.Tensor]:
        family, model = trainer.family, trainer.model
        if self.heldout is None:
            self.heldout = HeldOutSet.build(
                family,
                model,
                subject_path=str(self.demo.heldout_subject),
                world_path=str(self.demo.heldout_world),
                resolution=64,
                timesteps=[0.25, 0.5, 0.75],
                seed=0,
                max_images=8,
                device=trainer.device,
            )
        heldout = self.heldout
        drift = measure_drift(family, model, heldout)
        subject, world = self._samples(trainer)
        metrics = {
            "subject_loss": float(drift.subject_loss),
            "drift_background": float(drift.drift_background),
            "drift_world": float(drift.drift_world),
            **self._sample_scores(subject, world),
        }
        if self.base is None:
            with lora_disabled(model.denoiser):
                base_subject, base_world = self._samples(trainer)
                base_drift = measure_drift(family, model, heldout)
            self.base = {
                "subject_loss": float(base_drift.subject_loss),
                **self._sample_scores(base_subject, base_world),
            }
            self.base_samples = _grid_row(base_subject, base_world)
        return metrics, _grid_row(subject, world)

    def _sample_scores(self, subject: torch.Tensor, world: torch.Tensor) -> dict[str, float]:
        match = score_prompt_match(self.classifier, world, self.world_labels)
        return {
            "subject_score": share_showing(self.subject_judge, subject, self.settings.task),
            "subject_leak": share_showing(self.subject_judge, world, self.settings.task),
            "subject_colour_score": _share_present(subject, self.settings.task),
            "subject_colour_leak": _share_present(world, self.settings.task),
            "prompt_match": match["prompt_match"],
            "world_background": match["background"],
            "world_colour": match["colour"],
        }

    @torch.no_grad()
    def _samples(self, trainer: GenericTrainer) -> tuple[torch.Tensor, torch.Tensor]:
        family, model = trainer.family, trainer.model
        out = []
        for prompts in (self.subject_prompts, self.world_prompts):
            text = family.encode_prompts(model, prompts)
            generator = torch.Generator().manual_seed(1234)
            images = family.sample(
                model,
                text,
                size=(64, 64),
                steps=self.settings.sample_steps,
                generator=generator,
            )
            out.append(images.float().cpu())
        return out[0], out[1]


def _share_present(images: torch.Tensor, task: str) -> float:
    """The share of ``images`` that show the subject's colours (``subject_presence``)."""
    return float((subject_presence(images, task) > SUBJECT_PRESENT).float().mean())


def _grid_row(subject: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    return torch.cat([subject[:GRID_COLUMNS], world[:GRID_COLUMNS]])


# -------------------------------------------------------------------------------- reporting


def summarise(results: list[RunResult], variants: tuple[Variant, ...]) -> dict[str, Any]:
    """Mean and sd per variant and metric, ratios against the baseline, the goal check."""
    summary: dict[str, Any] = {}
    for variant in variants:
        runs = [r for r in results if r.variant == variant.name]
        if not runs:
            continue
        summary[variant.name] = {
            key: _mean_sd([r.metrics[key] for r in runs]) for key, _, _ in METRICS
        }
    if BASELINE in summary:
        base = summary[BASELINE]
        for stats in summary.values():
            stats["drift_reduction"] = base["drift_background"][0] / max(
                stats["drift_background"][0], 1e-12
            )
            stats["world_drift_reduction"] = base["drift_world"][0] / max(
                stats["drift_world"][0], 1e-12
            )
            stats["subject_loss_change"] = stats["subject_loss"][0] / base["subject_loss"][0] - 1
    return summary


def goal_check(summary: dict[str, Any], variants: tuple[Variant, ...]) -> list[str]:
    """The issue's two goals, computed, never tuned for."""
    lines = []
    if BASELINE not in summary:
        return lines
    passing = [
        name
        for name, s in summary.items()
        if s["drift_reduction"] >= 3.0 and s["subject_loss_change"] <= 0.15
    ]
    lines.append(
        "Goal 1 (at least 3x less background drift than masked loss with min weight 0.05, at "
        "no more than 15 % more subject loss): "
        + (f"met by {', '.join(passing)}." if passing else "not met by any variant.")
    )
    plain = sorted(
        (s["subject_loss"][0], s["drift_background"][0])
        for v in variants
        if not v.prior and v.name in summary
        for s in [summary[v.name]]
    )
    verdicts = []
    for variant in variants:
        if not variant.prior or variant.name not in summary:
            continue
        loss, drift = (
            summary[variant.name]["subject_loss"][0],
            summary[variant.name]["drift_background"][0],
        )
        frontier = _frontier_drift(plain, loss)
        below = frontier is None or drift <= frontier
        verdicts.append(f"{variant.name}: {'on or below' if below else 'above'}")
    lines.append(
        "Goal 2 (prior preservation on or below the drift/subject-loss frontier of the "
        "variants without a prior): " + "; ".join(verdicts) + "."
    )
    return lines


def _frontier_drift(points: list[tuple[float, float]], loss: float) -> float | None:
    """The least drift the non-prior variants reach at ``loss`` or lower subject loss, read on
    the staircase through their points (None: no such variant learns the subject that well,
    so nothing beats this point)."""
    reachable = [drift for point_loss, drift in points if point_loss <= loss]
    return min(reachable) if reachable else None


def write_table(summary: dict[str, Any], base: dict[str, float], settings: Settings) -> str:
    header = [
        "variant",
        *(title for _, title, _ in METRICS),
        "drift (bg) cut",
        "subject loss",
        "subject learned",
    ]
    lines = [
        f"Demo family, subject task {settings.task}, {settings.steps} steps (2x for the row "
        f"that says so), batch "
        f"{settings.batch_size}, learning rate {settings.learning_rate:g}, LoRA rank "
        f"{settings.rank} on lora.targets={settings.lora_targets}, seeds "
        f"{', '.join(map(str, settings.seeds))}; mean ± sd over seeds. "
        f"Ratios are against *{BASELINE}*. *Subject learned*: the drop in held-out subject "
        "loss from the base model's, as a share of the baseline's drop.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for name, stats in summary.items():
        cells = [name]
        for key, _, fmt in METRICS:
            mean, sd = stats[key]
            cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
        cells.append(f"{stats.get('drift_reduction', float('nan')):.2f}x")
        cells.append(f"{stats.get('subject_loss_change', float('nan')):+.1%}")
        cells.append(f"{_learned(stats, summary, base):.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    shown = ", ".join(
        f"{title} {fmt.format(base[key])}" for key, title, fmt in METRICS if key in base
    )
    lines += ["", f"Base model without a LoRA: {shown}."]
    return "\n".join(lines) + "\n"


def _learned(stats: dict[str, Any], summary: dict[str, Any], base: dict[str, float]) -> float:
    """(base loss - this loss) / (base loss - baseline loss); NaN without both references."""
    if BASELINE not in summary or "subject_loss" not in base:
        return float("nan")
    drop = base["subject_loss"] - summary[BASELINE]["subject_loss"][0]
    if drop == 0:
        return float("nan")
    return (base["subject_loss"] - stats["subject_loss"][0]) / drop


def plot_frontier(results: list[RunResult], variants: tuple[Variant, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    markers = "osD^v<>pXP*h"
    for index, variant in enumerate(variants):
        runs = [r for r in results if r.variant == variant.name]
        if not runs:
            continue
        for axis, key in zip(axes, ("drift_background", "drift_world"), strict=True):
            axis.scatter(
                [r.metrics["subject_loss"] for r in runs],
                [r.metrics[key] for r in runs],
                marker=markers[index % len(markers)],
                s=55,
                facecolors="none" if not variant.prior else None,
                edgecolors=f"C{index % 10}",
                color=f"C{index % 10}",
                label=variant.name if axis is axes[0] else None,
            )
    for axis, title in zip(
        axes, ("background of held-out subject images", "base-world prompts"), strict=True
    ):
        axis.set_xlabel("held-out subject loss (lower: learns the subject better)")
        axis.set_ylabel("drift from the base model (lower: less bleed)")
        axis.set_yscale("log")
        axis.set_title(f"Drift on the {title}")
        axis.grid(True, alpha=0.3)
    figure.legend(loc="outside right center", fontsize=8, title="hollow: no prior")
    _save_figure(figure, path)
    plt.close(figure)


def save_grids(
    results: list[RunResult],
    base_samples: torch.Tensor,
    variants: tuple[Variant, ...],
    path: Path,
) -> None:
    """One row per variant (its lowest seed with samples), base model first: subject prompts
    on the left, base-world prompts on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("base model (no LoRA)", base_samples)]
    for variant in variants:
        runs = sorted(
            (r for r in results if r.variant == variant.name and r.samples is not None),
            key=lambda r: r.seed,
        )
        if runs:
            rows.append((f"{variant.name} (seed {runs[0].seed})", runs[0].samples))
    columns = base_samples.shape[0]
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(columns * 1.2 + 2.6, len(rows) * 1.2), squeeze=False
    )
    for row, (name, images) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            pixels = ((images[column].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy()
            axis.imshow(pixels, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if row == 0 and column % (columns // 2) == 0:
                title = "subject prompts" if column == 0 else "base-world prompts"
                axis.set_title(title, fontsize=8, loc="left")
    figure.subplots_adjust(left=0.25, wspace=0.05, hspace=0.05)
    _save_figure(figure, path)
    plt.close(figure)


def _save_figure(figure: Any, path: Path) -> None:
    with replacing(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# ------------------------------------------------------------------------------------- main


def run(settings: Settings) -> dict[str, Any]:
    """Train and measure every (seed, variant) not yet in the work folder, then report all.

    Each finished run is appended to ``WORK/runs.jsonl`` (its grid samples to ``WORK/samples``)
    at once, so a stopped benchmark resumes where it stopped with the same command."""
    settings.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = settings.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (work / "samples").mkdir(parents=True, exist_ok=True)
        _claim_work(work, settings)
        demo = write_demo_dataset(work / "demo-data", task=settings.task)
        evaluation = Evaluation(settings, demo)
        _load_base(evaluation, work)
        results = _load_results(work)
        done = {(r.variant, r.seed) for r in results}
        started = time.perf_counter()
        for seed in settings.seeds:
            for variant in settings.variants:
                if (variant.name, seed) in done or settings.report_only:
                    continue
                result = run_variant(variant, seed, settings, demo, work, evaluation)
                _save_result(work, result, evaluation)
                results.append(result)
                shown = ", ".join(
                    f"{title} {fmt.format(result.metrics[key])}" for key, title, fmt in METRICS
                )
                print(
                    f"[{time.perf_counter() - started:6.0f} s] seed {seed} {variant.name}: {shown}",
                    flush=True,
                )
    wanted = {v.name for v in settings.variants}
    results = [r for r in results if r.variant in wanted and r.seed in settings.seeds]
    assert evaluation.base is not None and evaluation.base_samples is not None
    summary = summarise(results, settings.variants)
    table = write_table(summary, evaluation.base, settings)
    goals = goal_check(summary, settings.variants)
    write_text_atomic(settings.out / "table.md", table + "\n" + "\n\n".join(goals) + "\n")
    payload = {
        "settings": {
            "seeds": list(settings.seeds),
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "rank": settings.rank,
            "lora_targets": settings.lora_targets,
            "sample_steps": settings.sample_steps,
            "task": settings.task,
        },
        "base_model": evaluation.base,
        "runs": [{"variant": r.variant, "seed": r.seed, **r.metrics} for r in results],
        "summary": summary,
        "goals": goals,
    }
    write_text_atomic(settings.out / "results.json", json.dumps(payload, indent=2) + "\n")
    plot_frontier(results, settings.variants, settings.out / "frontier.png")
    save_grids(results, evaluation.base_samples, settings.variants, settings.out / "grids.png")
    print(table)
    print("\n".join(goals))
    return payload


WORK_STAMP = "made-with.json"


def work_stamp(settings: Settings) -> dict[str, Any]:
    """What a finished run's numbers depend on besides its variant and seed: the settings and
    the base model (a digest of the built-in weights, and the family's sampling constants)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in BUILTIN_WEIGHTS.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(BUILTIN_WEIGHTS)).encode())
        digest.update(path.read_bytes())
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "rank": settings.rank,
        "lora_targets": settings.lora_targets,
        "sample_steps": settings.sample_steps,
        "world_prompts": settings.world_prompts,
        "subject_samples": settings.subject_samples,
        "base_weights_sha256": digest.hexdigest(),
        "time_shift": TIME_SHIFT,
        "guidance": GUIDANCE,
        "task": settings.task,
        # Scores of runs judged by another subject judge (or by colour alone) do not compare.
        "subject_judge_sha256": hashlib.sha256(SUBJECT_JUDGE_WEIGHTS.read_bytes()).hexdigest(),
    }


def _claim_work(work: Path, settings: Settings) -> None:
    """Stamp a new work folder; refuse one whose runs were made with other settings or another
    base model, which a resumed benchmark would otherwise report as its own."""
    stamp, path = work_stamp(settings), work / WORK_STAMP
    if not path.exists():
        if (work / "runs.jsonl").exists():
            raise SystemExit(
                f"{work} holds runs from an earlier version of this benchmark, which did not "
                "record what they were made with; delete the folder or pass another --work"
            )
        write_text_atomic(path, json.dumps(stamp, indent=2) + "\n")
        return
    # Stamps from before the targets were a setting: those runs trained the attention layers.
    saved = {
        "lora_targets": "attention",
        "task": "heart",
        **json.loads(path.read_text(encoding="utf-8")),
    }
    changed = sorted(k for k in stamp.keys() | saved.keys() if saved.get(k) != stamp.get(k))
    if changed:
        raise SystemExit(
            f"{work} holds runs made with other {', '.join(changed)} than this benchmark's; "
            "delete the folder to start again, or pass another --work"
        )


def _save_result(work: Path, result: RunResult, evaluation: Evaluation) -> None:
    if result.samples is not None:
        torch.save(result.samples, work / "samples" / f"{_slug(result.variant)}-{result.seed}.pt")
    if not (work / "base.json").exists() and evaluation.base is not None:
        torch.save(evaluation.base_samples, work / "samples" / "base.pt")
        write_text_atomic(work / "base.json", json.dumps(evaluation.base) + "\n")
    row = {"variant": result.variant, "seed": result.seed, **result.metrics}
    with (work / "runs.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _load_results(work: Path) -> list[RunResult]:
    path = work / "runs.jsonl"
    if not path.exists():
        return []
    results = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        variant, seed = row.pop("variant"), row.pop("seed")
        samples_path = work / "samples" / f"{_slug(variant)}-{seed}.pt"
        samples = torch.load(samples_path, weights_only=True) if samples_path.exists() else None
        results.append(RunResult(variant, seed, row, samples))
    return results


def _load_base(evaluation: Evaluation, work: Path) -> None:
    if (work / "base.json").exists() and (work / "samples" / "base.pt").exists():
        evaluation.base = json.loads((work / "base.json").read_text(encoding="utf-8"))
        evaluation.base_samples = torch.load(work / "samples" / "base.pt", weights_only=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/ablation"))
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/phantom-ablation"),
        help="finished runs are kept here; running again resumes (default %(default)s)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--learning-rate", type=float, default=Settings.learning_rate)
    parser.add_argument(
        "--lora-targets",
        choices=["attention", "attention_ffn", "attention_conv"],
        default=Settings.lora_targets,
        help="lora.targets of every run (default %(default)s)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="run only these variants (names as in the table; quote them)",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=Settings.task,
        help="the demo subject task every variant trains (default %(default)s)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; write the report from the runs in --work",
    )
    args = parser.parse_args(argv)
    variants = VARIANTS
    if args.variants:
        known = {v.name: v for v in VARIANTS}
        unknown = [name for name in args.variants if name not in known]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {sorted(known)}")
        variants = tuple(known[name] for name in args.variants)
    settings = Settings(
        out=args.out,
        work=args.work,
        seeds=tuple(args.seeds),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lora_targets=args.lora_targets,
        variants=variants,
        task=args.task,
        report_only=args.report_only,
    )
    run(settings)


if __name__ == "__main__":
    main()
