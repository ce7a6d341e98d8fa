import typing

import pytest
import torch

from modules.config.schema import ModelConfig
from modules.models import ModelFamily, ModelLoadError, get_family
from modules.models.demo.family import (
    ARCHITECTURES,
    MAX_PROMPT_BYTES,
    TIME_SHIFT,
    DemoFamily,
    build_demo_model,
    demo_architecture,
    save_demo_model,
)
from modules.models.flow_matching import euler_sample, flow_noisy_input_and_target
from modules.models.registry import SPECS
from tests.runner_check import assert_predict_goes_through_the_runner

CPU = torch.device("cpu")


def test_registry_matches_the_config_choices():
    assert set(typing.get_args(ModelConfig.model_fields["family"].annotation)) == set(SPECS)
    for name in SPECS:
        family = get_family(ModelConfig(family=name))
        assert isinstance(family, ModelFamily) and family.name == name
    with pytest.raises(ModelLoadError, match="model.family: unknown family 'nope'"):
        get_family(ModelConfig.model_construct(family="nope"))


def test_lora_target_presets_follow_the_denoiser(demo_family):
    transformer = build_demo_model(seed=0, architecture="wan")
    unet = build_demo_model(seed=0, architecture="unet")
    assert set(demo_family.lora_targets(transformer)) == {"attention", "attention_ffn"}
    presets = demo_family.lora_targets(unet)
    assert set(presets) == {"attention", "attention_ffn", "attention_conv"}
    for model, targets in ((transformer, demo_family.lora_targets(transformer)), (unet, presets)):
        names = [name for name, _ in model.denoiser.named_modules()]
        for preset, modules in targets.items():  # every listed layer exists in the model
            for module in modules:
                assert any(n.endswith("." + module) for n in names), (preset, module)
    convs = [n for n, m in unet.denoiser.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(n.endswith(".conv1") for n in convs) and any(n.endswith(".conv2") for n in convs)


def test_codec_is_exact(demo_family, demo_model):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = demo_family.encode_images(demo_model, images)
    assert latents.shape == (2, 48, 8, 8)
    assert torch.equal(demo_family.decode_latents(demo_model, latents), images)


@pytest.mark.parametrize(("architecture", "folder"), [("wan", "transformer"), ("unet", "unet")])
def test_saved_model_loads_from_its_folder_with_the_same_output(
    tmp_path, demo_family, demo_inputs, architecture, folder
):
    model = build_demo_model(seed=0, architecture=architecture)
    save_demo_model(model, tmp_path / "demo")
    assert (tmp_path / f"demo/{folder}/config.json").is_file()
    assert [p.name for p in (tmp_path / "demo").iterdir() if p.name in ARCHITECTURES.values()] == [
        folder
    ]
    assert (tmp_path / "demo/text_encoder/config.json").is_file()
    loaded = demo_family.load(str(tmp_path / "demo"), dtype=torch.float32, device=CPU)
    noisy, timesteps, _ = demo_inputs
    text = demo_family.encode_prompts(loaded, ["a red star", "a blue ring on stripes"])
    assert torch.equal(
        text["embeds"],
        demo_family.encode_prompts(model, ["a red star", "a blue ring on stripes"])["embeds"],
    )
    with torch.no_grad():
        expected = demo_family.predict(model, noisy, timesteps, text)
        assert torch.equal(demo_family.predict(loaded, noisy, timesteps, text), expected)
    assert loaded.identity != model.identity
    assert demo_architecture(loaded.denoiser) == architecture


def test_the_unet_predicts_a_velocity_from_its_clean_image(demo_family, demo_inputs):
    model = build_demo_model(seed=0, architecture="unet")
    noisy, timesteps, text = demo_inputs
    with torch.no_grad():
        velocity = demo_family.predict(model, noisy, timesteps, text)
        clean = model.denoiser(noisy, timesteps * 1000, text["embeds"], return_dict=False)[0]
    assert_predict_goes_through_the_runner(demo_family, model, noisy, timesteps, text, velocity)
    assert velocity.shape == noisy.shape
    t = timesteps.view(-1, 1, 1, 1)
    assert torch.allclose(velocity, (noisy - clean) / t, atol=1e-5)
    with pytest.raises(ValueError, match="architecture: 'dit' is not one of"):
        build_demo_model(architecture="dit")


def test_missing_model_folder_is_a_clear_error(tmp_path, demo_family):
    with pytest.raises(ModelLoadError, match=r"model\.path: .*nowhere. does not exist"):
        demo_family.load(str(tmp_path / "nowhere"), dtype=torch.float32, device=CPU)
    (tmp_path / "half/transformer").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="has no text_encoder, tokenizer subfolder"):
        demo_family.load(str(tmp_path / "half"), dtype=torch.float32, device=CPU)
    (tmp_path / "encoders/text_encoder").mkdir(parents=True)
    (tmp_path / "encoders/tokenizer").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no transformer \(or unet\) subfolder"):
        demo_family.load(str(tmp_path / "encoders"), dtype=torch.float32, device=CPU)
    (tmp_path / "half/unet").mkdir()
    with pytest.raises(ModelLoadError, match="holds both transformer/ and unet/"):
        demo_family.load(str(tmp_path / "half"), dtype=torch.float32, device=CPU)


def test_prompt_padding_is_zeroed(demo_family, demo_model):
    embeds = demo_family.encode_prompts(demo_model, ["ab"])["embeds"]
    assert embeds.shape == (1, MAX_PROMPT_BYTES, 64)
    assert embeds[0, 3:].abs().sum() == 0 and embeds[0, :3].abs().sum() > 0


def test_flow_matching_target_and_exact_euler_on_a_known_velocity():
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    noisy, target = flow_noisy_input_and_target(latents, noise, t)
    assert torch.allclose(noisy[0], latents[0]) and torch.allclose(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.5 * (latents[1] + noise[1]))
    assert torch.equal(target, noise - latents)
    # With the true velocity of a straight path, Euler lands exactly on the data.
    result = euler_sample(lambda x, t: noise - latents, noise, steps=7)
    assert torch.allclose(result, latents, atol=1e-5)
    # Started part-way, from the input noised to t = 0.6, it lands there too, in fewer steps.
    calls: list[float] = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return noise - latents

    partway = 0.4 * latents + 0.6 * noise
    result = euler_sample(velocity, partway, steps=10, shift=3.0, start=0.6)
    assert torch.allclose(result, latents, atol=1e-5)
    assert calls[0] == pytest.approx(0.6) and calls[1:] == pytest.approx(
        [0.5625, 0.4286, 0.25], abs=1e-4
    )


def test_timesteps_favour_high_noise_where_the_layout_is_decided():
    t = DemoFamily().sample_timesteps(
        torch.Size([40_000]), generator=torch.Generator().manual_seed(0), device=CPU
    )
    # Logit-normal shifted by TIME_SHIFT = 3: median 0.75 (plain logit-normal: 0.5), and 39 %
    # of the steps above t = 0.8 (plain: 8 %).
    assert TIME_SHIFT == 3.0
    assert float(t.median()) == pytest.approx(0.75, abs=0.01)
    assert float((t > 0.8).float().mean()) == pytest.approx(0.386, abs=0.01)
    assert float(t.min()) > 0 and float(t.max()) < 1


def test_the_sampler_steps_on_the_same_shifted_schedule(demo_family, demo_model, monkeypatch):
    seen: list[float] = []
    predict = demo_family.predict

    def recording(model, noisy, timesteps, text):
        seen.append(float(timesteps[0]))
        return predict(model, noisy, timesteps, text)

    monkeypatch.setattr(demo_family, "predict", recording)
    text = demo_family.encode_prompts(demo_model, ["a star"])
    demo_family.sample(
        demo_model, text, size=(32, 32), steps=4, generator=torch.Generator().manual_seed(0)
    )
    # Guided: two predictions per step, at t = shift(1), shift(0.75), shift(0.5), shift(0.25).
    expected = [1.0, 0.9, 0.75, 0.5]
    assert seen[::2] == pytest.approx(expected) and seen[1::2] == pytest.approx(expected)


def test_sample_shapes(demo_family, demo_model):
    text = demo_family.encode_prompts(demo_model, ["a star"])
    images = demo_family.sample(
        demo_model, text, size=(32, 32), steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1
