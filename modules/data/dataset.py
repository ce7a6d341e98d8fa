"""The training dataset over cached concepts, and the collate function that builds a batch.

Caption dropout is decided in :func:`collate`, from a generator the caller passes, so the draws
are reproducible and independent of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from modules.config.schema import ConceptConfig
from modules.data.cache_files import CachedItem, cached_info, load_cached

Sample = dict[str, Any]


@dataclass(frozen=True)
class MaskCoverage:
    """How many distinct training images have a mask (prior_prediction concepts not counted)."""

    images: int
    without_mask: int

    def warning(self) -> str | None:
        """The line the trainer reports once, or None when every image has a mask."""
        if self.without_mask == 0:
            return None
        return (
            f"{self.without_mask} of {self.images} images have no mask: trained with an "
            "all-ones mask"
        )


@dataclass(frozen=True)
class Batch:
    latents: Tensor
    """(B, C, h, w) or (B, C, F, h, w), float32."""
    masks: Tensor
    """(B, 1, h, w) or (B, 1, F, h, w) weights in [0, 1]."""
    text: dict[str, Tensor]
    """Prompt encodings, batch-first; per-sample sequences zero-padded to the longest."""
    prior_prediction: Tensor
    """(B,) bool: the sample's target is the base model's prediction."""
    loss_weight: Tensor
    """(B,) float32, the concept's loss weight."""
    has_mask: Tensor
    """(B,) bool: the image had a mask file."""
    caption_dropped: Tensor
    """(B,) bool: the sample uses the empty prompt this time."""
    conditioning: dict[str, Tensor] = field(default_factory=dict)
    """The family's per-item conditioning encodings (a first frame, reference images),
    batch-first like ``text`` and padded the same way, so the teacher's subset takes the same
    rows of both; empty for a family without conditioning. ``predict`` receives the two merged
    (:func:`modules.models.base.with_conditioning`)."""


class ConceptDataset(Dataset[Sample]):
    """Every cached item of every concept, each listed ``repeats`` times.

    Samples of prior_prediction concepts get an all-ones mask and ``has_mask`` False: their
    target is the base model's prediction over the whole image, so masks do not apply.
    """

    def __init__(self, concepts: Sequence[tuple[ConceptConfig, Sequence[CachedItem]]]) -> None:
        self._concepts = [concept for concept, _ in concepts]
        # (cache files, concept index), repeats expanded, so __getitem__ is a plain lookup.
        self._index: list[tuple[CachedItem, int]] = [
            (item, number)
            for number, (concept, items) in enumerate(concepts)
            for _ in range(concept.repeats)
            for item in items
        ]
        self._coverage = _mask_coverage(concepts)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Sample:
        item, number = self._index[index]
        concept = self._concepts[number]
        cached = load_cached(item)
        prior_prediction = concept.type == "prior_prediction"
        mask = torch.ones_like(cached.mask) if prior_prediction else cached.mask
        return {
            "latent": cached.latent,
            "mask": mask,
            "text": cached.text,
            "empty_text": cached.empty_text,
            "is_prior_prediction": prior_prediction,
            "loss_weight": concept.loss_weight,
            "has_mask": cached.has_mask and not prior_prediction,
            "caption_dropout": concept.caption.dropout,
            "conditioning": cached.conditioning,
        }

    def mask_coverage(self) -> MaskCoverage:
        return self._coverage

    def share_line(self) -> str | None:
        """Each concept's share of the draws (its items times its repeats over all), with its
        type and loss weight when they are not the default: how much a prior-prediction concept
        counts, in one line. None for a single concept."""
        if len(self._concepts) < 2:
            return None
        counts = [0] * len(self._concepts)
        for _, number in self._index:
            counts[number] += 1
        total = max(1, sum(counts))
        parts = []
        for concept, count in zip(self._concepts, counts, strict=True):
            notes = ["prior prediction"] if concept.type == "prior_prediction" else []
            if concept.loss_weight != 1.0:
                notes.append(f"loss weight {concept.loss_weight:g}")
            named = Path(concept.path).name + (f" ({', '.join(notes)})" if notes else "")
            parts.append(f"{named} {count} ({count / total:.0%})")
        return "Share of the draws (items x repeats): " + ", ".join(parts)

    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Each sample's latent shape, (C, h, w) or (C, F, h, w), from the cache files' headers:
        samples of one shape (one bucket and frame count) can share a batch."""
        shapes: dict[Path, tuple[int, ...]] = {}
        for item, _ in self._index:
            if item.latent not in shapes:
                shapes[item.latent] = cached_info(item).latent_shape
        return [shapes[item.latent] for item, _ in self._index]


def collate(samples: Sequence[Sample], generator: torch.Generator | None = None) -> Batch:
    """Stack samples into a Batch, replacing each caption by the empty prompt with its
    ``caption_dropout`` probability.

    One uniform number is drawn per sample from ``generator`` (the global RNG when None), also
    for samples without dropout, so the draws do not depend on the concepts' settings.
    Use ``functools.partial(collate, generator=g)`` as a DataLoader's ``collate_fn``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    draws = torch.rand(len(samples), generator=generator)
    dropout = torch.tensor([float(sample["caption_dropout"]) for sample in samples])
    dropped = draws < dropout
    texts = [
        sample["empty_text"] if drop else sample["text"]
        for sample, drop in zip(samples, dropped.tolist(), strict=True)
    ]
    shapes = {tuple(sample["latent"].shape) for sample in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"a batch mixes latent shapes {sorted(shapes)} (stills and clips, or clips of "
            "different lengths): use training.batch_size=1 for such datasets"
        )
    return Batch(
        latents=torch.stack([sample["latent"] for sample in samples]),
        masks=torch.stack([sample["mask"] for sample in samples]),
        text=stack_encodings(texts),
        prior_prediction=torch.tensor([bool(s["is_prior_prediction"]) for s in samples]),
        loss_weight=torch.tensor([float(s["loss_weight"]) for s in samples]),
        has_mask=torch.tensor([bool(s["has_mask"]) for s in samples]),
        caption_dropped=dropped,
        conditioning=stack_encodings([s.get("conditioning", {}) for s in samples], "conditioning"),
    )


def stack_encodings(
    texts: Sequence[dict[str, Tensor]], what: str = "prompt encodings"
) -> dict[str, Tensor]:
    """Stack per-sample encodings key by key, zero-padding the sequence dimension.

    Zero padding suits attention masks too (padded tokens are not attended), so every key,
    embeddings and masks alike, is padded the same way.
    """
    names = set(texts[0])
    for text in texts[1:]:
        if set(text) != names:
            raise ValueError(
                f"{what} differ in their keys ({sorted(names)} vs {sorted(text)}): "
                "the cache mixes model families; clear the cache folder"
            )
    return {name: _pad_stack([text[name] for text in texts], name, what) for name in sorted(names)}


def _pad_stack(tensors: list[Tensor], name: str, what: str = "prompt encodings") -> Tensor:
    """(L_i, ...) tensors → (B, max L_i, ...), zeros after each sequence's end."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    if any(t.dim() == 0 or t.shape[1:] != tensors[0].shape[1:] for t in tensors):
        shapes = sorted({tuple(t.shape) for t in tensors})
        raise ValueError(f"{what} '{name}' differ beyond the sequence dimension: {shapes}")
    length = max(t.shape[0] for t in tensors)
    batch = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))  # (B, L, ...)
    for row, tensor in zip(batch, tensors, strict=True):
        row[: tensor.shape[0]] = tensor  # new_zeros works for bool and integer masks too
    return batch


def _mask_coverage(concepts: Sequence[tuple[ConceptConfig, Sequence[CachedItem]]]) -> MaskCoverage:
    """Distinct cached images of standard concepts, and how many of them lack a mask."""
    distinct = {
        item.source: item
        for concept, items in concepts
        if concept.type == "standard"
        for item in items
    }
    without = sum(item.mask is None for item in distinct.values())
    return MaskCoverage(images=len(distinct), without_mask=without)
