"""What the memory options cost and save: peak GPU memory and seconds per step of each family's
denoiser at its published size, for the shapes of its budget preset, and the memory estimate's
error against what was measured.

Each family's denoiser (WAN 2.2 T2V A14B, one expert; Qwen-Image; FLUX.2 dev) is built from
its published ``transformer/config.json`` (written out below) with random weights, no download:
on the meta device first, then each weight made on the device in the model's dtype. From there
it goes the way a run's model goes: the memory options through the memory seam
(``modules.models.memory.apply_memory``), the LoRA (``modules.lora.add_lora``), the run's
optimizer, and the real training step (``modules.trainer.step.train_step``: masks, the teacher)
with its backward and optimizer step. The config is the family's budget preset
(``presets/*-24gb.json``: resolution, frames, batch, LoRA, optimizer, precision, checkpointing)
with each variant's changes:

- ``masked``: the preset's base weights, no block swapped, prior weight 0 (no teacher);
- ``teacher``: the same with prior weight 1 (the teacher runs on every sample);
- ``swap N``: the teacher with N blocks swapped: a quarter, half and all of them;
- ``preset (auto: N)``: the preset as it is, ``blocks_to_swap=auto`` resolved (real size);
- ``bf16``, ``fp8``, ``int8``, ``nf4``: the teacher with each other storage form of the base
  weights (the presets' own, ``fp8_scaled``, is ``teacher``'s).

Sizes: ``--size real`` (a CUDA GPU) builds the published models at the preset's shapes;
``--size small`` (the default without a GPU) the same configs with fewer, narrower layers and
tiny shapes, so that everything runs in seconds on a CPU. The variants are measured in
interleaved rounds in one process; on a GPU one model at a time (they do not fit together),
its variants interleaved.

What the table says, per variant:

- on a GPU: peak memory (``torch.cuda.max_memory_allocated``, reset per variant; the first
  steps included, since they allocate the optimizer's state) and seconds per step (median of
  the rounds), against the estimate's training peak less its CUDA context reserve (which
  ``max_memory_allocated`` does not count either). A variant that does not fit says so;
- on a CPU: seconds per step as a ratio to ``masked`` (never absolute times), and the bytes
  of the base weights, the LoRA with its gradients and the optimizer's state as allocated,
  against the estimate's figures for the same config read from the same model's files;
- both: the base weights' storage dtype (checked against the form), block swap's transfers
  per step (``BlockSwapper.transfers``: 2N, 3N with the teacher) and whether the teacher's
  prediction equals the unswapped model's of the same form exactly. A form that cannot run on
  the device (bitsandbytes without its kernels) is skipped, and the row says why.

    python benchmarks/memory.py                           # a CPU: small size, mechanics, ratios
    python benchmarks/memory.py --size real --json memory.json          # a CUDA GPU
    python benchmarks/memory.py --families wan --variants masked,teacher,"swap 20"
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import init_empty_weights
from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel

from modules.atomic import write_text_atomic
from modules.config import TrainConfig, apply_overrides, load_preset
from modules.data.dataset import Batch
from modules.lora import add_lora, lora_disabled
from modules.models import LoadedModel, ModelFamily, get_family
from modules.models.base_weights import QuantisedLinear, quantise
from modules.models.flux2.family import Flux2Parts
from modules.models.memory import apply_memory
from modules.models.memory_estimate import (
    CUDA_CONTEXT_GB,
    GB,
    ModelSizes,
    estimate,
    model_sizes,
    resolve_blocks_to_swap,
)
from modules.models.model_folder import denoiser_on_device
from modules.models.qwen_image.family import QwenImageParts
from modules.models.registry import family_spec
from modules.models.wan.family import WanParts
from modules.trainer.optimizer import make_optimizer
from modules.trainer.precision import Precision
from modules.trainer.step import StepParts, train_step

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0

# The published transformer/config.json of each model (the diffusers classes' defaults are
# the same values). The benchmark checks that the models they build have the parameter counts
# of the memory estimate's PUBLISHED table.
WAN22_A14B = {  # Wan-AI/Wan2.2-T2V-A14B-Diffusers, transformer/ and transformer_2/ alike
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
QWEN_IMAGE = {  # Qwen/Qwen-Image
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
FLUX2_DEV = {  # black-forest-labs/FLUX.2-dev
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-06,
    "guidance_embeds": True,
}


@dataclass(frozen=True)
class Model:
    """One family's published model, as the benchmark builds it."""

    label: str
    preset: str
    """The budget preset whose shapes and options the variants start from (``presets/``)."""
    transformer: type
    config: dict[str, Any]
    small: dict[str, Any]
    """What ``--size small`` changes in ``config``: fewer, narrower layers."""
    parts: type
    """The family's parts class (the denoiser's device and dtype; no encoders are loaded)."""


MODELS = {
    "wan": Model(
        "WAN 2.2 T2V A14B (one expert)",
        "wan22-a14b-24gb.json",
        WanTransformer3DModel,
        WAN22_A14B,
        {
            "num_layers": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 64,
            "ffn_dim": 512,
            "text_dim": 32,
        },
        WanParts,
    ),
    "qwen_image": Model(
        "Qwen-Image (20B)",
        "qwen-image-24gb.json",
        QwenImageTransformer2DModel,
        QWEN_IMAGE,
        {
            "num_layers": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 64,
            "axes_dims_rope": [16, 24, 24],
            "joint_attention_dim": 32,
        },
        QwenImageParts,
    ),
    "flux2": Model(
        "FLUX.2 dev (32B)",
        "flux2-dev-24gb.json",
        Flux2Transformer2DModel,
        FLUX2_DEV,
        {
            "num_layers": 1,
            "num_single_layers": 3,
            "num_attention_heads": 2,
            "attention_head_dim": 64,
            "axes_dims_rope": [16, 16, 16, 16],
            "joint_attention_dim": 48,
        },
        Flux2Parts,
    ),
}

SMALL = [
    "data.resolution=64",
    "lora.rank=8",
    "lora.alpha=8",
    "training.batch_size=2",
]
"""``--size small``'s shapes; WAN adds 5 frames (2 latent frames), the image families 16 text
tokens."""
FORMS = ("auto", "fp8", "fp8_scaled", "int8", "nf4")
EXPECTED_STORAGE = {
    "fp8": torch.float8_e4m3fn,
    "fp8_scaled": torch.uint8,  # float8 codes kept as bytes, with a float32 scale per row
    "int8": torch.int8,
    "nf4": torch.uint8,  # two 4-bit codes per byte, a float32 absmax per 64 weights
}
"""The dtype a block's linear weight is stored in, per form (``auto``: the model's dtype)."""


@dataclass(frozen=True)
class Variant:
    name: str
    base_weights: str
    blocks_to_swap: int
    prior_weight: float

    @property
    def group(self) -> tuple[str, int]:
        """Variants of one group share one model (only the prior weight differs)."""
        return self.base_weights, self.blocks_to_swap


def variants(config: TrainConfig, blocks: int, real: bool) -> list[Variant]:
    """The variants of a family whose denoiser has ``blocks`` blocks (see the docstring)."""
    form = config.model.memory.base_weights
    found = [Variant("masked", form, 0, 0.0), Variant("teacher", form, 0, 1.0)]
    counts = sorted({max(1, blocks // 4), max(1, blocks // 2), blocks})
    found += [Variant(f"swap {count}", form, count, 1.0) for count in counts]
    if real and config.model.memory.blocks_to_swap == "auto":
        chosen = resolve_blocks_to_swap(config).model.memory.blocks_to_swap
        found.append(Variant(f"preset (auto: {chosen})", form, int(chosen), 1.0))
    for other in FORMS:
        if other != form:
            name = config.model.dtype.replace("bfloat", "bf") if other == "auto" else other
            found.append(Variant(name, other, 0, 1.0))
    return found


@dataclass
class Row:
    """One line of the table (and of ``--json``)."""

    family: str
    """``model.family``."""
    model: str
    variant: str
    base_weights: str
    blocks_to_swap: int
    prior_weight: float
    stored_as: str = "-"
    storage_ok: bool | None = None
    peak_gb: float | None = None
    """GPU: ``max_memory_allocated``; None on a CPU."""
    seconds_per_step: float | None = None
    """GPU only: the CPU's output is ratios."""
    ratio: float | None = None
    """Seconds per step against ``masked`` of the same family."""
    estimate_gb: float | None = None
    """GPU: the training peak less the CUDA context; CPU: base weights + LoRA and state."""
    measured_gb: float | None = None
    """GPU: ``peak_gb``; CPU: the allocated bytes of the base weights, LoRA, grads and state."""
    estimate_error_pct: float | None = None
    transfers_per_step: float | None = None
    teacher_unchanged: bool | None = None
    """The teacher's prediction equals (==) the unswapped model's of the same form."""
    note: str = ""
    times: list[float] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------------------------ building


def published_config(name: str, size: str) -> dict[str, Any]:
    model = MODELS[name]
    return {**model.config, **(model.small if size == "small" else {})}


def build_denoiser(
    name: str, size: str, *, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """The denoiser of ``MODELS[name]`` with random weights, no file read: its parameters made
    on the meta device (no memory), then each one made on ``device`` in ``dtype`` and filled
    from a generator seeded alike for every build, so every variant has the same base weights.
    Buffers (position tables) are computed by the class on the CPU, as when it loads.

    A model whose weights in ``dtype`` would not fit the GPU's free memory is kept in CPU
    memory (each weight made on the GPU, then copied there), as a run loads it: the memory
    options are applied there and it moves to the GPU afterwards, what fits of it."""
    with init_empty_weights(include_buffers=False):
        denoiser = MODELS[name].transformer(**published_config(name, size))
    home = device
    if device.type == "cuda":
        needed = sum(p.numel() for p in denoiser.parameters()) * dtype.itemsize
        if needed > 0.8 * torch.cuda.mem_get_info(device)[0]:
            home = torch.device("cpu")
    generator = torch.Generator(device).manual_seed(SEED)
    for module_name, module in denoiser.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            values = torch.empty(param.shape, dtype=dtype, device=device)
            _fill(values, f"{module_name}.{key}", generator)
            module._parameters[key] = torch.nn.Parameter(values.to(home), requires_grad=False)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(home)
    return denoiser.eval()


@torch.no_grad()
def _fill(values: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """Weights of unit gain (normal, std 1/sqrt(fan in)), norm scales 1, biases small: the
    activations keep their scale through every block, as a trained model's do."""
    if values.dim() >= 2:
        fan_in = values[0].numel()
        values.normal_(0.0, fan_in**-0.5, generator=generator)
    elif name.endswith("bias"):
        values.normal_(0.0, 0.02, generator=generator)
    else:
        values.fill_(1.0)


def parameter_counts(denoiser: torch.nn.Module, family: ModelFamily) -> tuple[tuple[int, ...], int]:
    """Parameters per block (in the family's block order) and outside them."""
    blocks = tuple(sum(p.numel() for p in block.parameters()) for block in family.blocks(denoiser))
    return blocks, sum(p.numel() for p in denoiser.parameters()) - sum(blocks)


def variant_config(base: TrainConfig, variant: Variant) -> TrainConfig:
    return apply_overrides(
        base,
        [
            f"model.memory.base_weights={variant.base_weights}",
            f"model.memory.blocks_to_swap={variant.blocks_to_swap}",
            f"prior.weight={variant.prior_weight}",
        ],
    )


def family_config(name: str, size: str) -> TrainConfig:
    config = load_preset(REPO / "presets" / MODELS[name].preset)
    if size == "small":
        options = [f"model.{name}.text_tokens=16"] if name != "wan" else ["data.frames=5"]
        config = apply_overrides(config, [*SMALL, *options])
    return config


def make_batch(config: TrainConfig, name: str, device_config: dict[str, Any]) -> Batch:
    """Random latents of the config's usual bucket, masks whose left half is outside the mask
    (the prior's region: the teacher runs on every sample), and random prompt encodings of the
    family's layout."""
    spec = family_spec(name)
    data, batch = config.data, config.training.batch_size
    side = data.resolution // spec.latent_grid().pixels_per_cell
    generator = torch.Generator().manual_seed(SEED)
    if name == "wan":
        frames = (data.frames - 1) // 4 + 1
        shape = (batch, device_config["in_channels"], frames, side, side)
        latents = torch.randn(shape, generator=generator)
        text = {"embeds": torch.randn(batch, 512, device_config["text_dim"], generator=generator)}
    else:
        channels = device_config["out_channels"] or device_config["in_channels"]
        latents = torch.randn(batch, channels, side, side, generator=generator)
        tokens = getattr(config.model, name).text_tokens
        width = device_config["joint_attention_dim"]
        text = {"embeds": torch.randn(batch, tokens, width, generator=generator)}
        if name == "qwen_image":
            text["mask"] = torch.ones(batch, tokens, dtype=torch.long)
    masks = torch.ones(batch, 1, *latents.shape[2:])
    masks[..., : side // 2] = 0.0  # the prior's region: the teacher runs there
    return Batch(
        latents=latents,
        masks=masks,
        text=text,
        prior_prediction=torch.zeros(batch, dtype=torch.bool),
        loss_weight=torch.ones(batch),
        has_mask=torch.ones(batch, dtype=torch.bool),
        caption_dropped=torch.zeros(batch, dtype=torch.bool),
    )


@dataclass
class Trainer:
    """One model of a group: its LoRA, optimizer and step parts, and what was measured."""

    family: ModelFamily
    model: LoadedModel
    config: TrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    precision: Precision
    parts: StepParts
    batch: Batch
    grad_bytes: int = 0

    def step(self, prior_weight: float) -> None:
        """One optimizer step as the trainer's loop takes it (backward, clip, step)."""
        result = train_step(self.batch, self.parts, prior_weight)
        self.precision.backward(result.own)
        if not self.grad_bytes:
            self.grad_bytes = _tensor_bytes(p.grad for p in self.params if p.grad is not None)
        self.precision.unscale(self.optimizer)
        self.precision.clip(self.params, self.config.training.max_grad_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher(self) -> torch.Tensor:
        """The teacher's prediction (the adapter off) on the batch at half noise."""
        latents = self.batch.latents.to(self.parts.device)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(SEED + 1))
        fractions = torch.full((latents.shape[0],), 0.5)
        timesteps = self.family.timesteps_from_fractions(fractions, latents.shape)
        timesteps = timesteps.to(self.parts.device)
        noisy, _ = self.family.noisy_input_and_target(latents, noise.to(latents), timesteps)
        text = {key: value.to(self.parts.device) for key, value in self.batch.text.items()}
        with self.precision.autocast(), lora_disabled(self.model.denoiser):
            return self.family.predict(self.model, noisy, timesteps, text).float().cpu()

    @property
    def swapper(self) -> Any:
        return getattr(self.model.denoiser, "block_swapper", None)


def build_trainer(
    name: str, size: str, config: TrainConfig, device: torch.device, batch: Batch
) -> Trainer:
    """The variant's model the way a run makes it: built, the memory options applied through
    the memory seam, the LoRA added, gradient checkpointing, the optimizer, the step's parts."""
    dtype = DTYPES[config.model.dtype]
    family = get_family(config.model)
    if name == "flux2":  # what Flux2Family.load reads from the folder: dev, guided
        family.klein, family.distilled, family.guided = False, False, True
    denoiser = build_denoiser(name, size, dtype=dtype, device=device)
    parts = MODELS[name].parts(
        folder=Path(config.model.path), device=device, dtype=dtype, vae_config={}
    )
    model = LoadedModel(denoiser=denoiser, identity=f"benchmark:{name}:{size}", parts=parts)
    apply_memory(model, config.model.memory, compute_dtype=dtype, blocks=family.blocks)
    denoiser_on_device(model)  # as a run's model moves once its encoders are freed
    torch.manual_seed(config.training.seed)
    lora = config.lora
    targets = family.lora_targets(model)[lora.targets]
    params = add_lora(
        denoiser, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets
    )
    if config.training.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    precision = Precision(config.training.mixed_precision, device)
    step_parts = StepParts(
        family=family,
        model=model,
        student=model,
        mask=config.mask,
        prior=config.prior,
        generator=torch.Generator().manual_seed(config.training.seed),
        mask_rng=random.Random(config.training.seed),
        device=device,
        autocast=precision.autocast,
    )
    optimizer = make_optimizer(config, params)
    return Trainer(family, model, config, params, optimizer, precision, step_parts, batch)


def form_problem(form: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why ``form`` cannot store weights on ``device``, or None: a linear layer is stored and
    run once (bitsandbytes' int8 and nf4 need its kernels for the device)."""
    if form in ("auto", "fp8"):
        return None
    layer = torch.nn.Linear(128, 64, dtype=dtype, device=device)
    try:
        stored = quantise(layer, form, dtype)
        stored(torch.randn(2, 128, dtype=dtype, device=device))
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as error:
        return f"skipped: {form} does not run on {device.type} ({type(error).__name__})"
    return None


# --------------------------------------------------------------------------------- measuring


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def base_bytes(trainer: Trainer) -> int:
    """Bytes of the frozen base weights on the device during a step: the parameters and stored
    buffers (a quantised layer's scales; not the position tables computed at build), the
    swapped blocks' empty placeholders as nothing, plus the two largest swapped blocks (the
    one running and the next arriving, from the swapper's CPU copies)."""
    seen: set[int] = set()
    total = 0
    for module in trainer.model.denoiser.modules():
        kept = [p for p in module._parameters.values() if p is not None and not p.requires_grad]
        kept += [
            b
            for key, b in module._buffers.items()
            if b is not None and key not in module._non_persistent_buffers_set
        ]
        for tensor in kept:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    swapper = trainer.swapper
    if swapper is not None:
        blocks = [_tensor_bytes(w.stored for w in weights) for weights in swapper._weights]
        total += sum(sorted(blocks, reverse=True)[:2])
    return total


def lora_bytes(trainer: Trainer) -> int:
    """The LoRA's float32 weights, their gradients (measured at the first backward) and the
    optimizer's state."""
    state = [
        value
        for entry in trainer.optimizer.state.values()
        for value in entry.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return _tensor_bytes(trainer.params) + trainer.grad_bytes + _tensor_bytes(state)


def stored_as(trainer: Trainer, family: ModelFamily) -> tuple[str, torch.dtype]:
    """How the first block's first linear layer keeps its weight, in words, and the dtype."""
    block = family.blocks(trainer.model.denoiser)[0]
    layer = next(m for m in block.modules() if isinstance(m, torch.nn.Linear) and not _is_lora(m))
    dtype = layer.weight.dtype
    words = str(dtype).removeprefix("torch.")
    if isinstance(layer, QuantisedLinear):
        words = f"{words} codes ({layer.form})"
    return words, dtype


def _is_lora(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def timed_steps(trainer: Trainer, variant: Variant, steps: int, cuda: bool) -> tuple[float, int]:
    """Seconds per step over ``steps`` steps, and the swap's transfers in them."""
    swapper = trainer.swapper
    before = swapper.transfers if swapper is not None else 0
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(variant.prior_weight)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return seconds, (swapper.transfers if swapper is not None else 0) - before


@contextlib.contextmanager
def peak_memory(row: Row, cuda: bool) -> Iterator[None]:
    """Record the peak GPU memory of what runs inside into ``row.peak_gb`` (the largest of
    the variant's rounds)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GB
        row.peak_gb = max(row.peak_gb or 0.0, peak)


# --------------------------------------------------------------------------------- running


@dataclass
class FamilyRun:
    name: str
    size: str
    config: TrainConfig
    sizes: ModelSizes | None
    rows: dict[str, Row]
    teacher_reference: dict[str, torch.Tensor] = field(default_factory=dict)
    """Base-weight form → the unswapped model's teacher prediction."""


def run_family(
    name: str,
    size: str,
    device: torch.device,
    rounds: int,
    steps: int,
    chosen: Sequence[str] | None,
    say: Callable[[str], None],
) -> list[Row]:
    config = family_config(name, size)
    dtype = DTYPES[config.model.dtype]
    family = get_family(config.model)
    with init_empty_weights(include_buffers=False):
        meta = MODELS[name].transformer(**published_config(name, size))
    blocks, outside = parameter_counts(meta, family)
    all_variants = variants(config, len(blocks), size == "real")
    if chosen:
        missing = sorted(set(chosen) - {v.name for v in all_variants})
        if missing:
            known = ", ".join(v.name for v in all_variants)
            say(f"{name}: no variant {', '.join(missing)} (its variants: {known})")
        all_variants = [v for v in all_variants if v.name in chosen or v.name == "masked"]
    batch = make_batch(config, name, published_config(name, size))
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _sizes(name, size, config, Path(tmp), dtype, (blocks, outside), say)
    del meta
    run = FamilyRun(name, size, config, sizes, {})
    for variant in all_variants:
        run.rows[variant.name] = Row(
            name,
            MODELS[name].label,
            variant.name,
            variant.base_weights,
            variant.blocks_to_swap,
            variant.prior_weight,
        )
        problem = form_problem(variant.base_weights, dtype, device)
        if problem:
            run.rows[variant.name].note = problem
    runnable = [v for v in all_variants if not run.rows[v.name].note]
    groups: dict[tuple[str, int], list[Variant]] = {}
    for variant in runnable:
        groups.setdefault(variant.group, []).append(variant)
    # On a CPU every model is kept and the rounds interleave them all; on a GPU one model at
    # a time (they do not fit together), the rounds interleave its variants.
    batches = [list(groups.items())] if not cuda else [[item] for item in groups.items()]
    for chunk in batches:
        trainers = {}
        for group, members in chunk:
            say(f"{name}: building {group[0]}, {group[1]} blocks swapped ({size} size)")
            try:
                trainers[group] = build_trainer(
                    name, size, variant_config(config, members[0]), device, batch
                )
            except torch.OutOfMemoryError:
                for variant in members:
                    run.rows[variant.name].note = "out of memory while building"
            _collect(cuda)
        _measure(run, trainers, chunk, rounds, steps, cuda, say)
        trainers.clear()
        _collect(cuda)
    return _finish(run, all_variants, cuda)


def _measure(
    run: FamilyRun,
    trainers: dict[tuple[str, int], Trainer],
    chunk: list[tuple[tuple[str, int], list[Variant]]],
    rounds: int,
    steps: int,
    cuda: bool,
    say: Callable[[str], None],
) -> None:
    """Warm-up step, then ``rounds`` interleaved rounds of ``steps`` steps per variant; the
    storage dtype, the transfers and the teacher's prediction."""
    live = [(trainers[g], v) for g, members in chunk if g in trainers for v in members]
    for round_index in range(rounds + 1):  # round 0: the warm-up (allocations, the state)
        for trainer, variant in live:
            row = run.rows[variant.name]
            if row.note:
                continue
            try:
                with peak_memory(row, cuda):
                    seconds, transfers = timed_steps(trainer, variant, steps, cuda)
            except torch.OutOfMemoryError:
                row.note = "out of memory"
                row.peak_gb = None
                trainer.optimizer.zero_grad(set_to_none=True)  # the group's next variant
                _collect(cuda)
                continue
            if round_index:
                row.times.append(seconds)
                row.transfers_per_step = transfers / steps
        done = f"round {round_index}/{rounds}" if round_index else "warm-up"
        say(f"{run.name}: {done} done")
    for trainer, variant in live:
        row = run.rows[variant.name]
        if row.note:
            continue
        row.stored_as, dtype = stored_as(trainer, trainer.family)
        expected = EXPECTED_STORAGE.get(variant.base_weights, DTYPES[run.config.model.dtype])
        row.storage_ok = dtype == expected
        if not cuda:
            _bytes_against_estimate(run, trainer, variant, row)
        try:
            prediction = trainer.teacher()
        except torch.OutOfMemoryError:
            row.note = "out of memory in the teacher's check"
            continue
        if variant.blocks_to_swap == 0:
            run.teacher_reference.setdefault(variant.base_weights, prediction)
        reference = run.teacher_reference.get(variant.base_weights)
        if variant.blocks_to_swap and reference is not None:
            row.teacher_unchanged = torch.equal(prediction, reference)


def _bytes_against_estimate(run: FamilyRun, trainer: Trainer, variant: Variant, row: Row) -> None:
    if run.sizes is None:
        return
    found = estimate(variant_config(run.config, variant), run.sizes, variant.blocks_to_swap)
    row.estimate_gb = found.base_weights + found.lora
    row.measured_gb = (base_bytes(trainer) + lora_bytes(trainer)) / GB
    row.estimate_error_pct = 100 * (row.estimate_gb - row.measured_gb) / row.measured_gb


def _finish(run: FamilyRun, all_variants: list[Variant], cuda: bool) -> list[Row]:
    """The ratios to ``masked``; on a GPU the seconds per step and the estimate's error."""
    rows = [run.rows[v.name] for v in all_variants]
    masked = run.rows.get("masked")
    base = statistics.median(masked.times) if masked and masked.times else None
    for variant, row in zip(all_variants, rows, strict=True):
        if not row.times:
            continue
        median = statistics.median(row.times)
        row.ratio = median / base if base else None
        if cuda:
            row.seconds_per_step = median
            if run.sizes is not None and row.peak_gb is not None:
                config = variant_config(run.config, variant)
                found = estimate(config, run.sizes, variant.blocks_to_swap)
                row.estimate_gb = found.training - CUDA_CONTEXT_GB
                row.measured_gb = row.peak_gb
                row.estimate_error_pct = 100 * (row.estimate_gb - row.peak_gb) / row.peak_gb
    return rows


def _sizes(
    name: str,
    size: str,
    config: TrainConfig,
    tmp: Path,
    dtype: torch.dtype,
    counts: tuple[tuple[int, ...], int],
    say: Callable[[str], None],
) -> ModelSizes | None:
    """The sizes the estimate reads. Real size: the published table (what a config whose
    model folder is absent gets), checked against the built model's counts. Small size: read
    from the small model's own files, as from a model folder (``transformer/``)."""
    if size == "real":
        sizes = model_sizes(config)
        if sizes is not None and (sizes.blocks, sizes.outside) != counts:
            say(f"warning: {name}: the published sizes differ from the built model's counts")
        return sizes
    small = build_denoiser(name, size, dtype=dtype, device=torch.device("cpu"))
    small.save_pretrained(tmp / "transformer")
    del small
    folder = apply_overrides(config, [f"model.path={tmp}"])
    return model_sizes(folder)


def _collect(cuda: bool) -> None:
    """Free a GPU's memory of the models dropped (a CPU's is left to Python)."""
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ output


def table(rows: list[Row], cuda: bool) -> str:
    """The Markdown table of ``rows``."""
    if cuda:
        head = ["peak GB", "s/step", "x masked", "estimate GB", "error %"]
    else:
        head = ["peak GB", "x masked", "est. weights+state MB", "error %"]
    header = ["model", "variant", "stored as", *head, "transfers/step", "teacher == unswapped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if cuda:
            cells = [
                _number(row.peak_gb, "{:.1f}"),
                _number(row.seconds_per_step, "{:.2f}"),
                _number(row.ratio, "{:.2f}x"),
                _number(row.estimate_gb, "{:.1f}"),
                _number(row.estimate_error_pct, "{:+.0f}"),
            ]
        else:
            megabytes = None if row.estimate_gb is None else row.estimate_gb * GB / 1e6
            cells = [
                "-",
                _number(row.ratio, "{:.2f}x"),
                _number(megabytes, "{:.2f}"),
                _number(row.estimate_error_pct, "{:+.1f}"),
            ]
        stored = row.stored_as + ("" if row.storage_ok in (None, True) else " (NOT the form's)")
        if row.note:
            stored = row.note
        transfers = _number(row.transfers_per_step, "{:g}")
        if row.blocks_to_swap and row.transfers_per_step is not None:
            transfers += f" ({row.transfers_per_step / row.blocks_to_swap:g}N)"
        teacher = {None: "-", True: "yes", False: "NO"}[row.teacher_unchanged]
        lines.append(
            "| " + " | ".join([row.model, row.variant, stored, *cells, transfers, teacher]) + " |"
        )
    return "\n".join(lines)


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--size",
        choices=("real", "small"),
        default="real" if cuda else "small",
        help="real: the published models (a CUDA GPU); small: fewer, narrower layers (a CPU)",
    )
    parser.add_argument("--families", default=",".join(MODELS), help="comma-separated")
    parser.add_argument(
        "--variants", default="", help="comma-separated names (masked is always measured)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in MODELS]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if args.size == "real" and not cuda:
        parser.error(
            "--size real needs a CUDA GPU (torch.cuda.is_available() is False here): the "
            "published models do not fit a CPU's time; --size small checks the mechanics"
        )
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps: at least 1")
    device = torch.device("cuda" if cuda and args.size == "real" else "cpu")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or None
    torch.manual_seed(SEED)
    rows: list[Row] = []
    for name in families:
        rows += run_family(
            name,
            args.size,
            device,
            args.rounds,
            args.steps,
            chosen,
            lambda text: print(text, file=sys.stderr, flush=True),
        )
    on = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (f"CPU ({torch.get_num_threads()} threads)")
    )
    print(
        f"memory benchmark, {args.size} size, {args.rounds} rounds x {args.steps} steps, {on}; "
        "shapes, LoRA, optimizer and precision of each family's 24 GB preset"
        + (" (small: tiny shapes)" if args.size == "small" else "")
    )
    print()
    print(table(rows, device.type == "cuda"))
    if args.json is not None:
        payload = {
            "size": args.size,
            "device": on,
            "rounds": args.rounds,
            "steps": args.steps,
            "rows": [{k: v for k, v in asdict(row).items() if k != "times"} for row in rows],
        }
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
