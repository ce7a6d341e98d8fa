"""Train the world classifier that scores the demo model's samples (a few minutes on a CPU).

    python -m scripts.train_demo_classifier --out modules/demo/classifier.safetensors

Scenes come from the world's ``judge`` split, drawn on the fly (no two steps see the same
image); accuracy is reported on the ``heldout`` split, whose main objects are the held-out
(shape, colour) pairs the base model is asked to draw, and on ``train`` scenes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.demo.classifier import (
    HEADS,
    WorldClassifier,
    images_to_tensor,
    label_targets,
    save_classifier,
    score_prompt_match,
)
from modules.demo.world import Split, WorldSpec, scene


@dataclass(frozen=True)
class ClassifierRun:
    steps: int = 1500
    """Scenes are drawn fresh every step, so more steps never overfit; 1500 × 64 take about
    5 minutes on two free CPU cores."""
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    noise: float = 0.15
    """Largest std of Gaussian noise added to inputs: generated samples are never clean, and a
    judge that only knows clean pixels would mark them down for noise, not content."""
    eval_scenes: int = 512
    width: int = 24
    """Channels of the first conv block (the shipped size; tests use a narrower one)."""


def train_classifier(
    run: ClassifierRun, spec: WorldSpec | None = None, log: bool = False
) -> WorldClassifier:
    """A trained classifier; the same run and spec give the same weights."""
    spec = spec if spec is not None else WorldSpec()
    torch.manual_seed(run.seed)
    classifier = WorldClassifier(spec, width=run.width)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=run.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=run.learning_rate, total_steps=run.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(run.seed)
    classifier.train()
    started = time.perf_counter()
    for step in range(run.steps):
        start = step * run.batch_size
        images, labels = _batch(spec, "judge", range(start, start + run.batch_size))
        sigma = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * run.noise
        images = images + sigma * torch.randn(images.shape, generator=generator)
        logits = classifier(images)
        targets = label_targets(labels, classifier)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{run.steps}  loss {float(loss.detach()):.4f}  {elapsed:.0f} s")
    return classifier.eval()


def evaluate(
    classifier: WorldClassifier, spec: WorldSpec, split: Split, count: int
) -> dict[str, float]:
    """Scores on the first ``count`` scenes of ``split`` (clean images)."""
    images, labels = _batch(spec, split, range(count))
    return score_prompt_match(classifier, images, labels)


def _batch(spec: WorldSpec, split: Split, indices: range) -> tuple[torch.Tensor, list]:
    scenes = [scene(i, split, spec) for i in indices]
    return images_to_tensor([s.image for s in scenes]), [s.labels for s in scenes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.train_demo_classifier",
        description="Train the world classifier and report its held-out accuracy.",
    )
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--steps", type=int, default=ClassifierRun.steps)
    parser.add_argument("--batch-size", type=int, default=ClassifierRun.batch_size)
    parser.add_argument("--seed", type=int, default=ClassifierRun.seed)
    args = parser.parse_args(argv)
    run = ClassifierRun(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    spec = WorldSpec()
    started = time.perf_counter()
    classifier = train_classifier(run, spec, log=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, args.out)
    report = {
        "run": asdict(run),
        "seconds": round(time.perf_counter() - started, 1),
        "heldout": evaluate(classifier, spec, "heldout", run.eval_scenes),
        "train": evaluate(classifier, spec, "train", run.eval_scenes),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
