"""Train the subject judge that scores the phantom-limb ablation's samples (minutes on a CPU).

    python -m scripts.train_subject_judge --out modules/demo/subject_judge.safetensors

Examples are drawn on the fly from the generator's own drawing code (no two steps see the same
image): a quarter show the sks heart, a quarter the zwx crescent (the two subject tasks of
``modules.demo.dataset``), half neither (world scenes, cluttered backgrounds, and near
misses: the subjects' colours as blobs, world shapes or the other subject in a subject's
pattern, a subject's shape in flat colours). Example ``i`` of a stream is drawn from a
generator seeded by ``(seed, stream, i)``; training uses stream 0 and the reported accuracy
stream 1, so held-out renderings are never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.demo import dataset as demo_dataset
from modules.demo import world
from modules.demo.classifier import images_to_tensor
from modules.demo.subject_judge import CLASSES, SubjectJudge, judge_subject, save_judge

TRAIN_STREAM, HELDOUT_STREAM = 0, 1
RADIUS = (0.1, 0.3)
"""Subject radius range of the positives, fraction of the side: the dataset draws 0.2-0.28,
and a LoRA often draws it smaller."""
ROTATION = {"heart": math.radians(35), "crescent": math.pi}
"""Largest turn either way (the dataset: 25° for the heart, any for the crescent)."""
SUBJECTS = CLASSES[1:]
_COLOURS = {
    "heart": (demo_dataset.BODY_COLOUR, demo_dataset.STRIPE_COLOUR),
    "crescent": (demo_dataset.CRESCENT_COLOUR, demo_dataset.DOT_COLOUR),
}
NEAR_MISSES = ("blobs", "patterned_shape", "flat_subject")


@dataclass(frozen=True)
class JudgeRun:
    steps: int = 1200
    batch_size: int = 48
    learning_rate: float = 3e-3
    seed: int = 0
    noise: float = 0.2
    """Largest std of Gaussian noise added to inputs: generated samples are never clean."""
    width: int = 16
    eval_examples: int = 600


def render_example(seed: int, stream: int, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """Example ``index`` of ``stream``: an RGB image and its class index into CLASSES."""
    rng = np.random.default_rng([seed, stream, index])
    kind = index % 4
    if kind in (1, 2):
        task = SUBJECTS[kind - 1]
        return _subject_image(rng, size, task), CLASSES.index(task)
    choice = int(rng.integers(5))
    if choice == 0:
        return world.render_scene(world.WorldSpec(), rng).image, 0
    if choice == 1:
        return _cluttered_background(rng, size), 0
    task = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
    return _near_miss(rng, size, NEAR_MISSES[choice - 2], task), 0


def _cluttered_background(rng: np.random.Generator, size: int) -> Image.Image:
    image = world.draw_background(rng, size, str(rng.choice(world.BACKGROUNDS)))
    pairs = world.WorldSpec().allowed_pairs("judge")
    for _ in range(int(rng.integers(0, 4))):
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        mask = world.silhouette(
            size,
            shape,
            tuple(rng.uniform(0, size, 2).tolist()),
            float(rng.uniform(0.08, 0.25)) * size,
            float(rng.uniform(0, 2 * math.pi)),
        )
        image.paste(world.COLOURS[colour], mask=mask)
    return image


def _pose(
    rng: np.random.Generator, size: int, task: str
) -> tuple[tuple[float, float], float, float]:
    radius = float(rng.uniform(*RADIUS)) * size
    margin = radius * 0.8  # a little may leave the frame
    centre = tuple(rng.uniform(margin, size - margin, 2).tolist())
    return centre, radius, float(rng.uniform(-ROTATION[task], ROTATION[task]))


def _subject_image(rng: np.random.Generator, size: int, task: str) -> Image.Image:
    image = _cluttered_background(rng, size)
    centre, radius, rotation = _pose(rng, size, task)
    body = Image.fromarray(demo_dataset.subject_body(size, centre, rotation, task), "RGB")
    image.paste(body, mask=demo_dataset.subject_silhouette(size, centre, radius, rotation, task))
    return image


def _near_miss(rng: np.random.Generator, size: int, kind: str, task: str) -> Image.Image:
    """``task``'s colours without its shape, or its pattern on another shape, or its shape
    without its pattern."""
    image = _cluttered_background(rng, size)
    colours = list(_COLOURS[task])
    if kind == "blobs":
        for _ in range(int(rng.integers(1, 4))):
            shape = str(rng.choice(world.SHAPES))
            centre = tuple(rng.uniform(0, size, 2).tolist())
            mask = world.silhouette(
                size, shape, centre, float(rng.uniform(0.05, 0.25)) * size, rng.uniform(0, 7)
            )
            image.paste(colours[int(rng.integers(2))], mask=mask)
    elif kind == "patterned_shape":
        centre, radius, rotation = _pose(rng, size, task)
        body = Image.fromarray(demo_dataset.subject_body(size, centre, rotation, task), "RGB")
        others = [*world.SHAPES, *(t for t in SUBJECTS if t != task)]
        shape = others[int(rng.integers(len(others)))]
        if shape in SUBJECTS:
            mask = demo_dataset.subject_silhouette(size, centre, radius, rotation, shape)
        else:
            mask = world.silhouette(size, shape, centre, radius, rotation)
        image.paste(body, mask=mask)
    else:
        centre, radius, rotation = _pose(rng, size, task)
        flat = [*colours, *world.COLOURS.values()]
        colour = flat[int(rng.integers(len(flat)))]
        mask = demo_dataset.subject_silhouette(size, centre, radius, rotation, task)
        image.paste(colour, mask=mask)
    return image


def batch(seed: int, stream: int, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 64, 64) in [-1, 1] and (B,) class indices."""
    examples = [render_example(seed, stream, i) for i in indices]
    images = images_to_tensor([image for image, _ in examples])
    return images, torch.tensor([label for _, label in examples])


def _augment(images: torch.Tensor, run: JudgeRun, generator: torch.Generator) -> torch.Tensor:
    """Sample-like damage: colour drift per channel, blur on some, Gaussian noise."""
    count = images.shape[0]
    gain = 1 + 0.15 * (torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1)
    offset = 0.1 * (torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1)
    images = images * gain + offset
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(count, 1, 1, 1, generator=generator) < 0.3).float()
    images = blur * blurred + (1 - blur) * images
    sigma = torch.rand(count, 1, 1, 1, generator=generator) * run.noise
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def train_judge(run: JudgeRun, log: bool = False) -> SubjectJudge:
    """A trained judge; the same run gives the same weights."""
    torch.manual_seed(run.seed)
    judge = SubjectJudge(CLASSES, width=run.width)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=run.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=run.learning_rate, total_steps=run.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(run.seed)
    judge.train()
    started = time.perf_counter()
    for step in range(run.steps):
        start = step * run.batch_size
        images, labels = batch(run.seed, TRAIN_STREAM, range(start, start + run.batch_size))
        loss = F.cross_entropy(judge(_augment(images, run, generator)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{run.steps}  loss {float(loss.detach()):.4f}  {elapsed:.0f} s")
    return judge.eval()


def evaluate(judge: SubjectJudge, count: int, seed: int = 0) -> dict[str, float]:
    """Accuracy per class on the first ``count`` held-out renderings (clean images)."""
    images, labels = batch(seed, HELDOUT_STREAM, range(count))
    right = judge_subject(judge, images) == labels
    scores = {name: float(right[labels == i].float().mean()) for i, name in enumerate(CLASSES)}
    scores["all"] = float(right.float().mean())
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.train_subject_judge",
        description="Train the subject judge and report its held-out accuracy.",
    )
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--steps", type=int, default=JudgeRun.steps)
    parser.add_argument("--batch-size", type=int, default=JudgeRun.batch_size)
    parser.add_argument("--seed", type=int, default=JudgeRun.seed)
    args = parser.parse_args(argv)
    run = JudgeRun(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    started = time.perf_counter()
    judge = train_judge(run, log=True)
    seconds = round(time.perf_counter() - started, 1)
    trained_on = {
        "renderer": "scripts.train_subject_judge",
        "stream": TRAIN_STREAM,
        "demo_version": demo_dataset.DEMO_VERSION,
        "radius": RADIUS,
        "near_misses": NEAR_MISSES,
        **asdict(run),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_judge(judge, args.out, trained_on)
    report = {"trained_on": trained_on, "seconds": seconds, "heldout": evaluate(judge, 600)}
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
