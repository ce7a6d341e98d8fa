"""Batches from one bucket: the order a bucketed run draws its samples in.

Samples share a batch only when their latents have one shape (one bucket, one frame count), as
stacking needs. Each pass over the data shuffles every bucket's samples and cuts them into
batches of ``batch_size``; a bucket's last batch holds what is left and may be smaller, so no
sample is ever dropped. The batches of all buckets are then shuffled together. Everything is
drawn from one generator seeded by the run, so the order is the same for the same seed. Give the
DataLoader the same generator: with a single bucket (and no batch cut short) the order is then
exactly that of a shuffled ``DataLoader`` with that generator (one number drawn per pass by the
loader, then a permutation and the sampler's trailing one), so a dataset of one aspect ratio
trains in the order it did before buckets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for a DataLoader over samples of the given latent ``shapes``."""

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], batch_size: int, generator: torch.Generator
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            groups.setdefault(tuple(shape), []).append(index)
        self._groups = [groups[shape] for shape in sorted(groups)]
        self._batch_size = batch_size
        self._generator = generator

    def __len__(self) -> int:
        size = self._batch_size
        return sum(-(-len(group) // size) for group in self._groups)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator function: the draws happen at the pass's first batch, after the
        # DataLoader's own draw, as a RandomSampler's do.
        batches = []
        for group in self._groups:
            order = torch.randperm(len(group), generator=self._generator).tolist()
            shuffled = [group[i] for i in order]
            size = self._batch_size
            batches += [shuffled[start : start + size] for start in range(0, len(shuffled), size)]
        if len(self._groups) > 1:
            order = torch.randperm(len(batches), generator=self._generator).tolist()
            batches = [batches[i] for i in order]
        else:
            # A RandomSampler draws a second permutation at the end of each pass (of which it
            # keeps none); drawn here too, one bucket takes the generator exactly as it did.
            torch.randperm(len(self._groups[0]) if self._groups else 0, generator=self._generator)
        yield from batches
