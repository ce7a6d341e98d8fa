"""What the families that load a diffusers folder share (``modules.models.model_folder``): each
keeps its parts in a dataclass of its own built on :class:`FolderParts`, loads its encoders and
VAE on first use, and ``release_encoders`` frees them through the shared helpers."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from modules.config.schema import ModelConfig
from modules.models import get_family
from modules.models.demo.family import DemoParts
from modules.models.flux1.family import Flux1Parts
from modules.models.flux2.family import Flux2Parts
from modules.models.model_folder import FolderParts, frozen_vae
from modules.models.qwen_image.family import QwenImageParts
from modules.models.wan.family import WanParts

CPU = torch.device("cpu")
FAMILIES = {
    # family: (fixture, its parts' class, the field its text encoders are kept in)
    "wan": ("tiny_wan", WanParts, "text_encoder"),
    "flux1": ("tiny_flux1", Flux1Parts, "encoders"),
    "flux2": ("tiny_flux2", Flux2Parts, "encoders"),
    "qwen_image": ("tiny_qwen_image", QwenImageParts, "encoder"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_keeps_typed_parts_that_load_on_use_and_are_released(name, request):
    fixture, parts_class, encoders = FAMILIES[name]
    folder = request.getfixturevalue(fixture)
    family = get_family(ModelConfig(family=name, path=str(folder)))
    model = family.load(str(folder), dtype=torch.float32, device=CPU)
    parts = model.parts
    assert type(parts) is parts_class and isinstance(parts, FolderParts)
    assert (parts.folder, parts.device, parts.dtype) == (folder, CPU, torch.float32)
    assert parts.vae_config["_class_name"].startswith("AutoencoderKL")
    assert parts.vae is None and getattr(parts, encoders) is None and not parts.released

    family.encode_prompts(model, ["a photo of sks star"])
    assert getattr(parts, encoders) is not None
    family.encode_images(model, torch.zeros(1, 3, 32, 32))
    vae = parts.vae
    assert vae is not None and not vae.training
    family.release_encoders(model, keep_decoder=True)
    assert getattr(parts, encoders) is None and parts.released
    assert parts.vae is vae  # kept for the samples
    family.release_encoders(model, keep_decoder=False)
    assert parts.vae is None and parts.released


def test_the_vae_loads_once_in_float32(tiny_flux1):
    parts = FolderParts(
        folder=tiny_flux1, device=CPU, dtype=torch.bfloat16, vae_config={}, released=True
    )
    vae = frozen_vae(parts, AutoencoderKL)
    assert isinstance(vae, AutoencoderKL) and parts.vae is vae
    assert next(vae.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in vae.parameters())
    assert frozen_vae(parts, AutoencoderKL) is vae


def test_the_demo_model_keeps_its_text_encoder_and_tokenizer(demo_model):
    assert isinstance(demo_model.parts, DemoParts)
    ids = demo_model.parts.tokenizer(["a red star"]).input_ids
    assert len(ids[0]) == len("a red star") + 1  # ByT5: one token a byte, and </s>
    assert not demo_model.parts.text_encoder.training
