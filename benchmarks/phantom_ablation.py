"""The phantom-limb ablation: what masked prior preservation buys against background drift.

Every variant trains a LoRA on the demo LoRA task (``modules.demo.dataset``: the "sks
heart", or with ``--task crescent`` the "zwx crescent", a shape and pattern the pretrained demo
base model never saw, on cluttered backgrounds with weighted masks) with the same data, steps,
batch, learning rate and seeds; only the masked-training settings change. Each trained LoRA is
then measured:

- ``subject loss``: mask-weighted denoising loss on held-out subject images (new backgrounds
  and clutter), at fixed noise and timesteps (``modules.trainer.drift``);
- ``subject score``: share of samples of "a sks heart on a ... background" prompts (or the
  ``--task crescent`` subject's, "a zwx crescent on a ... background") that the
  subject judge (``modules.demo.subject_judge``, trained on the subject's renderings at
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

    python benchmarks/phantom_ablation.py      # 3 seeds: the heart, every variant, then the
                                               # crescent, the variants it confirms (crescent/)
    python benchmarks/phantom_ablation.py --task heart --variants "prior 1" "prior 3"
    python benchmarks/phantom_ablation.py --seeds 0 --steps 20 --out runs/quick --work runs/q

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.atomic import replacing, write_text_atomic
from modules.config import config_from_dict
from modules.demo.classifier import load_classifier, score_prompt_match
from modules.demo.dataset import (
    SUBJECT_PRESENT,
    TASKS,
    TRIGGERS,
    DemoDataset,
    subject_presence,
    write_demo_dataset,
)
from modules.demo.subject_judge import SHIPPED_WEIGHTS as SUBJECT_JUDGE_WEIGHTS
from modules.demo.subject_judge import load_judge, share_showing
from modules.demo.world import BACKGROUNDS, SceneLabels, scene
from modules.lora import lora_disabled
from modules.models.demo.family import BUILTIN_WEIGHTS, GUIDANCE, TIME_SHIFT
from modules.trainer import GenericTrainer
from modules.trainer.drift import DriftMetrics, HeldOutSet, measure_drift, reading_keys

BASELINE = "masked, min weight 0.05"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    prior: bool
    """Uses the base model's prediction as a target (masked prior or a prior concept)."""
    steps_factor: int = 1
    prior_concept: bool = False
    concepts: dict[str, Any] = field(default_factory=dict)
    """Settings of the two concepts: ``subject`` and ``prior`` (``repeats``, ``loss_weight``)."""
    learning_rate_factor: float = 1.0
    why: str = ""
    """Why the lever was tried (the table's notes)."""


BEST_BALANCE = Variant(
    "prior concept 1/3 + prior 3, warm-up 0.5",
    {"prior": {"weight": 3.0, "schedule": "warmup", "schedule_share": 0.5}},
    prior=True,
    prior_concept=True,
    concepts={"subject": {"repeats": 2}},
    why="the two best balances of the first seed together: the world concept at a third "
    "of the draws, the masked prior warming up",
)
"""The second round's best balance, which the third round varies."""


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
    # The levers of the second round: when the prior acts, and how much the prior concept counts.
    Variant(
        "prior 3, warm-up 0.5",
        {"prior": {"weight": 3.0, "schedule": "warmup", "schedule_share": 0.5}},
        prior=True,
        why="prior 3 held the world but lost the subject: let the subject in first",
    ),
    Variant(
        "prior 3, decay 0.5",
        {"prior": {"weight": 3.0, "schedule": "decay", "schedule_share": 0.5}},
        prior=True,
        why="the other way round: hold the world first, free the subject at the end",
    ),
    Variant(
        "prior 3, noise 0.5-1",
        {"prior": {"weight": 3.0, "noise_min": 0.5}},
        prior=True,
        why="high noise decides the layout (where phantom limbs appear); the teacher runs half",
    ),
    Variant(
        "prior 3, noise 0-0.5",
        {"prior": {"weight": 3.0, "noise_max": 0.5}},
        prior=True,
        why="the opposite gate: the prior on the detail steps only",
    ),
    Variant(
        "prior concept 1/3, min weight 0.05",
        {"mask": {"min_weight": 0.05}},
        prior=True,
        prior_concept=True,
        concepts={"subject": {"repeats": 2}},
        why="the prior concept kept the world but cost subject loss: a smaller share of draws",
    ),
    Variant(
        "prior concept 2/3, min weight 0.05",
        {"mask": {"min_weight": 0.05}},
        prior=True,
        prior_concept=True,
        concepts={"prior": {"repeats": 2}},
        why="a larger share, for a world closer to the base",
    ),
    Variant(
        "prior concept x3 weight, min weight 0.05",
        {"mask": {"min_weight": 0.05}},
        prior=True,
        prior_concept=True,
        concepts={"prior": {"loss_weight": 3.0}},
        why="the same share, counted three times",
    ),
    Variant(
        "prior concept + prior 3, noise 0.5-1",
        {"prior": {"weight": 3.0, "noise_min": 0.5}},
        prior=True,
        prior_concept=True,
        why="the two best-protecting levers together, the masked prior on layout steps only",
    ),
    BEST_BALANCE,
    Variant(
        "prior concept, min weight 0.05, lr/2, 2x steps",
        {"mask": {"min_weight": 0.05}},
        prior=True,
        prior_concept=True,
        steps_factor=2,
        learning_rate_factor=0.5,
        why="every variant loses world prompt match: a gentler learning rate, as long a run",
    ),
    # The third round: the second round's best world-keepers, each with what the subject missed.
    replace(
        BEST_BALANCE,
        name="prior concept 1/3 + prior 3, decay 0.5",
        overrides={"prior": {"weight": 3.0, "schedule": "decay", "schedule_share": 0.5}},
        why="the decay alone drew the subject most often but let the world go once the prior "
        "let go: the world concept holds the world through the whole run",
    ),
    replace(
        BEST_BALANCE,
        name="prior concept 1/3 + prior 3, warm-up 0.5, lr/2, 2x steps",
        steps_factor=2,
        learning_rate_factor=0.5,
        why="the two variants that kept most of the world (80 %) together: the best balance, "
        "at a gentler learning rate over twice the steps",
    ),
)
"""Every variant shares mask.gamma 1 and per-sample normalisation; prior weights act on
``1 - mask`` (continuous mode) unless a threshold is given."""

HELDOUT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""The noise levels of the held-out measures: the whole range, each reported alone."""

METRICS = (
    ("subject_score", "subject score", "{:.2f}"),
    ("subject_leak", "subject leak", "{:.2f}"),
    ("prompt_match", "world prompt match", "{:.2f}"),
    ("drift_background_clean", "drift (bg)", "{:.2e}"),
    ("drift_world_clean", "drift (world)", "{:.2e}"),
    ("subject_loss_clean", "subject loss", "{:.4f}"),
    ("sec_per_step", "s/step", "{:.3f}"),
    ("teacher_fraction", "teacher ran", "{:.2f}"),
)
"""The main table: the samples' scores, and the held-out measures in clean-image space
(``modules.trainer.drift``: every noise level weighs by what it does to the picture)."""

BAND_METRICS = tuple(
    (f"{key}_t{t:g}", f"{title} @ {t:g}", fmt)
    for key, title, fmt in (
        ("drift_background", "drift (bg)", "{:.1e}"),
        ("subject_loss", "subject loss", "{:.4f}"),
    )
    for t in HELDOUT_TIMESTEPS
)
"""The held-out measures at each noise level alone (clean-image space)."""

OTHER_METRICS = (
    ("subject_colour_score", "subject score (colour)", "{:.2f}"),
    ("subject_colour_leak", "subject leak (colour)", "{:.2f}"),
    ("world_background", "world bg right", "{:.2f}"),
    ("world_colour", "world colour right", "{:.2f}"),
    ("subject_loss", "subject loss (velocity)", "{:.4f}"),
    ("drift_background", "drift (bg, velocity)", "{:.2e}"),
    ("drift_world", "drift (world, velocity)", "{:.2e}"),
)
"""The first round's measures: the colour test, and the velocity-space averages, which the
lowest noise level outweighs."""

ALL_METRICS = METRICS + BAND_METRICS + OTHER_METRICS


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
    subject_samples: int = 32
    """Samples of subject prompts per run, as many as of world prompts: with 10, one run's
    subject score moved by 0.1 a sample and its sd over seeds reached 0.32."""
    variants: tuple[Variant, ...] = VARIANTS
    task: str = "heart"
    """The demo subject task (``modules.demo.dataset.TASKS``) every variant trains."""
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
    concepts: list[dict[str, Any]] = [
        {"path": str(demo.subject), **variant.concepts.get("subject", {})}
    ]
    if variant.prior_concept:
        prior = variant.concepts.get("prior", {})
        concepts.append({"path": str(demo.prior), "type": "prior_prediction", **prior})
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
                "learning_rate": settings.learning_rate * variant.learning_rate_factor,
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
    trainer.built.model.denoiser.eval()
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
        family, model = trainer.built.family, trainer.built.model
        if self.heldout is None:
            self.heldout = HeldOutSet.build(
                family,
                model,
                subject_path=str(self.demo.heldout_subject),
                world_path=str(self.demo.heldout_world),
                resolution=64,
                timesteps=list(HELDOUT_TIMESTEPS),
                seed=0,
                max_images=8,
                device=trainer.built.device,
            )
        heldout = self.heldout
        subject, world = self._samples(trainer)
        metrics = {
            **_heldout_metrics(measure_drift(family, model, heldout)),
            **self._sample_scores(subject, world),
        }
        if self.base is None:
            with lora_disabled(model.denoiser):
                base_subject, base_world = self._samples(trainer)
                base_drift = measure_drift(family, model, heldout)
            held = _heldout_metrics(base_drift)
            self.base = {
                **{k: v for k, v in held.items() if k.startswith("subject_loss")},
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
        family, model = trainer.built.family, trainer.built.model
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


def _heldout_metrics(reading: DriftMetrics) -> dict[str, float]:
    """A drift reading's keys: velocity space under the first round's names, clean-image space
    with ``_clean``, and each noise level's with ``_t`` and the level."""
    return {key: float(value) for key, value in reading_keys(reading, "subject_loss").items()}


def _share_present(images: torch.Tensor, task: str) -> float:
    """The share of ``images`` that show the subject's colours (``subject_presence``)."""
    return float((subject_presence(images, task) > SUBJECT_PRESENT).float().mean())


def _grid_row(subject: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    return torch.cat([subject[:GRID_COLUMNS], world[:GRID_COLUMNS]])


# -------------------------------------------------------------------------------- reporting


def summarise(
    results: list[RunResult], variants: tuple[Variant, ...], base: dict[str, float] | None = None
) -> dict[str, Any]:
    """Mean and sd per variant and metric, ratios against the baseline (clean-image space) and
    the world prompt match as a share of the base model's."""
    summary: dict[str, Any] = {}
    for variant in variants:
        runs = [r for r in results if r.variant == variant.name]
        if not runs:
            continue
        summary[variant.name] = {
            key: _mean_sd([r.metrics[key] for r in runs])
            for key, _, _ in ALL_METRICS
            if all(key in r.metrics for r in runs)
        }
    if BASELINE in summary:
        reference = summary[BASELINE]
        for stats in summary.values():
            stats["drift_reduction"] = reference["drift_background_clean"][0] / max(
                stats["drift_background_clean"][0], 1e-12
            )
            stats["world_drift_reduction"] = reference["drift_world_clean"][0] / max(
                stats["drift_world_clean"][0], 1e-12
            )
            stats["subject_loss_change"] = (
                stats["subject_loss_clean"][0] / reference["subject_loss_clean"][0] - 1
            )
    if base and base.get("prompt_match"):
        for stats in summary.values():
            stats["world_kept"] = stats["prompt_match"][0] / base["prompt_match"]
    return summary


GOAL = {
    "subject_score": (">=", 0.9, "subject score ≥ 0.9"),
    "subject_leak": ("<=", 0.05, "leak ≤ 0.05"),
    "world_kept": (">=", 0.9, "world prompt match ≥ 90 % of the base's"),
    "drift_reduction": (">=", 3.0, "background drift ≥ 3x below the baseline's"),
}
"""The goal of the second round, on the means over seeds."""


def goal_misses(stats: dict[str, Any]) -> list[str]:
    """The goal's parts a variant's means miss (a part it has no number for is missed)."""
    missed = []
    for key, (sense, bound, _) in GOAL.items():
        value = stats.get(key)
        value = value[0] if isinstance(value, tuple) else value
        # Means of shares of samples (float32): 0.9 must count as 0.9 whatever the rounding.
        slack = 1e-6
        if value is None or not (
            value >= bound - slack if sense == ">=" else value <= bound + slack
        ):
            missed.append(key)
    return missed


def goal_check(summary: dict[str, Any], variants: tuple[Variant, ...]) -> list[str]:
    """The goals, computed, never tuned for: the first round's two (background drift against
    subject loss) and the second round's (the subject drawn, no leak, the world kept)."""
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
        "no more than 15 % more held-out subject loss, both in clean-image space): "
        + (f"met by {', '.join(passing)}." if passing else "not met by any variant.")
    )
    plain = sorted(
        (s["subject_loss_clean"][0], s["drift_background_clean"][0])
        for v in variants
        if not v.prior and v.name in summary
        for s in [summary[v.name]]
    )
    verdicts = []
    for variant in variants:
        if not variant.prior or variant.name not in summary:
            continue
        stats = summary[variant.name]
        frontier = _frontier_drift(plain, stats["subject_loss_clean"][0])
        below = frontier is None or stats["drift_background_clean"][0] <= frontier
        verdicts.append(f"{variant.name}: {'on or below' if below else 'above'}")
    lines.append(
        "Goal 2 (prior preservation on or below the drift/subject-loss frontier of the "
        "variants without a prior): " + "; ".join(verdicts) + "."
    )
    met = [name for name, stats in summary.items() if not goal_misses(stats)]
    parts = ", ".join(text for _, _, text in GOAL.values())
    if met:
        verdict = f"met by {', '.join(met)}."
    else:
        fewest = min(len(goal_misses(stats)) for stats in summary.values())
        nearest = [
            f"{name} (misses {'; '.join(GOAL[key][2] for key in goal_misses(stats))})"
            for name, stats in summary.items()
            if len(goal_misses(stats)) == fewest
        ]
        verdict = f"not met by any variant; the nearest: {', '.join(nearest)}."
    lines.append(f"Goal 3 ({parts}; means over seeds): {verdict}")
    return lines


def _frontier_drift(points: list[tuple[float, float]], loss: float) -> float | None:
    """The least drift the non-prior variants reach at ``loss`` or lower subject loss, read on
    the staircase through their points (None: no such variant learns the subject that well,
    so nothing beats this point)."""
    reachable = [drift for point_loss, drift in points if point_loss <= loss]
    return min(reachable) if reachable else None


def _cells(stats: dict[str, Any], metrics: tuple[tuple[str, str, str], ...]) -> list[str]:
    cells = []
    for key, _, fmt in metrics:
        if key not in stats:
            cells.append("–")
            continue
        mean, sd = stats[key]
        cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
    return cells


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def write_table(
    summary: dict[str, Any],
    base: dict[str, float],
    settings: Settings,
    variants: tuple[Variant, ...] = VARIANTS,
) -> str:
    levels = ", ".join(f"{t:g}" for t in HELDOUT_TIMESTEPS)
    lines = [
        f"Demo family, subject task {settings.task}, {settings.steps} steps (2x for the rows "
        f"that say so), batch {settings.batch_size}, learning rate {settings.learning_rate:g} "
        f"(halved where a row says lr/2), LoRA rank {settings.rank} on "
        f"lora.targets={settings.lora_targets}, seeds {', '.join(map(str, settings.seeds))}; "
        f"mean ± sd over seeds. Ratios are against *{BASELINE}*.",
        "",
        "*Subject score* and *subject leak*: the subject judge on samples of subject prompts "
        "and of base-world prompts (which never name the subject). *World prompt match*: the "
        "world classifier on those base-world samples; *world kept* is it as a share of the "
        "base model's. Drift and subject loss are held-out measures in clean-image space "
        f"(squared error × t², the mean over noise levels {levels}, so each level weighs by "
        "what it does to the picture); *subject learned*: the drop in that subject loss from "
        "the base model's, as a share of the baseline's drop. *Goal misses*: the parts of "
        "goal 3 (below) the means miss: score, leak, world, drift.",
        "",
    ]
    header = [
        "variant",
        *(title for _, title, _ in METRICS),
        "world kept",
        "drift (bg) cut",
        "subject learned",
        "goal misses",
    ]
    rows = []
    short = {
        "subject_score": "score",
        "subject_leak": "leak",
        "world_kept": "world",
        "drift_reduction": "drift",
    }
    for name, stats in summary.items():
        misses = [short[key] for key in goal_misses(stats)]
        rows.append(
            [
                name,
                *_cells(stats, METRICS),
                f"{stats.get('world_kept', float('nan')):.0%}",
                f"{stats.get('drift_reduction', float('nan')):.2f}x",
                f"{_learned(stats, summary, base):.0%}",
                ", ".join(misses) or "none",
            ]
        )
    lines += _markdown_table(header, rows)
    lines += [
        "",
        f"By noise level (clean-image space): background drift and held-out subject loss at "
        f"each of {levels} alone.",
        "",
    ]
    header = ["variant", *(title for _, title, _ in BAND_METRICS)]
    rows = [[name, *_cells(stats, BAND_METRICS)] for name, stats in summary.items()]
    lines += _markdown_table(header, rows)
    lines += [
        "",
        "The first round's measures: the colour-area test (which calls a small subject "
        "absent), the world classifier's background and colour alone, and the velocity-space "
        "averages, which the lowest noise level outweighs.",
        "",
    ]
    header = ["variant", *(title for _, title, _ in OTHER_METRICS)]
    rows = [[name, *_cells(stats, OTHER_METRICS)] for name, stats in summary.items()]
    lines += _markdown_table(header, rows)
    shown = ", ".join(
        f"{title} {fmt.format(base[key])}" for key, title, fmt in ALL_METRICS if key in base
    )
    lines += ["", f"Base model without a LoRA: {shown}."]
    reasons = [f"- *{v.name}*: {v.why}." for v in variants if v.why and v.name in summary]
    if reasons:
        lines += ["", "Why each lever of the later rounds was tried:", "", *reasons]
    return "\n".join(lines) + "\n"


def _learned(stats: dict[str, Any], summary: dict[str, Any], base: dict[str, float]) -> float:
    """(base loss - this loss) / (base loss - baseline loss), clean-image space; NaN without
    both references."""
    if BASELINE not in summary or "subject_loss_clean" not in base:
        return float("nan")
    drop = base["subject_loss_clean"] - summary[BASELINE]["subject_loss_clean"][0]
    if drop == 0:
        return float("nan")
    return (base["subject_loss_clean"] - stats["subject_loss_clean"][0]) / drop


def plot_frontier(
    results: list[RunResult],
    variants: tuple[Variant, ...],
    path: Path,
    base: dict[str, float] | None = None,
) -> None:
    """Three panels: subject score against world prompt match (the goal's corner shaded), and
    the held-out background and world drift against the held-out subject loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2), constrained_layout=True)
    markers = "osD^v<>pXP*h"
    base_match = (base or {}).get("prompt_match")
    for index, variant in enumerate(variants):
        runs = [r for r in results if r.variant == variant.name]
        if not runs:
            continue
        style = {
            "marker": markers[index % len(markers)],
            "edgecolors": f"C{index % 10}",
            "color": f"C{index % 10}",
        }
        if not variant.prior:
            style["facecolors"] = "none"
        match = [r.metrics["prompt_match"] for r in runs]
        score = [r.metrics["subject_score"] for r in runs]
        axes[0].scatter(match, score, s=18, alpha=0.35, **style)
        axes[0].scatter(
            [statistics.mean(match)], [statistics.mean(score)], s=70, label=variant.name, **style
        )
        for axis, key in zip(
            axes[1:], ("drift_background_clean", "drift_world_clean"), strict=True
        ):
            axis.scatter(
                [r.metrics["subject_loss_clean"] for r in runs],
                [r.metrics[key] for r in runs],
                s=55,
                **style,
            )
    axes[0].set_xlabel("world prompt match (higher: the world kept)")
    axes[0].set_ylabel("subject score (higher: the subject drawn)")
    axes[0].set_title("Subject against world: means (large) and seeds (small)")
    axes[0].set_xlim(-0.02, 1.02)
    axes[0].set_ylim(-0.02, 1.05)
    if base_match:
        axes[0].axvline(base_match, color="grey", ls="--", lw=1)
        goal = Rectangle((0.9 * base_match, 0.9), 1.02 - 0.9 * base_match, 0.15)
        axes[0].add_patch(goal)
        goal.set(color="C2", alpha=0.12, lw=0, label="the goal")
        axes[0].text(base_match, 0.02, " base model", color="grey", fontsize=8)
    axes[0].grid(True, alpha=0.3)
    for axis, title in zip(
        axes[1:], ("background of held-out subject images", "base-world images"), strict=True
    ):
        axis.set_xlabel("held-out subject loss, clean image (lower: learns the subject better)")
        axis.set_ylabel("drift from the base, clean image (lower: less bleed)")
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
    summary = summarise(results, settings.variants, evaluation.base)
    table = write_table(summary, evaluation.base, settings, settings.variants)
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
    plot_frontier(results, settings.variants, settings.out / "frontier.png", evaluation.base)
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
        "heldout_timesteps": list(HELDOUT_TIMESTEPS),
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


CONFIRM_VARIANTS = (
    BASELINE,
    "prior 1",
    "prior 3, warm-up 0.5",
    "prior concept 1/3 + prior 3, warm-up 0.5",
    "prior concept 1/3 + prior 3, decay 0.5",
    "prior concept 1/3 + prior 3, warm-up 0.5, lr/2, 2x steps",
)
"""The variants the second task confirms, unchanged: the baseline, the first round's
recommended prior weight, the best balances of the first task's second round and the third
round's two candidates (``docs/ablation/table.md``)."""


def plan(args: argparse.Namespace) -> list[Settings]:
    """The benchmark's runs: the heart task with every variant (or ``--variants``) into
    ``--out`` and ``--work``; with ``--task both`` (the default) then the crescent task with
    :data:`CONFIRM_VARIANTS` (or ``--variants``) into ``OUT/crescent`` and ``WORK-crescent``."""
    known = {v.name: v for v in VARIANTS}
    chosen = tuple(known[name] for name in args.variants) if args.variants else None
    tasks = ("heart", "crescent") if args.task == "both" else (args.task,)
    settings = []
    for task in tasks:
        second = args.task == "both" and task == "crescent"
        variants = chosen or (
            tuple(known[name] for name in CONFIRM_VARIANTS) if second else VARIANTS
        )
        settings.append(
            Settings(
                out=args.out / "crescent" if second else args.out,
                work=args.work.with_name(f"{args.work.name}-crescent") if second else args.work,
                seeds=tuple(args.seeds),
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                lora_targets=args.lora_targets,
                variants=variants,
                task=task,
                report_only=args.report_only,
            )
        )
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        choices=(*TASKS, "both"),
        default="both",
        help="the demo subject task every variant trains; both (the default): the heart with "
        "every variant, then the crescent with the variants it confirms",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; write the report from the runs in --work",
    )
    args = parser.parse_args(argv)
    known = {v.name for v in VARIANTS}
    unknown = [name for name in args.variants or () if name not in known]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> None:
    for settings in plan(parse_args(argv)):
        run(settings)


if __name__ == "__main__":
    main()
