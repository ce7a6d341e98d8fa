"""The zimage family on tiny real Z-Image folders: the pipeline's encodings and samples (Turbo's
own steps, base's CFG), the teacher equal to a separately loaded base, the training adapter
merged for training and taken out for samples, single-file transformers in the original layout
(scaled fp8 too), and the public CLI training a masked-prior LoRA from the shipped preset on
Turbo with a training adapter, whose LoRA loads in ZImagePipeline without the adapter in it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import load_file, save_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled
from modules.loss import masked_prior_loss
from modules.models import ModelLoadError, get_family, load_model
from modules.models.base_weights import QuantisedLinear
from modules.models.registry import family_spec, folder_summary
from modules.models.single_file_check import single_file_problem
from modules.models.zimage.family import to_comfyui, without_adapter
from modules.trainer.notes import family_notes
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.trained_lora import SAMPLES, train_in_process, train_preset
from tests.zimage.tiny_zimage import build_tiny_zimage, write_training_adapter

CPU = torch.device("cpu")
TOKENS = 64
PROMPTS = ["a photo of sks star", "a red cat with a striped ring on a checkered background"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Z-Image-Turbo folder (read as Turbo by its name), a base-named copy of the same
    weights, and a training adapter for them in the published layout."""
    root = tmp_path_factory.mktemp("zimage")
    turbo = build_tiny_zimage(root / "Z-Image-Turbo")
    base = root / "Z-Image"
    base.symlink_to(turbo, target_is_directory=True)
    transformer = ZImageTransformer2DModel.from_pretrained(turbo / "transformer")
    adapter = root / "zimage_turbo_training_adapter.safetensors"
    write_training_adapter(transformer, adapter)
    return turbo, base, adapter


@pytest.fixture(scope="module")
def pipe(folders):
    pipeline = ZImagePipeline.from_pretrained(folders[0], local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load(folder, **options):
    config = ModelConfig(
        family="zimage", path=str(folder), zimage={"text_tokens": TOKENS, **options}
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def test_encodings_and_samples_are_the_pipeline_s(folders, pipe):
    turbo, base, _ = folders
    family, model = load(turbo)
    (note,) = family_notes(family, model)  # said at the start of a run
    assert "Z-Image Turbo, a step-distilled model" in note
    assert family_notes(family, load(base)[1]) == []
    text = family.encode_prompts(model, PROMPTS)
    embeds, _ = pipe.encode_prompt(
        list(PROMPTS), device=CPU, do_classifier_free_guidance=False, max_sequence_length=TOKENS
    )
    counts, limit = family.prompt_token_counts(model, PROMPTS)
    assert counts == [e.shape[0] for e in embeds] == text["mask"].sum(dim=1).tolist()
    assert limit == TOKENS and counts[0] < counts[1]  # one prompt is padded
    for row, mask, theirs in zip(text["embeds"], text["mask"].bool(), embeds, strict=True):
        assert torch.allclose(row[mask], theirs, atol=1e-6) and not row[~mask].any()
    # Turbo: its own 9 steps, no guidance, whatever sampling.steps says.
    family.release_encoders(model, keep_decoder=True)
    ours = family.sample(model, text, size=(48, 32), steps=2, generator=_seed())
    theirs = pipe(
        prompt_embeds=embeds,
        width=48,
        height=32,
        num_inference_steps=9,
        guidance_scale=0.0,
        output_type="pt",
        generator=_seed(),
    ).images
    assert ours.shape == (2, 3, 32, 48)
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-4)
    # Base (the same weights under another name): sampling.steps and CFG 5 with "".
    family, model = load(base)
    assert not model.parts.turbo
    text = family.encode_prompts(model, PROMPTS[:1])
    family.release_encoders(model, keep_decoder=True)
    ours = family.sample(model, text, size=(32, 32), steps=3, generator=_seed())
    theirs = pipe(
        PROMPTS[0],
        width=32,
        height=32,
        num_inference_steps=3,
        output_type="pt",
        generator=_seed(),
        max_sequence_length=TOKENS,
    ).images
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-4)


def _seed():
    return torch.Generator().manual_seed(0)


def test_teacher_is_the_base_and_the_loss_takes_it(folders):
    family, model = load(folders[0])
    base = ZImageTransformer2DModel.from_pretrained(folders[0] / "transformer")
    text = family.encode_prompts(model, PROMPTS)  # different lengths: the mask is used
    family.release_encoders(model, keep_decoder=False)
    targets = family.lora_targets(model)["attention_ffn"]
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 16, 6, 4), torch.tensor([0.3, 0.8])
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    with torch.no_grad():
        reference = family.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert student.shape == noisy.shape
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    # The shorter prompt alone gives the same prediction: the padding is never read.
    alone = {key: value[:1, : int(text["mask"][0].sum())] for key, value in text.items()}
    with torch.no_grad(), lora_disabled(model.denoiser):
        single = family.predict(model, noisy[:1], t[:1], alone)
    assert torch.allclose(single, teacher[:1], atol=1e-5)
    # The transformer's own convention: t = 1 - sigma in, x0 - noise out.
    with torch.no_grad():
        raw = base([noisy[0, :, None]], 1 - t[:1], [alone["embeds"][0]], return_dict=False)[0]
    assert torch.allclose(-raw[0][:, 0], teacher[0], atol=1e-5)
    mask = torch.zeros(2, 1, 6, 4)
    mask[:, :, 1:4, 1:3] = 1.0
    loss = masked_prior_loss(
        (student - noisy) ** 2,
        mask,
        prior_loss=(student - teacher) ** 2,
        prior_weight=1.0,
        normalize_per_sample=True,
        layout="video",
    )
    loss.total.backward()
    assert torch.isfinite(loss.total) and float(loss.prior.detach()) > 0
    assert len(family.blocks(model.denoiser)) == 1 + 1 + 2  # refiners, then the layers


def test_block_swap_changes_nothing_training_computes(folders):
    """The memory seam: every block swapped (refiners and layers), the teacher and the
    student's loss and LoRA gradients are those without the swap; 3N copies per step."""
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([0.3, 0.7])
    text = {"embeds": torch.randn(2, 5, 16), "mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    results = []
    for swap in (0, 4):
        config = ModelConfig(family="zimage", path=str(folders[0]), memory={"blocks_to_swap": swap})
        family = get_family(config)
        model = load_model(family, config, dtype=torch.float32, device=CPU)
        torch.manual_seed(0)
        targets = family.lora_targets(model)["attention_ffn"]
        params = add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
        with torch.no_grad():
            for param in params[1::2]:
                param.normal_(std=0.1)
        with torch.no_grad(), lora_disabled(model.denoiser):
            teacher = family.predict(model, noisy, t, text)
        loss = (family.predict(model, noisy, t, text) - teacher).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
        swapper = getattr(model.denoiser, "block_swapper", None)
        assert (swapper is None) == (swap == 0)
        assert swapper is None or swapper.transfers == 3 * swap
    (loss, grads), (swapped_loss, swapped_grads) = results
    assert torch.equal(loss, swapped_loss) and float(loss) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, swapped_grads, strict=True))


def test_the_training_adapter_is_merged_for_the_teacher_and_out_of_the_samples(folders):
    turbo, _, adapter = folders
    family, model = load(turbo, training_adapter=str(adapter))
    plain = ZImageTransformer2DModel.from_pretrained(turbo / "transformer")
    file = load_file(adapter)
    merged = dict(model.denoiser.named_modules())
    for key, down in file.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            up = file[key.replace("lora_A", "lora_B")]
            expected = plain.get_submodule(name).weight + up @ down
            assert torch.allclose(merged[name].weight, expected, atol=1e-6), name
    # The teacher is base + adapter, as the pipeline fuses it.
    pipeline = ZImagePipeline.from_pretrained(turbo, local_files_only=True)
    pipeline.load_lora_weights(str(adapter))
    pipeline.fuse_lora()
    text = family.encode_prompts(model, PROMPTS)
    family.release_encoders(model, keep_decoder=False)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q"])
    noisy, t = torch.randn(2, 16, 4, 4), torch.tensor([0.2, 0.7])
    fused = type(model)(denoiser=pipeline.transformer, identity="", parts=model.parts)
    turbo_alone = type(model)(denoiser=plain, identity="", parts=model.parts)
    with torch.no_grad():
        with lora_disabled(model.denoiser):
            teacher = family.predict(model, noisy, t, text)
            with without_adapter(model.denoiser, model.parts.adapter):  # what samples run
                sampled = family.predict(model, noisy, t, text)
        assert torch.allclose(teacher, family.predict(fused, noisy, t, text), atol=1e-5)
        assert torch.allclose(sampled, family.predict(turbo_alone, noisy, t, text), atol=1e-5)
        assert not torch.allclose(teacher, sampled, atol=1e-3)
        with lora_disabled(model.denoiser):  # the hooks are gone after
            assert torch.equal(family.predict(model, noisy, t, text), teacher)


def test_a_single_file_in_the_original_layout_loads_with_scaled_fp8(folders, tmp_path):
    turbo = folders[0]
    state = ZImageTransformer2DModel.from_pretrained(turbo / "transformer").state_dict()
    original = _original_layout(state)
    layer = "layers.0.feed_forward.w1"  # one layer as ComfyUI's scaled fp8 (the older form)
    weight = original.pop(f"{layer}.weight")
    scale = weight.abs().max() / 448
    codes = (weight / scale).to(torch.float8_e4m3fn)
    original[f"{layer}.weight"], original[f"{layer}.scale_weight"] = codes, scale.reshape(1)
    original["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    file = tmp_path / "z_image_turbo_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, file)
    spec = family_spec("zimage")
    assert single_file_problem(spec, str(file), str(turbo)) is None  # the preflight's check
    _, model = load(turbo, transformer_file=str(file))
    loaded = model.denoiser.state_dict()
    for name, value in state.items():
        if not name.startswith(layer):
            assert torch.equal(loaded[name], value), name
    kept = model.denoiser.get_submodule(layer)
    assert isinstance(kept, QuantisedLinear) and kept.form == "fp8_scaled"
    assert torch.equal(kept.dequantised(), codes.float() * scale)
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.img_in.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelLoadError, match=r"model.zimage.transformer_file: .*other"):
        load(turbo, transformer_file=str(other))
    larger = tmp_path / "larger.safetensors"
    save_file({**original, "layers.2.adaLN_modulation.0.weight": torch.zeros(2, 2)}, larger)
    assert "another size" in single_file_problem(spec, str(larger), str(turbo))
    assert "not hold a Z-Image" in single_file_problem(spec, str(other), str(turbo))


def _original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers names back to the original Z-Image checkpoint's (ComfyUI's too): fused
    qkv, ``out``, ``q_norm`` / ``k_norm``, ``x_embedder`` and ``final_layer``."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace("all_x_embedder.2-1.", "x_embedder.")
        key = key.replace(".attention.to_out.0.", ".attention.out.")
        key = key.replace(".attention.norm_q.", ".attention.q_norm.")
        key = key.replace(".attention.norm_k.", ".attention.k_norm.")
        renamed[key] = value
    for key in [k for k in renamed if k.endswith(".attention.to_q.weight")]:
        block = key.removesuffix(".to_q.weight")
        parts = [renamed.pop(f"{block}.to_{p}.weight") for p in "qkv"]
        renamed[f"{block}.qkv.weight"] = torch.cat(parts)
    return renamed


def test_turbo_is_told_by_name_or_option_and_the_adapter_is_for_turbo_only(folders):
    turbo, base, adapter = folders
    spec = family_spec("zimage")
    assert spec.latent_grid(str(turbo)).pixel_multiple == 16
    said = folder_summary(ModelConfig(family="zimage", path=str(turbo)))
    assert said is not None and "de-distils" in said
    assert "base" in folder_summary(ModelConfig(family="zimage", path=str(base)))
    with pytest.raises(ModelLoadError, match=r"training_adapter is for Z-Image Turbo"):
        load(base, training_adapter=str(adapter))
    _, model = load(base, variant="turbo", training_adapter=str(adapter))
    assert model.parts.turbo and model.parts.adapter
    with pytest.raises(ModelLoadError, match=r"model.zimage.training_adapter: cannot read"):
        load(turbo, training_adapter=str(turbo / "transformer" / "config.json"))
    not_lora = adapter.parent / "not_a_lora.safetensors"
    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, not_lora)
    with pytest.raises(ModelLoadError, match=r"model.zimage.training_adapter: .*no LoRA"):
        load(turbo, training_adapter=str(not_lora))


# ------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_the_preset_trains_turbo_with_the_adapter_and_the_lora_loads_in_the_pipeline(
    folders, tmp_path
):
    turbo, _, adapter = folders
    run = train_preset(
        "presets/zimage-prior.json",
        tmp_path,
        "run",
        turbo,
        f"model.zimage.text_tokens={TOKENS}",
        f"model.zimage.training_adapter={adapter}",
        "output.format=diffusers",
        *SAMPLES,
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    assert (run / "samples/step000003-0-pair.png").is_file()
    saved = load_file(run / "lora.safetensors")
    # The adapter is not in the file: no key of its own layers the run does not train (the
    # modulation), and every tensor is the run's rank 4.
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert not any("adaLN_modulation" in k for k in saved)
    assert {v.shape[0] for k, v in saved.items() if ".lora_A." in k} == {4}
    pipe = ZImagePipeline.from_pretrained(turbo, local_files_only=True)
    before = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(run / "lora.safetensors"))
    after = _velocity(pipe.transformer)
    assert not torch.allclose(before, after, atol=1e-6)
    # What output.format=comfyui writes: diffusion_model.<module>.lora_down / lora_up / alpha;
    # diffusers' converter folds alpha / rank (8 / 4 = 2, exact in binary) into lora_A.
    comfy = to_comfyui(saved, 8.0)
    assert all(k.startswith("diffusion_model.layers.") or "refiner" in k for k in comfy)
    assert {k.rsplit(".", 2)[-2] for k in comfy if k.endswith(".weight")} == {
        "lora_down",
        "lora_up",
    }
    state = ZImagePipeline.lora_state_dict(dict(comfy))
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value * 2 if ".lora_A." in key else value), key


@pytest.mark.slow
def test_the_saved_lora_with_the_adapter_predicts_as_the_trained_model(folders, tmp_path):
    """Keys and values: the run trained on Turbo + adapter; its file plus the adapter in the
    pipeline is the trained model, the file alone is Turbo with the LoRA (not the adapter)."""
    turbo, _, adapter = folders
    model = {
        "family": "zimage",
        "path": str(turbo),
        "zimage": {"text_tokens": TOKENS, "training_adapter": str(adapter)},
    }
    trained, lora = train_in_process(tmp_path, model)
    pipe = ZImagePipeline.from_pretrained(turbo, local_files_only=True)
    turbo_only = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(lora), adapter_name="run")
    with_lora = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(adapter), adapter_name="training_adapter")
    pipe.set_adapters(["run", "training_adapter"], [1.0, 1.0])
    assert torch.allclose(_velocity(pipe.transformer), _velocity(trained), atol=1e-5)
    assert not torch.allclose(with_lora, _velocity(trained), atol=1e-4)
    assert not torch.allclose(with_lora, turbo_only, atol=1e-6)


def _velocity(transformer):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(16, 1, 4, 4, generator=generator)
    caption = torch.randn(7, 16, generator=generator)
    with torch.no_grad():
        return transformer([latents], torch.tensor([0.5]), [caption], return_dict=False)[0][0]
