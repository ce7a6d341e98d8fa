"""The memory options (``model.memory``), applied to any family's denoiser after it loads.

A family loads its base model as the files give it; where the frozen weights live and in what
form is decided here, the same way for every family, so that no family carries memory code of
its own. :func:`load_model` is the one way a run, a script or a benchmark loads a base model
(the family's ``load``, then the memory options). A family that loads another denoiser later
(WAN 2.2's second expert, for samples) calls ``LoadedModel.prepare_denoiser`` on it, which
:func:`load_model` sets.

- ``base_weights="fp8"``: every frozen weight is stored in float8 (e4m3) and each layer upcasts
  its own to the compute dtype (``model.dtype``) for its forward only (diffusers' layerwise
  casting, which skips norms, embeddings of positions and patches, and LoRA layers). LoRA layers
  added afterwards keep their own dtype and train; the teacher, the same modules with the adapter
  off, runs on the same stored weights.
- ``base_weights="fp8_scaled"``, ``"int8"``, ``"nf4"``: each linear layer of the family's blocks
  keeps its weight as codes and a scale and dequantises it for its own forward
  (:mod:`modules.models.base_weights`); peft's LoRA wraps that layer as it wraps any linear one.
- ``blocks_to_swap=N``: the last N of the family's blocks keep their stored weights in CPU
  memory and bring them to the device only while they run (:mod:`modules.models.block_swap`).
  ``auto`` is resolved from the config's memory estimate before the model loads
  (:func:`modules.models.memory_estimate.resolve_blocks_to_swap`: a run does it).
- Experts trained in one run (WAN 2.2 A14B, ``model.wan.expert=both``): each gets the options
  above, and :func:`switch_denoiser` keeps the one in use on the device, the other in pinned
  CPU memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

import torch
from diffusers import ModelMixin
from diffusers.hooks import apply_layerwise_casting
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

from modules.models.base import LoadedModel, ModelFamily
from modules.models.base_weights import Blocks, QuantisedLinear, store_quantised
from modules.models.block_swap import swap_blocks

if TYPE_CHECKING:
    from modules.config.schema import MemoryConfig, ModelConfig

FP8_STORAGE = torch.float8_e4m3fn
"""``base_weights="fp8"``: 3 mantissa bits and the range of ±448, the float8 form GPUs compute
with; weights of a trained model sit well inside that range."""


def load_model(
    family: ModelFamily, config: ModelConfig, *, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """The base model of ``config`` (``model``) loaded by ``family`` in ``dtype`` for
    ``device``, with the memory options applied to its denoiser."""
    model = family.load(config.path, dtype=dtype, device=device)
    apply_memory(model, config.memory, compute_dtype=dtype, blocks=family.blocks)
    return model


def apply_memory(
    model: LoadedModel,
    memory: MemoryConfig,
    *,
    compute_dtype: torch.dtype,
    blocks: Blocks | None = None,
) -> None:
    """Apply ``memory`` to ``model.denoiser`` and leave the same preparation in
    ``model.prepare_denoiser`` for any denoiser the family loads later. ``blocks`` (the
    family's) says which layers the quantised forms store; without it, every linear layer."""
    prepare = partial(prepare_denoiser, memory=memory, compute_dtype=compute_dtype, blocks=blocks)
    prepare(model.denoiser)
    if model.experts is not None:  # WAN 2.2 A14B trained whole: each expert alike
        for denoiser in model.experts.denoisers.values():
            if denoiser is not model.denoiser:
                prepare(denoiser)
    model.prepare_denoiser = prepare


def prepare_denoiser(
    denoiser: torch.nn.Module,
    *,
    memory: MemoryConfig,
    compute_dtype: torch.dtype,
    blocks: Blocks | None = None,
) -> None:
    """Store ``denoiser``'s frozen weights as ``memory`` says, in place."""
    if memory.blocks_to_swap == "auto":
        raise ValueError(
            "model.memory.blocks_to_swap=auto is a count to resolve before loading "
            "(modules.models.memory_estimate.resolve_blocks_to_swap)"
        )
    if memory.base_weights == "fp8":
        store_in_fp8(denoiser, compute_dtype)
    elif memory.base_weights != "auto":
        chosen = None if blocks is None else blocks(denoiser)
        store_quantised(denoiser, memory.base_weights, compute_dtype, chosen)
    if memory.blocks_to_swap:  # after the storage form: the CPU copy holds the stored form
        if blocks is None:
            raise ValueError("model.memory.blocks_to_swap needs the family's blocks")
        swap_blocks(denoiser, blocks(denoiser), memory.blocks_to_swap)


def switch_denoiser(
    active: torch.nn.Module, others: Iterable[torch.nn.Module], device: torch.device
) -> None:
    """``active`` on ``device``, each of ``others`` in CPU memory: the experts of a model
    trained whole (WAN 2.2 A14B) take turns on the GPU. On CUDA the parked weights are pinned,
    so that bringing them back is a fast copy; on a CPU device nothing moves. The parameters
    stay the same objects (the optimizer holds them), only their storage moves."""
    if device.type != "cpu":
        for other in others:
            if other is not active and next(other.parameters()).device.type != "cpu":
                park_denoiser(other)
    if next(active.parameters()).device != device:
        active.to(device)


def park_denoiser(denoiser: torch.nn.Module) -> None:
    """Move ``denoiser``'s frozen parameters and buffers to pinned CPU memory (a block-swapped
    block's placeholders too; its weights are already there). The trained ones (a LoRA) stay:
    they are small, and the optimizer and the step's checks read them on the device.

    The frozen values never change, so the CPU copy made at the first park is kept and reused:
    parking again only lets the device's copy go (no copy back, no new pinned memory)."""
    pin = torch.cuda.is_available()
    kept: dict[tuple[int, str], torch.Tensor] = denoiser.__dict__.setdefault("_parked", {})
    for module in denoiser.modules():
        for kind, slots in (("p", module._parameters), ("b", module._buffers)):
            for name, tensor in slots.items():
                if tensor is None or tensor.device.type == "cpu" or tensor.requires_grad:
                    continue
                key = (id(module), f"{kind}.{name}")
                stored = kept.get(key)
                if stored is None or stored.shape != tensor.shape or stored.dtype != tensor.dtype:
                    stored = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
                    stored.copy_(tensor.detach())
                    kept[key] = stored
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = stored  # the same Parameter: the optimizer's stays valid
                else:
                    slots[name] = stored


def store_in_fp8(denoiser: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep the weights of ``denoiser`` in float8 (e4m3), each layer upcast to ``compute_dtype``
    for its forward only: about half the memory of bfloat16. A diffusers model also keeps the
    modules its class lists as precision-sensitive (``_keep_in_fp32_modules``,
    ``_skip_layerwise_casting_patterns``) as they are; any other module keeps diffusers' default
    skips (norms, position and patch embeddings)."""
    kept = (QuantisedLinear,)  # a scaled fp8 file's layers: already 8 bits, with their scales
    if isinstance(denoiser, ModelMixin):
        denoiser.enable_layerwise_casting(
            storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype, skip_modules_classes=kept
        )
    else:
        apply_layerwise_casting(
            denoiser,
            storage_dtype=FP8_STORAGE,
            compute_dtype=compute_dtype,
            skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN,
            skip_modules_classes=kept,
        )
