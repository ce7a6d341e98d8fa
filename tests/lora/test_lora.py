import copy
import json

import pytest
import torch
from safetensors import safe_open

from modules.lora import add_lora, load_lora, lora_disabled, save_lora
from modules.models.demo.family import DemoFamily, build_demo_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_model(model):
    """Add a LoRA and give it non-zero B so the LoRA model differs from the base."""
    add_lora(model.denoiser, rank=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@torch.no_grad()
def _predict(family, model, inputs):
    noisy, timesteps, text = inputs
    return family.predict(model, noisy, timesteps, text)


def test_add_lora_freezes_base_and_trains_float32_lora(demo_model):
    params = add_lora(demo_model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=TARGETS)
    trainable = {n for n, p in demo_model.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in params)
    assert len(params) == len(trainable)


def test_fresh_lora_equals_base(demo_family, demo_model, demo_inputs):
    base = _predict(demo_family, demo_model, demo_inputs)
    add_lora(demo_model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=TARGETS)
    assert torch.equal(_predict(demo_family, demo_model, demo_inputs), base)


def test_unknown_targets_fail_clearly(demo_model):
    with pytest.raises(ValueError, match="not_a_layer|lora.targets"):
        add_lora(demo_model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=["not_a_layer"])


def test_lora_disabled_gives_exactly_the_base_model(demo_family, demo_model, demo_inputs):
    base_copy = copy.deepcopy(demo_model)
    base = _predict(demo_family, base_copy, demo_inputs)
    _lora_model(demo_model)
    student = _predict(demo_family, demo_model, demo_inputs)
    assert not torch.allclose(student, base), "the test LoRA must change the output"
    with lora_disabled(demo_model.denoiser):
        teacher = _predict(demo_family, demo_model, demo_inputs)
    assert torch.equal(teacher, base)  # exactly, not approximately
    assert torch.equal(_predict(demo_family, demo_model, demo_inputs), student)


def test_lora_is_back_on_after_an_exception(demo_family, demo_model, demo_inputs):
    _lora_model(demo_model)
    student = _predict(demo_family, demo_model, demo_inputs)
    with pytest.raises(RuntimeError, match="boom"), lora_disabled(demo_model.denoiser):
        raise RuntimeError("boom")
    assert torch.equal(_predict(demo_family, demo_model, demo_inputs), student)


def test_the_switch_keeps_what_trains_and_refuses_a_model_without_lora(demo_model):
    with pytest.raises(ValueError, match="no LoRA adapter"), lora_disabled(demo_model.denoiser):
        pass
    _lora_model(demo_model)
    before = {n: p.requires_grad for n, p in demo_model.denoiser.named_parameters()}
    for _ in range(3):  # the layers found at the first call serve the next ones
        with lora_disabled(demo_model.denoiser):
            assert not any(p.requires_grad for p in demo_model.denoiser.parameters())
    assert {n: p.requires_grad for n, p in demo_model.denoiser.named_parameters()} == before


def test_save_load_round_trip_through_diffusers(tmp_path, demo_family, demo_inputs):
    model = _lora_model(build_demo_model(seed=0, architecture="wan"))
    student = _predict(demo_family, model, demo_inputs)
    path = save_lora(
        model.denoiser, tmp_path / "x.safetensors", family="demo", config_json='{"a": 1}'
    )
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(k.startswith("transformer.blocks.") for k in keys)
    assert metadata["maskprior.rank"] == "4" and metadata["maskprior.alpha"] == "8"
    assert json.loads(metadata["maskprior.config"]) == {"a": 1}
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 8

    fresh = build_demo_model(seed=0, architecture="wan")  # same base weights, no LoRA
    load_lora(fresh.denoiser, path)
    assert torch.allclose(_predict(demo_family, fresh, demo_inputs), student, atol=1e-6)


def test_a_unet_lora_is_saved_under_diffusers_unet_prefix_and_loads_back(
    tmp_path, demo_family, demo_inputs
):
    model = _lora_model(build_demo_model(seed=0, architecture="unet"))
    student = _predict(demo_family, model, demo_inputs)
    with lora_disabled(model.denoiser):
        assert not torch.allclose(_predict(demo_family, model, demo_inputs), student)
    path = save_lora(model.denoiser, tmp_path / "u.safetensors", family="demo", config_json="{}")
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert keys and all(
        k.startswith("unet.down_blocks.")
        or k.startswith("unet.up_blocks.")
        or k.startswith("unet.mid_block.")
        for k in keys
    )
    assert adapter["unet.r"] == 4
    fresh = build_demo_model(seed=0, architecture="unet")
    load_lora(fresh.denoiser, path)
    assert torch.allclose(_predict(demo_family, fresh, demo_inputs), student, atol=1e-6)
    with pytest.raises(ValueError, match="output.format=comfyui: .* UNet2DConditionModel"):
        demo_family.comfyui_converter(model)


def test_the_comfyui_layout_needs_the_family_s_converter(tmp_path, demo_model):
    """The shared LoRA code knows no family's ComfyUI names: without the converter the layout
    is refused and nothing is written."""
    _lora_model(demo_model)
    with pytest.raises(ValueError, match="layout='comfyui' needs the family's converter"):
        save_lora(
            demo_model.denoiser,
            tmp_path / "c.safetensors",
            family="demo",
            config_json="{}",
            layout="comfyui",
        )
    assert not (tmp_path / "c.safetensors").exists()


def test_save_is_atomic(tmp_path, demo_model, monkeypatch):
    _lora_model(demo_model)
    path = tmp_path / "x.safetensors"
    save_lora(demo_model.denoiser, path, family="demo", config_json="{}")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("modules.lora.lora.save_file", fail)
    with pytest.raises(OSError):
        save_lora(demo_model.denoiser, path, family="demo", config_json="{}")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_the_comfyui_layout_is_the_family_s_converter(tmp_path, demo_model):
    """``save_lora`` writes what the family's ``comfyui_converter`` returns (a UNet has none)."""
    add_lora(demo_model.denoiser, rank=2, alpha=3, dropout=0.0, target_modules=["to_q"])
    seen = []

    def converter(state, alpha):
        seen.append(alpha)
        return {f"diffusion_model.{key}": value for key, value in state.items()}

    path = save_lora(
        demo_model.denoiser,
        tmp_path / "c.safetensors",
        family="demo",
        config_json="{}",
        layout="comfyui",
        comfyui=converter,
    )
    with safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())
    assert seen == [3] and keys and all(k.startswith("diffusion_model.unet.") for k in keys)
    with pytest.raises(ValueError, match="output.format=comfyui: the ComfyUI layout here is WAN"):
        DemoFamily().comfyui_converter(demo_model)
