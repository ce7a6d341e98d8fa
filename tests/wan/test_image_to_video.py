"""WAN image-to-video on tiny WAN 2.1 I2V (CLIP image encoder), WAN 2.2 I2V A14B and TI2V 5B
folders: the forms are told apart from the folder, the first frame is encoded as
``WanImageToVideoPipeline`` encodes it, the teacher is the base model on exactly the student's
inputs, TI2V's clean first frame carries no loss, and a still image is refused by name."""

import contextlib
import json
import queue
import shutil

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from PIL import Image

from modules.config import ConfigError, config_from_dict
from modules.data.dataset import Batch
from modules.lora import add_lora, lora_state_dict
from modules.models import registry
from modules.models.wan import WanOptions, wan_form
from modules.models.wan import image_to_video as i2v
from modules.models.wan.comfyui import to_comfyui
from modules.models.wan.family import WanFamily
from modules.trainer import GenericTrainer
from modules.trainer.preflight import preflight
from modules.trainer.step import draw, train_step
from tests.trainer.test_step import make_parts

pytestmark = pytest.mark.slow

CPU, F32 = torch.device("cpu"), torch.float32


def config(folder, concept, tmp_path, wan=None, **sections):
    data = {
        "model": {"family": "wan", "path": str(folder), "wan": wan or {}},
        "data": {
            "concepts": [{"path": str(concept)}],
            "resolution": 32,
            "frames": 9,
            "cache_dir": str(tmp_path / "cache"),
        },
        "mask": {"enabled": True, "normalize_per_sample": True},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4, "targets": "attention"},
        "training": {"steps": 2, "learning_rate": 1e-2},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


# ----------------------------------------------------------------------------------- forms


def test_the_forms_and_their_conditioning_are_told_apart_from_the_folder(
    tiny_wan, tiny_wan_ti2v, tiny_wan_i2v21, tiny_wan_i2v22, tmp_path
):
    assert wan_form(tiny_wan) == "t2v"
    assert wan_form(tiny_wan_ti2v) == "ti2v"
    assert wan_form(tiny_wan_i2v21) == "i2v_21"
    assert wan_form(tiny_wan_i2v22) == "i2v_a14b"

    def kinds(folder, **wan):
        model = config(folder, tmp_path, tmp_path, wan).model
        return [kind.name for kind in registry.conditioning_kinds(model)]

    assert kinds(tiny_wan) == [] and kinds(tiny_wan_ti2v) == []  # auto: text-to-video
    assert kinds(tiny_wan_ti2v, task="image_to_video") == ["first_frame"]
    assert kinds(tiny_wan_i2v21) == ["first_frame"]
    assert kinds(tiny_wan_i2v22, expert="low_noise") == ["first_frame"]


def test_a_task_the_folder_cannot_train_is_refused_by_name(tiny_wan, tiny_wan_i2v21):
    with pytest.raises(ValueError, match="model.wan.task=image_to_video: .* text-to-video"):
        WanFamily(WanOptions(task="image_to_video")).load(str(tiny_wan), dtype=F32, device=CPU)
    with pytest.raises(ValueError, match="model.wan.task=text_to_video: .* image-to-video"):
        WanFamily(WanOptions(task="text_to_video")).load(str(tiny_wan_i2v21), dtype=F32, device=CPU)


def test_a_still_image_in_an_image_to_video_concept_is_refused_by_name(
    tiny_wan_i2v21, video_concept, tmp_path
):
    with pytest.raises(ConfigError) as raised:
        preflight(config(tiny_wan_i2v21, video_concept, tmp_path), create_run_dir=False)
    message = str(raised.value)
    assert "'still.png' is a still image" in message and "replace it with a clip" in message
    assert "walk.mp4" not in message  # the clips are fine


def test_the_i2v_a14b_boundary_is_the_folders_else_0_9(tiny_wan_i2v22, tmp_path):
    family = WanFamily(WanOptions(expert="high_noise"))
    family.load(str(tiny_wan_i2v22), dtype=F32, device=CPU)
    assert family.boundary == 0.9 and family.timestep_range == (0.9, 1.0)
    folder = shutil.copytree(tiny_wan_i2v22, tmp_path / "no-boundary")
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = 0.75
    (folder / "model_index.json").write_text(json.dumps(index))
    family.load(str(folder), dtype=F32, device=CPU)
    assert family.boundary == 0.75
    del index["boundary_ratio"]
    (folder / "model_index.json").write_text(json.dumps(index))
    family.load(str(folder), dtype=F32, device=CPU)
    assert family.boundary == 0.9  # T2V A14B keeps 0.875


# ------------------------------------------------------------------------- the first frame


def _picture():
    generator = torch.Generator().manual_seed(11)
    pixels = (torch.rand(32, 32, 3, generator=generator) * 255).round().byte()
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("form", ["2.1", "ti2v"])
def test_the_first_frame_is_encoded_as_the_pipeline_does(form, tiny_wan_i2v21, tiny_wan_ti2v):
    folder = tiny_wan_i2v21 if form == "2.1" else tiny_wan_ti2v
    family = WanFamily(WanOptions(task="image_to_video"))
    model = family.load(str(folder), dtype=F32, device=CPU)
    pipeline = WanImageToVideoPipeline.from_pretrained(folder, local_files_only=True)
    picture = _picture()
    image = pipeline.video_processor.preprocess(picture, height=32, width=32)  # (1, 3, 32, 32)
    encoded = family.encode_conditioning(model, "first_frame", [image[0]], frames=9)
    with torch.no_grad():
        prepared = pipeline.prepare_latents(image, 1, 16 if form == "2.1" else 48, 32, 32, 9, F32)
    if form == "ti2v":
        _, condition, first_frame_mask = prepared
        assert torch.equal(encoded[i2v.LATENT_KEY], condition)  # (1, 48, 1, 2, 2)
        assert first_frame_mask[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]
        return
    _, condition = prepared  # (1, 4 mask + 16 latent, 3, 4, 4)
    assert torch.equal(encoded[i2v.VIDEO_KEY], condition[:, 4:])
    hidden, _, extra = i2v.denoiser_inputs(
        torch.zeros(1, 16, 3, 4, 4), torch.tensor([500.0]), encoded, 2
    )
    assert torch.equal(hidden[:, 16:], condition)  # the mask channels as the pipeline's
    with torch.no_grad():
        embedding = pipeline.encode_image(picture, CPU)  # hidden_states[-2]
    assert torch.equal(encoded[i2v.IMAGE_KEY], embedding)
    assert extra["encoder_hidden_states_image"] is encoded[i2v.IMAGE_KEY]


# ----------------------------------------------------------------------------- the teacher


def _spy(monkeypatch):
    records = []
    original = WanFamily.predict

    def spy(self, model, noisy, timesteps, text):
        out = original(self, model, noisy, timesteps, text)
        records.append((torch.is_grad_enabled(), noisy.clone(), timesteps.clone(), dict(text)))
        records[-1] += (out.detach(),)
        return out

    monkeypatch.setattr(WanFamily, "predict", spy)
    return records


def _base_prediction(transformer, form, noisy, timesteps, text):
    """The separately loaded base transformer on the inputs built here as the pipeline does."""
    embeds = text["embeds"]
    embeds = torch.cat([embeds, embeds.new_zeros(len(embeds), 512 - embeds.shape[1], 32)], 1)
    timestep = timesteps * 1000
    if form == "ti2v":
        hidden = torch.cat([text[i2v.LATENT_KEY], noisy[:, :, 1:]], dim=2)
        mask = torch.ones(noisy.shape[2:])  # (F', h, w), 0 on the given frame
        mask[0] = 0
        timestep = torch.stack([(mask[:, ::2, ::2] * t).flatten() for t in timestep])
    else:
        mask = torch.zeros(len(noisy), 4, *noisy.shape[2:])
        mask[:, :, 0] = 1
        hidden = torch.cat([noisy, mask, text[i2v.VIDEO_KEY]], dim=1)
    with torch.no_grad():
        return transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_image=text.get(i2v.IMAGE_KEY),
            return_dict=False,
        )[0]


@pytest.mark.parametrize("form", ["2.1", "2.2", "ti2v"])
def test_the_teacher_is_the_base_model_on_the_students_inputs(
    form, tiny_wan_i2v21, tiny_wan_i2v22, tiny_wan_ti2v, clip_concept, tmp_path, monkeypatch
):
    folder = {"2.1": tiny_wan_i2v21, "2.2": tiny_wan_i2v22, "ti2v": tiny_wan_ti2v}[form]
    wan = {"2.1": {}, "2.2": {"expert": "low_noise"}, "ti2v": {"task": "image_to_video"}}[form]
    records = _spy(monkeypatch)
    finished = GenericTrainer(config(folder, clip_concept, tmp_path, wan), queue.Queue()).run()
    assert finished.error is None, finished.error
    teacher = [r for r in records if not r[0]]
    student = [r for r in records if r[0]]
    assert len(teacher) == len(student) == 2
    _, noisy, timesteps, text, out = teacher[-1]
    keys = {"2.1": {i2v.VIDEO_KEY, i2v.IMAGE_KEY}, "2.2": {i2v.VIDEO_KEY}}
    assert set(text) == {"embeds"} | keys.get(form, {i2v.LATENT_KEY})
    assert all(torch.equal(text[k], student[-1][3][k]) for k in text)  # the student's own
    subfolder = "transformer_2" if form == "2.2" else "transformer"
    base = WanTransformer3DModel.from_pretrained(folder / subfolder, local_files_only=True)
    assert torch.equal(out, _base_prediction(base, form, noisy, timesteps, text))
    assert not torch.equal(student[-1][4], out)  # the LoRA trained: the student differs


# ------------------------------------------------------------------ TI2V: frame 0 no loss


def test_ti2v_frame_0_carries_no_loss_and_no_mask_weight(tiny_wan_ti2v, monkeypatch):
    family = WanFamily(WanOptions(task="image_to_video"))
    model = family.load(str(tiny_wan_ti2v), dtype=F32, device=CPU)
    torch.manual_seed(0)
    add_lora(model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, weight in model.denoiser.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(3)
    masks = torch.ones(2, 1, 3, 2, 2)
    masks[:, :, :, 0] = 0.0  # a prior region on every frame
    batch = Batch(
        latents=torch.randn(2, 48, 3, 2, 2, generator=generator),
        masks=masks,
        text={"embeds": torch.randn(2, 5, 32, generator=generator)},
        prior_prediction=torch.tensor([False, False]),
        loss_weight=torch.ones(2),
        has_mask=torch.ones(2, dtype=torch.bool),
        caption_dropped=torch.zeros(2, dtype=torch.bool),
        conditioning={i2v.LATENT_KEY: torch.randn(2, 48, 1, 2, 2, generator=generator)},
    )
    maps = draw(batch, make_parts(model, family=family), 1.0).maps
    assert maps.target[:, :, 0].abs().sum() == 0 and maps.prior[:, :, 0].abs().sum() == 0
    assert maps.target[:, :, 1:].sum() > 0 and maps.prior[:, :, 1:].sum() > 0

    original = WanFamily.predict

    def losses(frame, **sections):
        def shifted(self, model, noisy, timesteps, text):
            out = original(self, model, noisy, timesteps, text)
            if torch.is_grad_enabled() and frame is not None:  # the student's prediction
                out = out.clone()
                out[:, :, frame] += 100.0
            return out

        monkeypatch.setattr(WanFamily, "predict", shifted)
        parts = make_parts(model, family=family, **sections)
        loss = train_step(batch, parts, prior_weight=1.0).loss
        return float(loss.target.detach()), float(loss.prior.detach())

    for sections in ({}, {"mask": {"enabled": False}, "prior": {"weight": 0.0}}):
        plain = losses(None, **sections)
        assert losses(0, **sections) == plain  # frame 0 is given: nothing learns it
        assert losses(1, **sections)[0] > plain[0] + 1000  # frame 1 is predicted


# ----------------------------------------------------------------- 2.1: image cross-attention


def test_wan21_i2v_lora_targets_the_image_cross_attention_and_converts_back(tiny_wan_i2v21):
    family = WanFamily()
    model = family.load(str(tiny_wan_i2v21), dtype=F32, device=CPU)
    targets = family.lora_targets(model)["attention"]
    assert {"add_k_proj", "add_v_proj"} <= set(targets)
    add_lora(model.denoiser, rank=4, alpha=8, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, weight in model.denoiser.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    state = lora_state_dict(model.denoiser)
    assert "transformer.blocks.0.attn2.add_k_proj.lora_A.weight" in state
    comfy = to_comfyui(state, alpha=4.0)  # alpha == rank: diffusers changes no tensor
    assert "diffusion_model.blocks.1.cross_attn.v_img.lora_up.weight" in comfy
    back = _convert_non_diffusers_wan_lora_to_diffusers(dict(comfy))
    assert set(back) == set(state)
    assert all(torch.equal(back[key], value) for key, value in state.items())


# ----------------------------------------------------------------------------------- samples


def _samples(folder, concept, tmp_path, wan=None, **sampling):
    from modules.trainer.sampling import Samples

    settings = config(folder, concept, tmp_path, wan, sampling={"prompts": ["a", "b"], **sampling})
    family = WanFamily(settings.model.wan)
    model = family.load(str(folder), dtype=F32, device=CPU)
    said = []
    samples = Samples(
        settings,
        family=family,
        model=model,
        text=family.encode_prompts(model, ["a", "b"]),
        size=(32, 32),
        folder=tmp_path / "samples",
        events=queue.Queue(),
        status=lambda text, level="info": said.append((level, text)),
        autocast=contextlib.nullcontext,
    )
    return samples, said


def test_sample_start_images_are_each_prompts_first_frame(tiny_wan_i2v22, clip_concept, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (250, 0, 0)).save(start)
    given, _ = _samples(
        tiny_wan_i2v22,
        clip_concept,
        tmp_path,
        {"expert": "low_noise"},
        images=[str(start), str(start)],
        frames=5,
    )
    first, said = _samples(tiny_wan_i2v22, clip_concept, tmp_path, {"expert": "low_noise"})
    assert first.frames == 9 and "data.frames=9" in said[0][1]  # sampling.frames=1: a clip
    assert given.conditioning[i2v.VIDEO_KEY].shape == (2, 16, 2, 4, 4)  # one per prompt
    assert torch.equal(given.conditioning[i2v.VIDEO_KEY][0], given.conditioning[i2v.VIDEO_KEY][1])
    assert first.conditioning[i2v.VIDEO_KEY].shape == (2, 16, 3, 4, 4)  # the first clips'
    assert not torch.equal(
        first.conditioning[i2v.VIDEO_KEY][:, :, 0], given.conditioning[i2v.VIDEO_KEY][:, :, 0]
    )
    with pytest.raises(ConfigError, match="sampling.images: 1 images for 2 prompts"):
        _samples(
            tiny_wan_i2v22, clip_concept, tmp_path, {"expert": "low_noise"}, images=[str(start)]
        )


def test_sample_images_for_a_text_to_video_model_are_said_unused(tiny_wan, clip_concept, tmp_path):
    samples, said = _samples(tiny_wan, clip_concept, tmp_path, images=["a.png", "b.png"])
    assert samples.conditioning is None
    assert [level for level, text in said if "sampling.images" in text] == ["warning"]


def test_the_drift_meter_on_an_image_to_video_model_is_refused_by_name(
    tiny_wan_i2v22, clip_concept, video_concept, tmp_path
):
    """Its held-out stills give no first frame: said before any step, not a shape error."""
    settings = config(
        tiny_wan_i2v22,
        clip_concept,
        tmp_path,
        {"expert": "low_noise"},
        drift={"every": 1, "world_path": str(video_concept)},  # still.png
    )
    finished = GenericTrainer(settings, queue.Queue()).run()
    assert finished.error is not None and "set drift.every=0" in finished.error
    assert finished.error_kind == "config"


def test_a_wan21_i2v_folder_without_its_image_encoder_is_named(tiny_wan_i2v21, tmp_path):
    folder = shutil.copytree(tiny_wan_i2v21, tmp_path / "partial")
    shutil.rmtree(folder / "image_encoder")
    with pytest.raises(ValueError, match="partial .*has no image_encoder/ subfolder"):
        WanFamily().load(str(folder), dtype=F32, device=CPU)


def test_one_frame_clips_for_an_image_to_video_model_are_refused_by_name(
    tiny_wan_i2v22, clip_concept, tmp_path
):
    settings = config(tiny_wan_i2v22, clip_concept, tmp_path, {"expert": "low_noise"})
    settings = settings.model_copy(update={"data": settings.data.model_copy(update={"frames": 1})})
    finished = GenericTrainer(settings, queue.Queue()).run()
    assert finished.error is not None and "set data.frames to 5 or more" in finished.error
