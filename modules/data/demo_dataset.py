"""A small, deterministic demo dataset, drawn with numpy and PIL (no downloads).

``root/subject/``: 16 images of one subject, the "sks star" (a magenta five-pointed star with a
yellow centre spot and a teal antenna), on cluttered backgrounds (stripes, checks, gradients,
noise) with distractor shapes. Each has a weighted mask with three levels, the cases masked
training and prior preservation have to handle:

- 255 on the star itself (learn fully),
- 128 on a rim around it (half weight: the soft border a hand-drawn mask has),
- 80 on the antenna (a thin extra part, like hair, that users weight low),
- 0 on the background.

``root/prior/``: 8 plain "base world" scenes (other shapes, including stars of other colours, on
the same kinds of backgrounds), without masks, for a prior_prediction concept.

Run ``python -m modules.data.demo_dataset ROOT`` to write it. Writing is idempotent: a
``.complete`` marker, written last, records the seed and size; a folder without a matching
marker (e.g. half written) is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from modules.config.schema import ConceptConfig

DEMO_VERSION = 1
"""Part of the marker: bump it when the drawing changes so old folders are regenerated."""
SUBJECT_IMAGES = 16
PRIOR_IMAGES = 8
TRIGGER = "sks"
CORE_LEVEL, RIM_LEVEL, ANTENNA_LEVEL = 255, 128, 80
MARKER = ".complete"

_BACKGROUNDS = ("striped", "checkered", "gradient", "noisy")
_STAR_COLOUR = (214, 38, 180)  # magenta: the named palette below never uses it
_SPOT_COLOUR = (255, 214, 0)
_ANTENNA_COLOUR = (20, 150, 140)
_PALETTE = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (40, 160, 60),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "star")

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    subject: Path
    """Folder of the subject concept: images, -masklabel masks, captions."""
    prior: Path
    """Folder of the prior_prediction concept: images and captions, no masks."""
    subject_images: int
    prior_images: int

    def concepts(self) -> list[ConceptConfig]:
        """The two concepts as config entries: the subject and the prior_prediction scenes."""
        return [
            ConceptConfig(path=str(self.subject)),
            ConceptConfig(path=str(self.prior), type="prior_prediction"),
        ]


def write_demo_dataset(root: Path, *, seed: int = 0, size: int = 128) -> DemoDataset:
    """Write (or reuse) the demo dataset under ``root``; the same seed and size give the same
    bytes."""
    if size < 32:
        raise ValueError(f"demo dataset size must be at least 32 pixels, got {size}")
    root = Path(root)
    dataset = DemoDataset(
        root=root,
        subject=root / "subject",
        prior=root / "prior",
        subject_images=SUBJECT_IMAGES,
        prior_images=PRIOR_IMAGES,
    )
    marker = root / MARKER
    wanted = json.dumps({"version": DEMO_VERSION, "seed": seed, "size": size}, sort_keys=True)
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return dataset
    # Files are overwritten, never deleted: the names are fixed, so nothing stale remains, and
    # a root the user pointed at by mistake loses nothing but these names.
    marker.unlink(missing_ok=True)
    dataset.subject.mkdir(parents=True, exist_ok=True)
    dataset.prior.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(SUBJECT_IMAGES):
        kind = _BACKGROUNDS[index % len(_BACKGROUNDS)]
        image, mask = _subject_scene(rng, size, kind)
        stem = dataset.subject / f"subject_{index:02d}"
        image.save(stem.with_suffix(".png"))
        mask.save(stem.parent / f"{stem.name}-masklabel.png")
        _write_caption(stem, f"a photo of {TRIGGER} star, on a {kind} background")
    for index in range(PRIOR_IMAGES):
        kind = _BACKGROUNDS[index % len(_BACKGROUNDS)]
        image, caption = _prior_scene(rng, size, kind)
        stem = dataset.prior / f"prior_{index:02d}"
        image.save(stem.with_suffix(".png"))
        _write_caption(stem, caption)
    marker.write_text(wanted, encoding="utf-8")
    return dataset


def _subject_scene(
    rng: np.random.Generator, size: int, kind: str
) -> tuple[Image.Image, Image.Image]:
    """The sks star on a cluttered background, and its three-level mask."""
    image = _background(rng, size, kind)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        _draw_shape(draw, rng, size, str(rng.choice(_SHAPES[:3])), _random_palette(rng))
    # Kept central so the star, its rim and its antenna (about 0.4 * size from the centre at
    # most) stay inside the frame.
    cx, cy = (rng.uniform(0.42, 0.58, size=2) * size).tolist()
    radius = float(rng.uniform(0.16, 0.2)) * size
    rotation = float(rng.uniform(0, 2 * math.pi))
    tip_angle = rotation + 2 * math.pi * int(rng.integers(5)) / 5
    tip = (cx + radius * math.cos(tip_angle), cy + radius * math.sin(tip_angle))
    length = float(rng.uniform(0.12, 0.15)) * size
    end = (tip[0] + length * math.cos(tip_angle), tip[1] + length * math.sin(tip_angle))
    width, ball = max(2, round(size / 40)), max(3, round(size * 0.035))

    mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(mask)
    # Drawn from the lowest level up, so the star and its rim cover the antenna's base.
    for target, antenna, rim, core in (
        (draw, _ANTENNA_COLOUR, None, _STAR_COLOUR),
        (mask_draw, ANTENNA_LEVEL, RIM_LEVEL, CORE_LEVEL),
    ):
        target.line([tip, end], fill=antenna, width=width)
        target.ellipse(_circle_box(end, ball), fill=antenna)
        if rim is not None:
            target.polygon(_star_points((cx, cy), radius * 1.3, rotation), fill=rim)
        target.polygon(_star_points((cx, cy), radius, rotation), fill=core)
    draw.ellipse(_circle_box((cx, cy), radius * 0.22), fill=_SPOT_COLOUR)
    return image, mask


def _prior_scene(rng: np.random.Generator, size: int, kind: str) -> tuple[Image.Image, str]:
    """Two or three plain shapes on a background, and the caption that names them."""
    image = _background(rng, size, kind)
    draw = ImageDraw.Draw(image)
    picks: list[tuple[str, str]] = []
    count = int(rng.integers(2, 4))
    # Distinct (colour, shape) pairs, so a caption never names the same thing twice.
    while len(picks) < count:
        pick = (str(rng.choice(sorted(_PALETTE))), str(rng.choice(_SHAPES)))
        if pick not in picks:
            picks.append(pick)
    for colour, shape in picks:
        _draw_shape(draw, rng, size, shape, _PALETTE[colour], scale=1.6)
    names = " and ".join(f"{_article(colour)} {colour} {shape}" for colour, shape in picks)
    return image, f"a photo of {names}, on a {kind} background"


def _background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A (size, size) RGB background of the given kind in two random muted colours."""
    first, second = rng.integers(40, 200, size=(2, 3)).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = float(rng.uniform(0, math.pi))
    along = x * math.cos(angle) + y * math.sin(angle)
    if kind == "striped":
        period = float(rng.uniform(0.06, 0.15)) * size
        blend = (np.floor(along / period) % 2)[..., None]
    elif kind == "checkered":
        cell = max(2, int(rng.integers(size // 16, size // 6)))
        blend = ((x // cell + y // cell) % 2)[..., None]
    elif kind == "gradient":
        blend = ((along - along.min()) / (along.max() - along.min()))[..., None]
    elif kind == "noisy":
        coarse = rng.random((size // 8, size // 8), dtype=np.float32)
        noise = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        blend = np.asarray(noise, dtype=np.float32)[..., None]
    else:
        raise ValueError(f"unknown background kind '{kind}'; use one of {_BACKGROUNDS}")
    pixels = first * (1 - blend) + second * blend  # (size, size, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    size: int,
    shape: str,
    colour: RGB,
    scale: float = 1.0,
) -> None:
    centre = (rng.uniform(0.08, 0.92, size=2) * size).tolist()
    radius = float(rng.uniform(0.05, 0.1)) * size * scale
    rotation = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        draw.ellipse(_circle_box(centre, radius), fill=colour)
    elif shape == "square":
        draw.regular_polygon((*centre, radius), 4, rotation=math.degrees(rotation), fill=colour)
    elif shape == "triangle":
        draw.regular_polygon((*centre, radius), 3, rotation=math.degrees(rotation), fill=colour)
    else:
        draw.polygon(_star_points(centre, radius, rotation), fill=colour)


def _star_points(
    centre: tuple[float, float] | list[float], radius: float, rotation: float
) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star, tips at ``rotation + k * 72°``."""
    cx, cy = centre
    points = []
    for corner in range(10):
        reach = radius if corner % 2 == 0 else radius * 0.45
        angle = rotation + corner * math.pi / 5
        points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
    return points


def _circle_box(
    centre: tuple[float, float] | list[float], radius: float
) -> tuple[float, float, float, float]:
    cx, cy = centre
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def _random_palette(rng: np.random.Generator) -> RGB:
    return _PALETTE[str(rng.choice(sorted(_PALETTE)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _write_caption(stem: Path, caption: str) -> None:
    stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modules.data.demo_dataset",
        description="Write the demo dataset (a subject concept with masks and a prior concept).",
    )
    parser.add_argument("root", type=Path, help="folder to write subject/ and prior/ into")
    parser.add_argument("--seed", type=int, default=0, help="drawing seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    args = parser.parse_args(argv)
    dataset = write_demo_dataset(args.root, seed=args.seed, size=args.size)
    print(f"{dataset.subject}: {dataset.subject_images} images with masks and captions")
    print(f"{dataset.prior}: {dataset.prior_images} images with captions (prior_prediction)")


if __name__ == "__main__":
    main()
