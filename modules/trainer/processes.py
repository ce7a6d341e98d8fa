"""Training on several processes (``accelerate launch --num_processes N``): who does what.

Every process draws the same batch of ``training.batch_size`` x N samples with the same noise,
timesteps and dropouts (one seed, one data order), and trains on its own share of it. So the
run is the run one process would make at N times the batch size, up to float rounding, and each
process still sees distinct samples and noise. The gradients are averaged by DDP; the main
process alone fills the cache first, writes the run folder (metrics, LoRA files, backups,
samples) and runs the drift meter.

A process that dies (killed, crashed) breaks the next exchange of the others: their backend
raises at once (gloo: "Connection reset by peer"), :func:`lost_peer` recognises it, and the
trainer saves the LoRA and names the backup to resume from instead of a traceback.

The step (:mod:`modules.trainer.step`) knows nothing of this: :meth:`Processes.split` gives it
this process's share of the batch and its draws, and :meth:`Share.place` puts its per-sample
losses back into the whole batch's, at 0 for the other processes' samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Generic, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

from modules.loss import LossBreakdown

_SUMMED = ("total", "target", "prior")
"""The loss parts each process computes a part of (the weight means it has whole)."""

Items = TypeVar("Items")
"""A dataclass of per-sample values, batch-first: tensors, dicts of them (the text, the
conditioning: each split by the same rows), or None."""
Draws = TypeVar("Draws")


def take(items: Items, index: torch.Tensor | slice) -> Items:
    """The samples ``index`` of ``items``, in that order (of each field: a tensor, a dict of
    tensors, a dataclass of them such as the weight maps, or None)."""
    taken: dict[str, Any] = {}
    for part in fields(items):  # type: ignore[arg-type]
        value = getattr(items, part.name)
        if isinstance(value, dict):
            taken[part.name] = {key: tensor[index] for key, tensor in value.items()}
        elif is_dataclass(value):
            taken[part.name] = take(value, index)
        else:
            taken[part.name] = None if value is None else value[index]
    return replace(items, **taken)  # type: ignore[type-var]


@dataclass(frozen=True)
class Share(Generic[Items, Draws]):
    """This process's share of a batch (all of it on one process)."""

    batch: Items
    draws: Draws
    whole: Draws
    """The whole batch's draws (repeated, when padded): the loss normalises over its masks."""
    part: slice
    """This process's samples in the whole batch."""
    size: int
    """The whole batch's size (padded: one sample at least for every process)."""

    def place(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample ``values`` of this share placed in the whole batch, the others at 0."""
        if values is None or values.shape[0] == self.size:
            return values
        whole = values.new_zeros((self.size, *values.shape[1:]))
        whole[self.part] = values
        return whole


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> Processes:
        """This process's place, from the launcher's environment (``accelerate launch`` or
        ``torchrun``; one process when launched plainly). The process group is set up here on
        first use: on the GPUs, or on the CPU (gloo) with ``--cpu`` or when there is no GPU."""
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        return cls(index=state.process_index, count=state.num_processes)

    @property
    def main(self) -> bool:
        return self.index == 0

    @property
    def several(self) -> bool:
        return self.count > 1

    def padded(self, size: int) -> torch.Tensor | None:
        """Indices that repeat a batch of ``size`` (< count) samples until every process has
        one; None when it already has enough (every process needs a sample each step)."""
        if size >= self.count:
            return None
        return torch.arange(self.count) % size

    def share(self, size: int) -> slice:
        """This process's part of a batch of ``size`` >= count samples: consecutive, the
        first ``size % count`` processes one sample more."""
        base, extra = divmod(size, self.count)
        start = self.index * base + min(self.index, extra)
        return slice(start, start + base + (1 if self.index < extra else 0))

    def split(self, batch: Items, draws: Draws, size: int) -> Share[Items, Draws]:
        """This process's share of ``batch`` (``size`` samples) and of its ``draws``; a batch
        with fewer samples than processes first repeats each sample, with its draws."""
        pad = self.padded(size)
        if pad is not None:
            batch, draws, size = take(batch, pad), take(draws, pad), len(pad)
        part = self.share(size)
        return Share(take(batch, part), take(draws, part), draws, part, size)

    def whole_loss(self, loss: LossBreakdown, accelerator: Accelerator) -> LossBreakdown:
        """Every process's part of the loss summed into the whole batch's, on each (for the log
        and the NaN check, which every process then makes alike)."""
        if not self.several:
            return loss
        parts = torch.stack([getattr(loss, name).detach().float() for name in _SUMMED])
        summed = accelerator.reduce(parts, reduction="sum")
        return replace(loss, **dict(zip(_SUMMED, summed.unbind(), strict=True)))

    def seed(self, seed: int) -> int:
        """The seed of this process's own torch generator (LoRA dropout): the run's seed on the
        main process, as a single-process run has it; a distinct one on each other process."""
        return seed if self.main else (seed * 1_000_003 + self.index) % 2**63

    def close(self, finished_well: bool) -> None:
        """End the process group before the process exits, as torch asks: left to the
        interpreter's exit, the group's threads may still run when it is torn down, and the
        process then aborts after its work is done. When every process finished well they meet
        first, so none leaves while another still needs it; after an error, each leaves."""
        if not torch.distributed.is_initialized():
            return
        try:
            if finished_well:
                torch.distributed.barrier()
        except RuntimeError:
            pass  # another process left after an error: nothing is waiting on this one
        finally:
            torch.distributed.destroy_process_group()


_BACKENDS = ("gloo", "nccl", "c10d")
_GONE = ("connection", "closed", "reset by peer", "broken pipe", "timed out", "timeout")
"""How the backends say that the other end went away (gloo: "Read error ...: Connection reset
by peer", "Connection closed by peer", "Timed out waiting ... for recv operation")."""


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective operation that failed because another process of the
    group ended or stopped answering: torch's network error, and the RuntimeError the backends
    raise from a collective or from DDP's gradient average inside ``backward`` (which shows no
    torch.distributed frame, only the backend's message)."""
    if isinstance(error, torch.distributed.DistNetworkError):
        return True
    text = str(error).lower()
    return (
        isinstance(error, RuntimeError)
        and any(name in text for name in _BACKENDS)
        and any(word in text for word in _GONE)
    )


def peer_reason(error: BaseException) -> str:
    """The backend's reason in a few words: ``Read error [127.0.0.1]:39097: Connection reset by
    peer``, without its source location and its advice for torch's developers."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # "[.../gloo/transport/tcp/pair.cc:537] "
    return line.split(". ")[0].rstrip(".")
