"""The quantised storage forms of the base weights (``model.memory.base_weights``: ``fp8_scaled``,
``int8``, ``nf4``): a LoRA trains on top, the teacher is the stored base, the bytes shrink."""

import contextlib
import copy
import json
import random

import pytest
import torch
from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel
from safetensors.torch import save_file

from modules.config import config_from_dict
from modules.config.schema import MemoryConfig, ModelConfig
from modules.data.dataset import Batch
from modules.lora import add_lora, lora_disabled
from modules.models import LoadedModel, get_family, load_model
from modules.models.base import ModelLoadError
from modules.models.base_weights import (
    FP8,
    QuantisedLinear,
    quantise,
    quantise_fp8_scaled,
    stored_bytes,
)
from modules.models.memory import apply_memory
from modules.trainer.step import StepParts, train_step
from tests.wan.tiny_wan import TRANSFORMER, original_layout

CPU = torch.device("cpu")
FORMS = ("fp8_scaled", "int8", "nf4")


def _relative_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    approx, exact = approx.detach(), exact.detach()
    return float(
        (approx.float() - exact.float()).pow(2).mean().sqrt() / exact.float().pow(2).mean().sqrt()
    )


def _load_wan(tiny_wan, base_weights, dtype=torch.float32):
    config = ModelConfig(family="wan", path=str(tiny_wan), memory={"base_weights": base_weights})
    family = get_family(config)
    return family, load_model(family, config, dtype=dtype, device=CPU)


def _block_linears(family, denoiser) -> list[torch.nn.Linear]:
    return [
        m
        for block in family.blocks(denoiser)
        for m in block.modules()
        if isinstance(m, torch.nn.Linear)
    ]


def test_fp8_scaled_keeps_small_weights_that_plain_fp8_loses():
    """Weights around 1e-3 sit among float8's subnormals: plain fp8 keeps one or two bits of
    them; with a scale per output channel each row uses the whole float8 range."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=generator) * 1e-3
    plain = _relative_rms(weight.to(FP8).float(), weight)
    codes, scale = quantise_fp8_scaled(weight)
    assert codes.dtype == FP8 and scale.shape == (16, 1)
    scaled = _relative_rms(codes.float() * scale, weight)
    assert scaled < 0.04 and plain > 5 * scaled
    assert codes.float().abs().amax(dim=1).eq(448).all()  # each row's largest weight → 448


def test_each_form_stores_codes_and_dequantises_close_to_the_weight():
    """The relative RMS error of each form on a weight of a trained model's spread (the
    README's figures): int8 < fp8_scaled < nf4, and each layer's forward is its dequantised
    weight's."""
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=generator) * 0.02)
    x = torch.randn(3, 128, generator=generator)
    errors = {}
    for form in FORMS:
        layer = quantise(linear, form, torch.float32)
        assert layer.weight.dtype in (torch.uint8, torch.int8) and not layer.weight.requires_grad
        errors[form] = _relative_rms(layer.dequantised(), linear.weight)
        expected = torch.nn.functional.linear(x, layer.dequantised(), linear.bias)
        assert torch.equal(layer(x), expected)
    assert errors["int8"] < errors["fp8_scaled"] < errors["nf4"] < 0.12, errors
    assert errors["int8"] < 0.01 and errors["fp8_scaled"] < 0.04, errors


def test_a_plain_torch_module_without_blocks_stores_every_linear_layer():
    denoiser = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    model = LoadedModel(denoiser=denoiser, identity="plain")
    apply_memory(model, MemoryConfig(base_weights="int8"), compute_dtype=torch.float32)
    assert isinstance(denoiser[0], QuantisedLinear) and isinstance(denoiser[2], QuantisedLinear)
    assert denoiser(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.parametrize("form", FORMS)
def test_each_form_stores_the_blocks_and_shrinks_their_bytes(tiny_wan, form):
    """bfloat16 blocks' linear weights: 2 bytes each; fp8_scaled and int8 1 byte and a float32
    scale per output channel, nf4 half a byte and a float32 absmax per 64 weights."""
    family, auto = _load_wan(tiny_wan, "auto", torch.bfloat16)
    _, model = _load_wan(tiny_wan, form, torch.bfloat16)
    before = _block_linears(family, auto.denoiser)
    after = _block_linears(family, model.denoiser)
    assert len(after) == len(before) > 0 and all(isinstance(m, QuantisedLinear) for m in after)
    assert not isinstance(model.denoiser.proj_out, QuantisedLinear)  # outside the blocks
    assert model.denoiser.dtype == torch.bfloat16  # the compute dtype, for the family's casts
    weights = sum(m.weight.numel() for m in before)
    ratio = sum(stored_bytes(m) for m in after) / sum(stored_bytes(m) for m in before)
    per_weight = {"fp8_scaled": 1.0, "int8": 1.0, "nf4": 0.5}[form]
    assert sum(m.weight.numel() * m.weight.element_size() for m in after) == weights * per_weight
    assert per_weight / 2 < ratio < per_weight / 2 + 0.2, ratio  # scales and biases on top


def _batch(family, model) -> Batch:
    """Two 2-frame 4 x 4 latents, the second with a prior region (it needs the teacher)."""
    generator = torch.Generator().manual_seed(2)
    masks = torch.ones(2, 1, 2, 4, 4)
    masks[1, :, :, :, :2] = 0.0
    return Batch(
        latents=torch.randn(2, 16, 2, 4, 4, generator=generator),
        masks=masks,
        text={"embeds": torch.randn(2, 5, 32, generator=generator)},
        prior_prediction=torch.tensor([False, False]),
        loss_weight=torch.ones(2),
        has_mask=torch.ones(2, dtype=torch.bool),
        caption_dropped=torch.zeros(2, dtype=torch.bool),
    )


def _train(family, model, monkeypatch) -> list[torch.nn.Parameter]:
    """Two training steps with the teacher on a LoRA added to ``model``; asserts each step's
    teacher prediction equals that of the stored model without the LoRA (a copy taken before
    the LoRA was added), and that the LoRA's gradient is not zero. Returns the LoRA's weights."""
    stored_base = copy.deepcopy(model.denoiser)  # the stored (quantised) model, no LoRA
    torch.manual_seed(0)
    targets = ["to_q", "to_v", "ffn.net.2"]
    params = add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
    assert all(p.dtype == torch.float32 for p in params)
    teachers = []
    original = type(family).predict

    def predict(self, loaded, noisy, timesteps, text):
        out = original(self, loaded, noisy, timesteps, text)
        if not torch.is_grad_enabled():  # the teacher's pass
            base = LoadedModel(denoiser=stored_base, identity="base", parts=loaded.parts)
            teachers.append((out, original(self, base, noisy, timesteps, text)))
        return out

    monkeypatch.setattr(type(family), "predict", predict)
    config = config_from_dict({"mask": {"enabled": True}, "prior": {"weight": 1.0}})
    parts = StepParts(
        family=family,
        model=model,
        student=model,
        mask=config.mask,
        prior=config.prior,
        generator=torch.Generator().manual_seed(3),
        mask_rng=random.Random(3),
        device=CPU,
        autocast=contextlib.nullcontext,
    )
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    start = [p.detach().clone() for p in params]
    for _ in range(2):
        result = train_step(_batch(family, model), parts, prior_weight=1.0)
        optimizer.zero_grad()
        result.own.backward()
        assert any(float(p.grad.abs().sum()) > 0 for p in params[1::2])  # lora_B
        optimizer.step()
    assert len(teachers) == 2 and all(torch.equal(out, base) for out, base in teachers)
    assert all(not torch.equal(p, s) for p, s in zip(params, start, strict=True))
    monkeypatch.undo()
    with torch.no_grad(), lora_disabled(model.denoiser):
        noisy = torch.randn(1, 16, 2, 4, 4)
        t, text = torch.tensor([0.4]), {"embeds": torch.randn(1, 5, 32)}
        teacher = family.predict(model, noisy, t, text)
    base = LoadedModel(denoiser=stored_base, identity="base", parts=model.parts)
    with torch.no_grad():
        assert torch.equal(teacher, family.predict(base, noisy, t, text))
    return params


@pytest.mark.parametrize("form", FORMS)
def test_a_lora_trains_on_each_form_and_the_teacher_is_the_stored_base(tiny_wan, form, monkeypatch):
    family, model = _load_wan(tiny_wan, form)
    _train(family, model, monkeypatch)
    layer = family.blocks(model.denoiser)[0].attn1.to_q
    assert isinstance(layer.base_layer, QuantisedLinear)  # the base stayed quantised, frozen
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


# ------------------------------------------------------------------- ComfyUI single files


def _comfyui_fp8_file(path, form: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` written as ComfyUI writes its ``fp8_scaled`` files: the blocks' linear weights
    as float8 with a float32 scale per tensor, the rest in bfloat16. ``form``: ``older``
    (``scaled_fp8`` marker, ``scale_weight``), ``newer`` (``weight_scale``, the layers in the
    file's ``_quantization_metadata``) or ``newer_tensors`` (the layers in ``comfy_quant``
    tensors, the float8 weights in uint8 containers). Returns the written weights dequantised,
    by their key."""
    written, expected, metadata = {}, {}, {}
    layers = {}
    for key, value in state.items():
        if "blocks." in key and key.endswith(".weight") and value.ndim == 2:
            layer = key.removesuffix(".weight")
            scale = value.abs().amax() / 448
            codes = (value / scale).to(FP8)
            written[key] = codes.view(torch.uint8) if form == "newer_tensors" else codes
            if form == "older":
                written[f"{layer}.scale_weight"] = scale.reshape(())
                written[f"{layer}.scale_input"] = torch.ones(())
            else:
                written[f"{layer}.weight_scale"] = scale.reshape(())
                written[f"{layer}.input_scale"] = torch.ones(())
                layers[layer] = {"format": "float8_e4m3fn"}
            expected[key] = codes.float() * scale
        else:
            written[key] = value.to(torch.bfloat16)
    if form == "older":
        written["scaled_fp8"] = torch.empty(0, dtype=FP8)
    elif form == "newer":
        quantization = {"format_version": "1.0", "layers": layers}
        metadata["_quantization_metadata"] = json.dumps(quantization)
    else:
        for layer, conf in layers.items():
            data = list(json.dumps(conf).encode())
            written[f"{layer}.comfy_quant"] = torch.tensor(data, dtype=torch.uint8)
    save_file(written, path, metadata=metadata)
    return expected


@pytest.mark.parametrize(
    ("form", "base_weights"), [("older", "auto"), ("newer", "auto"), ("newer", "int8")]
)
def test_a_comfyui_fp8_scaled_wan_file_loads_in_its_form_and_trains(
    tiny_wan, tmp_path, form, base_weights, monkeypatch
):
    """The file's scaled layers stay float8 with the file's scales (``auto``), their
    dequantised weights exactly what was written; another storage form is taken from them."""
    file = tmp_path / f"wan_fp8_scaled_{form}.safetensors"
    torch.manual_seed(7)
    state = original_layout(WanTransformer3DModel(**TRANSFORMER).state_dict())
    expected = _comfyui_fp8_file(file, form, state)
    config = ModelConfig(
        family="wan",
        path=str(tiny_wan),
        wan={"transformer_file": str(file)},
        memory={"base_weights": base_weights},
    )
    family = get_family(config)
    model = load_model(family, config, dtype=torch.float32, device=CPU)
    prefix = "model.diffusion_model.blocks"
    stored = "fp8_scaled" if base_weights == "auto" else base_weights
    for index, block in enumerate(model.denoiser.blocks):
        for original, layer in (
            ("self_attn.q", block.attn1.to_q),
            ("cross_attn.o", block.attn2.to_out[0]),
            ("ffn.2", block.ffn.net[2]),
        ):
            written = expected[f"{prefix}.{index}.{original}.weight"]
            assert isinstance(layer, QuantisedLinear) and layer.form == stored
            if stored == "fp8_scaled":
                assert torch.equal(layer.dequantised(), written)
                assert layer.weight.numel() == written.numel()  # one byte per weight
            else:
                assert _relative_rms(layer.dequantised(), written) < 0.01
    _train(family, model, monkeypatch)


def test_a_comfyui_fp8_scaled_qwen_image_file_loads_in_its_form(tiny_qwen_image, tmp_path):
    """The families reading ``transformer_file`` through the shared loader read it the same way
    (here with per-layer ``comfy_quant`` tensors and float8 bytes in uint8 containers)."""
    folder_state = QwenImageTransformer2DModel.from_pretrained(
        tiny_qwen_image / "transformer"
    ).state_dict()
    file = tmp_path / "qwen_image_fp8_scaled.safetensors"
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in folder_state.items()}
    expected = _comfyui_fp8_file(file, "newer_tensors", state)
    config = ModelConfig(
        family="qwen_image", path=str(tiny_qwen_image), qwen_image={"transformer_file": str(file)}
    )
    model = load_model(get_family(config), config, dtype=torch.float32, device=CPU)
    assert len(expected) > 0
    for key, value in expected.items():
        name = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        layer = model.denoiser.get_submodule(name)
        assert isinstance(layer, QuantisedLinear) and torch.equal(layer.dequantised(), value), key


def test_a_comfyui_file_in_another_quantised_format_is_refused_by_name(tiny_wan, tmp_path):
    file = tmp_path / "wan_int8.safetensors"
    state = original_layout(WanTransformer3DModel(**TRANSFORMER).state_dict())
    key = "model.diffusion_model.blocks.0.ffn.2"
    state[f"{key}.comfy_quant"] = torch.tensor(
        list(b'{"format": "int8_blockwise"}'), dtype=torch.uint8
    )
    save_file(state, file)
    config = ModelConfig(family="wan", path=str(tiny_wan), wan={"transformer_file": str(file)})
    with pytest.raises(
        ModelLoadError, match=r"transformer_file: .*wan_int8.safetensors.*int8_blockwise"
    ):
        load_model(get_family(config), config, dtype=torch.float32, device=CPU)


def test_an_unknown_form_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="base_weights") as error:
        ModelConfig(memory={"base_weights": "int4"})
    assert "nf4" in str(error.value)
