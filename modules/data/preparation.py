"""From the data config to a training dataset: scan concepts, cut long clips into their frame
windows (``data.frame_windows``), place each item in its bucket, fill the cache, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modules.config.schema import DataConfig, MaskConfig, PriorConfig
from modules.data.buckets import Placement, Size, data_buckets, histogram_text, place
from modules.data.cache_files import CachedInfo, CachedItem, cached_info, old_layout_files
from modules.data.concept import ConceptItem, ConceptScan, DataError, name_list, scan_concept
from modules.data.conditioning import takes_references
from modules.data.dataset import ConceptDataset
from modules.data.frame_windows import in_windows, window_lines
from modules.data.images import image_size
from modules.data.latent_cache import CacheCounts, ConditioningEncoder, build_cache
from modules.data.video import clip_info, clip_window_starts
from modules.loss import Weighting
from modules.models.base import ConditionedFamily, LoadedModel, ModelFamily, TextEncoding
from modules.models.spec import ConditioningKind

CODEC_VERSION = 1
"""Bump when the meaning of cached latents changes without a change of model identity."""


@dataclass(frozen=True)
class PreparedData:
    dataset: ConceptDataset
    scans: list[ConceptScan]
    counts: CacheCounts
    """What the cache build encoded and reused (0 encoded when everything was cached)."""
    cache_dir: Path
    placements: list[Placement]
    """Each concept's items' training sizes (buckets) and crops, in scan order."""
    bucketed: bool
    notes: list[str] = field(default_factory=list)
    """Warnings about the data (masks without weight, coloured masks, damaged cache files)."""
    items: list[list[ConceptItem]] = field(default_factory=list)
    """Each concept's training items in scan order, as placed: a clip trained in windows
    (``data.frame_windows``) once per window. Empty: the scans' items."""
    windows: list[str] = field(default_factory=list)
    """What the clips' frame windows are (``walk.mp4: 4 windows of 33 frames``), one line each;
    empty when every clip trains one window."""

    @property
    def encoded(self) -> int:
        """Latents encoded in this run (0 when every one came from the cache)."""
        return self.counts.latents_encoded

    def report_lines(self) -> list[str]:
        lines = [f"{scan.folder}: {scan.describe()}" for scan in self.scans]
        lines += self.windows
        if self.bucketed:
            lines.append(self.bucket_line())
        share = self.dataset.share_line()
        if share:
            lines.append(share)
        warning = self.dataset.mask_coverage().warning()
        if warning:
            lines.append(warning)
        return lines

    def bucket_line(self) -> str:
        """The buckets used, items per bucket and the largest crop, in one line."""
        merged = self._all_placed()
        trained = self.items or [list(scan.items) for scan in self.scans]
        names = [item.image.name for items in trained for item in items]
        used = len(merged.histogram())
        return f"Buckets ({used} used by {len(names)} items): {histogram_text(merged, names)}"

    def bucket_histogram(self) -> list[tuple[Size, int]]:
        """(training size, items) over every concept, the fullest first (ties: the smaller
        size first)."""
        return sorted(self._all_placed().histogram(), key=lambda pair: (-pair[1], pair[0]))

    def _all_placed(self) -> Placement:
        return Placement(
            sizes=[size for placement in self.placements for size in placement.sizes],
            crops=[crop for placement in self.placements for crop in placement.crops],
        )

    def captions(self) -> list[str]:
        """Every distinct caption the run trains with, in first-seen order."""
        seen = dict.fromkeys(item.caption for scan in self.scans for item in scan.items)
        return [caption for caption in seen if caption]

    def cache_hint(self) -> str:
        return f"Cache: {self.cache_dir} ({self.counts.describe()})"


def prepare_dataset(
    data: DataConfig,
    *,
    family: ModelFamily,
    model: LoadedModel,
    pixel_multiple: int = 16,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
    scans: Sequence[ConceptScan] | None = None,
    sources: Sequence[Sequence[Size | None]] | None = None,
    mask: MaskConfig | None = None,
    prior: PriorConfig | None = None,
    conditioning: Sequence[ConditioningKind] = (),
) -> PreparedData:
    """Scan every concept (unless ``scans`` are given), place each item in its bucket (sides
    multiples of ``pixel_multiple``, the family's; ``sources``: the items' sizes when already
    read, per scan), encode what the cache lacks, and build the dataset over the cache.

    Clips train as ``data.frames`` frames at ``data.fps``, a longer clip as each of its
    windows (``data.frame_windows``: each an item of its own). Without buckets and with
    ``batch_size`` > 1 every item must have the same latent frame count (a DataError naming the
    fix otherwise; with buckets, batches group items of one shape). With
    ``mask`` (and ``prior``) given and masked training on, masks without any target weight are
    counted in a warning, and a dataset in which no item has any is refused (DataError).
    ``conditioning``: the family's conditioning kinds (its declaration's), encoded into the
    cache with the family's ``encode_conditioning``; a scan made here then keeps reference
    images apart from the items, and each concept's references come from its
    ``reference_dirs`` when it has some (else from beside its items).
    """
    cache_dir = Path(data.cache_dir)
    settings = {"family": family.name, "model": model.identity, "codec": CODEC_VERSION}
    kinds = tuple(conditioning)
    references = takes_references(kinds)
    if scans is None:
        scans = [scan_concept(c, references=references) for c in data.concepts]
    scans = list(scans)
    notes: list[str] = _old_cache_note(cache_dir)
    buckets = _buckets(data, pixel_multiple)
    counts = CacheCounts()
    per_concept, placements, trained = [], [], []
    masks: dict[Path | None, list[CachedItem]] = {}
    windows: list[tuple[Path, int]] = []
    known = list(sources) if sources is not None else [[None] * len(s.items) for s in scans]
    for concept, scan, sizes in zip(data.concepts, scans, known, strict=True):
        read = [size or source_size(item) for item, size in zip(scan.items, sizes, strict=True)]
        items, read, counted = _frame_windows(list(scan.items), read, data)
        windows += counted
        placement = place(read, buckets, data.resolution)
        built = build_cache(
            items,
            resolution=data.resolution,
            cache_dir=cache_dir,
            settings=settings,
            encode_images=lambda images: family.encode_images(model, images),
            encode_prompts=lambda prompts: family.encode_prompts(model, prompts),
            sizes=placement.sizes,
            progress=progress,
            frames=data.frames,
            fps=data.fps,
            warn=notes.append,
            conditioning=kinds,
            encode_conditioning=_conditioning_encoder(family, model, kinds),
            reference_dirs=[Path(folder).expanduser() for folder in concept.reference_dirs]
            if references
            else (),
        )
        counts.add(built.counts)
        placements.append(placement)
        trained.append(items)
        per_concept.append((concept, built.items))
        if concept.type == "standard":
            # Per mask file (a clip's windows share one; so can two items of the same content).
            for item, cached in zip(items, built.items, strict=True):
                masks.setdefault(item.mask, []).append(cached)
    if batch_size > 1 and buckets is None:
        distinct = {cached.latent: cached for _, items in per_concept for cached in items}
        _check_one_frame_count([cached_info(item) for item in distinct.values()], batch_size)
    masked = {mask_file: _strongest(cached) for mask_file, cached in masks.items() if mask_file}
    notes += _coloured_note(masked)
    if mask is not None and mask.enabled and masked:
        with_weight_elsewhere = None in masks or any(
            concept.type == "prior_prediction" for concept in data.concepts
        )
        prior = prior or PriorConfig()
        weighting = Weighting.of(mask, prior)
        notes += _weightless_note(masked, weighting, prior.weight > 0, with_weight_elsewhere)
    return PreparedData(
        dataset=ConceptDataset(per_concept),
        scans=scans,
        counts=counts,
        cache_dir=cache_dir,
        placements=placements,
        bucketed=buckets is not None,
        notes=notes,
        items=trained,
        windows=window_lines(windows, data.frames),
    )


def _frame_windows(
    items: list[ConceptItem], sizes: list[Size], data: DataConfig
) -> tuple[list[ConceptItem], list[Size], list[tuple[Path, int]]]:
    """The items with each clip replaced by its windows (``data.frame_windows``), their sizes,
    and (clip, windows) for each clip. ``head`` (or 1-frame clips): the items as they are (a
    clip too short is named when it is encoded, as before windows existed)."""
    if not in_windows(data):
        return items, sizes, []
    windowed: list[ConceptItem] = []
    placed: list[Size] = []
    counts: list[tuple[Path, int]] = []
    for item, size in zip(items, sizes, strict=True):
        starts = clip_window_starts(item.image, clip_info(item.image), data) if item.clip else [0]
        windowed += [replace(item, start=start) for start in starts]
        placed += [size] * len(starts)
        if item.clip:
            counts.append((item.image, len(starts)))
    return windowed, placed, counts


def _strongest(cached: list[CachedItem]) -> CachedInfo:
    """The cache info of a mask file's item with the largest weight: a mask video's windows
    each have their own mask frames, and the file has weight if any window has."""
    return max((cached_info(item) for item in cached), key=lambda info: info.mask_max)


def _buckets(data: DataConfig, pixel_multiple: int) -> list[Size] | None:
    try:
        return data_buckets(data, pixel_multiple)
    except ValueError as error:
        raise DataError(str(error)) from None


def source_size(item: ConceptItem) -> Size:
    """(width, height) of an image as shown, or of a clip's frames."""
    return clip_info(item.image).size if item.clip else image_size(item.image)


def _old_cache_note(cache_dir: Path) -> list[str]:
    old = old_layout_files(cache_dir)
    if not old:
        return []
    size = sum(path.stat().st_size for path in old) / 2**20
    folders = sorted({path.parent.name for path in old})
    return [
        f"{cache_dir} holds {len(old)} files ({size:.0f} MiB) of the cache layout before "
        f"latents, captions and masks were kept apart; they are no longer read: delete its "
        f"two-letter folders ({name_list([Path(f) for f in folders])}) to free the space"
    ]


def _coloured_note(masks: dict[Path, CachedInfo]) -> list[str]:
    coloured = [path for path, info in masks.items() if info.mask_coloured]
    if not coloured:
        return []
    return [
        f"{len(coloured)} masks are coloured, not grey ({name_list(coloured)}): their brightness "
        "is used as the weight; save masks as greyscale to be sure of the weights"
    ]


def _conditioning_encoder(
    family: ModelFamily, model: LoadedModel, kinds: Sequence[ConditioningKind]
) -> ConditioningEncoder | None:
    """The family's ``encode_conditioning`` for the cache; None for a family without
    conditioning. A family that declares kinds must have the method (ConditionedFamily)."""
    if not kinds:
        return None
    if not isinstance(family, ConditionedFamily):
        raise TypeError(
            f"the {family.name} family declares conditioning "
            f"({', '.join(kind.name for kind in kinds)}) but has no encode_conditioning"
        )

    def encode(
        kind: str, images: list[Tensor], frames: int, caption: str | None, **geometry: Any
    ) -> TextEncoding:
        extra = {} if caption is None else {"caption": caption}  # a kind with_caption only
        extra.update(geometry)  # a kind with_geometry only
        return family.encode_conditioning(model, kind, images, frames=frames, **extra)

    return encode


def _weightless_note(
    masks: dict[Path, CachedInfo], weighting: Weighting, with_prior: bool, weight_elsewhere: bool
) -> list[str]:
    """Masks whose target weight map is 0 everywhere teach nothing of their own. The map only
    grows with the raw mask, so the mask's largest value decides it. When no item has any
    weight (no mask has, no item goes without a mask, no prior-prediction concept), nothing
    would be learnt: a DataError."""
    largest = torch.tensor([info.mask_max for info in masks.values()])
    weights = weighting.maps(largest).target
    empty = [path for path, w in zip(masks, weights.tolist(), strict=True) if w <= 0]
    if not empty:
        return []
    if len(empty) == len(masks) and not weight_elsewhere:
        raise DataError(
            f"no mask has any weight: all {len(masks)} masks ({name_list(empty)}) are black (or "
            "below prior.threshold), so nothing would be learnt. Paint the subject in the masks "
            "(white = learn), or set mask.enabled=false"
        )
    return [
        f"{len(empty)} of {len(masks)} masks have no weight anywhere ({name_list(empty)}): their "
        "images teach nothing of the subject" + (" (only the prior)" if with_prior else "")
    ]


def _check_one_frame_count(infos: list[CachedInfo], batch_size: int) -> None:
    """Batches stack latents: stills (1 latent frame) and clips cannot share one."""
    counts: dict[int, int] = {}
    for info in infos:
        frames = info.latent_frames
        counts[frames] = counts.get(frames, 0) + 1
    if len(counts) > 1:
        found = ", ".join(f"{n} items with {frames}" for frames, n in sorted(counts.items()))
        raise DataError(
            f"training.batch_size={batch_size}: the items have different latent frame counts "
            f"({found}; still images have 1) and cannot share a batch: set "
            "training.batch_size=1, or train only clips (or only images) in this run"
        )
