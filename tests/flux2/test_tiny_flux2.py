"""The tiny FLUX.2 pipelines load with their real pipeline classes and generate finite images."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from tests.flux2.tiny_flux2 import build_tiny_flux2

PIPELINES = {"klein": Flux2KleinPipeline, "klein-base": Flux2KleinPipeline, "dev": Flux2Pipeline}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    loaded = {}
    for variant, cls in PIPELINES.items():
        folder = build_tiny_flux2(root / variant, variant=variant)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == cls.__name__
        loaded[variant] = cls.from_pretrained(folder, local_files_only=True)
    return loaded


@pytest.mark.parametrize("variant", list(PIPELINES))
@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 64)])
def test_generates(pipelines, variant, height, width):
    pipe = pipelines[variant]
    images = pipe(
        prompt="a photo of a red cat",
        height=height,
        width=width,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, height, width)
    assert torch.isfinite(images).all()


def test_configs(pipelines):
    assert pipelines["dev"].transformer.config.guidance_embeds is True
    assert pipelines["klein"].transformer.config.guidance_embeds is False
    assert pipelines["klein"].config.is_distilled is True
    assert pipelines["klein-base"].config.is_distilled is False
    for pipe in pipelines.values():
        assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
        assert not torch.allclose(pipe.vae.bn.running_mean, torch.zeros(1))
        embeds, text_ids = pipe.encode_prompt("a red cat")
        assert embeds.shape == (1, 512, pipe.transformer.config.joint_attention_dim)
        assert text_ids.shape == (1, 512, 4)
