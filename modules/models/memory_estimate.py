"""The estimated peak GPU memory of a config, before anything loads (``check``, the start of a
run, the Model tab), and ``model.memory.blocks_to_swap=auto``.

Pure arithmetic on sizes read from the model folder's files (``config.json`` and the
safetensors headers, which list every tensor's shape: no weights are read, no torch) or, where
``model.path`` is not a folder of the family, from :data:`PUBLISHED`: the sizes of the released
models, counted once from the diffusers classes built with their published configs.

The estimate is the larger of two phases (the cache fills before training, the text encoder and
VAE are freed before the denoiser moves to the GPU, as every family here does):

- **cache**: text encoder and VAE weights in ``model.dtype`` plus the VAE's working memory,
  ``VAE_BYTES_PER_PIXEL`` x height x width (x 4 frames for video: the VAE encodes causal chunks);
- **training**:

  - base weights: the resident blocks (all but ``blocks_to_swap``) at the storage form's bytes
    per weight (:data:`BYTES_PER_WEIGHT`, the README's table), plus the two largest swapped
    blocks (the one running and the next arriving) when any is swapped; the weights outside the
    blocks at ``model.dtype``'s bytes (fp8 stores them in one byte too);
  - LoRA: rank x (in + out) weights per targeted linear layer, float32 weights and gradients,
    and the optimizer's state (:func:`optimizer_state_bytes`, as measured in the README);
  - activations, for a sequence of T tokens (bucket side / pixel multiple, squared, x latent
    frames, + the text tokens of the families that attend jointly), hidden size h, batch b, in
    2-byte compute precision: ``ACTIVATION_CONSTANT`` x T x h x b bytes per block that keeps its
    activations (34: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", for a block with flash attention), and 2 x T x h x b (its input) per
    checkpointed block, plus one block recomputed in full during the backward (beside the input
    it kept: 34 - 2 more). The count of swapped blocks never raises the estimate: each swapped
    block costs its input instead of its activations, and while the first two run, the weights
    it frees are the ones in flight. Swapped blocks are
    always checkpointed (:mod:`modules.models.block_swap`);
  - the teacher's extra forward with prior preservation: no gradients, one block's working
    memory at a time, ``TEACHER_CONSTANT`` x T x h x b;
  - ``CUDA_CONTEXT_GB`` for the CUDA context and the allocator's reserve.

It ignores the latents and text encodings of a batch, the dequantised copy of one layer at a
time, fragmentation beyond the fixed reserve, and attention implementations that store the score
matrix. What it says is an estimate: on real GPUs it has not been compared with measurements.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modules.config.schema import TrainConfig

GB = 1e9
ACTIVATION_CONSTANT = 34
"""Bytes per token per hidden unit of a block that keeps its activations (2-byte compute)."""
CHECKPOINT_CONSTANT = 2
"""What a checkpointed block keeps: its input, 2 bytes per token per hidden unit."""
TEACHER_CONSTANT = 16
"""The teacher's no-grad forward: one block's working memory at a time."""
VAE_BYTES_PER_PIXEL = 1536
"""The VAE's working memory while it encodes: about 6 live 128-channel maps in 2 bytes."""
CUDA_CONTEXT_GB = 1.0
"""The CUDA context (kernels, cuBLAS workspaces) and the allocator's reserve."""

BYTES_PER_WEIGHT = {"fp8": 1.0, "fp8_scaled": 1.0, "int8": 1.0, "nf4": 0.56}
"""Stored bytes per base weight of each ``model.memory.base_weights`` (``auto``: the dtype's)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SMALLER_OPTIMIZERS = ("adamw8bit", "adafactor")


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs of a model, in parameters (counts, not bytes)."""

    source: str
    """Where the sizes come from, in words ("the folder's files", "published WAN 2.2 A14B")."""
    blocks: tuple[int, ...]
    """Parameters of each repeated block of the denoiser, in forward order."""
    outside: int
    """Denoiser parameters outside the blocks."""
    hidden: int
    lora_layers: dict[str, tuple[tuple[int, int, int], ...]]
    """``lora.targets`` preset → (in, out, how many) of the linear layers it targets."""
    text_encoder: int
    vae: int


PUBLISHED: dict[str, dict[str, ModelSizes | None]] = {
    "wan": {
        "14b": ModelSizes(
            "published WAN 2.1 / 2.2 14B (A14B: one expert)",
            blocks=(351_394_304,) * 40,
            outside=232_719_424,
            hidden=5120,
            lora_layers={
                "attention": ((5120, 5120, 320),),
                "attention_ffn": ((5120, 5120, 320), (5120, 13824, 40), (13824, 5120, 40)),
            },
            text_encoder=5_680_000_000,  # UMT5-XXL encoder
            vae=127_000_000,
        ),
        "5b": ModelSizes(
            "published WAN 2.2 TI2V 5B",
            blocks=(163_656_704,) * 30,
            outside=90_086_592,
            hidden=3072,
            lora_layers={
                "attention": ((3072, 3072, 240),),
                "attention_ffn": ((3072, 3072, 240), (3072, 14336, 30), (14336, 3072, 30)),
            },
            text_encoder=5_680_000_000,
            vae=705_000_000,  # the 2.2 VAE
        ),
        "1.3b": ModelSizes(
            "published WAN 2.1 1.3B",
            blocks=(46_440_704,) * 30,
            outside=25_775_680,
            hidden=1536,
            lora_layers={
                "attention": ((1536, 1536, 240),),
                "attention_ffn": ((1536, 1536, 240), (1536, 8960, 30), (8960, 1536, 30)),
            },
            text_encoder=5_680_000_000,
            vae=127_000_000,
        ),
    },
    "qwen_image": {
        "": ModelSizes(
            "published Qwen-Image (20B)",
            blocks=(339_831_296,) * 60,
            outside=40_523_328,
            hidden=3072,
            lora_layers={
                "attention": ((3072, 3072, 480),),
                "attention_ffn": ((3072, 3072, 480), (3072, 12288, 120), (12288, 3072, 120)),
            },
            text_encoder=8_290_000_000,  # Qwen2.5-VL 7B
            vae=127_000_000,
        )
    },
    "flux2": {
        "klein": None,  # the klein models: sizes from their folder only
        "": ModelSizes(
            "published FLUX.2 dev (32B)",
            blocks=(981_467_648,) * 8 + (490_733_824,) * 48,
            outside=816_316_416,
            hidden=6144,
            lora_layers={
                "attention": ((6144, 6144, 64), (6144, 55296, 48)),
                "attention_ffn": (
                    (6144, 6144, 64),
                    (6144, 36864, 16),
                    (18432, 6144, 16),
                    (6144, 55296, 48),
                ),
            },
            text_encoder=24_000_000_000,  # Mistral Small 3.1 24B
            vae=84_000_000,
        ),
    },
    "flux1": {
        "": ModelSizes(
            "published FLUX.1 dev (12B)",
            blocks=(339_831_296,) * 19 + (141_591_808,) * 38,
            outside=64_124_992,
            hidden=3072,
            lora_layers={
                "attention": ((3072, 3072, 266),),
                "attention_ffn": (
                    (3072, 3072, 266),
                    (3072, 12288, 76),
                    (12288, 3072, 38),
                    (15360, 3072, 38),
                    (3072, 64, 1),
                ),
            },
            text_encoder=4_880_000_000,  # T5-XXL encoder and CLIP-L
            vae=84_000_000,
        )
    },
}
"""Family → a word of ``model.path`` that picks the model ("" for any) → its sizes. Counted from
the diffusers classes with the published configs; text encoders and VAEs rounded."""


@dataclass(frozen=True)
class Estimate:
    """Peak GPU memory in GB, by part."""

    base_weights: float
    lora: float
    activations: float
    teacher: float
    context: float
    cache_phase: float
    resident: int
    blocks: int
    tokens: int

    @property
    def training(self) -> float:
        return self.base_weights + self.lora + self.activations + self.teacher + self.context

    @property
    def peak(self) -> float:
        return max(self.training, self.cache_phase)


def model_sizes(config: TrainConfig) -> ModelSizes | None:
    """The sizes of ``config.model``'s model: from its folder where it is one, else the published
    model the family trains (WAN: 1.3B or 5B when the path says so, else 14B); None for a family
    without published sizes (the demo's) and a single-file transformer of unknown size."""
    model = config.model
    folder = Path(model.path).expanduser() if model.path else None
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        found = _folder_sizes(folder, config)
        if found is not None:
            return found
    published = PUBLISHED.get(model.family, {})
    path = model.path.lower()
    for word, sizes in published.items():
        if word and word in path:
            return sizes
    return published.get("", published.get("14b"))


def estimate(config: TrainConfig, sizes: ModelSizes, blocks_to_swap: int | None = None) -> Estimate:
    """The estimate of ``config`` for a model of ``sizes`` (see the module docstring);
    ``blocks_to_swap`` overrides ``model.memory.blocks_to_swap`` (which may be ``auto``)."""
    model, training = config.model, config.training
    swap = model.memory.blocks_to_swap if blocks_to_swap is None else blocks_to_swap
    count = len(sizes.blocks)
    swap = min(int(swap) if swap != "auto" else 0, count)
    dtype_bytes = DTYPE_BYTES[model.dtype]
    form = model.memory.base_weights
    weight_bytes = BYTES_PER_WEIGHT.get(form, dtype_bytes)
    outside_bytes = 1 if form == "fp8" else dtype_bytes
    resident = sizes.blocks[: count - swap]
    in_flight = sorted(sizes.blocks[count - swap :], reverse=True)[:2]
    base = (sum(resident) + sum(in_flight)) * weight_bytes + sizes.outside * outside_bytes

    lora = lora_bytes(sizes.lora_layers.get(config.lora.targets, ()), config)

    tokens = token_count(config)
    scale = training.batch_size * tokens * sizes.hidden
    scale *= 1.0 if training.mixed_precision != "no" else dtype_bytes / 2
    full = ACTIVATION_CONSTANT * scale
    kept = CHECKPOINT_CONSTANT * scale
    checkpointed = count if training.gradient_checkpointing else swap
    activations = (count - checkpointed) * full + checkpointed * kept
    if checkpointed:
        activations += full - kept  # one block recomputed in full, beside its kept input
    teacher = TEACHER_CONSTANT * scale if config.prior.weight > 0 else 0.0

    cache = (sizes.text_encoder + sizes.vae) * dtype_bytes
    side = config.data.resolution
    cache += VAE_BYTES_PER_PIXEL * side * side * (4 if config.data.frames > 1 else 1)
    return Estimate(
        base_weights=base / GB,
        lora=lora / GB,
        activations=activations / GB,
        teacher=teacher / GB,
        context=CUDA_CONTEXT_GB,
        cache_phase=cache / GB + CUDA_CONTEXT_GB,
        resident=count - swap,
        blocks=count,
        tokens=tokens,
    )


def lora_bytes(layers: tuple[tuple[int, int, int], ...], config: TrainConfig) -> float:
    """Float32 LoRA weights and gradients plus the optimizer's state, in bytes."""
    rank = config.lora.rank
    shapes = []
    for fan_in, fan_out, times in layers:
        shapes += [(rank, fan_in)] * times + [(fan_out, rank)] * times  # lora_A, lora_B
    params = sum(rows * cols for rows, cols in shapes)
    return 8 * params + optimizer_state_bytes(config.training.optimizer, shapes)


def optimizer_state_bytes(optimizer: str, shapes: list[tuple[int, int]]) -> float:
    """The state ``training.optimizer`` keeps for matrices of ``shapes`` (the README's measured
    table): AdamW 2 floats per weight; AdamW8bit 2 bytes per weight from 4096 values on (plus a
    float per 256), else AdamW's; Adafactor a float per row and column; CAME a float per weight
    and per row and column of two factored moments; Prodigy 4 floats; SGD 1."""
    total = 0.0
    for rows, cols in shapes:
        n = rows * cols
        if optimizer == "adamw8bit":
            total += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
        elif optimizer == "adafactor":
            total += 4 * (rows + cols)
        elif optimizer == "came":
            total += 4 * n + 8 * (rows + cols)
        elif optimizer == "prodigy":
            total += 16 * n
        elif optimizer == "sgd":
            total += 4 * n
        else:
            total += 8 * n
    return total


def token_count(config: TrainConfig) -> int:
    """Tokens per sample of the run's usual bucket (about ``data.resolution`` squared): the
    latent grid's tokens x latent frames (WAN: 4x temporal compression), plus the text tokens
    of a family whose blocks attend to image and text jointly (``model.<family>.text_tokens``)."""
    from modules.models.registry import family_spec

    spec = family_spec(config.model.family)
    side = config.data.resolution // spec.latent_grid(config.model.path).pixel_multiple
    frames = (config.data.frames - 1) // 4 + 1 if spec.video else 1
    options = getattr(config.model, config.model.family, None)
    text = getattr(options, "text_tokens", None) or 0
    return (
        side * side * frames
        + (text if config.model.family != "wan" else 0)
        + reference_tokens(config)
    )


REFERENCE_PIXELS = 1024 * 1024
"""The area the edit pipelines encode a reference at, at most (Qwen-Image-Edit's VAE size,
FLUX.1 Kontext's preferred resolutions, FLUX.2's limit)."""


def reference_tokens(config: TrainConfig) -> int:
    """An edit model's reference tokens beside the target's, counted at the most references
    the run allows, each at the pipelines' largest reference area (smaller references cost
    less): 0 for a model without references."""
    from modules.models.registry import conditioning_kinds, family_spec

    most = max(
        (k.most for k in conditioning_kinds(config.model) if k.source == "references"), default=0
    )
    if not most:
        return 0
    options = getattr(config.model, config.model.family, None)
    pixels = getattr(options, "reference_pixels", None) or REFERENCE_PIXELS
    multiple = family_spec(config.model.family).latent_grid(config.model.path).pixel_multiple
    return most * pixels // (multiple * multiple)


def fitting_swap(config: TrainConfig, sizes: ModelSizes, budget_gb: float) -> int | None:
    """The smallest ``blocks_to_swap`` whose training phase fits ``budget_gb``; None if even
    every block swapped does not. The estimate does not grow with the count, so the first fit
    is the smallest."""
    for swap in range(len(sizes.blocks) + 1):
        if estimate(config, sizes, swap).training <= budget_gb:
            return swap
    return None


def resolve_blocks_to_swap(config: TrainConfig) -> TrainConfig:
    """``config`` with ``blocks_to_swap=auto`` replaced by the count :func:`fitting_swap`
    gives (every block where none fits; 0 where the model's sizes are unknown)."""
    memory = config.model.memory
    if memory.blocks_to_swap != "auto":
        return config
    sizes = model_sizes(config)
    count = 0
    if sizes is not None and memory.vram_gb is not None:
        found = fitting_swap(config, sizes, memory.vram_gb)
        count = len(sizes.blocks) if found is None else found
    resolved = memory.model_copy(update={"blocks_to_swap": count})
    return config.model_copy(update={"model": config.model.model_copy(update={"memory": resolved})})


def estimate_lines(config: TrainConfig) -> list[str]:
    """What ``check``, the start of a run and the Model tab say: the estimate by part, and the
    options that would bring it under ``model.memory.vram_gb``."""
    sizes = model_sizes(config)
    if sizes is None:  # the demo model (small, on any device) and FLUX.2 klein without a folder
        return []
    memory = config.model.memory
    swap = memory.blocks_to_swap
    if swap == "auto":
        swap = resolve_blocks_to_swap(config).model.memory.blocks_to_swap
    found = estimate(config, sizes, swap)
    form = memory.base_weights if memory.base_weights != "auto" else config.model.dtype
    checkpointing = "with" if config.training.gradient_checkpointing else "without"
    lines = [
        f"memory estimate (not measured): peak {found.peak:.1f} GB on the GPU; training "
        f"{found.training:.1f} GB = base weights {found.base_weights:.1f} ({form}, "
        f"{found.resident} of {found.blocks} blocks resident) + LoRA and "
        f"{config.training.optimizer} state {found.lora:.2f} + activations "
        f"{found.activations:.1f} ({config.training.batch_size} x {found.tokens:,} tokens, "
        f"{checkpointing} checkpointing) + teacher {found.teacher:.1f} + CUDA "
        f"{found.context:.1f}; while the cache fills {found.cache_phase:.1f} (text encoder and "
        f"VAE); sizes: {sizes.source}"
    ]
    if memory.blocks_to_swap == "auto":
        lines.append(f"memory estimate: blocks_to_swap=auto swaps {swap} blocks")
    budget = memory.vram_gb
    if budget is None:
        return lines
    if found.peak <= budget:
        lines.append(f"memory estimate: fits model.memory.vram_gb={budget:g}")
        return lines
    lines.append(
        f"memory estimate: {found.peak:.1f} GB is over model.memory.vram_gb={budget:g}; "
        + _what_fits(config, sizes, budget, found)
    )
    return lines


def _what_fits(config: TrainConfig, sizes: ModelSizes, budget: float, now: Estimate) -> str:
    if now.cache_phase > budget:
        return (
            f"the cache phase alone needs {now.cache_phase:.1f} GB (text encoder and VAE), "
            "which no memory option changes: fill the cache once on a larger GPU (runs reuse "
            "it: data.cache_dir)"
        )
    options = []
    for form in ("fp8_scaled", "int8", "nf4"):
        changed = _with(config, base_weights=form)
        swap = fitting_swap(changed, sizes, budget)
        if swap is not None:
            extra = f" with model.memory.blocks_to_swap={swap}" if swap else ""
            options.append(f"model.memory.base_weights={form}{extra}")
    swap = fitting_swap(config, sizes, budget)
    if swap is not None:
        options.insert(0, f"model.memory.blocks_to_swap={swap} (or auto)")
    if not config.training.gradient_checkpointing:
        changed = _with(config, gradient_checkpointing=True)
        if estimate(changed, sizes).peak <= budget:
            options.insert(0, "training.gradient_checkpointing=true")
    for optimizer in SMALLER_OPTIMIZERS:
        smaller = _with(config, optimizer=optimizer)
        if optimizer != config.training.optimizer and estimate(smaller, sizes).peak <= budget:
            options.append(f"training.optimizer={optimizer}")
    if not options:
        return "no single option fits: lower data.resolution, data.frames or the batch size"
    return "would fit: " + "; ".join(options)


def _with(config: TrainConfig, **changes: object) -> TrainConfig:
    """``config`` with a memory or training field changed (no validation needed: known values)."""
    if "base_weights" in changes:
        memory = config.model.memory.model_copy(update=changes)
        model = config.model.model_copy(update={"memory": memory})
        return config.model_copy(update={"model": model})
    training = config.training.model_copy(update=changes)
    return config.model_copy(update={"training": training})


BLOCK_NAME = re.compile(r"([a-z_]*blocks|layers|noise_refiner|context_refiner)\.(\d+)\.")
"""A repeated block's weights: ``blocks.N.`` (WAN), ``transformer_blocks.N.`` and
``single_transformer_blocks.N.`` (FLUX, Qwen-Image, Chroma), ``layers.N.`` and the refiners'
(Z-Image)."""


def _folder_sizes(folder: Path, config: TrainConfig) -> ModelSizes | None:
    """Sizes from a diffusers folder: ``transformer/config.json`` for the hidden size, the
    safetensors headers for every tensor's shape."""
    try:
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        if "dim" in transformer:  # Z-Image names its width directly
            hidden = int(transformer["dim"])
        else:
            heads = int(transformer["num_attention_heads"])
            hidden = heads * int(transformer["attention_head_dim"])
        shapes = _shapes(folder / "transformer")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not shapes:
        return None
    blocks: dict[tuple[str, int], int] = Counter()
    outside = 0
    for name, shape in shapes.items():
        found = BLOCK_NAME.match(name)
        if found:
            blocks[(found[1], int(found[2]))] += math.prod(shape)
        else:
            outside += math.prod(shape)
    order = sorted(blocks, key=lambda key: (key[0].startswith("single"), key[0], key[1]))
    from modules.models.registry import family_spec

    spec = family_spec(config.model.family)
    layers = {}
    for preset, targets in spec.lora_targets.items():
        groups: Counter[tuple[int, int]] = Counter()
        for name, shape in shapes.items():
            module = name.removesuffix(".weight")
            linear = len(shape) == 2 and name.endswith(".weight")
            if linear and any(module == t or module.endswith("." + t) for t in targets):
                groups[(shape[1], shape[0])] += 1  # a linear weight is (out, in)
        layers[preset] = tuple((i, o, n) for (i, o), n in groups.items())
    count = lambda part: sum(math.prod(s) for s in _shapes(folder / part).values())  # noqa: E731
    return ModelSizes(
        "the model folder's files",
        blocks=tuple(blocks[key] for key in order),
        outside=outside,
        hidden=hidden,
        lora_layers=layers,
        # WAN 2.1 image-to-video's CLIP image encoder is on the GPU while the cache fills too.
        text_encoder=count("text_encoder") + count("text_encoder_2") + count("image_encoder"),
        vae=count("vae"),
    )


def _shapes(part: Path) -> dict[str, list[int]]:
    """Every tensor's shape in ``part``'s safetensors files, from their headers (an 8-byte
    length, then JSON)."""
    shapes: dict[str, list[int]] = {}
    if not part.is_dir():
        return shapes
    for file in sorted(part.glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = entry["shape"]
    return shapes
