"""``training.compile``: the denoiser's blocks compiled one by one (regional compilation).

Each of ``family.blocks(denoiser)`` is compiled on its own (``block.compile()``, torch.compile's
default backend, Inductor); the code around the blocks (embeddings, the output layer) stays
eager. The blocks of a model share one class and one forward, so one graph serves every block of
one shape: the compile cost is one block's, not the whole model's, and does not grow with the
block count.

What a training step compiles, measured on a tiny WAN transformer with the teacher on (the
recompilation log and ``torch._dynamo``'s graph counter), all of it during the first step:

- the teacher's forward: no gradients and the adapter off, one graph;
- the student's forward and backward: one graph for the first block (its input needs no
  gradient) and one for the blocks after it (theirs does);
- nothing after that: the teacher switch (:func:`modules.lora.lora_disabled`, peft's
  ``enable_adapters``) sets the adapter weights' ``requires_grad``, which the compiled graphs
  guard on, so switching does select another graph, but both are compiled in the first step
  and reused from then on. The teacher runs without gradients, which needs a graph of its own
  anyway. A LoRA multiplier of 0 instead of the switch does not avoid the recompilation either:
  peft's ``scaling`` is a Python number the graph guards on (``scaling['default'] == 1.0``
  failed and the blocks recompiled, measured the same way); it would also still compute the
  LoRA's layers and draw the LoRA dropout's random numbers, and 0 times an infinite value is
  not 0. The switch stays, and the teacher is the base model's blocks compiled the same way,
  bit for bit (with Inductor's fused kernels the sums round differently from the eager model's:
  at most 2.4e-6 on the demo transformer's outputs of up to 15; the compiled run's base model
  is the compiled one).

Shapes are static (``dynamic=False``): each new input shape (another bucket, the teacher's
share of a batch when it changes size, the samples, the drift meter) compiles once more, then
its graph is reused. Dynamic shapes were tried first: torch marks a size symbolic after it
changes once, and Inductor failed on the demo UNet's blocks with symbolic sizes.

Block swap is refused together with compile: compiling a swapped block traces the swapper's
Python (its transfers, its counter), which gave 10 graphs instead of 3 and a recompilation in
the second step on the tiny WAN; the config says so before anything loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def compile_blocks(
    denoiser: torch.nn.Module,
    blocks: Callable[[torch.nn.Module], Sequence[torch.nn.Module]],
    *,
    backend: str = "inductor",
) -> int:
    """Compile each of ``blocks(denoiser)`` in place (the next forward of each compiles it);
    the number of blocks compiled. ``backend``: torch.compile's (a run uses Inductor, which
    generates the kernels; ``aot_eager`` captures and guards the same graphs and runs them
    without code generation, seconds instead of a minute on a CPU)."""
    chosen = list(blocks(denoiser))
    if not chosen:
        raise ValueError("training.compile: the model has no blocks to compile")
    if getattr(denoiser, "block_swapper", None) is not None:
        raise ValueError(COMBINED)
    # One graph per shape and mode: more than torch's default of 8 per function (the teacher's
    # share of a batch changes size from step to step, buckets, samples, the drift meter).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
    for block in chosen:
        block.compile(backend=backend, dynamic=False)
    return len(chosen)


RECOMPILES = 64
"""Graphs kept per compiled function; past that torch runs the block uncompiled (and warns)."""


COMBINED = (
    "training.compile with model.memory.blocks_to_swap: the compiled blocks would trace the "
    "block swap's transfers; set model.memory.blocks_to_swap=0 or training.compile=false"
)
