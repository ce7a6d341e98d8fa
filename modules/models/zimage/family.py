"""The ``zimage`` family: Z-Image base and Z-Image Turbo LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``ZImagePipeline.save_pretrained`` writes it, e.g. a
download of ``Tongyi-MAI/Z-Image-Turbo``)::

    transformer/   ZImageTransformer2DModel: one stream of image and prompt tokens
    vae/           AutoencoderKL (FLUX.1's): 16 latent channels, scaling and shift factor
    text_encoder/  Qwen3Model (bare; its second-to-last hidden states)
    tokenizer/     Qwen2Tokenizer with Qwen3's chat template
    scheduler/     scheduler_config.json: the static timestep shift (3.0)

Everything is read with ``local_files_only``. As ``ZImagePipeline`` does:

- Latents: ``(z - shift_factor) * scaling_factor`` of the VAE posterior's mode, (B, 16, H/8,
  W/8); the transformer cuts them into 2x2 patches itself and takes a list of (16, 1, h, w)
  one-frame latents.
- Prompts: the chat template (user turn, generation prompt, ``enable_thinking=True``: no think
  block) around the caption, cut at ``model.zimage.text_tokens``; ``hidden_states[-2]`` of the
  text encoder, each prompt's real tokens only (the transformer takes a list of different
  lengths). The encoding pads them with zeros to the batch's longest and carries the mask.
- Timesteps: the transformer's ``t`` is ``1 - sigma`` (1 = clean) and it predicts the negative
  velocity; ``predict`` takes and returns the flow convention of the other families (sigma,
  ``noise - x0``). Training sigmas are uniform, shifted by the scheduler's static shift.
- Samples: Euler over ``linspace(1, 1/steps)`` shifted, with CFG ``pos + g (pos - neg)`` when
  the guidance is above 0.

Z-Image Turbo is step-distilled: a plain LoRA trained on it drifts it back towards a model that
needs many steps (it de-distils). With ``model.zimage.training_adapter`` a de-distillation LoRA
is merged into Turbo's weights when it loads: the student and the teacher both run base +
adapter, and the run's LoRA (a separate peft adapter) is saved without it. The samples remove
it again (each adapted layer subtracts the adapter's update in its forward), so they show the
LoRA on Turbo as it will be used, at Turbo's 9 steps without guidance.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.loaders import ZImageLoraLoaderMixin
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoTokenizer, Qwen3Model

from modules.models.base import ComfyConverter, LoadedModel, ModelLoadError, TextEncoding
from modules.models.base_weights import QuantisedLinear
from modules.models.flow_matching import ScheduleShift, ShiftedByTokens
from modules.models.model_folder import (
    FolderParts,
    check_model_folder,
    decode_shifted,
    denoiser_on_device,
    encode_shifted,
    files_stamp,
    free_encoders,
    frozen_vae,
    load_frozen,
    load_transformer,
    read_model_json,
    text_encoder_dtype,
)
from modules.models.zimage import LORA_TARGETS, TURBO_STEPS, ZImageOptions, is_turbo

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
COMFYUI_PREFIX = "diffusion_model."
BASE_GUIDANCE = 5.0
"""The pipeline's default guidance, for base samples."""
ADAPTER_FIELD = "model.zimage.training_adapter"


@dataclass(frozen=True)
class AdapterLayer:
    """One layer's update of the training adapter, ``scale * up @ down`` (out x in)."""

    down: Tensor
    up: Tensor
    scale: float


@dataclass(kw_only=True)
class ZImageParts(FolderParts):
    """What a loaded Z-Image keeps beside its transformer (the folder, device, dtype and VAE of
    :class:`FolderParts`)."""

    turbo: bool = False
    encoder: tuple[Any, Qwen3Model] | None = None
    """The tokenizer and the text encoder: loaded on first use, freed by ``release_encoders``."""
    negative: TextEncoding | None = None
    """``negative_prompt`` encoded before the text encoder is freed, for guided samples."""
    adapter: dict[str, AdapterLayer] = field(default_factory=dict)
    """The training adapter merged into the transformer, by module name (empty: none)."""


ZImageModel = LoadedModel[ZImageParts]


class ZImageFamily(ShiftedByTokens):
    """Z-Image base / Turbo text-to-image, with its options (``model.zimage``)."""

    name = "zimage"
    loss_layout = "video"

    def __init__(self, options: ZImageOptions | None = None) -> None:
        self.options = options if options is not None else ZImageOptions()
        self.shift = ScheduleShift()

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        return {name: list(modules) for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The image tokens' refiner blocks, the prompt's refiner blocks, then the main layers:
        the order the forward runs them."""
        return [*denoiser.noise_refiner, *denoiser.context_refiner, *denoiser.layers]

    def lora_loader(self, model: LoadedModel) -> type:
        """ZImagePipeline's LoRA loader."""
        return ZImageLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """ComfyUI names a Z-Image LoRA after the diffusers modules under ``diffusion_model.``
        (it maps to_q / to_k / to_v onto its fused qkv itself), with ``lora_down`` /
        ``lora_up`` and a per-module ``alpha``."""
        return to_comfyui

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> ZImageModel:
        """The transformer to train (with the training adapter merged, if any), on the CPU
        until ``release_encoders``; the VAE and the text encoder load on first use."""
        folder = check_model_folder(path, "zimage", self.options)
        turbo = is_turbo(folder, self.options)
        denoiser = load_transformer(
            ZImageTransformer2DModel,
            folder,
            dtype,
            file=self.options.transformer_file,
            field="model.zimage.transformer_file",
            what="a Z-Image transformer (original, ComfyUI or diffusers names, the same size)",
            rename=_without_prefix,
        )
        scheduler = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        self.shift = ScheduleShift.from_scheduler_config(scheduler)
        parts = ZImageParts(
            folder=folder,
            device=torch.device(device),
            dtype=dtype,
            vae_config=read_model_json(folder / "vae" / "config.json") or {},
            turbo=turbo,
        )
        if self.options.training_adapter:
            parts.adapter = merge_training_adapter(denoiser, Path(self.options.training_adapter))
        return LoadedModel(denoiser=denoiser, identity=self._identity(folder, dtype), parts=parts)

    def run_notes(self, model: ZImageModel) -> list[str]:
        """Said at the start of a run: Turbo without a training adapter is de-distilled."""
        parts = model.parts
        if not parts.turbo or parts.adapter:
            return []
        return [
            f"{parts.folder} is Z-Image Turbo, a step-distilled model: a plain LoRA trained on "
            "it de-distils it (its samples need more steps and guidance over the run). Set "
            f"{ADAPTER_FIELD} to a de-distillation LoRA to keep Turbo's few-step sampling."
        ]

    def _identity(self, folder: Path, dtype: torch.dtype) -> str:
        """What the cached latents and prompt encodings depend on: the VAE, the text encoder
        and tokenizer (path, size, modification time), the dtype and the prompt length."""
        head = f"zimage:{folder.resolve()}:dtype={dtype}:tokens={self.options.text_tokens}:"
        return head + files_stamp(folder, ("vae", "text_encoder", "tokenizer"))

    # ------------------------------------------------------------------------------ encoders

    def encode_images(self, model: ZImageModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 16, H/8, W/8)."""
        return encode_shifted(self._vae(model), model.parts.vae_config, images)

    def decode_latents(self, model: ZImageModel, latents: Tensor) -> Tensor:
        return decode_shifted(self._vae(model), model.parts.vae_config, latents)

    def _templated(self, tokenizer: Any, prompts: list[str]) -> list[str]:
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]

    @torch.no_grad()
    def encode_prompts(self, model: ZImageModel, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, D), "mask": (B, L)}``: each templated prompt's second-to-last
        hidden states, zero-padded to the longest, with 1 where a token is real."""
        tokenizer, encoder = self._encoder(model)
        device = next(encoder.parameters()).device
        tokens = tokenizer(
            self._templated(tokenizer, prompts),
            padding="longest",
            max_length=self.options.text_tokens,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        mask = tokens.attention_mask.bool()
        hidden = encoder(
            input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        # Right padding: the real tokens come first, so zeroing the rest keeps them as they are.
        embeds = hidden * mask.unsqueeze(-1)
        return {"embeds": embeds.float(), "mask": mask.long()}

    def prompt_token_counts(self, model: ZImageModel, prompts: list[str]) -> tuple[list[int], int]:
        """Tokens of each templated prompt, and how many the text encoder reads."""
        tokenizer = AutoTokenizer.from_pretrained(
            model.parts.folder / "tokenizer", local_files_only=True
        )
        ids = tokenizer(self._templated(tokenizer, prompts)).input_ids
        return [len(row) for row in ids], self.options.text_tokens

    def release_encoders(self, model: ZImageModel, *, keep_decoder: bool) -> None:
        """Free the text encoder (and the VAE unless samples are decoded), then move the
        transformer to the training device. For guided samples the negative prompt is
        encoded first."""
        parts = model.parts
        if keep_decoder and self._guidance(parts) > 0 and parts.negative is None:
            parts.negative = self.encode_prompts(model, [self.options.negative_prompt])
        parts.encoder = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoder(self, model: ZImageModel) -> tuple[Any, Qwen3Model]:
        parts = model.parts
        if parts.encoder is None:
            folder = parts.folder
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            encoder = load_frozen(
                Qwen3Model,
                folder / "text_encoder",
                parts.device,
                dtype=text_encoder_dtype(parts.dtype),
            )
            parts.encoder = (tokenizer, encoder)
        return parts.encoder

    def _vae(self, model: ZImageModel) -> AutoencoderKL:
        return frozen_vae(model.parts, AutoencoderKL)

    # ---------------------------------------------------------------------------- training

    def predict(
        self, model: ZImageModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity ``noise - x0`` (B, 16, h, w) for noisy latents of the same shape at
        noise levels ``timesteps`` (B,)."""
        denoiser_on_device(model)
        dtype = model.parts.dtype
        frames = noisy.to(dtype).unsqueeze(2).unbind(0)  # B x (16, 1, h, w)
        mask = text["mask"].bool()
        captions = [row[keep].to(dtype) for row, keep in zip(text["embeds"], mask, strict=True)]
        # The time stays float32, as the pipeline passes it: the embedding's sines read t * 1000.
        t = (1 - timesteps).float()
        out = model.runner(list(frames), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts x0 - noise

    def training_mu(self, shape: torch.Size) -> float:
        """The pipeline's ``mu`` (unused by Z-Image's static shift, passed as it does)."""
        return self.shift.mu_for((shape[-2] // 2) * (shape[-1] // 2))

    def _guidance(self, parts: ZImageParts) -> float:
        chosen = self.options.sample_guidance
        if chosen is not None:
            return chosen
        return 0.0 if parts.turbo else BASE_GUIDANCE

    def sample_steps(self, parts: ZImageParts, steps: int) -> int:
        """The samples' step count: ``sample_steps``, else Turbo's own, else ``steps``."""
        if self.options.sample_steps is not None:
            return self.options.sample_steps
        return TURBO_STEPS if parts.turbo else steps

    @torch.no_grad()
    def sample(
        self,
        model: ZImageModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
    ) -> Tensor:
        """Euler over the pipeline's schedule, with CFG when the guidance is above 0; on Turbo
        with a training adapter, without the adapter."""
        denoiser_on_device(model)
        parts = model.parts
        device = parts.device
        batch = text["embeds"].shape[0]
        scale = 2 ** (len(parts.vae_config.get("block_out_channels") or [0] * 4) - 1)
        channels = model.denoiser.config.in_channels
        x = torch.randn(batch, channels, size[1] // scale, size[0] // scale, generator=generator)
        x = x.to(device)
        guidance, negative = self._guidance(parts), parts.negative
        if negative is not None:
            negative = {k: v.expand(batch, *v.shape[1:]) for k, v in negative.items()}
        count = self.sample_steps(parts, steps)
        grid = torch.linspace(1.0, 1.0 / count, count)
        sigmas = torch.cat([self.shift.sigmas(grid, self.training_mu(x.shape)), torch.zeros(1)])
        with without_adapter(model.denoiser, parts.adapter):
            for now, after in itertools.pairwise(sigmas.tolist()):
                t = torch.full((batch,), now, device=device)
                v = self.predict(model, x, t, text).float()
                if guidance > 0 and negative is not None:
                    v = v + guidance * (v - self.predict(model, x, t, negative).float())
                x = x + (after - now) * v
        return self.decode_latents(model, x)


# ---------------------------------------------------------------------- the training adapter


def read_training_adapter(path: Path) -> dict[str, AdapterLayer]:
    """The adapter file as ZImagePipeline's loader reads it (the published layout
    ``diffusion_model.<module>.lora_A/B.weight``, kohya's, or the diffusers layout; alphas
    folded in), by module name; the scale is ``lora_alpha / r`` of a diffusers file's metadata,
    else 1. A ModelLoadError naming the option otherwise."""
    path = path.expanduser()
    try:
        state, metadata = ZImageLoraLoaderMixin.lora_state_dict(
            str(path), return_lora_metadata=True
        )
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
        raise ModelLoadError(
            f"{ADAPTER_FIELD}: cannot read {path} as a Z-Image LoRA ({type(error).__name__}: "
            f"{str(error)[:200]}); give the Z-Image Turbo training adapter's .safetensors file"
        ) from None
    scale = 1.0
    if metadata:
        config = metadata.get("transformer", metadata)
        if isinstance(config, str):
            config = json.loads(config)
        if config.get("lora_alpha") and config.get("r"):
            scale = float(config["lora_alpha"]) / float(config["r"])
    layers = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = state.get(key.replace(".lora_A.", ".lora_B."))
            if up is None:
                raise ModelLoadError(
                    f"{ADAPTER_FIELD}: {path} has {key} without its lora_B; is the file whole?"
                )
            layers[module] = AdapterLayer(down=down.float(), up=up.float(), scale=scale)
    if not layers:
        raise ModelLoadError(
            f"{ADAPTER_FIELD}: {path} holds no LoRA layers; give the Z-Image Turbo training "
            "adapter's .safetensors file"
        )
    return layers


def merge_training_adapter(denoiser: torch.nn.Module, path: Path) -> dict[str, AdapterLayer]:
    """Add the adapter's update ``scale * up @ down`` to each of its layers' weights, in place,
    computed in float32 and stored in the layer's dtype; return the adapter. A layer stored as
    scaled fp8 (a scaled single file) becomes a plain layer of the load dtype."""
    layers = read_training_adapter(path)
    modules = dict(denoiser.named_modules())
    missing = [name for name in layers if not isinstance(modules.get(name), torch.nn.Linear)]
    if missing:
        raise ModelLoadError(
            f"{ADAPTER_FIELD}: {path} has layers this Z-Image transformer lacks (e.g. "
            f"{missing[0]}); is it an adapter for Z-Image Turbo of this size?"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            linear = modules[name]
            if isinstance(linear, QuantisedLinear):
                linear = _plain_linear(denoiser, name, linear)
            weight = linear.weight
            update = layer.scale * (layer.up @ layer.down)
            if update.shape != weight.shape:
                raise ModelLoadError(
                    f"{ADAPTER_FIELD}: {path}'s {name} is {tuple(update.shape)}, the "
                    f"transformer's {tuple(weight.shape)}; is it an adapter for this model?"
                )
            weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))
    return layers


def _plain_linear(denoiser: torch.nn.Module, name: str, layer: QuantisedLinear) -> torch.nn.Linear:
    plain = torch.nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        dtype=layer.compute_dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(layer.dequantised())
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    plain.requires_grad_(False)
    parent, _, child = name.rpartition(".")
    setattr(denoiser.get_submodule(parent), child, plain)
    return plain


@contextlib.contextmanager
def without_adapter(denoiser: torch.nn.Module, adapter: dict[str, AdapterLayer]) -> Iterator[None]:
    """Inside, each layer the training adapter was merged into subtracts the adapter's update
    from its output (``- scale * up(down(x))``): the transformer runs as Turbo (with the run's
    LoRA, if on). The hooks sit on the base layers (inside a LoRA layer, after a storage form
    replaced them), and come off after, even on an exception."""
    handles = []
    try:
        for name, layer in adapter.items():
            module = denoiser.get_submodule(name)
            base = getattr(module, "base_layer", module)
            handles.append(base.register_forward_hook(_subtract(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _subtract(layer: AdapterLayer) -> Any:
    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        down, up = layer.down.to(x.device, x.dtype), layer.up.to(x.device, x.dtype)
        return output - layer.scale * F.linear(F.linear(x, down), up)

    return hook


# ----------------------------------------------------------------------------------- files


def _without_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformer file's tensors without ComfyUI's model prefix; diffusers' single-file
    converter takes the original names (fused qkv, ``final_layer``) from there."""
    return {_strip_prefix(key): value for key, value in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def to_comfyui(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``transformer.<module>.lora_A/B.weight`` → ``diffusion_model.<module>.lora_down/up.weight``
    and ``diffusion_model.<module>.alpha``: the names ComfyUI maps onto its Z-Image model (to_q,
    to_k, to_v onto slices of its fused qkv, to_out.0 onto out), which diffusers' converter for
    non-diffusers Z-Image LoRAs reads back."""
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"output.format=comfyui: '{key}' is neither a lora_A nor a lora_B weight; use "
                "output.format=diffusers"
            )
        converted[f"{COMFYUI_PREFIX}{module}.lora_{'down' if kind[0] == 'A' else 'up'}.weight"] = (
            value
        )
        converted[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return converted
