"""The ``demo`` family: a tiny real diffusers model that trains on a laptop CPU in seconds.

- Codec: parameter-free pixel unshuffle, (B, 3, H, W) → (B, 48, H/4, W/4). No VAE to download,
  and decoding is exact.
- Denoiser: a ~5M-parameter ``UNet2DConditionModel`` (the Stable Diffusion UNet, shrunk to
  latents of 16, 8 and 4 pixels; the built-in weights), or a ~4M-parameter
  ``WanTransformer3DModel`` (the WAN 2.1 architecture, shrunk) on one-frame latents, the earlier
  built-in model, which drew blobs rather than shapes (``docs/demo-model.md``). Both are trained
  with flow matching and predict the clean latents; ``predict`` returns the velocity they imply,
  so everything outside the family sees a velocity.
- Text encoder: a tiny ``T5EncoderModel`` (WAN's UMT5 is a T5 variant) with the byte-level
  ``ByT5Tokenizer``, which needs no vocabulary file.

On disk the model is a folder with ``transformer/`` or ``unet/`` (diffusers ``save_pretrained``),
``text_encoder/`` and ``tokenizer/`` (transformers ``save_pretrained``), loaded with
``local_files_only``: the same code path a user's model takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, WanTransformer3DModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, WanLoraLoaderMixin
from torch import Tensor
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from modules.models.base import ComfyConverter, LoadedModel, TextEncoding
from modules.models.demo import (
    ARCHITECTURES,
    BUILTIN_WEIGHTS,
    CODEC_FACTOR,
    TRANSFORMER_LORA_TARGETS,
    UNET_HAS_NO_COMFYUI,
    UNET_LORA_TARGETS,
)
from modules.models.flow_matching import (
    FlowMatching,
    euler_sample,
    logit_normal_timesteps,
)
from modules.models.model_folder import check_model_folder
from modules.models.spec import FamilyOptions
from modules.models.wan.comfyui import to_comfyui

LATENT_CHANNELS = 3 * CODEC_FACTOR**2
MAX_PROMPT_BYTES = 96
"""Captions of the demo world reach 77 bytes; ByT5 spends one token per byte."""
MIN_PREDICTION_T = 0.05
"""The clean-image prediction is turned into a velocity by dividing by ``t``, clamped here."""
GUIDANCE = 4.0
"""Classifier-free guidance scale of the demo sampler. The built-in model was pretrained with
10 % empty captions; on 48 held-out prompts, guidance 4 against none raises the world judge's
background accuracy from 0.46 to 0.83 (``python -m scripts.score_demo_model``)."""
TIME_SHIFT = 3.0
"""Flow shift of the demo family's timesteps, in pretraining, LoRA training and sampling alike.
The world's objects are large flat areas: averaged over a 30-pixel object the noise shrinks
some 25-fold, so where an object goes and what shape it takes is settled above t = 0.8. Plain
logit-normal steps put 8 % of the training there, and the velocity error of a clean-image
prediction (weighed by 1/t^2) gives each of them about a sixtieth of the weight of a t = 0.1
step. Shifted by 3, 39 % of the steps lie above t = 0.8 and the 1/t^2 weighting spreads the
gradient about evenly over t = 0.1 … 0.9."""

TRANSFORMER_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 48,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 768,
    "num_layers": 6,
    "rope_max_seq_len": 256,
}
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (64, 96, 128),
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
    "attention_head_dim": (2, 3, 4),  # diffusers' legacy name: the heads per level (of 32 values)
    "time_embedding_dim": 128,
}
"""Latents of 16 × 16, 8 × 8 and 4 × 4, where a 3 × 3 convolution spans a whole object;
cross-attention to the caption at the two lower levels. 5.3M parameters, 10.7 MB in float16."""
TEXT_ENCODER_CONFIG = {
    "vocab_size": 384,  # ByT5: 256 bytes + 3 specials + 125 sentinels
    "d_model": 64,
    "d_kv": 32,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
}


@dataclass
class DemoParts:
    """What the demo model keeps beside its denoiser (no VAE: the codec has no weights)."""

    text_encoder: T5EncoderModel
    tokenizer: ByT5Tokenizer


DemoModel = LoadedModel[DemoParts]


def build_demo_model(seed: int = 0, architecture: str = "unet") -> DemoModel:
    """Random demo weights of ``architecture`` ("wan" or "unet"), deterministic in ``seed``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    denoiser: torch.nn.Module
    if architecture == "wan":
        denoiser = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    else:
        denoiser = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = T5EncoderModel(T5Config(**TEXT_ENCODER_CONFIG))
    return LoadedModel(
        denoiser=denoiser,
        identity=f"demo-random-seed{seed}",
        parts=DemoParts(text_encoder=text_encoder.eval(), tokenizer=ByT5Tokenizer()),
    )


def save_demo_model(model: DemoModel, directory: str | Path) -> None:
    """Write the model in the on-disk layout :meth:`DemoFamily.load` reads."""
    directory = Path(directory)
    model.denoiser.save_pretrained(directory / ARCHITECTURES[demo_architecture(model.denoiser)])
    model.parts.text_encoder.save_pretrained(directory / "text_encoder")
    model.parts.tokenizer.save_pretrained(directory / "tokenizer")


def demo_architecture(denoiser: torch.nn.Module) -> str:
    """The architecture of ``denoiser``: "unet" for a ``UNet2DConditionModel``, else "wan"."""
    return "unet" if isinstance(denoiser, UNet2DConditionModel) else "wan"


class DemoFamily(FlowMatching):
    """The demo family has no options; it takes them like every family."""

    name = "demo"
    loss_layout = "video"

    def __init__(self, options: FamilyOptions | None = None) -> None:
        self.options = options

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> DemoModel:
        if not path and not BUILTIN_WEIGHTS.is_dir():
            model = build_demo_model()
        else:
            folder = Path(path) if path else BUILTIN_WEIGHTS
            model = _load_folder(folder, dtype)
        if next(model.denoiser.parameters()).dtype != dtype:
            _cast_keeping_fp32_modules(model.denoiser, dtype)
        model.denoiser.to(device=device)
        model.parts.text_encoder.to(device=device)
        return model

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        unet = demo_architecture(model.denoiser) == "unet"
        presets = UNET_LORA_TARGETS if unet else TRANSFORMER_LORA_TARGETS
        return {name: list(modules) for name, modules in presets.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer's blocks; the UNet's down blocks, middle block and up blocks."""
        if demo_architecture(denoiser) == "unet":
            return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]
        return list(denoiser.blocks)

    def lora_loader(self, model: LoadedModel) -> type:
        """Stable Diffusion's loader for the UNet, WAN's for the WAN transformer."""
        if isinstance(model.denoiser, UNet2DConditionModel):
            return StableDiffusionLoraLoaderMixin
        return WanLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """A demo transformer is a WAN transformer: WAN's ComfyUI names. A UNet has none here."""
        if demo_architecture(model.denoiser) == "unet":
            raise ValueError(UNET_HAS_NO_COMFYUI)
        return to_comfyui

    def encode_images(self, model: LoadedModel, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, CODEC_FACTOR)

    def release_encoders(self, model: LoadedModel, *, keep_decoder: bool) -> None:
        """Nothing to free: the codec has no weights and the text encoder is tiny."""

    def decode_latents(self, model: LoadedModel, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, CODEC_FACTOR).clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, model: DemoModel, prompts: list[str]) -> TextEncoding:
        tokens = model.parts.tokenizer(
            prompts,
            padding="max_length",
            max_length=MAX_PROMPT_BYTES,
            truncation=True,
            return_tensors="pt",
        )
        encoder = model.parts.text_encoder
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
        # WAN zeroes the padded positions instead of passing an attention mask to cross-attention.
        embeds = hidden.last_hidden_state * mask.unsqueeze(-1)
        return {"embeds": embeds.float()}

    def prompt_token_counts(self, model: DemoModel, prompts: list[str]) -> tuple[list[int], int]:
        ids = model.parts.tokenizer(prompts, add_special_tokens=True).input_ids
        return [len(row) for row in ids], MAX_PROMPT_BYTES

    def sample_timesteps(
        self, shape: torch.Size, *, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        # The pretraining's distribution (TIME_SHIFT). Uniform t would put 5 % of the samples
        # below MIN_PREDICTION_T, where the clean-image error reaches the velocity 1/t^2
        # amplified.
        return logit_normal_timesteps(
            shape[0], generator=generator, device=device, shift=TIME_SHIFT
        )

    def predict(
        self, model: LoadedModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        denoiser = model.denoiser
        dtype = denoiser.dtype  # the compute dtype, also where the weights are stored in fp8
        embeds = text["embeds"].to(dtype)
        if demo_architecture(denoiser) == "unet":
            clean = model.runner(noisy.to(dtype), timesteps * 1000, embeds, return_dict=False)[0]
        else:
            # (B, C, h, w) → one-frame video (B, C, 1, h, w) for the WAN transformer, and back.
            clean = model.runner(
                hidden_states=noisy.unsqueeze(2).to(dtype),
                timestep=timesteps * 1000,
                encoder_hidden_states=embeds,
                return_dict=False,
            )[0].squeeze(2)
        # The network predicts the clean image and the family returns the velocity it implies,
        # so the loss, the teacher and the sampler see a velocity like every flow family. A
        # transformer token carries 192 values through a width of 192: asked for the velocity,
        # the network must pass the noise through unchanged; asked for the image, it only has to
        # remove it. The UNet is trained the same way, so the two share the sampler and schedule.
        t = timesteps.view(-1, 1, 1, 1).clamp(min=MIN_PREDICTION_T).to(noisy.dtype)
        return (noisy - clean.to(noisy.dtype)) / t

    @torch.no_grad()
    def sample(
        self,
        model: LoadedModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
        guidance: float = GUIDANCE,
    ) -> Tensor:
        batch = next(iter(text.values())).shape[0]
        width, height = size
        device = next(model.denoiser.parameters()).device
        shape = (batch, LATENT_CHANNELS, height // CODEC_FACTOR, width // CODEC_FACTOR)
        noise = torch.randn(shape, generator=generator).to(device)
        return self.denoise(model, text, noise, start=1.0, steps=steps, guidance=guidance)

    @torch.no_grad()
    def denoise(
        self,
        model: LoadedModel,
        text: TextEncoding,
        noisy: Tensor,
        *,
        start: float,
        steps: int,
        guidance: float = GUIDANCE,
    ) -> Tensor:
        """Images from latents noised to ``t = start`` (1: pure noise), Euler on the shifted
        grid of ``steps``, with classifier-free ``guidance`` (1: none)."""
        if guidance != 1.0:
            empty = self.encode_prompts(model, [""] * noisy.shape[0])
            empty = {key: value.to(noisy.device) for key, value in empty.items()}

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            conditional = self.predict(model, x, t, text).float()
            if guidance == 1.0:
                return conditional
            unconditional = self.predict(model, x, t, empty).float()
            return unconditional + guidance * (conditional - unconditional)

        latents = euler_sample(velocity, noisy, steps=steps, shift=TIME_SHIFT, start=start)
        return self.decode_latents(model, latents)


def _load_folder(folder: Path, dtype: torch.dtype) -> DemoModel:
    check_model_folder(str(folder), "demo")
    found = [name for name in ARCHITECTURES.values() if (folder / name).is_dir()]
    model_class = UNet2DConditionModel if found[0] == "unet" else WanTransformer3DModel
    denoiser = model_class.from_pretrained(
        folder / found[0], torch_dtype=dtype, local_files_only=True
    )
    text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = ByT5Tokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return LoadedModel(
        denoiser=denoiser,
        identity=_folder_identity(folder),
        parts=DemoParts(text_encoder=text_encoder.eval(), tokenizer=tokenizer),
    )


def _folder_identity(folder: Path) -> str:
    """Path plus size and modification time of every file: changes when the weights change."""
    stamps = sorted(
        f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in folder.rglob("*")
        if p.is_file()
    )
    return f"demo:{folder.resolve()}:" + ",".join(stamps)


def _cast_keeping_fp32_modules(denoiser: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast like ``from_pretrained(torch_dtype=...)`` does: the modules the model class lists in
    ``_keep_in_fp32_modules`` (norms, time embedding, RoPE) stay float32 for stability."""
    keep = set(getattr(denoiser, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*denoiser.named_parameters(), *denoiser.named_buffers()]:
        if tensor.is_floating_point() and keep.isdisjoint(name.split(".")):
            tensor.data = tensor.data.to(dtype)
