"""A tiny random Z-Image pipeline, built in code and saved in the real on-disk layout.

``build_tiny_zimage(folder)`` writes what ``ZImagePipeline(...).save_pretrained`` writes for
``Tongyi-MAI/Z-Image-Turbo`` (or ``Tongyi-MAI/Z-Image``): ``transformer/``
(``ZImageTransformer2DModel``), ``vae/`` (FLUX.1's 16-channel ``AutoencoderKL``), ``text_encoder/``
(a bare ``Qwen3Model``), ``tokenizer/`` (``Qwen2Tokenizer`` with a Qwen3 chat template) and
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``), so the family loads it through the same code
as a downloaded folder. All models are the real classes with small dimensions and random weights.

What is kept from the real model, because training and inference code depends on it:

- the text encoder has 3 layers (the pipeline reads ``hidden_states[-2]``) and the transformer's
  ``cap_feat_dim`` is its hidden size; the tokenizer pads (the pipeline pads to 512 tokens);
- ``dim / n_heads`` equals ``sum(axes_dims)`` (the model asserts it); ``in_channels`` is the
  VAE's 16 latent channels (the transformer patchifies 2x2 itself);
- the VAE has FLUX.1's scaling and shift factors; the scheduler is Z-Image-Turbo's (static
  ``shift=3.0``).

``write_training_adapter`` writes a LoRA for such a transformer in the layout of the published
Z-Image Turbo training adapter (``diffusion_model.<module>.lora_A/lora_B.weight``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from tests.flux1.tiny_flux1 import VAE
from tests.flux2.tiny_flux2 import build_qwen_tokenizer

TEXT_DIM = 16
TRANSFORMER = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": TEXT_DIM,
    "axes_dims": [4, 6, 6],  # sums to dim / n_heads
    "axes_lens": [256, 64, 64],
}
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json.
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
ADAPTER_TARGETS = (
    *("attention.to_q", "attention.to_v", "feed_forward.w1", "feed_forward.w2"),
    "adaLN_modulation.0",  # a layer no lora.targets preset trains
)


def _qwen3(tokenizer) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3Model(config).eval()


def build_tiny_zimage(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random Z-Image pipeline (diffusers layout) to ``folder`` and return it; a
    folder named like ``Z-Image-Turbo`` is read as Turbo by the family."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(**TRANSFORMER)
    with torch.no_grad():  # the pad tokens start at zero: make them count
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=AutoencoderKL(**VAE),
        text_encoder=_qwen3(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    return folder


def write_training_adapter(
    transformer: ZImageTransformer2DModel, path: Path, *, rank: int = 2, seed: int = 5
) -> dict[str, torch.Tensor]:
    """A random LoRA on ``ADAPTER_TARGETS`` of every block, saved to ``path`` with the published
    adapter's keys (``diffusion_model.<module>.lora_A/lora_B.weight``, no alpha); returns it."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ADAPTER_TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            state[f"diffusion_model.{name}.lora_A.weight"] = down
            state[f"diffusion_model.{name}.lora_B.weight"] = up
    save_file(state, str(path))
    return state
