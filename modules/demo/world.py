"""The synthetic world the demo base model is pretrained on: captioned scenes of simple shapes.

A scene is one or two objects (shape × colour) at varied positions and sizes on a background
(plain, striped, checkered, gradient, noisy), a caption that names them, and labels: each
object's shape, colour, box and visible-pixel mask, and the background kind.

Determinism: :func:`scene` draws scene ``index`` of a split from a generator seeded by
``(seed, split, index)``, so any scene can be drawn alone, in any order, by any worker.

Held-out rule: a fixed set of (shape, colour) pairs, :data:`HELD_OUT_PAIRS` (one per shape,
each with a different colour), never appears in the ``train`` split, not even as the second
object. In the ``heldout`` split the main object is always one of these pairs, so every
held-out caption names a shape × colour combination (and hence a shape × colour × background
combination) the base model never saw. The ``judge`` split draws every pair: it trains the
prompt-match classifier, which must recognise the held-out pairs to score them.

Main object: the largest (by drawn radius; the generator keeps the two radii at least 15 %
apart, so "largest" is never a close call). It is first in the labels and in the caption.

The drawing helpers are public (:func:`draw_background`, :func:`silhouette` and the shapes'
corners): the demo LoRA dataset (``modules.demo.dataset``) draws its backgrounds and
distractors with them, so the task data and the base world share one look.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "heldout", "judge"]
SPLITS: tuple[Split, ...] = ("train", "heldout", "judge")

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    # Saturated and far apart in RGB, while backgrounds stay greyish (see _tone_down), so a
    # 64-pixel object's colour is never in doubt.
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 175, 55),
    "cyan": (30, 205, 220),
    "blue": (35, 65, 225),
    "purple": (150, 45, 205),
    "white": (250, 250, 250),
}
BACKGROUNDS = ("plain", "striped", "checkered", "gradient", "noisy")
PATTERNS = BACKGROUNDS[1:]
"""The background kinds drawn by :func:`pattern_background` ("plain" is one flat colour)."""
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "purple"),
        ("square", "yellow"),
        ("triangle", "cyan"),
        ("star", "green"),
        ("ring", "red"),
        ("cross", "blue"),
    }
)
_PHRASINGS = (
    # Short on purpose: the demo text encoder reads 64 bytes, and in every phrasing the main
    # object and the background come within them (only a second object's tail may be cut).
    "{objects} on a {background} background",
    "{background} background with {objects}",
    "{objects}, {background} background",
)
_MIN_RADIUS_RATIO = 1.15  # main radius / second radius, at least
_PLACEMENT_TRIES = 20
_PATTERN_STD = 22.0  # least std (0-255 levels) of a patterned background


@dataclass(frozen=True)
class WorldSpec:
    """What the world can contain. The defaults are the world the demo model learns."""

    size: int = 64
    """Image side in pixels (square images)."""
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    max_objects: int = 2
    """1 or 2: scenes hold between one and this many objects."""
    single_radius: tuple[float, float] = (0.16, 0.32)
    """Radius range of a lone object, as a fraction of ``size``."""
    pair_radius: tuple[float, float] = (0.15, 0.25)
    """Radius range of the main object when there are two (the second is 55-85 % of it)."""
    held_out_pairs: frozenset[tuple[str, str]] = HELD_OUT_PAIRS
    seed: int = 0
    """World seed: another seed draws another world with the same rules."""

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"WorldSpec.size: {self.size} is too small; use 32 pixels or more")
        if self.max_objects not in (1, 2):
            raise ValueError(f"WorldSpec.max_objects: {self.max_objects}; use 1 or 2")
        for name, chosen, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, tuple(COLOURS)),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = sorted(set(chosen) - set(known))
            if unknown or not chosen:
                raise ValueError(f"WorldSpec.{name}: unknown or empty {unknown}; pick from {known}")

    def allowed_pairs(self, split: Split) -> list[tuple[str, str]]:
        """The (shape, colour) pairs a split's objects may take (main object, for heldout)."""
        every = [(s, c) for s in self.shapes for c in self.colours]
        if split == "train":
            return [p for p in every if p not in self.held_out_pairs]
        if split == "heldout":
            return [p for p in every if p in self.held_out_pairs]
        return every


@dataclass(frozen=True)
class ObjectLabel:
    shape: str
    colour: str
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, x1 and y1 exclusive: the drawn shape's tight box, hidden
    parts included."""
    radius: float
    """Drawn radius in pixels: the main object is the one with the largest."""


@dataclass(frozen=True)
class SceneLabels:
    background: str
    objects: tuple[ObjectLabel, ...]
    """Main (largest) object first, in caption order."""
    masks: np.ndarray = field(repr=False, compare=False)
    """(objects, size, size) bool: the pixels where each object is visible (occlusion taken
    off), in the order of ``objects``. Everything outside their union is background."""

    @property
    def main(self) -> ObjectLabel:
        return self.objects[0]


class Scene(NamedTuple):
    image: Image.Image
    caption: str
    labels: SceneLabels


def scene(index: int, split: Split, spec: WorldSpec | None = None) -> Scene:
    """Scene ``index`` of ``split``: the same arguments always give the same pixels."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    if index < 0:
        raise ValueError(f"scene index {index}: indices start at 0")
    spec = spec if spec is not None else WorldSpec()
    # A seed sequence keyed by split and index: scenes never share a stream across splits.
    rng = np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])
    return render_scene(spec, rng, split=split)


def render_scene(
    spec: WorldSpec, rng: np.random.Generator | int, *, split: Split = "judge"
) -> Scene:
    """Draw one scene from ``rng`` (or a seed) with the objects ``split`` allows."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    background = str(rng.choice(spec.backgrounds))
    count = int(rng.integers(1, spec.max_objects + 1))
    pairs = _pick_pairs(spec, rng, split, count)
    radii = _pick_radii(spec, rng, count)
    centres = _place(spec.size, radii, rng)
    image = draw_background(rng, spec.size, background)

    # Painter's order: the smaller object is drawn last so it never hides the main one, and
    # each mask loses the pixels a later object covers.
    silhouettes = [
        silhouette(spec.size, shape, centre, radius, float(rng.uniform(0, 2 * math.pi)))
        for (shape, _), centre, radius in zip(pairs, centres, radii, strict=True)
    ]
    for (_, colour), shape_mask in zip(pairs, silhouettes, strict=True):
        image.paste(COLOURS[colour], mask=shape_mask)
    masks = np.stack([np.asarray(s, dtype=bool) for s in silhouettes])  # (n, size, size)
    # Boxes from the whole silhouettes (hidden parts included), before occlusion is taken off.
    boxes = [_box(mask) for mask in masks]
    for later in range(1, count):
        masks[:later] &= ~masks[later]

    objects = tuple(
        ObjectLabel(shape, colour, box, radius)
        for (shape, colour), box, radius in zip(pairs, boxes, radii, strict=True)
    )
    labels = SceneLabels(background=background, objects=objects, masks=masks)
    return Scene(image, caption_for(labels, phrasing=int(rng.integers(len(_PHRASINGS)))), labels)


def caption_for(labels: SceneLabels, phrasing: int = 0) -> str:
    """The caption naming the objects (main first) and the background."""
    names = " and ".join(f"{_article(o.colour)} {o.colour} {o.shape}" for o in labels.objects)
    return _PHRASINGS[phrasing % len(_PHRASINGS)].format(
        objects=names, background=labels.background
    )


def _pick_pairs(
    spec: WorldSpec, rng: np.random.Generator, split: Split, count: int
) -> list[tuple[str, str]]:
    """Distinct (shape, colour) pairs: a caption never names the same thing twice."""
    main_choices = spec.allowed_pairs(split)
    if not main_choices:
        raise ValueError(f"WorldSpec: split {split!r} has no allowed (shape, colour) pairs")
    # The second object of a held-out scene is any training pair: only the main is unseen.
    rest = spec.allowed_pairs("judge" if split == "judge" else "train")
    picks = [main_choices[int(rng.integers(len(main_choices)))]]
    while len(picks) < count:
        pick = rest[int(rng.integers(len(rest)))]
        if pick not in picks:
            picks.append(pick)
    return picks


def _pick_radii(spec: WorldSpec, rng: np.random.Generator, count: int) -> list[float]:
    if count == 1:
        return [float(rng.uniform(*spec.single_radius)) * spec.size]
    main = float(rng.uniform(*spec.pair_radius)) * spec.size
    second = main * float(rng.uniform(0.55, 1 / _MIN_RADIUS_RATIO))
    return [main, second]


def _place(size: int, radii: list[float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres keeping each object inside the frame and two objects apart.

    Apart means centres at least 85 % of the summed radii away, so a shape is at most nicked
    by the other, never hidden. A draw that fails ``_PLACEMENT_TRIES`` times takes the last
    try: rare, and still a valid scene (the masks say what is visible)."""
    margin = [max(r * 0.9, 2.0) for r in radii]
    centres: list[tuple[float, float]] = []
    for _ in range(_PLACEMENT_TRIES):
        centres = [tuple(rng.uniform(m, size - m, size=2).tolist()) for m in margin]
        if len(centres) < 2 or math.dist(*centres) >= 0.85 * sum(radii):
            break
    return centres


def draw_background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A (size, size) RGB world background of ``kind``, toned towards grey like every scene's."""
    if kind == "plain":
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 200, 3)))
    else:
        image = pattern_background(rng, size, kind)
    return _tone_down(image, kind)


def pattern_background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A (size, size) RGB pattern of ``kind`` (one of :data:`PATTERNS`) in two random muted
    colours, before any toning down."""
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
        raise ValueError(f"unknown background pattern {kind!r}; use one of {PATTERNS}")
    pixels = first * (1 - blend) + second * blend  # (size, size, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _tone_down(image: Image.Image, kind: str) -> Image.Image:
    """Pull the background towards grey (a third of its colour, mid range) so the saturated
    object colours stand out, then stretch its pattern to a visible contrast: two random
    muted colours are often close, and a near-flat "noisy" or "gradient" background would be
    a caption the pixels do not bear out."""
    pixels = np.asarray(image, dtype=np.float32)  # (size, size, 3)
    grey = pixels.mean(axis=2, keepdims=True)
    toned = 0.35 * (pixels - grey) + (grey * 0.7 + 30)
    if kind != "plain":
        centre = toned.mean(axis=(0, 1))
        spread = float((toned - centre).std())
        toned = centre + (toned - centre) * max(1.0, _PATTERN_STD / max(spread, 1e-3))
    return Image.fromarray(toned.clip(0, 255).astype(np.uint8), "RGB")


def silhouette(
    size: int, shape: str, centre: tuple[float, float], radius: float, rotation: float
) -> Image.Image:
    """The shape as an 8-bit mask (255 inside, no anti-aliasing so pixels are exact)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    degrees = math.degrees(rotation)
    if shape == "circle":
        draw.ellipse(circle_box(centre, radius), fill=255)
    elif shape == "ring":
        draw.ellipse(circle_box(centre, radius), fill=255)
        draw.ellipse(circle_box(centre, radius * 0.55), fill=0)
    elif shape == "square":
        draw.regular_polygon((*centre, radius), 4, rotation=degrees, fill=255)
    elif shape == "triangle":
        draw.regular_polygon((*centre, radius), 3, rotation=degrees, fill=255)
    elif shape == "star":
        draw.polygon(star_points(centre, radius, rotation), fill=255)
    elif shape == "cross":
        draw.polygon(cross_points(centre, radius, rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    return mask


def cross_points(
    centre: tuple[float, float], radius: float, rotation: float
) -> list[tuple[float, float]]:
    """The twelve corners of a plus sign with arms ``radius`` long and ``0.64 radius`` wide."""
    half = radius * 0.32
    # One arm's two outer corners and the inner corner after it, turned four times.
    arm = [(radius, -half), (radius, half), (half, half)]
    points = []
    for quarter in range(4):
        angle = rotation + quarter * math.pi / 2
        cos, sin = math.cos(angle), math.sin(angle)
        points += [(centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos) for x, y in arm]
    return points


def star_points(
    centre: tuple[float, float], radius: float, rotation: float
) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star, tips at ``rotation + k * 72°``."""
    cx, cy = centre
    points = []
    for corner in range(10):
        reach = radius if corner % 2 == 0 else radius * 0.45
        angle = rotation + corner * math.pi / 5
        points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
    return points


def circle_box(centre: tuple[float, float], radius: float) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) box PIL's ``ellipse`` takes for a circle."""
    cx, cy = centre
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The tight (x0, y0, x1, y1) box of a (size, size) bool mask, x1 and y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
