"""``lora.init_from``: a new run's LoRA starts from a LoRA file's updates, read by the family's
diffusers loader, in the run's own rank and alpha."""

import pytest
import torch
from safetensors.torch import save_file

from modules.lora import add_lora, save_lora
from modules.lora.init_from import InitFromError, init_lora_from, lora_file_problem
from modules.models.demo.family import DemoFamily, build_demo_model

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WAN_TARGETS = [*ATTENTION, "ffn.net.0.proj", "ffn.net.2"]
FAMILY = DemoFamily()


def _inputs(model):
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    text = FAMILY.encode_prompts(model, ["a red star", "a blue ring on stripes"])
    return noisy, torch.tensor([0.3, 0.8]), text


@torch.no_grad()
def _predict(model, inputs):
    return FAMILY.predict(model, *inputs)


def _saved_lora(tmp_path, architecture, targets, layout="diffusers", rank=4, alpha=8.0):
    """A LoRA with non-zero updates saved in ``layout``; (file, the LoRA model's prediction)."""
    model = build_demo_model(seed=0, architecture=architecture)
    add_lora(model.denoiser, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    path = tmp_path / f"{architecture}-{layout}.safetensors"
    comfyui = FAMILY.comfyui_converter(model) if layout == "comfyui" else None
    save_lora(model.denoiser, path, family="demo", config_json="{}", layout=layout, comfyui=comfyui)
    return path, _predict(model, _inputs(model))


def _fresh(architecture, targets, rank, alpha):
    model = build_demo_model(seed=0, architecture=architecture)
    params = add_lora(model.denoiser, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)
    return model, params


@pytest.mark.parametrize(
    ("architecture", "targets", "layout"),
    [
        ("unet", ATTENTION, "diffusers"),
        ("wan", WAN_TARGETS, "diffusers"),
        ("wan", WAN_TARGETS, "comfyui"),
    ],
)
@pytest.mark.parametrize(("rank", "alpha"), [(4, 8.0), (8, 3.0)])
def test_the_run_starts_as_the_file_s_lora_at_its_own_rank_and_alpha(
    tmp_path, architecture, targets, layout, rank, alpha
):
    path, expected = _saved_lora(tmp_path, architecture, targets, layout)
    model, params = _fresh(architecture, targets, rank, alpha)
    base = _predict(build_demo_model(seed=0, architecture=architecture), _inputs(model))
    ids = [id(p) for p in params]
    report = init_lora_from(model.denoiser, path, FAMILY.lora_loader(model))
    got = _predict(model, _inputs(model))
    assert not torch.allclose(expected, base, atol=1e-3), "the test LoRA must change the output"
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5)
    assert (report.file_rank, report.fresh) == (4, 0) and report.kept == pytest.approx(1.0)
    assert report.lines(rank) == [f"LoRA starts from {path}: {report.layers} layers"]
    # The run's adapter as add_lora left it: the same parameters, alone trainable and active.
    trainable = [p for p in model.denoiser.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == ids
    assert list(model.denoiser.peft_config) == ["default"]
    assert model.denoiser.active_adapters() == ["default"]
    assert all(p.dtype == torch.float32 for p in params)
    # Every rank-r row of A still learns: none is zero where B's column is zero.
    a_rows = [p for n, p in model.denoiser.named_parameters() if "lora_A" in n]
    assert all(bool((a.reshape(a.shape[0], -1).abs().sum(1) > 0).all()) for a in a_rows)


def test_a_smaller_rank_keeps_the_largest_directions_and_says_how_much(tmp_path):
    path, expected = _saved_lora(tmp_path, "wan", WAN_TARGETS)
    model, _ = _fresh("wan", WAN_TARGETS, rank=2, alpha=2.0)
    base = _predict(build_demo_model(seed=0, architecture="wan"), _inputs(model))
    report = init_lora_from(model.denoiser, path, FAMILY.lora_loader(model))
    assert report.file_rank == 4 and 0.5 < report.kept < 0.99
    warning = report.lines(2)[1]
    assert "lora.rank=2 keeps" in warning and "set lora.rank=4" in warning
    got = _predict(model, _inputs(model))
    # Closer to the file's LoRA than the base is, but not equal to it.
    assert (got - expected).norm() < 0.8 * (base - expected).norm()
    assert not torch.allclose(got, expected, atol=1e-4)


def test_layers_the_file_does_not_have_start_fresh(tmp_path):
    path, _ = _saved_lora(tmp_path, "wan", ATTENTION)
    model, _ = _fresh("wan", WAN_TARGETS, rank=4, alpha=4.0)
    report = init_lora_from(model.denoiser, path, FAMILY.lora_loader(model))
    assert report.fresh > 0 and report.layers > 0
    assert "start fresh" in report.lines(4)[0]
    ffn_b = [p for n, p in model.denoiser.named_parameters() if "ffn" in n and "lora_B" in n]
    assert ffn_b and all(not bool(b.any()) for b in ffn_b)  # a new LoRA's B: zero


def test_a_file_training_layers_the_run_does_not_is_refused_naming_them(tmp_path):
    path, _ = _saved_lora(tmp_path, "wan", WAN_TARGETS)
    model, _ = _fresh("wan", ATTENTION, rank=4, alpha=4.0)
    with pytest.raises(InitFromError, match=r"lora.init_from: .* trains \d+ layers .*ffn"):
        init_lora_from(model.denoiser, path, FAMILY.lora_loader(model))
    assert list(model.denoiser.peft_config) == ["default"]


def test_a_lora_for_another_model_is_refused(tmp_path):
    path, _ = _saved_lora(tmp_path, "wan", WAN_TARGETS)
    model, params = _fresh("unet", ATTENTION, rank=4, alpha=4.0)
    with pytest.raises(InitFromError, match="another model family"):
        init_lora_from(model.denoiser, path, FAMILY.lora_loader(model))
    assert [p for p in model.denoiser.parameters() if p.requires_grad] == params


def test_files_that_are_not_loras_are_named_before_a_model_loads(tmp_path):
    assert "is not a file" in lora_file_problem(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert "not a readable .safetensors file" in lora_file_problem(broken)
    full = tmp_path / "model.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, str(full))
    assert "holds no LoRA weights" in lora_file_problem(full)
