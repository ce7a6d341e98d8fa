"""From the data config to a training dataset: scan concepts, fill the latent cache, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modules.config.schema import DataConfig
from modules.data.concept import ConceptScan, DataError, scan_concept
from modules.data.dataset import ConceptDataset
from modules.data.latent_cache import build_cache, cached_latent_frames
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

    def report_lines(self) -> list[str]:
        lines = [f"{scan.folder}: {scan.describe()}" for scan in self.scans]
        warning = self.dataset.mask_coverage().warning()
        if warning:
            lines.append(warning)
        return lines

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
) -> PreparedData:
    """Scan every concept, encode what the cache lacks, and build the dataset over the cache.

    Clips train as ``data.frames`` frames at ``data.fps``. With ``batch_size`` > 1 every item
    must have the same latent frame count (a DataError naming the fix otherwise).
    """
    cache_dir = Path(data.cache_dir)
    settings = {"family": family.name, "model": model.identity, "codec": CODEC_VERSION}
    scans = [scan_concept(concept) for concept in data.concepts]
    encoded = 0

    def report(done: int, total: int) -> None:
        nonlocal encoded
        if done == 0:
            encoded += total  # build_cache announces how many items it has to encode
        if progress is not None:
            progress(done, total)

    per_concept = []
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
        )
        per_concept.append((concept, paths))
    if batch_size > 1:
        _check_one_frame_count([path for _, paths in per_concept for path in paths], batch_size)
    return PreparedData(
        dataset=ConceptDataset(per_concept),
        scans=scans,
        encoded=encoded,
        total=sum(len(scan.items) for scan in scans),
        cache_dir=cache_dir,
    )


def _check_one_frame_count(paths: list[Path], batch_size: int) -> None:
    """Batches stack latents: stills (1 latent frame) and clips cannot share one."""
    counts: dict[int, int] = {}
    for path in paths:
        frames = cached_latent_frames(path)
        counts[frames] = counts.get(frames, 0) + 1
    if len(counts) > 1:
        found = ", ".join(f"{n} items with {frames}" for frames, n in sorted(counts.items()))
        raise DataError(
            f"training.batch_size={batch_size}: the items have different latent frame counts "
            f"({found}; still images have 1) and cannot share a batch: set "
            "training.batch_size=1, or train only clips (or only images) in this run"
        )
