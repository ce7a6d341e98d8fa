"""The memory options (``model.memory``) applied to every family's denoiser after ``load``, and
the Protocol's ``blocks``: each family's repeated blocks, all of them, in forward order."""

import pytest
import torch

from modules.config.schema import MemoryConfig, ModelConfig
from modules.lora.lora import add_lora, lora_disabled
from modules.models import LoadedModel, get_family, load_model
from modules.models.demo.family import DemoFamily, build_demo_model
from modules.models.memory import apply_memory
from tests.runner_check import assert_predict_goes_through_the_runner

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn


def _wan_inputs():
    return torch.randn(1, 16, 2, 4, 4), {"embeds": torch.randn(1, 5, 32)}


def _flux1_inputs():
    return torch.randn(1, 16, 4, 6), {"embeds": torch.randn(1, 8, 32), "pooled": torch.randn(1, 32)}


def _flux2_inputs():
    return torch.randn(1, 128, 2, 3), {"embeds": torch.randn(1, 8, 48)}


def _qwen_image_inputs():
    mask = torch.ones(1, 5, dtype=torch.long)
    return torch.randn(1, 16, 4, 6), {"embeds": torch.randn(1, 5, 32), "mask": mask}


FAMILIES = {
    "wan": ("tiny_wan", _wan_inputs),
    "flux1": ("tiny_flux1", _flux1_inputs),
    "flux2": ("tiny_flux2", _flux2_inputs),
    "qwen_image": ("tiny_qwen_image", _qwen_image_inputs),
}
"""Family → (its tiny folder's fixture, a function giving noisy latents and text for it)."""


def _load(request, name, dtype=torch.float32, **memory):
    fixture, inputs = FAMILIES[name]
    config = ModelConfig(family=name, path=str(request.getfixturevalue(fixture)), memory=memory)
    family = get_family(config)
    return family, load_model(family, config, dtype=dtype, device=CPU), inputs


@pytest.mark.parametrize("name", FAMILIES)
def test_fp8_base_weights_store_float8_a_lora_trains_on_top_and_the_teacher_is_that_base(
    request, name
):
    family, model, inputs = _load(request, name, torch.bfloat16, base_weights="fp8")
    first = family.blocks(model.denoiser)[0]
    layer = first.attn1 if name == "wan" else first.attn
    assert layer.to_q.weight.dtype == FP8 and model.denoiser.dtype == torch.bfloat16
    torch.manual_seed(0)
    noisy, text = inputs()
    t = torch.tensor([0.5])
    with torch.no_grad():
        base = family.predict(model, noisy, t, text)
    params = add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q"])
    assert all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for param in params[1::2]:
            param.normal_()  # lora_B: the student now differs from the base
    out = family.predict(model, noisy, t, text)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    assert layer.to_q.base_layer.weight.dtype == FP8
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, out)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    assert torch.equal(teacher, base) and not torch.equal(out.detach(), base)


def test_auto_base_weights_are_left_as_loaded(request):
    _, model, _ = _load(request, "flux1", torch.bfloat16)
    dtypes = {p.dtype for p in model.denoiser.parameters()}
    assert dtypes == {torch.bfloat16}
    model.prepare_denoiser(model.denoiser)  # what WAN does to an expert it loads later
    assert {p.dtype for p in model.denoiser.parameters()} == dtypes


@pytest.mark.parametrize("base_weights", ["fp8", "auto"])
def test_wan_s_second_expert_gets_the_same_storage(tiny_wan_a14b, base_weights):
    """WAN 2.2 A14B loads the expert it does not train when a sample needs it: through the
    loaded model's ``prepare_denoiser``, so it is stored like the trained one."""
    config = ModelConfig(
        family="wan",
        path=str(tiny_wan_a14b),
        wan={"expert": "low_noise"},
        memory={"base_weights": base_weights},
    )
    family = get_family(config)
    model = load_model(family, config, dtype=torch.bfloat16, device=CPU)
    assert model.parts.other_expert is None
    images = family.sample(
        model,
        {"embeds": torch.randn(1, 5, 32)},
        size=(16, 16),
        steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    other = model.parts.other_expert  # the high-noise expert, used at t = 1
    assert other is not None and other is not model.denoiser
    stored = FP8 if base_weights == "fp8" else torch.bfloat16
    for denoiser in (model.denoiser, other):
        assert denoiser.blocks[0].attn1.to_q.weight.dtype == stored
        assert denoiser.dtype == torch.bfloat16  # the compute dtype


@pytest.mark.parametrize("architecture", ["unet", "wan"])
def test_the_demo_denoisers_take_fp8_base_weights(architecture, demo_inputs):
    family = DemoFamily()
    model = build_demo_model(architecture=architecture)
    noisy, timesteps, text = demo_inputs
    with torch.no_grad():
        before = family.predict(model, noisy, timesteps, text)
    apply_memory(model, MemoryConfig(base_weights="fp8"), compute_dtype=torch.float32)
    first = family.blocks(model.denoiser)[0]
    assert any(p.dtype == FP8 for p in first.parameters())
    with torch.no_grad():
        after = family.predict(model, noisy, timesteps, text)
    assert after.dtype == before.dtype and torch.isfinite(after).all()
    assert not torch.equal(after, before)  # the weights were rounded to float8
    assert torch.allclose(after, before, atol=0.5, rtol=0.5)


def test_a_plain_torch_module_takes_fp8_base_weights():
    """Not only diffusers models: any denoiser's layers are stored in float8."""
    denoiser = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    model = LoadedModel(denoiser=denoiser, identity="plain")
    x = torch.randn(3, 4)
    expected = denoiser(x)
    apply_memory(model, MemoryConfig(base_weights="fp8"), compute_dtype=torch.float32)
    assert denoiser[0].weight.dtype == FP8
    out = denoiser(x)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=0.2)


# ------------------------------------------------------------------------------------ blocks


def _candidates(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """Every repeated block a denoiser has: the items of its ``*blocks`` lists, and a UNet's
    middle block."""
    found = [
        block
        for name, child in denoiser.named_children()
        if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]
    middle = getattr(denoiser, "mid_block", None)
    return found + ([middle] if middle is not None else [])


def _forward_order(denoiser, run) -> list[torch.nn.Module]:
    """The candidates in the order ``run()`` calls them."""
    called: list[torch.nn.Module] = []
    handles = [
        block.register_forward_pre_hook(lambda module, args: called.append(module))
        for block in _candidates(denoiser)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return called


EXPECTED_BLOCKS = {
    "wan": ["WanTransformerBlock"] * 2,
    "flux1": ["FluxTransformerBlock"] + ["FluxSingleTransformerBlock"] * 2,
    "flux2": ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"],
    "qwen_image": ["QwenImageTransformerBlock"] * 2,
}
"""The block classes of each tiny model, in forward order (its config's layer counts)."""


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_are_all_of_the_denoiser_s_blocks_in_forward_order(request, name):
    family, model, inputs = _load(request, name)
    noisy, text = inputs()
    blocks = family.blocks(model.denoiser)
    assert [type(block).__name__ for block in blocks] == EXPECTED_BLOCKS[name]
    called = _forward_order(
        model.denoiser, lambda: family.predict(model, noisy, torch.tensor([0.5]), text)
    )
    assert len(called) == len(blocks) == len(_candidates(model.denoiser))
    assert all(a is b for a, b in zip(called, blocks, strict=True))


@pytest.mark.parametrize("architecture", ["unet", "wan"])
def test_the_demo_s_blocks_are_in_forward_order(architecture, demo_inputs):
    family = DemoFamily()
    model = build_demo_model(architecture=architecture)
    noisy, timesteps, text = demo_inputs
    blocks = family.blocks(model.denoiser)
    called = _forward_order(model.denoiser, lambda: family.predict(model, noisy, timesteps, text))
    assert len(blocks) == (7 if architecture == "unet" else 6)  # 3 down, middle, 3 up / 6 layers
    assert len(called) == len(blocks) == len(_candidates(model.denoiser))
    assert all(a is b for a, b in zip(called, blocks, strict=True))
