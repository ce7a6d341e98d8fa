"""The ComfyUI (native WAN) layout: names, alpha, and the round trip through diffusers' own
conversion of non-diffusers WAN LoRAs. The demo family's transformer is a WAN transformer, so it
stands in for WAN here (test_wan_cli.py repeats the round trip on a trained WAN LoRA)."""

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from modules.lora import add_lora, load_lora, lora_state_dict, save_lora
from modules.models.demo.family import build_demo_model
from modules.models.wan.comfyui import original_module_name, to_comfyui


@pytest.fixture
def demo_model():
    """The demo family's WAN transformer, whatever the built-in weights are."""
    return build_demo_model(seed=0, architecture="wan")


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _trained_lora(model, rank=4, alpha=8.0):
    add_lora(model.denoiser, rank=rank, alpha=alpha, dropout=0.0, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_module_names_follow_the_original_wan_implementation():
    assert original_module_name("blocks.3.attn1.to_q") == "blocks.3.self_attn.q"
    assert original_module_name("blocks.0.attn2.to_out.0") == "blocks.0.cross_attn.o"
    assert original_module_name("blocks.12.ffn.net.0.proj") == "blocks.12.ffn.0"
    assert original_module_name("blocks.1.ffn.net.2") == "blocks.1.ffn.2"
    assert original_module_name("proj_out") == "head.head"
    with pytest.raises(ValueError, match="'blocks.0.norm2' has no ComfyUI WAN name"):
        original_module_name("blocks.0.norm2")


def test_comfyui_keys_and_alpha(demo_model):
    state = lora_state_dict(_trained_lora(demo_model).denoiser)
    converted = to_comfyui(state, alpha=8.0)
    down = "diffusion_model.blocks.0.self_attn.q.lora_down.weight"
    assert torch.equal(converted[down], state["transformer.blocks.0.attn1.to_q.lora_A.weight"])
    up = "diffusion_model.blocks.5.ffn.2.lora_up.weight"
    assert torch.equal(converted[up], state["transformer.blocks.5.ffn.net.2.lora_B.weight"])
    alphas = {k: v for k, v in converted.items() if k.endswith(".alpha")}
    assert len(alphas) == len(state) // 2  # one alpha per module
    assert all(v.dim() == 0 and float(v) == 8.0 for v in alphas.values())


@pytest.mark.parametrize("alpha", [4.0, 8.0, 1.0])
def test_diffusers_conversion_gives_back_the_diffusers_tensors(tmp_path, demo_model, alpha):
    """diffusers folds alpha / rank into the pair (A * s_down, B * s_up, s_down s_up = alpha /
    rank); with alpha == rank that is the identity, otherwise the product B A is kept."""
    denoiser = _trained_lora(demo_model, rank=4, alpha=alpha).denoiser
    save_lora(denoiser, tmp_path / "d.safetensors", family="demo", config_json="{}")
    path = save_lora(
        denoiser,
        tmp_path / "c.safetensors",
        family="demo",
        config_json="{}",
        layout="comfyui",
        comfyui=to_comfyui,
    )
    with safe_open(str(path), "pt") as handle:
        assert "lora_adapter_metadata" not in handle.metadata()  # else alpha would apply twice
        assert handle.metadata()["maskprior.layout"] == "comfyui"
    reference = load_file(tmp_path / "d.safetensors")
    converted = _convert_non_diffusers_wan_lora_to_diffusers(load_file(path))
    assert set(converted) == set(reference)
    scale = alpha / 4
    for key in (k for k in reference if k.endswith("lora_A.weight")):
        a, b = reference[key], reference[key.replace("lora_A", "lora_B")]
        a2, b2 = converted[key], converted[key.replace("lora_A", "lora_B")]
        if scale == 1.0:
            assert torch.equal(a2, a) and torch.equal(b2, b)
        assert torch.allclose(b2 @ a2, scale * (b @ a), atol=1e-6)


def test_load_lora_reads_the_comfyui_layout(tmp_path, demo_family, demo_model, demo_inputs):
    denoiser = _trained_lora(demo_model).denoiser
    noisy, timesteps, text = demo_inputs
    with torch.no_grad():
        student = demo_family.predict(demo_model, noisy, timesteps, text)
    path = save_lora(
        denoiser,
        tmp_path / "c.safetensors",
        family="demo",
        config_json="{}",
        layout="comfyui",
        comfyui=demo_family.comfyui_converter(demo_model),
    )
    fresh = build_demo_model(seed=0, architecture="wan")
    with pytest.raises(ValueError, match="load it with the family's LoRA loader"):
        load_lora(fresh.denoiser, path)  # the shared code knows no family's layout
    load_lora(fresh.denoiser, path, loader=demo_family.lora_loader(fresh))
    with torch.no_grad():
        loaded = demo_family.predict(fresh, noisy, timesteps, text)
    assert torch.allclose(loaded, student, atol=1e-5)
