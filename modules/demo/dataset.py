"""The demo LoRA task: a new subject, the "sks heart", drawn in the synthetic world's look.

The demo base model is pretrained on :mod:`modules.demo.world`, whose scenes never hold a heart
nor the subject's colours. The subject is a heart with a magenta body and diagonal yellow
stripes (wide enough to see at 64 px), on cluttered world backgrounds: a world background plus
two or three world objects (training pairs only) drawn under it. The caption names only the
subject and the background, as a user's trigger caption would, so the clutter is what masked
training and prior preservation have to keep the LoRA from learning.

Folders under the root (:func:`write_demo_dataset`):

- ``subject/``: 16 subject scenes, each with a weighted mask ``NAME-masklabel.png`` (255 on the
  heart, 128 on a rim band a few pixels wide around it, 0 elsewhere) and a caption
  ``a sks heart on a BACKGROUND background``.
- ``prior/``: 16 base-world training scenes with the world's captions and no masks, for a
  prior_prediction concept.
- ``heldout-subject/``: 8 subject scenes from another random stream (new backgrounds and
  clutter), with masks and captions, for evaluation.
- ``heldout-world/``: 8 base-world scenes with their captions, prompts that never name the
  subject, for measuring how far the LoRA leaks into the base world.

:func:`subject_scene` draws one subject scene in memory and :func:`subject_presence` scores
generated images for the subject.

Run ``python -m modules.demo.dataset ROOT`` to write it. Writing is idempotent: a
``.complete`` marker, written last, records the version, seed and size; a folder without a
matching marker (e.g. half written) is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from modules.config.schema import ConceptConfig
from modules.demo import world

if TYPE_CHECKING:
    import torch

DEMO_VERSION = 2
"""Part of the marker: bump it when the drawing changes so old folders are regenerated."""
SUBJECT_IMAGES = 16
PRIOR_IMAGES = 16
HELDOUT_SUBJECT_IMAGES = 8
HELDOUT_WORLD_IMAGES = 8
TRIGGER = "sks"
CORE_LEVEL, RIM_LEVEL = 255, 128
MARKER = ".complete"
PRIOR_OFFSET = 1_000_000
"""First world ``train`` index of ``prior/``: far past any index pretraining draws."""
HELDOUT_WORLD_OFFSET = 2_000_000
"""First world ``train`` index of ``heldout-world/``."""
SUBJECT_PRESENT = 0.5
"""A :func:`subject_presence` score above this means the image shows the subject."""

BODY_COLOUR = (214, 38, 180)  # magenta: no world colour is near it
STRIPE_COLOUR = (255, 214, 0)
_RADIUS = (0.2, 0.28)
"""Heart radius range (every point of the heart within it of the centre), fraction of the side."""
_ROTATION = math.radians(25)
"""Largest tilt either way: more and the heart stops reading as a heart."""
_STRIPE_PERIOD = 0.11
"""Stripe period as a fraction of the side: 7 px at 64 px."""
_STRIPE_SHARE = 0.4
"""Part of each period that is yellow: about 3 px at 64 px."""
_RIM = 0.04
"""Rim band width as a fraction of the side (3 px at 64 px, never under 2 px)."""
_DISTRACTORS = (2, 3)
_DISTRACTOR_RADIUS = (0.08, 0.16)
_SUBJECT_STREAM, _HELDOUT_STREAM = 0, 1

TASKS = ("heart", "crescent")
"""Subject tasks :func:`write_demo_dataset` can write. "heart" (the default) is the sks heart;
"crescent" is a pink crescent with dark polka dots: neither the shape nor a dotted pattern is
in the world (its shapes: circle, square, triangle, star, ring, cross; its patterns: stripes,
checks, gradient, noise)."""
TRIGGERS = {"heart": TRIGGER, "crescent": "zwx"}
CRESCENT_COLOUR = (250, 140, 190)  # pink: far from every world colour and from magenta
DOT_COLOUR = (25, 25, 30)
_DOT_SPACING = 0.11
"""Dot lattice spacing as a fraction of the side: 7 px at 64 px."""
_DOT_RADIUS = 0.3
"""Dot radius as a fraction of the spacing: about 2 px at 64 px."""
_CRESCENT_CUT = (0.45, 0.8)
"""The disc cut out of the crescent: its centre's offset and its radius, fractions of the
crescent's radius (the crescent is 0.65 radius thick at its widest)."""


def _unit_heart(corners: int = 96) -> np.ndarray:
    """(corners, 2) points of the classic parametric heart, centred on its box and scaled so
    the farthest point is 1 away; y grows downwards (image coordinates), tip at the bottom."""
    t = np.linspace(0, 2 * math.pi, corners, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.min(axis=0) + points.max(axis=0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


_HEART = _unit_heart()
_HEART_AREA = 0.5 * abs(
    float(
        np.dot(_HEART[:, 0], np.roll(_HEART[:, 1], 1))
        - np.dot(_HEART[:, 1], np.roll(_HEART[:, 0], 1))
    )
)
"""Area of the unit heart (radius 1), by the shoelace formula."""


class SubjectScene(NamedTuple):
    image: Image.Image
    """RGB, the heart on top of a cluttered world background."""
    mask: Image.Image
    """L, :data:`CORE_LEVEL` on the heart, :data:`RIM_LEVEL` on its rim, 0 elsewhere."""
    caption: str


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    subject: Path
    """Folder of the subject concept: images, -masklabel masks, captions."""
    prior: Path
    """Folder of the prior_prediction concept: base-world images and captions, no masks."""
    heldout_subject: Path
    """Subject scenes never trained on: images, masks, captions."""
    heldout_world: Path
    """Base-world scenes never trained on: images and captions that never name the subject."""
    subject_images: int
    prior_images: int

    def concepts(self) -> list[ConceptConfig]:
        """The two training concepts: the subject and the prior_prediction scenes."""
        return [
            ConceptConfig(path=str(self.subject)),
            ConceptConfig(path=str(self.prior), type="prior_prediction"),
        ]


def write_demo_dataset(
    root: Path, *, seed: int = 0, size: int = 64, task: str = "heart"
) -> DemoDataset:
    """Write (or reuse) the demo dataset of subject ``task`` (one of :data:`TASKS`) under
    ``root``; the same seed, size and task give the same bytes."""
    if size < 32:
        raise ValueError(f"demo dataset size must be at least 32 pixels, got {size}")
    _check_task(task)
    root = Path(root)
    dataset = DemoDataset(
        root=root,
        subject=root / "subject",
        prior=root / "prior",
        heldout_subject=root / "heldout-subject",
        heldout_world=root / "heldout-world",
        subject_images=SUBJECT_IMAGES,
        prior_images=PRIOR_IMAGES,
    )
    marker = root / MARKER
    wanted = _marker_text(seed, size, task)
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return dataset
    # Files are overwritten, never deleted: the names are fixed, so nothing stale remains, and
    # a root the user pointed at by mistake loses nothing but these names.
    marker.unlink(missing_ok=True)
    _write_subject(dataset.subject, "subject", SUBJECT_IMAGES, [seed, _SUBJECT_STREAM], size, task)
    _write_subject(
        dataset.heldout_subject,
        "subject",
        HELDOUT_SUBJECT_IMAGES,
        [seed, _HELDOUT_STREAM],
        size,
        task,
    )
    _write_world(dataset.prior, "prior", PRIOR_IMAGES, PRIOR_OFFSET, size)
    _write_world(dataset.heldout_world, "world", HELDOUT_WORLD_IMAGES, HELDOUT_WORLD_OFFSET, size)
    marker.write_text(wanted, encoding="utf-8")
    return dataset


def is_current(root: Path, *, seed: int = 0, size: int = 64, task: str = "heart") -> bool:
    """Whether ``root`` holds a complete demo dataset of this version, seed, size and task."""
    marker = Path(root) / MARKER
    wanted = _marker_text(seed, size, task)
    return marker.is_file() and marker.read_text(encoding="utf-8") == wanted


def _marker_text(seed: int, size: int, task: str = "heart") -> str:
    fields: dict[str, object] = {"version": DEMO_VERSION, "seed": seed, "size": size}
    if task != "heart":  # the heart's marker predates tasks: its folders stay current
        fields["task"] = task
    return json.dumps(fields, sort_keys=True)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"demo task {task!r}: use one of {TASKS}")


def subject_scene(
    rng: np.random.Generator, size: int = 64, background: str | None = None, task: str = "heart"
) -> SubjectScene:
    """One subject scene drawn from ``rng``: a world background of ``background`` (random when
    None), two or three world objects, the subject of ``task`` on top, its weighted mask and
    its caption."""
    _check_task(task)
    if background is None:
        background = str(rng.choice(world.BACKGROUNDS))
    elif background not in world.BACKGROUNDS:
        raise ValueError(f"background {background!r}: use one of {world.BACKGROUNDS}")
    image = world.draw_background(rng, size, background)

    pairs = world.WorldSpec().allowed_pairs("train")  # never a held-out pair
    for _ in range(int(rng.integers(_DISTRACTORS[0], _DISTRACTORS[1] + 1))):
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        radius = float(rng.uniform(*_DISTRACTOR_RADIUS)) * size
        centre = tuple(rng.uniform(0, size, size=2).tolist())
        rotation = float(rng.uniform(0, 2 * math.pi))
        image.paste(
            world.COLOURS[colour], mask=world.silhouette(size, shape, centre, radius, rotation)
        )

    radius = float(rng.uniform(*_RADIUS)) * size
    rim = max(2, round(_RIM * size))
    margin = radius + rim + 1  # the heart and its rim stay inside the frame
    centre = tuple(rng.uniform(margin, size - margin, size=2).tolist())
    if task == "heart":
        rotation = float(rng.uniform(-_ROTATION, _ROTATION))
    else:  # a crescent reads as one at any turn
        rotation = float(rng.uniform(-math.pi, math.pi))
    heart = subject_silhouette(size, centre, radius, rotation, task)
    body = subject_body(size, centre, rotation, task)
    image.paste(Image.fromarray(body, "RGB"), mask=heart)

    core = np.asarray(heart) > 0
    levels = np.where(_dilate(core, rim), RIM_LEVEL, 0)
    levels[core] = CORE_LEVEL
    mask = Image.fromarray(levels.astype(np.uint8), "L")
    return SubjectScene(image, mask, f"a {TRIGGERS[task]} {task} on a {background} background")


def subject_silhouette(
    size: int, centre: tuple[float, float], radius: float, rotation: float, task: str = "heart"
) -> Image.Image:
    """The subject of ``task`` as an 8-bit mask (255 inside), within ``radius`` of ``centre``."""
    if task == "heart":
        return heart_silhouette(size, centre, radius, rotation)
    _check_task(task)
    return crescent_silhouette(size, centre, radius, rotation)


def crescent_silhouette(
    size: int, centre: tuple[float, float], radius: float, rotation: float
) -> Image.Image:
    """A crescent: the disc of ``radius`` less a disc cut from the side ``rotation`` points
    to (no anti-aliasing)."""
    offset, cut = (f * radius for f in _CRESCENT_CUT)
    inner = (centre[0] + offset * math.cos(rotation), centre[1] + offset * math.sin(rotation))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse(world.circle_box(centre, radius), fill=255)
    draw.ellipse(world.circle_box(inner, cut), fill=0)
    return mask


def heart_silhouette(
    size: int, centre: tuple[float, float], radius: float, rotation: float
) -> Image.Image:
    """The heart as an 8-bit mask (255 inside, no anti-aliasing), every point within
    ``radius`` of ``centre``, tilted by ``rotation`` radians (0: tip down)."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    turned = _HEART @ np.array([[cos, sin], [-sin, cos]])  # (corners, 2), rotated by `rotation`
    points = [tuple(p) for p in (turned * radius + np.asarray(centre)).tolist()]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def subject_presence(images: torch.Tensor, task: str = "heart") -> torch.Tensor:
    """How much of the sks heart (or ``task``'s subject) each image shows: a (B,) score in [0, 1].

    ``images`` is (B, 3, H, W) in [-1, 1]. The world classifier has no class for the subject
    (the base world never had a heart), so presence is judged by the subject's colours: the
    count of body-coloured pixels (nearest to magenta among the world's colours and the
    subject's, and close to it) with a yellow pixel within a tenth of the side, over the body
    area of the smallest heart the dataset draws, clipped to 1. Rendered subject scenes score
    near 1, world scenes near 0; above :data:`SUBJECT_PRESENT` counts as present.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"subject_presence takes (B, 3, H, W) images, got {tuple(images.shape)}")
    # Imported here: writing the dataset (the UI does, on first use) needs no torch.
    import torch
    import torch.nn.functional as F

    _check_task(task)
    body_colour, marking_colour = (
        (BODY_COLOUR, STRIPE_COLOUR) if task == "heart" else (CRESCENT_COLOUR, DOT_COLOUR)
    )
    height, width = images.shape[-2:]
    pixels = (images.detach().float().clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in 0-255
    references = torch.tensor(
        [body_colour, marking_colour, *world.COLOURS.values()], dtype=torch.float32
    ).to(pixels.device)  # (K, 3): body, stripe, then the world's colours
    distance = torch.cdist(pixels.permute(0, 2, 3, 1).reshape(-1, 3), references)  # (B*H*W, K)
    nearest = distance.argmin(dim=1)
    close = distance.min(dim=1).values < _COLOUR_DISTANCE
    world_yellow = 2 + list(world.COLOURS).index("yellow")
    body = ((nearest == 0) & close).reshape(-1, 1, height, width)
    marking = nearest == 1
    if task == "heart":  # a sample's stripes drift towards the world's yellow
        marking |= nearest == world_yellow
    stripe = (marking & close).reshape(-1, 1, height, width)
    reach = max(1, round(0.1 * min(height, width)))
    near_stripe = F.max_pool2d(stripe.float(), 2 * reach + 1, stride=1, padding=reach) > 0
    found = (body & near_stripe).flatten(1).sum(dim=1).float()  # (B,)
    if task == "heart":
        expected = _HEART_AREA * (_RADIUS[0] ** 2) * height * width * (1 - _STRIPE_SHARE)
    else:  # the body pixels of the smallest crescent, counted on a drawn one
        side = min(height, width)
        centre = (side / 2, side / 2)
        drawn = np.asarray(crescent_silhouette(side, centre, _RADIUS[0] * side, 0.0)) > 0
        undotted = (_dotted_body(side, centre, 0.0) == CRESCENT_COLOUR).all(axis=2)
        expected = float((drawn & undotted).sum()) * height * width / side**2
    return (found / expected).clamp(0, 1)


_COLOUR_DISTANCE = 55.0
"""Farthest (RGB, 0-255) a pixel may be from the subject colour it is nearest to and still
count: loose enough for a generated sample's drift, far from the greyish backgrounds."""


def _striped_body(size: int, centre: tuple[float, float], rotation: float) -> np.ndarray:
    """(size, size, 3) uint8: the body colour with yellow stripes at 45° to the heart's axis,
    fixed to the heart (they turn and move with it, as a real subject's markings would)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rotation + math.pi / 4
    along = (x - centre[0]) * math.cos(angle) + (y - centre[1]) * math.sin(angle)
    yellow = ((along / (_STRIPE_PERIOD * size)) % 1.0) < _STRIPE_SHARE
    return np.where(yellow[..., None], STRIPE_COLOUR, BODY_COLOUR).astype(np.uint8)


def subject_body(
    size: int, centre: tuple[float, float], rotation: float, task: str = "heart"
) -> np.ndarray:
    """(size, size, 3) uint8: the colouring of ``task``'s subject at ``centre`` turned by
    ``rotation`` (heart: yellow stripes on magenta; crescent: dark dots on pink); paste it
    through :func:`subject_silhouette`."""
    if task == "heart":
        return _striped_body(size, centre, rotation)
    _check_task(task)
    return _dotted_body(size, centre, rotation)


def _dotted_body(size: int, centre: tuple[float, float], rotation: float) -> np.ndarray:
    """(size, size, 3) uint8: pink with dark dots on a square lattice fixed to the subject."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    spacing = _DOT_SPACING * size
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = ((x - centre[0]) * cos + (y - centre[1]) * sin) / spacing
    v = (-(x - centre[0]) * sin + (y - centre[1]) * cos) / spacing
    distance = np.hypot(u - np.round(u), v - np.round(v))  # to the nearest lattice point
    dot = distance < _DOT_RADIUS
    return np.where(dot[..., None], DOT_COLOUR, CRESCENT_COLOUR).astype(np.uint8)


def _dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """``mask`` (bool, (size, size)) grown by a disc of radius ``reach`` pixels."""
    size = mask.shape[0]
    padded = np.pad(mask, reach)
    grown = np.zeros_like(mask)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dx * dx + dy * dy <= reach * reach:
                grown |= padded[reach + dy : reach + dy + size, reach + dx : reach + dx + size]
    return grown


def _write_subject(
    folder: Path, prefix: str, count: int, stream: list[int], size: int, task: str
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(stream)
    for index in range(count):
        background = world.BACKGROUNDS[index % len(world.BACKGROUNDS)]
        image, mask, caption = subject_scene(rng, size, background, task)
        stem = folder / f"{prefix}_{index:02d}"
        image.save(stem.with_suffix(".png"))
        mask.save(folder / f"{stem.name}-masklabel.png")
        _write_caption(stem, caption)


def _write_world(folder: Path, prefix: str, count: int, offset: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image, caption, _ = world.scene(offset + index, "train")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        stem = folder / f"{prefix}_{index:02d}"
        image.save(stem.with_suffix(".png"))
        _write_caption(stem, caption)


def _write_caption(stem: Path, caption: str) -> None:
    stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modules.demo.dataset",
        description="Write the demo dataset: the sks heart subject with masks, base-world prior "
        "scenes, and held-out subject and world scenes.",
    )
    parser.add_argument("root", type=Path, help="folder to write the four folders into")
    parser.add_argument("--seed", type=int, default=0, help="drawing seed (default 0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--task", choices=TASKS, default="heart", help="subject (default heart)")
    args = parser.parse_args(argv)
    dataset = write_demo_dataset(args.root, seed=args.seed, size=args.size, task=args.task)
    print(f"{dataset.subject}: {dataset.subject_images} images with masks and captions")
    print(f"{dataset.prior}: {dataset.prior_images} images with captions (prior_prediction)")
    print(f"{dataset.heldout_subject}: {HELDOUT_SUBJECT_IMAGES} images with masks and captions")
    print(f"{dataset.heldout_world}: {HELDOUT_WORLD_IMAGES} images with captions")


if __name__ == "__main__":
    main()
