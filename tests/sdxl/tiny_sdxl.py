"""A tiny random SDXL pipeline, built in code and saved in the real on-disk layouts.

``build_tiny_sdxl(folder)`` writes what ``StableDiffusionXLPipeline(...).save_pretrained`` writes
for ``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/`` (``UNet2DConditionModel``), ``vae/``
(``AutoencoderKL``), ``text_encoder/`` (``CLIPTextModel``) and ``text_encoder_2/``
(``CLIPTextModelWithProjection``) with their ``CLIPTokenizer``s, and ``scheduler/``
(``EulerDiscreteScheduler``). ``original_layout(folder)`` writes the same weights as one
``.safetensors`` checkpoint in the original (Stability's sgm) key layout, the reverse of
diffusers' single-file conversion.

What is kept from the real model, because training and inference depend on it:

- the UNet's ``cross_attention_dim`` is the two encoders' hidden sizes summed (their penultimate
  hidden states are concatenated) and ``projection_class_embeddings_input_dim`` is
  6 x ``addition_time_embed_dim`` + text_encoder_2's ``projection_dim`` (the pooled embedding);
  the encoders differ in width, as CLIP-L and OpenCLIP bigG do (diffusers' single-file loader
  tells them apart by it);
- three UNet levels (``DownBlock2D`` then cross-attention), two layers per block and two
  transformer layers in the last level, so the sgm block numbering is the real one;
- an SD VAE: 8x compression, 4 latent channels, quant convs, scaling 0.13025, no shift;
- tokenizer_2 pads with "!" like the real one; both read 77 tokens;
- the scheduler has the SDXL base values (scaled_linear 0.00085..0.012, leading spacing,
  steps_offset 1); ``prediction_type`` is epsilon, or v_prediction for the v variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from tests.flux1.tiny_flux1 import build_clip_tokenizer

CLIP_L = 32  # text_encoder's hidden size (real 768)
CLIP_G = 48  # text_encoder_2's hidden size (real 1280)
PROJECTION = 40  # text_encoder_2's projection_dim: the pooled embedding (real 1280)
TIME_EMBED = 8  # addition_time_embed_dim (real 256)

UNET = {
    "sample_size": 8,  # the pipeline's default size: 8 x the VAE's 8 = 64 px
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 2, 4),  # diffusers' legacy name: the heads per level
    "norm_num_groups": 8,
    "cross_attention_dim": CLIP_L + CLIP_G,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + PROJECTION,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _text_config(tokenizer, hidden: int, layers: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_sdxl(folder: Path, *, prediction: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny random SDXL pipeline (diffusers layout) to ``folder`` and return it;
    ``prediction``: the scheduler's ``prediction_type`` ("epsilon" or "v_prediction")."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # as the real tokenizer_2
    text_encoder = CLIPTextModel(
        _text_config(tokenizer, CLIP_L, 2, hidden_act="quick_gelu", projection_dim=CLIP_L)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, CLIP_G, 3, hidden_act="gelu", projection_dim=PROJECTION)
    )
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**UNET),
        scheduler=EulerDiscreteScheduler.from_config({**SCHEDULER, "prediction_type": prediction}),
        add_watermarker=False,  # invisible-watermark is not installed
    )
    pipeline.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ the original single file


def original_layout(folder: Path) -> dict[str, torch.Tensor]:
    """The tiny folder's weights under the original SDXL checkpoint's key names
    (``model.diffusion_model.``, ``first_stage_model.``, ``conditioner.embedders.0/1.``)."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for key, value in _weights(folder / "unet").items():
        state["model.diffusion_model." + _sgm_unet_key(key, unet_config)] = value
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    for key, value in _weights(folder / "vae").items():
        name = _ldm_vae_key(key, len(vae_config["block_out_channels"]))
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # a 1x1 convolution in the original
        state["first_stage_model." + name] = value
    for key, value in _weights(folder / "text_encoder").items():
        state["conditioner.embedders.0.transformer.text_model." + key] = value
    state.update(_open_clip(_weights(folder / "text_encoder_2")))
    return {key: value.contiguous() for key, value in state.items()}


def write_original_checkpoint(folder: Path, file: Path) -> Path:
    save_file(original_layout(folder), str(file))
    return file


def _weights(part: Path) -> dict[str, torch.Tensor]:
    (file,) = sorted(part.glob("*.safetensors"))
    return load_file(str(file))


_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_OUTSIDE = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _sgm_unet_key(key: str, config: dict) -> str:
    """A diffusers UNet key → the sgm UNet's (input_blocks / middle_block / output_blocks)."""
    layers = config["layers_per_block"]
    module, _, leaf = key.rpartition(".")
    if module in _OUTSIDE:
        return f"{_OUTSIDE[module]}.{leaf}"
    parts = key.split(".")
    rest = ".".join(parts[4:])
    if parts[0] == "down_blocks":
        level, kind, index = int(parts[1]), parts[2], int(parts[3])
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (layers + 1)}.0.op.{'.'.join(parts[5:])}"
        block = level * (layers + 1) + index + 1
        return f"input_blocks.{block}.{_inner(kind, rest)}"
    if parts[0] == "mid_block":
        kind, index = parts[1], int(parts[2])
        rest = ".".join(parts[3:])
        return f"middle_block.{1 if kind == 'attentions' else 2 * index}.{_inner(kind, rest)[2:]}"
    assert parts[0] == "up_blocks", key
    level, kind, index = int(parts[1]), parts[2], int(parts[3])
    if kind == "upsamplers":
        block = level * (layers + 1) + layers
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{block}.{slot}.{'.'.join(parts[4:])}"
    return f"output_blocks.{level * (layers + 1) + index}.{_inner(kind, rest)}"


def _inner(kind: str, rest: str) -> str:
    if kind == "attentions":
        return f"1.{rest}"
    for new, old in _RESNET:
        rest = rest.replace(new, old)
    return f"0.{rest}"


def _ldm_vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key → the original's."""
    replacements = (
        ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
        ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
        ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
        ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
        ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
        ("mid_block.resnets.0", "mid.block_1"),
        ("mid_block.resnets.1", "mid.block_2"),
        ("conv_norm_out", "norm_out"),
        ("conv_shortcut", "nin_shortcut"),
        ("downsamplers.0", "downsample"),
        ("upsamplers.0", "upsample"),
    )
    for new, old in replacements:
        key = key.replace(new, old)
    parts = key.split(".")
    if parts[1] == "down_blocks":
        parts[1] = "down"
    elif parts[1] == "up_blocks":  # the original numbers the decoder's levels bottom-up
        parts[1], parts[2] = "up", str(levels - 1 - int(parts[2]))
    key = ".".join(parts)
    return key.replace(".resnets.", ".block.")


def _open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights → OpenCLIP's (fused q, k, v; the projection
    transposed) under ``conditioner.embedders.1.model.``."""
    prefix = "conditioner.embedders.1.model."
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T,
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        old = f"text_model.encoder.layers.{i}."
        new = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{new}attn.in_proj_{leaf}"] = torch.cat(
                [state[f"{old}self_attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")]
            )
            for theirs, ours in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{new}{theirs}.{leaf}"] = state[f"{old}{ours}.{leaf}"]
    return out
