"""Block swap (``model.memory.blocks_to_swap``): the frozen base weights of the denoiser's last
N blocks live in CPU memory and come to the compute device only while their block runs.

One mechanism for every family, on the blocks ``family.blocks`` gives, installed when the model
loads (:mod:`modules.models.memory`), before the LoRA exists:

- A swapped block's base parameters and buffers are replaced by placeholders (empty tensors of
  the same dtype and number of dimensions) while the block is not running; their values stay in
  a CPU copy (pinned when CUDA is available, so that copies to the GPU are asynchronous). Moving
  the denoiser to the GPU moves only the placeholders, and tells the swapper where to bring the
  weights. A LoRA added later (peft's ``lora_A``/``lora_B``) follows the placeholder's device,
  is not in the CPU copy, and never moves; nor does its optimizer state.
- When a swapped block runs, its weights are copied to the placeholder's device (on the GPU: on
  a side CUDA stream) and the next swapped block's copy is started at once, so that copying
  block i+1 overlaps computing block i; after the block, the placeholders come back (the
  weights are frozen: nothing is copied back).
- The backward needs a block's weights again. An identity autograd node on the block's outputs
  (:class:`_Arrive`) brings them when the backward reaches the block, starts the copy of the
  block before it, and lets the blocks after it go; at the backward's end none stays. So that
  the forward does not keep them for the backward (autograd saves the weights a layer
  multiplies by), a swapped block runs under activation checkpointing (non-reentrant): the
  model's own when gradient checkpointing is on, else the swapper's, for the swapped blocks
  only (one more forward of each per step). The recomputation is exact (same inputs, same
  random state) and no node is added at a block's inputs (gradients sent to one tensor by
  several blocks add up in the same order), so nothing training computes changes.
- The teacher's forward (adapter off, no gradients), the samples and the drift meter go through
  the same blocks and so the same mechanism: never every block at once.

Transfers (one block's base weights copied to the device) per training step, N swapped blocks:
N for the student's forward, N for its backward, N more when the step runs the teacher: 2N or
3N. Counted in :attr:`BlockSwapper.transfers`.

Why the last N blocks: in the forward, the resident first blocks give the first swapped
block's copy time to arrive (the last resident block starts it), while the backward, which
starts with the last blocks, has nothing to hide the first copy behind either way; musubi-tuner
and kohya's sd-scripts swap the last blocks too, so the same count means the same there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from modules.models.base import ModelLoadError


@dataclass
class _Weight:
    """One frozen base parameter or buffer (a quantised layer's scales) of a swapped block."""

    module: torch.nn.Module
    """The module that holds it (a LoRA wraps the module later; the module stays the same)."""
    slots: dict[str, Any]
    """The module's ``_parameters`` or ``_buffers``."""
    name: str
    stored: torch.Tensor
    """Its values, in CPU memory (pinned with CUDA)."""

    @property
    def device(self) -> torch.device:
        """Where the module's tensor is now (the placeholder moves with the denoiser)."""
        return self.slots[self.name].device

    def put(self, values: torch.Tensor) -> None:
        """Give the module ``values`` (a parameter stays a frozen parameter)."""
        is_param = self.slots is self.module._parameters
        self.slots[self.name] = (
            torch.nn.Parameter(values, requires_grad=False) if is_param else values
        )

    def empty(self, device: torch.device) -> None:
        """What the module holds while the block is not running: no values, the same dtype and
        number of dimensions (peft reads a convolution's from its weight)."""
        shape = (0, *self.stored.shape[1:])
        self.put(torch.empty(shape, dtype=self.stored.dtype, device=device))


@dataclass
class _Arrival:
    """A block's weights on their way to the device."""

    copies: list[torch.Tensor]
    done: torch.cuda.Event | None
    """Recorded on the side stream after the copies (None off CUDA: already there)."""


class BlockSwapper:
    """Keeps the base weights of ``blocks[-count:]`` in CPU memory and brings each to the device
    just ahead of its use (see the module docstring). ``checkpointing`` says whether the model
    already runs each block under activation checkpointing (read at every call: the trainer turns
    it on after the model loads)."""

    def __init__(
        self, blocks: Sequence[torch.nn.Module], count: int, checkpointing: Callable[[], bool]
    ) -> None:
        if not 0 < count <= len(blocks):
            raise ModelLoadError(
                f"model.memory.blocks_to_swap: {count} is not between 1 and the denoiser's "
                f"{len(blocks)} blocks; use 0 (off) to {len(blocks)}"
            )
        self.swapped: list[torch.nn.Module] = list(blocks[-count:])
        self.transfers = 0
        """Blocks copied to the device so far (each: all of one block's base weights)."""
        self._checkpointing = checkpointing
        self._weights: list[list[_Weight]] = []
        self._arriving: dict[int, _Arrival] = {}
        self._resident: set[int] = set()
        self._cleared_after = -1
        """The backward (graph task) at whose end every block leaves."""
        self._stream: torch.cuda.Stream | None = None
        pin = torch.cuda.is_available()
        for index, block in enumerate(self.swapped):
            weights = []
            for module in block.modules():
                for slots in (module._parameters, module._buffers):
                    for name, tensor in list(slots.items()):
                        if tensor is None or tensor.dim() == 0:  # a scalar stays
                            continue
                        weight = _Weight(module, slots, name, _stored(tensor.detach(), pin))
                        weight.empty(tensor.device)
                        weights.append(weight)
            self._weights.append(weights)
            block.forward = partial(self._forward, index, block.forward)
        if count < len(blocks):  # the last resident block starts the first swapped one's copy
            blocks[-count - 1].register_forward_pre_hook(self._before_first)

    # ----------------------------------------------------------------------------- running

    def _forward(self, index: int, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        """Swapped block ``index``'s forward, wrapped: its weights come for the forward and
        leave after it; when gradients flow, the block runs under checkpointing (the model's,
        or here) and its backward gets its weights through :class:`_Arrive` on its outputs."""
        if _in_backward():  # a checkpoint's recomputation: the weights came with _Arrive
            return forward(*args, **kwargs)
        if not torch.is_grad_enabled():
            return self._run(index, forward, *args, **kwargs)
        if self._checkpointing():
            out = self._run(index, forward, *args, **kwargs)
        else:
            out = checkpoint(self._run, index, forward, *args, use_reentrant=False, **kwargs)
        return _through(partial(_Arrive.apply, self, index), out)

    def _run(self, index: int, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if _in_backward():  # recomputed by the swapper's own checkpoint
            return forward(*args, **kwargs)
        self._arrive(index)
        if index + 1 < len(self.swapped):
            self._prefetch(index + 1)
        try:
            return forward(*args, **kwargs)
        finally:
            self._leave(index)

    def _before_first(self, _module: torch.nn.Module, _args: Any) -> None:
        if not _in_backward():  # the backward reaches the swapped blocks before this one
            self._prefetch(0)

    def backward_arrives(self, index: int) -> None:
        """The backward reached block ``index``'s outputs: the blocks after it are done (their
        backward produced these outputs' gradients, and autograd runs the nodes made later in
        the forward first), so their weights leave; block ``index``'s come (for it and any
        checkpoint inside it to recompute), the block before it starts copying, and once the
        backward ends no block stays. Nothing is added at a block's inputs: gradients that
        several blocks send to one tensor add up in the same order as without the swap."""
        task = torch._C._current_graph_task_id()
        if task != self._cleared_after:
            self._cleared_after = task
            torch.autograd.Variable._execution_engine.queue_callback(self._leave_all)
        for done in [i for i in self._resident if i > index]:
            self._leave(done)
        self._arrive(index)
        if index > 0:
            self._prefetch(index - 1)

    def _leave_all(self) -> None:
        for index in list(self._resident):
            self._leave(index)

    # ---------------------------------------------------------------------------- copying

    def _prefetch(self, index: int) -> None:
        """Start copying block ``index``'s weights to the device its placeholders are on."""
        if index in self._arriving:
            return
        weights = self._weights[index]
        device = weights[0].device if weights else torch.device("cpu")
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            # The copies run beside the compute; the memory they fill is the side stream's
            # own (the allocator keeps pools per stream, and record_stream below).
            with torch.cuda.stream(self._stream):
                copies = [w.stored.to(device, non_blocking=True) for w in weights]
                done = torch.cuda.Event()
                done.record(self._stream)
        else:
            copies = [w.stored.to(device, copy=True) for w in weights]
            done = None
        self._arriving[index] = _Arrival(copies, done)
        self.transfers += 1

    def _arrive(self, index: int) -> None:
        """Put block ``index``'s weights in place, waiting for their copy to finish."""
        if index in self._resident:
            return
        self._resident.add(index)
        self._prefetch(index)
        arrival = self._arriving.pop(index)
        if arrival.done is not None:
            stream = torch.cuda.current_stream(arrival.copies[0].device)
            stream.wait_event(arrival.done)
            for copy in arrival.copies:
                # Freed later, the copy's memory must not be reused before the compute is done.
                copy.record_stream(stream)
        for weight, copy in zip(self._weights[index], arrival.copies, strict=True):
            weight.put(copy)

    def _leave(self, index: int) -> None:
        """Block ``index`` ran: its placeholders come back (what the backward still needs of
        the weights, autograd keeps until then)."""
        self._resident.discard(index)
        for weight in self._weights[index]:
            weight.empty(weight.device)


def _stored(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """``tensor``'s values in CPU memory: pinned (page-locked, so that copies to the GPU are
    asynchronous) when ``pin``; a tensor already in CPU memory otherwise kept as it is (frozen:
    nothing writes to it)."""
    if pin and type(tensor) is torch.Tensor:
        stored = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return stored.copy_(tensor)
    return tensor.to("cpu")


class _Arrive(torch.autograd.Function):
    """Identity on a swapped block's outputs; its backward, the first of the block's, brings
    the block's weights."""

    @staticmethod
    def forward(ctx: Any, swapper: BlockSwapper, index: int, tensor: torch.Tensor) -> Any:
        ctx.swapper, ctx.index = swapper, index
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        ctx.swapper.backward_arrives(ctx.index)
        return None, None, grad


def _through(function: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """``tree`` (nested tuples, lists and dicts) with each tensor that requires a gradient
    passed through ``function``, once: a tensor found twice (a UNet block returns its output
    also as its last skip) stays one tensor, so its gradients add up in the same order."""
    leaves, spec = tree_flatten(tree)
    passed: dict[int, torch.Tensor] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            if id(leaf) not in passed:
                passed[id(leaf)] = function(leaf)
            leaves[i] = passed[id(leaf)]
    return tree_unflatten(leaves, spec)


def _in_backward() -> bool:
    """Whether this runs inside a backward (a checkpointed block's recomputation)."""
    return torch._C._current_graph_task_id() != -1


def swap_blocks(
    denoiser: torch.nn.Module, blocks: Sequence[torch.nn.Module], count: int
) -> BlockSwapper:
    """Swap the last ``count`` of ``denoiser``'s ``blocks`` (its repeated blocks in forward
    order); the swapper is kept on the denoiser (``block_swapper``) for its transfer count."""
    swapper = BlockSwapper(
        blocks, count, lambda: bool(getattr(denoiser, "gradient_checkpointing", False))
    )
    denoiser.block_swapper = swapper
    return swapper
