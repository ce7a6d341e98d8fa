"""FLUX.2 editing with reference images (``model.flux2.task=edit``) on a tiny real FLUX.2 klein
folder: references resized, encoded and packed as the pipeline's ``image=``, the teacher equal
to a separately loaded base with the same references, the edit samples the pipeline's, the
reference count refused past the model's limit, and the public CLI training a masked-prior
LoRA on pairs in both dataset layouts with the shipped preset, whose diffusers file changes
the pipeline's edit and whose ComfyUI file converts back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from PIL import Image
from safetensors.torch import load_file

from modules.config.schema import ModelConfig
from modules.data.concept import DataError
from modules.lora import add_lora, lora_disabled
from modules.models import ModelLoadError, get_family, load_model
from modules.models.base import with_conditioning
from modules.models.flux2 import SPEC
from modules.models.flux2.family import Flux2Family
from modules.models.flux2.references import IDS_KEY, LATENTS_KEY, TOKENS_KEY
from modules.models.spec import ConditioningKind
from tests.flux2.test_flux2_family import _updates
from tests.flux2.tiny_flux2 import build_tiny_flux2
from tests.trained_lora import REPO

CPU = torch.device("cpu")
TOKENS = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant → its tiny folder, built when a test first asks for it."""
    root, built = tmp_path_factory.mktemp("flux2-edit"), {}

    def folder(variant):
        if variant not in built:
            built[variant] = build_tiny_flux2(root / variant, variant=variant)
        return built[variant]

    return folder


@pytest.fixture(scope="module")
def klein(folders):
    return folders("klein")


def load(folder, **options):
    config = ModelConfig(
        family="flux2",
        path=str(folder),
        flux2={"text_tokens": TOKENS, "task": "edit", **options},
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def picture(width, height, seed):
    """An 8-bit RGB picture, and the same as the data layer gives it: (3, H, W) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    return Image.fromarray(pixels), tensor


def test_the_task_and_reference_count_come_from_the_options(klein):
    text = ModelConfig(family="flux2", path=str(klein)).flux2
    assert SPEC.conditioning_of(str(klein), text) == ()
    assert SPEC.summary_of(str(klein), text) == "Detected: FLUX.2 klein; trains text-to-image"
    edit = text.model_copy(update={"task": "edit", "references": 3})
    assert SPEC.conditioning_of(str(klein), edit) == (
        ConditioningKind(name="reference", source="references", most=3),
    )
    assert "editing with up to 3" in SPEC.summary_of(str(klein), edit)
    with pytest.raises(ModelLoadError, match=r"model.flux2.references=5: FLUX.2 klein takes at"):
        load(klein, references=5)


def test_references_are_the_pipeline_s_image_latents_and_ids(klein):
    """Two references of their own sizes (neither the target's): resized, cropped to 16 px,
    encoded, normalised and packed with time indices 10 and 20, as the pipeline's ``image=``."""
    family, model = load(klein, references=2)
    pipe = Flux2KleinPipeline.from_pretrained(klein, local_files_only=True)
    (first, a), (second, b) = picture(72, 64, 1), picture(64, 100, 2)
    ours = family.encode_conditioning(model, "reference", [a, b])
    prepared = [
        pipe.image_processor.preprocess(p, height=h, width=w, resize_mode="crop")
        for p, (w, h) in ((first, (64, 64)), (second, (64, 96)))
    ]
    latents, ids = pipe.prepare_image_latents(prepared, 1, None, CPU, torch.float32)
    assert ours.keys() == {LATENTS_KEY, IDS_KEY, TOKENS_KEY}
    assert torch.equal(ours[LATENTS_KEY], latents) and torch.equal(ours[IDS_KEY], ids)
    assert ours[LATENTS_KEY].shape == (1, 16 + 24, 128)
    assert ours[IDS_KEY][0, :, 0].unique().tolist() == [10, 20]
    assert ours[TOKENS_KEY].tolist() == [[40]]
    with pytest.raises(DataError, match="reference image of 40 x 64 px .* at least 64 px"):
        family.encode_conditioning(model, "reference", [picture(40, 64, 3)[1]])


def test_the_teacher_is_the_base_with_the_same_references(klein):
    """A batch whose two items' references differ in size (padded as the data loader pads
    them): the student and the teacher see each item's own references, and the teacher equals
    a separately loaded base given them; the prediction keeps the target's tokens only."""
    family, model = load(klein)
    base = Flux2Transformer2DModel.from_pretrained(klein / "transformer")
    rows = [
        family.encode_conditioning(model, "reference", [picture(w, h, seed)[1]])
        for w, h, seed in ((64, 64, 4), (96, 64, 5))
    ]
    conditioning = {key: _pad([row[key][0] for row in rows]) for key in rows[0]}
    text = with_conditioning(
        family.encode_prompts(model, ["a red cat", "a blue dog"]), conditioning
    )
    family.release_encoders(model, keep_decoder=False)
    targets = family.lora_targets(model)["attention_ffn"]
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 128, 2, 3), torch.tensor([0.3, 0.8])
    student = family.predict(model, noisy, t, text)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    plain = type(model)(denoiser=base, identity="", parts=model.parts)
    with torch.no_grad():
        alone = [
            Flux2Family(family.options).predict(
                plain, noisy[i : i + 1], t[i : i + 1], {k: v[i : i + 1] for k, v in text.items()}
            )
            for i in range(2)
        ]
        without = family.predict(plain, noisy, t, {"embeds": text["embeds"]})
    assert student.shape == teacher.shape == noisy.shape
    assert torch.equal(teacher, torch.cat(alone))
    assert not torch.allclose(student, teacher)
    assert not torch.allclose(teacher, without)  # the references reach the prediction


@pytest.mark.parametrize("variant", ["klein", "klein-base", "dev"])
def test_an_edit_sample_is_the_pipeline_s(folders, variant):
    """Same noise, schedule and reference: the family's sample equals the pipeline's edit
    (dev: embedded guidance; klein base: the unconditional pass with the same reference)."""
    folder = folders(variant)
    family, model = load(folder)
    reference, pixels = picture(64, 80, 6)
    conditioning = family.encode_conditioning(model, "reference", [pixels])
    text = family.encode_prompts(model, ["a red cat"])
    ours = family.sample(
        model,
        text,
        size=(32, 48),
        steps=2,
        generator=torch.Generator().manual_seed(0),
        conditioning=conditioning,
    )
    pipeline = Flux2Pipeline if variant == "dev" else Flux2KleinPipeline
    theirs = _edit(pipeline.from_pretrained(folder, local_files_only=True), reference)
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-5)
    plain = family.sample(
        model, text, size=(32, 48), steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(plain, ours, atol=1e-3)


# ------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_edit_preset_trains_on_pairs_in_both_layouts(klein, tmp_path):
    """Pairs with references beside the targets (saved for diffusers) and in a reference folder
    (saved for ComfyUI): the teacher runs, the samples edit the first pair's reference, the
    diffusers file changes the pipeline's 2-step edit of a reference, the ComfyUI file
    converts back to the same updates."""
    beside, folders = (
        _pairs(tmp_path / "beside", beside=True),
        _pairs(tmp_path / "folders", shade=20),
    )
    samples = ('sampling.prompts=["make the square red"]', "sampling.every=2", "sampling.steps=2")
    diffusers = _train(klein, tmp_path, "diffusers", beside, "output.format=diffusers", *samples)
    comfy = _train(
        klein,
        tmp_path,
        "comfy",
        folders,
        f'data.concepts.0.reference_dirs=["{folders}-refs"]',
    )
    for run in (diffusers, comfy):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    # The samples edit the first pair's reference, with and without the LoRA.
    assert (diffusers / "samples/step000002-0-pair.png").is_file()
    reference = Image.open(beside / "a-ref.png")
    pipe = Flux2KleinPipeline.from_pretrained(klein, local_files_only=True)
    before = _edit(pipe, reference)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    assert not torch.allclose(before, _edit(pipe, reference), atol=1e-4)
    comfy_file = load_file(comfy / "lora.safetensors")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight" in comfy_file
    converted = _updates(Flux2KleinPipeline.lora_state_dict(str(comfy / "lora.safetensors")))
    assert converted.keys() == _updates(load_file(diffusers / "lora.safetensors")).keys()
    assert all(update.abs().sum() > 0 for update in converted.values())


def _edit(pipe, reference):
    return pipe(
        prompt="a red cat",
        image=[reference],
        height=48,
        width=32,
        num_inference_steps=2,
        max_sequence_length=TOKENS,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def _pad(rows):
    """Per-item rows (L_i, ...) → (B, max L_i, ...), zeros after each (the data loader's)."""
    length = max(row.shape[0] for row in rows)
    batch = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for out, row in zip(batch, rows, strict=True):
        out[: row.shape[0]] = row
    return batch


def _pairs(folder: Path, *, beside: bool = False, shade: int = 0) -> Path:
    """Two 32 px targets, each a grey picture whose centre square the edit turned red (the
    mask learns the square, keeps the rest), and its 64 x 80 px reference with the square
    blue: ``name-ref.png`` beside it, or ``name.png`` in the folder ``<folder>-refs``."""
    refs = folder if beside else folder.with_name(f"{folder.name}-refs")
    folder.mkdir(parents=True)
    refs.mkdir(exist_ok=True)
    for i, name in enumerate(("a", "b")):
        target = np.full((32, 32, 3), 90 + 40 * i + shade, dtype=np.uint8)
        target[8:24, 8:24] = (220, 30, 30)
        Image.fromarray(target).save(folder / f"{name}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(mask).save(folder / f"{name}-masklabel.png")
        (folder / f"{name}.txt").write_text("make the square red")
        reference = np.full((80, 64, 3), 90 + 40 * i + shade, dtype=np.uint8)
        reference[24:56, 16:48] = (30, 30, 220)
        Image.fromarray(reference).save(refs / (f"{name}-ref.png" if beside else f"{name}.png"))
    return folder


def _train(flux: Path, root: Path, name: str, data: Path, *extra: str) -> Path:
    """Two steps of the edit preset through the public CLI on the pairs in ``data``."""
    overrides = [
        f"model.path={flux}",
        "model.dtype=float32",
        f"model.flux2.text_tokens={TOKENS}",
        f"data.concepts.0.path={data}",
        f"data.cache_dir={root / 'cache'}",
        "data.resolution=32",
        "training.steps=2",
        "training.learning_rate=0.01",
        "training.mixed_precision=no",
        "lora.rank=4",
        "lora.alpha=8",
        "output.save_every=0",
        *extra,
    ]
    command = [sys.executable, "-m", "modules.cli", "train", "presets/flux2-edit-prior.json"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(
        [*command, "--run-dir", str(root / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "conditioning 0 reused, 2 encoded" in result.stdout, result.stdout
    return root / name


def test_references_without_the_edit_task_are_said_to_do_nothing() -> None:
    from modules.config import config_from_dict
    from modules.config.schema import config_warnings

    def said(**flux2) -> list[str]:
        config = config_from_dict({"model": {"family": "flux2", "flux2": flux2}})
        return [w for w in config_warnings(config) if "model.flux2.references" in w]

    assert said(references=3) and "task=edit" in said(references=3)[0]
    assert said(references=3, task="edit") == [] and said() == []
