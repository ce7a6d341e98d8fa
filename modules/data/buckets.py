"""Aspect-ratio buckets: the training sizes, which one each image (or clip) trains at, and the
centred crop that takes the image to it.

With ``data.buckets`` on, :func:`bucket_sizes` lists sizes of about ``resolution²`` pixels whose
sides are multiples of a step (the family's pixel multiple unless ``data.bucket_step`` says),
from 1:``max_aspect`` to ``max_aspect``:1; each image goes to the size nearest its aspect ratio
(:func:`nearest_bucket`), is resized to cover it and centre-cropped (:func:`crop_box`), which
cuts no more than the rounding of the sizes (more only for an image beyond the aspect range).
Off, every image trains at ``resolution`` × ``resolution`` from its centred square, as before
buckets existed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Size = tuple[int, int]
"""(width, height) in pixels."""


@dataclass(frozen=True)
class BucketRule:
    """What :func:`bucket_sizes` needs: the data config's bucket settings and the family's grid."""

    resolution: int
    """The side of the square of the same area (``data.resolution``)."""
    step: int
    """Every side is a multiple of it (at least the family's pixel multiple)."""
    max_aspect: float
    """Long side over short side, at most."""
    max_side: int | None = None
    """No side longer (None: only the aspect range limits it)."""


def bucket_sizes(rule: BucketRule) -> list[Size]:
    """Every landscape (width, height) with sides multiples of ``step`` and the largest height
    that keeps the area within ``resolution²``, within the aspect range and the side limit, and
    each one turned to portrait; widest first."""
    step, area = rule.step, rule.resolution * rule.resolution
    limit = rule.max_side or int(math.sqrt(area * rule.max_aspect)) + step
    sizes = set()
    for width in range(step, limit + 1, step):
        height = (area // width) // step * step
        if step <= height <= width <= limit and width / height <= rule.max_aspect + 1e-9:
            sizes |= {(width, height), (height, width)}
    if not sizes:
        raise ValueError(
            f"data.resolution={rule.resolution} with a side step of {step} px and "
            f"data.bucket_max_side={rule.max_side} leaves no bucket size: raise the side limit"
        )
    return sorted(sizes, key=lambda size: (-size[0] / size[1], size))


def nearest_bucket(source: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the source's (in log scale, so 2:1 and 1:2 are
    as far from 1:1); on a tie the larger one."""
    aspect = math.log(source[0] / source[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def crop_box(source: Size, target: Size) -> tuple[float, float, float, float]:
    """The centred box (left, top, right, bottom) of ``source`` with ``target``'s aspect ratio:
    what is resized to ``target``. For a square target, the centred square."""
    width, height = source
    aspect = target[0] / target[1]
    if width / height > aspect:  # wider than the target: cut the sides
        crop_width, crop_height = height * aspect, float(height)
    else:  # taller (or the same): cut top and bottom
        crop_width, crop_height = float(width), width / aspect
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    return (left, top, left + crop_width, top + crop_height)


def crop_fraction(source: Size, target: Size) -> float:
    """The share of the source's area the centred crop to ``target``'s aspect cuts away."""
    left, top, right, bottom = crop_box(source, target)
    return 1.0 - (right - left) * (bottom - top) / (source[0] * source[1])


@dataclass(frozen=True)
class Placement:
    """Where each item of a concept trains: its bucket and how much its crop cuts."""

    sizes: list[Size]
    crops: list[float]

    def histogram(self) -> list[tuple[Size, int]]:
        """(bucket, items) from the fullest bucket down."""
        return Counter(self.sizes).most_common()


def place(sources: Sequence[Size], buckets: Sequence[Size] | None, resolution: int) -> Placement:
    """Each source's training size: its nearest bucket, or the square when ``buckets`` is
    None (bucketing off)."""
    if buckets is None:
        sizes = [(resolution, resolution)] * len(sources)
    else:
        sizes = [nearest_bucket(source, buckets) for source in sources]
    crops = [crop_fraction(source, size) for source, size in zip(sources, sizes, strict=True)]
    return Placement(sizes=sizes, crops=crops)


def size_label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def histogram_text(placement: Placement, names: Sequence[str] | None = None) -> str:
    """``80x48: 2, 48x80: 2, 64x64: 1; the largest crop cuts 10.4 % (of name)``."""
    used = ", ".join(f"{size_label(size)}: {count}" for size, count in placement.histogram())
    if not placement.crops:
        return used
    index = max(range(len(placement.crops)), key=placement.crops.__getitem__)
    where = f" of {names[index]}" if names else ""
    return f"{used}; the largest crop cuts {placement.crops[index]:.1%}{where}"


def data_buckets(data: Any, pixel_multiple: int) -> list[Size] | None:
    """The bucket sizes of a data config (``data.buckets``, ``bucket_step``,
    ``bucket_max_aspect``, ``bucket_max_side``, ``resolution``) for a family whose image sides
    are multiples of ``pixel_multiple``; None without buckets (the square crop). A ValueError
    when the settings leave no size."""
    if not data.buckets:
        return None
    step = max(pixel_multiple, -(-data.bucket_step // pixel_multiple) * pixel_multiple)
    rule = BucketRule(
        resolution=data.resolution,
        step=step,
        max_aspect=data.bucket_max_aspect,
        max_side=data.bucket_max_side or None,
    )
    return bucket_sizes(rule)
