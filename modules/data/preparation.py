"""From the data config to a training dataset: scan concepts, fill the latent cache, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.config.schema import DataConfig, MaskConfig, PriorConfig
from modules.data.concept import ConceptScan, DataError, name_list, scan_concept
from modules.data.dataset import ConceptDataset
from modules.data.latent_cache import CachedInfo, build_cache, cached_info
from modules.loss import process_masks
from modules.models.base import LoadedModel, ModelFamily

CODEC_VERSION = 1
"""Bump when the meaning of cached latents changes without a change of model identity."""


@dataclass(frozen=True)
class PreparedData:
    dataset: ConceptDataset
    scans: list[ConceptScan]
    encoded: int
    """Items encoded in this run (0 when everything came from the cache)."""
    total: int
    cache_dir: Path
    notes: list[str] = field(default_factory=list)
    """Warnings about the data (masks without weight, coloured masks, damaged cache files)."""

    def report_lines(self) -> list[str]:
        lines = [f"{scan.folder}: {scan.describe()}" for scan in self.scans]
        warning = self.dataset.mask_coverage().warning()
        if warning:
            lines.append(warning)
        return lines

    def captions(self) -> list[str]:
        """Every distinct caption the run trains with, in first-seen order."""
        seen = dict.fromkeys(item.caption for scan in self.scans for item in scan.items)
        return [caption for caption in seen if caption]

    def cache_hint(self) -> str:
        reused = self.total - self.encoded
        return f"Latent cache: {self.cache_dir} ({reused} of {self.total} items reused)"


def prepare_dataset(
    data: DataConfig,
    *,
    family: ModelFamily,
    model: LoadedModel,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
    scans: Sequence[ConceptScan] | None = None,
    mask: MaskConfig | None = None,
    prior: PriorConfig | None = None,
) -> PreparedData:
    """Scan every concept (unless ``scans`` are given), encode what the cache lacks, and build
    the dataset over the cache.

    Clips train as ``data.frames`` frames at ``data.fps``. With ``batch_size`` > 1 every item
    must have the same latent frame count (a DataError naming the fix otherwise). With
    ``mask`` (and ``prior``) given and masked training on, masks without any target weight are
    counted in a warning, and a dataset in which no item has any is refused (DataError).
    """
    cache_dir = Path(data.cache_dir)
    settings = {"family": family.name, "model": model.identity, "codec": CODEC_VERSION}
    scans = list(scans) if scans is not None else [scan_concept(c) for c in data.concepts]
    notes: list[str] = []
    encoded = 0

    def report(done: int, total: int) -> None:
        nonlocal encoded
        if done == 0:
            encoded += total  # build_cache announces how many items it has to encode
        if progress is not None:
            progress(done, total)

    per_concept, masks = [], {}
    for concept, scan in zip(data.concepts, scans, strict=True):
        paths = build_cache(
            list(scan.items),
            resolution=data.resolution,
            cache_dir=cache_dir,
            settings=settings,
            encode_images=lambda images: family.encode_images(model, images),
            encode_prompts=lambda prompts: family.encode_prompts(model, prompts),
            progress=report,
            frames=data.frames,
            fps=data.fps,
            warn=notes.append,
        )
        per_concept.append((concept, paths))
        if concept.type == "standard":
            # Per mask file (two items can share a cache file when their contents match).
            masks |= {item.mask: path for item, path in zip(scan.items, paths, strict=True)}
    infos = {path: cached_info(path) for _, paths in per_concept for path in paths}
    if batch_size > 1:
        _check_one_frame_count(list(infos.values()), batch_size)
    masked = {mask_file: infos[path] for mask_file, path in masks.items() if mask_file}
    notes += _coloured_note(masked)
    if mask is not None and mask.enabled and masked:
        with_weight_elsewhere = None in masks or any(
            concept.type == "prior_prediction" for concept in data.concepts
        )
        notes += _weightless_note(masked, mask, prior or PriorConfig(), with_weight_elsewhere)
    return PreparedData(
        dataset=ConceptDataset(per_concept),
        scans=scans,
        encoded=encoded,
        total=sum(len(scan.items) for scan in scans),
        cache_dir=cache_dir,
        notes=notes,
    )


def _coloured_note(masks: dict[Path, CachedInfo]) -> list[str]:
    coloured = [path for path, info in masks.items() if info.mask_coloured]
    if not coloured:
        return []
    return [
        f"{len(coloured)} masks are coloured, not grey ({name_list(coloured)}): their brightness "
        "is used as the weight; save masks as greyscale to be sure of the weights"
    ]


def _weightless_note(
    masks: dict[Path, CachedInfo], mask: MaskConfig, prior: PriorConfig, weight_elsewhere: bool
) -> list[str]:
    """Masks whose target weight map is 0 everywhere teach nothing of their own. The map only
    grows with the raw mask, so the mask's largest value decides it. When no item has any
    weight (no mask has, no item goes without a mask, no prior-prediction concept), nothing
    would be learnt: a DataError."""
    largest = torch.tensor([info.mask_max for info in masks.values()])
    weights = process_masks(
        largest, gamma=mask.gamma, min_weight=mask.min_weight, prior_threshold=prior.threshold
    ).target
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
        "images teach nothing of the subject" + (" (only the prior)" if prior.weight > 0 else "")
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
