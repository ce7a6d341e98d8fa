"""The qwen_image family on tiny Qwen-Image-Edit-Plus (2511 and 2509) and Qwen-Image-Edit folders:
told apart from the folder, the references encoded as the edit pipelines encode them, samples equal
to the pipeline's edit, and the teacher equal to a separately loaded base with the same
references, the loss on the target's tokens only."""

from __future__ import annotations

import json
import shutil

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus_module
import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from modules.config import ConfigError
from modules.config.schema import ModelConfig
from modules.data.dataset import stack_encodings
from modules.lora import add_lora, lora_disabled
from modules.loss import masked_prior_loss
from modules.models import get_family, load_model
from modules.models.base import with_conditioning
from modules.models.folder_check import model_folder_problem
from modules.models.packing import pack, unpack
from modules.models.qwen_image import SPEC
from modules.models.qwen_image import edit as edits
from modules.models.registry import conditioning_kinds
from modules.models.spec import ConditioningKind
from tests.qwen_image.tiny_qwen_image import build_tiny_qwen_image
from tests.qwen_image.tiny_qwen_image_edit import build_tiny_qwen_image_edit, edit_pipeline
from tests.runner_check import assert_predict_goes_through_the_runner

CPU = torch.device("cpu")
AREA = 64 * 64  # references VAE-encoded at about 64 x 64 px (the pipelines: 1024 x 1024)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """2511 (built), and copies made 2509 (zero_cond_t False) and Qwen-Image-Edit."""
    root = tmp_path_factory.mktemp("qwen_image_edit")
    plus = build_tiny_qwen_image_edit(root / "2511")
    made = {"2511": plus}
    for name, pipeline, zero in (
        ("2509", "QwenImageEditPlusPipeline", False),
        ("edit", "QwenImageEditPipeline", False),
    ):
        copy = shutil.copytree(plus, root / name)
        _rewrite(copy / "model_index.json", _class_name=pipeline)
        _rewrite(copy / "transformer" / "config.json", zero_cond_t=zero)
        made[name] = copy
    return made


def _rewrite(path, **values):
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def load(folder, **options):
    config = ModelConfig(
        family="qwen_image",
        path=str(folder),
        qwen_image={"reference_pixels": AREA, "sample_cfg": 1.0, **options},
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def _reference(size, colour, seed):
    """(3, H, W) in [-1, 1], as the cache loads a reference file (8-bit levels)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 60, (3, size[1], size[0]), generator=generator)
    base = torch.tensor(colour).view(3, 1, 1)
    return ((base + noise).clamp(0, 255).float() / 127.5 - 1).contiguous()


REFERENCES = [_reference((48, 32), (180, 40, 40), 0), _reference((32, 40), (20, 90, 160), 1)]


def test_the_folder_says_the_form_and_the_references_it_takes(folders, tmp_path):
    def kinds(folder):
        return conditioning_kinds(ModelConfig(family="qwen_image", path=str(folder)))

    plus = ConditioningKind("reference", "references", most=3, with_caption=True)
    assert kinds(folders["2511"]) == kinds(folders["2509"]) == (plus,)
    assert kinds(folders["edit"]) == (ConditioningKind("reference", "references", 1, True),)
    assert SPEC.summary_of(str(folders["2511"])).startswith("Detected: Qwen-Image-Edit-2511")
    assert "Qwen-Image-Edit-2509" in SPEC.summary_of(str(folders["2509"]))
    for folder in folders.values():
        assert model_folder_problem("qwen_image", str(folder)) is None
    text_to_image = build_tiny_qwen_image(tmp_path / "t2i")
    assert kinds(text_to_image) == () and SPEC.summary_of(str(text_to_image)) is None
    broken = shutil.copytree(folders["2509"], tmp_path / "no-processor")
    shutil.rmtree(broken / "processor")
    problem = model_folder_problem("qwen_image", str(broken))
    assert "no processor/ subfolder" in problem and str(broken) in problem


@pytest.mark.parametrize("form", ["2511", "edit"])
def test_the_references_are_encoded_as_the_pipeline_encodes_them(folders, form):
    area = 128 * 128  # a 3:2 reference becomes 160 x 96 px: its aspect ratio is kept
    family, model = load(folders[form], reference_pixels=area)
    pipe = edit_pipeline(folders[form])
    references = REFERENCES if form == "2511" else REFERENCES[:1]
    caption = "a red star on a blue square"
    ours = family.encode_conditioning(model, "reference", references, caption=caption)
    pictures = [edits.to_picture(image) for image in references]
    sizes = [edit_plus_module.calculate_dimensions(area, p.width / p.height) for p in pictures]
    assert sizes[0] == (160, 96)
    vae_images = [
        pipe.image_processor.preprocess(p, h, w).unsqueeze(2)
        for p, (w, h) in zip(pictures, sizes, strict=True)
    ]
    if form == "edit":
        # Qwen-Image-Edit reads its one reference at the VAE's size.
        width, height = sizes[0]
        seen = pipe.image_processor.resize(pictures[0], height, width)
        embeds, _ = pipe.encode_prompt(caption, image=seen, device=CPU)
        _, latents = pipe.prepare_latents(vae_images[0], 1, 16, 32, 32, torch.float32, CPU, None)
    else:
        seen = []
        for picture in pictures:
            w, h = edit_plus_module.calculate_dimensions(384 * 384, picture.width / picture.height)
            seen.append(pipe.image_processor.resize(picture, h, w))
        embeds, _ = pipe.encode_prompt(caption, image=seen, device=CPU)
        _, latents = pipe.prepare_latents(vae_images, 1, 16, 32, 32, torch.float32, CPU, None)
    assert torch.allclose(ours[edits.EMBEDS_KEY], embeds, atol=1e-5)
    assert torch.equal(ours[edits.MASK_KEY], torch.ones(embeds.shape[:2], dtype=torch.long))
    assert torch.allclose(ours[edits.TOKENS_KEY], latents, atol=1e-5)
    grids = [[1, h // 16, w // 16] for w, h in sizes]
    assert ours[edits.SHAPES_KEY].tolist() == [grids]
    assert ours[edits.TOKENS_KEY].shape[1] == sum(a * b for _, a, b in grids)
    with pytest.raises(ValueError, match="1 to"):
        family.encode_conditioning(model, "reference", REFERENCES * 2, caption=caption)


@pytest.mark.parametrize("form", ["2511", "2509"])
def test_an_edit_sample_is_the_pipeline_s_edit(folders, form, monkeypatch):
    """The family's sample with the encoded references is the pipeline's default call (no
    true CFG) at the same reference size; 2511's zero_cond_t is the transformer's own."""
    monkeypatch.setattr(edit_plus_module, "VAE_IMAGE_SIZE", AREA)
    family, model = load(folders[form])
    prompts = ["a red star", "a blue heart"]
    text = family.encode_prompts(model, prompts)
    rows = [
        family.encode_conditioning(model, "reference", refs, caption=prompt)
        for prompt, refs in zip(prompts, [REFERENCES, REFERENCES[1:]], strict=True)
    ]
    references = stack_encodings([{k: v[0] for k, v in row.items()} for row in rows])
    family.release_encoders(model, keep_decoder=True)
    ours = family.sample(
        model,
        text,
        size=(32, 48),
        steps=2,
        generator=torch.Generator().manual_seed(0),
        conditioning=references,
    )
    pipe = edit_pipeline(folders[form])
    noise = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    for index, (prompt, refs) in enumerate(zip(prompts, [REFERENCES, REFERENCES[1:]], strict=True)):
        theirs = pipe(
            image=[edits.to_picture(image) for image in refs],
            prompt=prompt,
            height=48,
            width=32,
            num_inference_steps=2,
            latents=pipe._pack_latents(noise[index : index + 1], 1, 16, 6, 4),
            output_type="pt",
        ).images
        assert torch.allclose(ours[index : index + 1] * 0.5 + 0.5, theirs, atol=1e-4), prompt
    with pytest.raises(ValueError, match="references"):
        family.sample(model, text, size=(32, 32), steps=1, generator=torch.Generator())


def test_the_teacher_is_the_base_with_the_same_references_and_the_loss_is_the_target_s(folders):
    family, model = load(folders["2511"])
    base = QwenImageTransformer2DModel.from_pretrained(folders["2511"] / "transformer")
    text = family.encode_prompts(model, ["a red star"])
    conditioning = family.encode_conditioning(model, "reference", REFERENCES, caption="a red star")
    family.release_encoders(model, keep_decoder=False)
    inputs = with_conditioning(text, conditioning)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "img_mlp.net.2"])
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(1, 16, 6, 8), torch.tensor([0.6])
    student = family.predict(model, noisy, t, inputs)
    assert_predict_goes_through_the_runner(family, model, noisy, t, inputs, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, inputs)
    with torch.no_grad():
        reference = family.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, inputs
        )
        # Without the references the base predicts something else: they are read.
        alone = family._velocity_tokens(
            type(model)(denoiser=base, identity="", parts=model.parts), pack(noisy), t, text, 6, 8
        )
    assert student.shape == noisy.shape == (1, 16, 6, 8)  # the target's tokens only
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    assert not torch.allclose(unpack(alone, 16, 6, 8), reference, atol=1e-4)
    mask = torch.zeros(1, 1, 6, 8)
    mask[:, :, 1:4, 2:6] = 1.0
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
    # Items of one batch with references of different counts: refused with the fix.
    row = {key: value[0] for key, value in conditioning.items()}
    first = conditioning[edits.SHAPES_KEY][0, 0].prod()  # the first reference's tokens
    fewer = {
        **row,
        edits.TOKENS_KEY: row[edits.TOKENS_KEY][:first],
        edits.SHAPES_KEY: row[edits.SHAPES_KEY][:1],
    }
    two = stack_encodings([row, fewer])
    batch = with_conditioning({k: torch.cat([v, v]) for k, v in text.items()}, two)
    with pytest.raises(ConfigError, match="training.batch_size=1"):
        family.predict(model, torch.cat([noisy, noisy]), torch.cat([t, t]), batch)
    with pytest.raises(ConfigError, match="drift.every=0"):
        family.predict(model, noisy, t, text)
