"""Score a demo base model with the world judge and draw its sample grid (``docs/demo-model.md``).

    python -m scripts.score_demo_model                      # the built-in weights
    python -m scripts.score_demo_model --model runs/demo-pretrain/model

Prints two markdown tables and writes ``--grid`` (the world's rendering of 8 held-out prompts
above the model's samples without and with guidance) and ``--json`` (every number):

- *what it draws*: the judge's background, shape and colour accuracy, and all three right, on
  samples of ``--count`` held-out prompts (a shape × colour pair the model never saw) and as
  many ``train``-pair prompts of scenes it never saw, without guidance and with the default;
- *where the shapes are lost*: the same prompts sampled from their own scene noised to
  t = 0.4, 0.6 and 0.8 (the layout given) against pure noise, and the judge on the clean scenes.

Every sample is a function of ``--seed``: the same weights give the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from modules.atomic import replacing, write_text_atomic
from modules.config.schema import ModelConfig
from modules.demo.classifier import (
    WorldClassifier,
    images_to_tensor,
    load_classifier,
    score_prompt_match,
)
from modules.demo.world import Scene, scene
from modules.models.base import LoadedModel
from modules.models.demo.family import GUIDANCE, DemoFamily
from modules.models.memory import load_model

NEW_SCENES = 100_000_000
"""First ``train``-split index of the "new scenes": pretraining draws scenes in order from 0
and would need three million steps of 32 to reach it."""
NOISED_STARTS = (0.4, 0.6, 0.8)
GRID_PROMPTS = 8
GRID_SCALE = 2
GRID_GAP = 8


def score(
    model: LoadedModel,
    classifier: WorldClassifier,
    *,
    count: int = 48,
    steps: int = 30,
    seed: int = 0,
) -> tuple[dict[str, Any], Image.Image]:
    """The two tables' numbers and the grid image."""
    family = DemoFamily()
    heldout = [scene(i, "heldout") for i in range(count)]
    seen_pairs = [scene(NEW_SCENES + i, "train") for i in range(count)]
    draws: dict[str, dict[str, float]] = {}
    grid_rows: list[Tensor] = []
    for prompts_name, scenes in (
        ("held-out pairs", heldout),
        ("train pairs, new scenes", seen_pairs),
    ):
        for guidance in (1.0, GUIDANCE):
            images = _denoise(
                family, model, scenes, start=1.0, steps=steps, guidance=guidance, seed=seed
            )
            draws[f"{prompts_name} | {guidance:g}"] = _judge(classifier, images, scenes)
            if scenes is heldout:
                grid_rows.append(images[:GRID_PROMPTS])
    lost: dict[str, dict[str, float]] = {
        "clean scene (the judge alone, no model)": _judge(classifier, _clean(heldout), heldout)
    }
    for start in NOISED_STARTS:
        images = _denoise(
            family, model, heldout, start=start, steps=steps, guidance=GUIDANCE, seed=seed
        )
        lost[f"scene noised to t = {start:g}, sampled from there"] = _judge(
            classifier, images, heldout
        )
    lost["pure noise (a normal sample)"] = draws[f"held-out pairs | {GUIDANCE:g}"]
    numbers = {"count": count, "steps": steps, "seed": seed, "draws": draws, "lost": lost}
    grid = _grid([_clean(heldout[:GRID_PROMPTS]), *grid_rows])
    return numbers, grid


def markdown(numbers: dict[str, Any]) -> str:
    """The two tables as ``docs/demo-model.md`` shows them."""
    lines = [
        "| prompts | guidance | background | shape | colour | all three |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in numbers["draws"].items():
        prompts, guidance = key.split(" | ")
        lines.append(
            f"| {prompts} | {guidance} | {s['background']:.2f} | {s['shape']:.2f} "
            f"| {s['colour']:.2f} | {s['prompt_match']:.2f} |"
        )
    lines += [
        "",
        "| what the model is given | background | shape | colour |",
        "| --- | --- | --- | --- |",
    ]
    for key, s in numbers["lost"].items():
        lines.append(f"| {key} | {s['background']:.2f} | {s['shape']:.2f} | {s['colour']:.2f} |")
    return "\n".join(lines) + "\n"


def _denoise(
    family: DemoFamily,
    model: LoadedModel,
    scenes: list[Scene],
    *,
    start: float,
    steps: int,
    guidance: float,
    seed: int,
) -> Tensor:
    """Samples of the scenes' captions in chunks of 16, from pure noise (``start`` 1) or from
    each scene's own image noised to ``start``. The noise is the same for every setting."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for first in range(0, len(scenes), 16):
        chunk = scenes[first : first + 16]
        text = family.encode_prompts(model, [s.caption for s in chunk])
        latents = family.encode_images(model, _clean(chunk))
        noise = torch.randn(latents.shape, generator=generator)
        noisy, _ = family.noisy_input_and_target(latents, noise, torch.full((len(chunk),), start))
        chunks.append(
            family.denoise(model, text, noisy, start=start, steps=steps, guidance=guidance)
        )
    return torch.cat(chunks)


def _clean(scenes: list[Scene]) -> Tensor:
    return images_to_tensor([s.image for s in scenes])


def _judge(classifier: WorldClassifier, images: Tensor, scenes: list[Scene]) -> dict[str, float]:
    scores = score_prompt_match(classifier, images, [s.labels for s in scenes])
    return {name: round(value, 4) for name, value in scores.items()}


def _grid(rows: list[Tensor]) -> Image.Image:
    """One row per tensor (N, 3, H, W) in [-1, 1], scaled up and parted by white gaps."""
    side = rows[0].shape[-1] * GRID_SCALE
    width = rows[0].shape[0] * side
    grid = Image.new("RGB", (width, len(rows) * side + (len(rows) - 1) * GRID_GAP), "white")
    for r, row in enumerate(rows):
        pixels = ((row.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for c, array in enumerate(pixels):
            tile = Image.fromarray(array).resize((side, side), Image.Resampling.NEAREST)
            grid.paste(tile, (c * side, r * (side + GRID_GAP)))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.score_demo_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model", default="", help="demo model folder (default: the built-in weights)"
    )
    parser.add_argument("--count", type=int, default=48, help="prompts per set (default 48)")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=Path("docs/demo-model-samples.png"))
    parser.add_argument("--json", type=Path, default=Path("docs/demo-model-scores.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(
        DemoFamily(),
        ModelConfig(family="demo", path=args.model),
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    numbers, grid = score(
        model, load_classifier(), count=args.count, steps=args.steps, seed=args.seed
    )
    numbers["model"] = args.model or "built-in"
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    with replacing(args.grid) as temporary:
        grid.save(temporary, format="PNG")
    write_text_atomic(args.json, json.dumps(numbers, indent=2) + "\n")
    print(markdown(numbers), end="")
    print(f"wrote {args.grid}, {args.json}")


if __name__ == "__main__":
    main()
