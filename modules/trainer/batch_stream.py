"""The endless stream of batches a run draws from, with its place in the data order kept, so a
backup can record it and a resumed run continue from exactly the same batch."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import DataLoader

from modules.config import TrainConfig
from modules.data.batches import BucketBatchSampler
from modules.data.dataset import Batch, ConceptDataset, collate


class BatchStream:
    """Pass after pass over ``loader``, whose order comes from ``order`` alone (the loader's and
    its sampler's generator): the state is that generator's state at the start of the current
    pass and the batches taken in it."""

    def __init__(self, loader: DataLoader, order: torch.Generator) -> None:
        self.loader, self.order = loader, order
        self._iterator: Any = None
        self._pass_start = order.get_state()
        self._taken = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._pass_start = self.order.get_state()
            self._iterator, self._taken = iter(self.loader), 0
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = None
            return next(self)
        self._taken += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {
            "pass_start": self._pass_start,
            "taken": self._taken,
            "in_pass": self._iterator is not None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the pass is started again from its generator
        state and the batches already taken are drawn again and dropped (the caller restores
        the generators they draw from afterwards)."""
        self.order.set_state(state["pass_start"])
        self._iterator = None
        if not state["in_pass"]:
            return
        self._iterator, self._taken = iter(self.loader), 0
        for _ in range(int(state["taken"])):
            next(self)


def make_batches(
    config: TrainConfig, dataset: ConceptDataset, generator: torch.Generator, processes: int
) -> tuple[BatchStream, int]:
    """Endless batches of ``batch_size`` per process (``processes`` of them draw each batch
    whole), and the optimizer steps in a pass over the data. Each pass reshuffles with the
    run's seed. With buckets every batch comes from one bucket (``BucketBatchSampler``);
    without, a batch is any samples and the last, smaller one of a pass is dropped.
    ``generator`` draws the caption dropout."""
    size = config.training.batch_size * processes
    collate_fn = functools.partial(collate, generator=generator)
    order = torch.Generator().manual_seed(config.training.seed + 1)
    if config.data.buckets:
        sampler = BucketBatchSampler(dataset.latent_shapes(), size, order)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=order)
    else:
        loader = DataLoader(
            dataset,
            batch_size=size,
            shuffle=True,
            drop_last=len(dataset) >= size,
            collate_fn=collate_fn,
            generator=order,
        )
    steps_per_epoch = max(1, len(loader) // config.training.gradient_accumulation)
    return BatchStream(loader, order), steps_per_epoch
