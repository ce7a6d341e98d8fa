"""FLUX.1 Kontext on a tiny real ``FluxKontextPipeline`` folder: told apart from the folder, the
reference encoded exactly as the pipeline feeds it to the transformer, the teacher equal to a
separately loaded base given the same reference, and the public CLI training a masked-prior
LoRA on a few pairs with the shipped preset, which the pipeline loads back (diffusers and
ComfyUI layouts) and which changes a 2-step edit."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from modules.cli.main import resolve_config
from modules.cli.main import train as cli_train
from modules.config.schema import ModelConfig
from modules.data.images import load_image
from modules.lora import add_lora, lora_disabled
from modules.models import get_family, load_model
from modules.models.flux1 import REFERENCE, SPEC
from modules.models.flux1 import kontext as ref
from modules.models.flux1.family import image_ids
from modules.models.folder_check import model_folder_problem
from modules.models.packing import pack, unpack
from tests.flux1.tiny_flux1 import build_tiny_flux1

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TOKENS = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    return build_tiny_flux1(root / "kontext", variant="kontext"), build_tiny_flux1(root / "dev")


def load(folder, size="own"):
    config = ModelConfig(
        family="flux1", path=str(folder), flux1={"text_tokens": TOKENS, "reference_size": size}
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def pipeline(folder):
    pipe = FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_a_kontext_folder_trains_with_one_reference_and_dev_without(folders):
    kontext, dev = folders
    assert model_folder_problem("flux1", str(kontext)) is None  # no longer refused
    assert SPEC.conditioning_of(str(kontext)) == (REFERENCE,) and REFERENCE.most == 1
    assert SPEC.conditioning_of(str(dev)) == ()
    assert "FLUX.1 Kontext" in SPEC.summary_of(str(kontext))
    assert SPEC.summary_of(str(dev)) is None


def test_the_reference_is_what_the_pipeline_gives_the_transformer(folders, tmp_path):
    """The pipeline's own call at the reference's own size (``_auto_resize=False``, what
    ``reference_size=own`` does), its transformer's inputs caught: the reference's tokens and
    ids after the target's are ours, from the file as the data layer loads it."""
    family, model = load(folders[0], "own")
    image = picture(40, 24, seed=1)
    image.save(tmp_path / "a-ref.png")
    pixels = load_image(tmp_path / "a-ref.png", (40, 24))
    encoded = family.encode_conditioning(model, "reference", [pixels])
    pipe = pipeline(folders[0])
    seen = {}
    pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    pipe(
        image=image,
        prompt="a red cat",
        max_area=32 * 32,
        num_inference_steps=1,
        max_sequence_length=TOKENS,
        output_type="latent",
        _auto_resize=False,
    )
    target = 2 * 2  # 32 x 32 px: a 4 x 4 latent, 2 x 2 tokens
    assert ref.grids(encoded) == [(1, 2)]  # floored to 32 x 16 px; a token is 16 x 16 px
    assert torch.equal(encoded[ref.TOKENS_KEY], seen["hidden_states"][:, target:])
    assert torch.equal(ref.reference_ids((1, 2), CPU), seen["img_ids"][target:])
    assert torch.equal(seen["img_ids"][:target], image_ids(2, 2, CPU))


class _Caught(Exception):
    pass


@pytest.mark.parametrize(
    ("size", "resized"),
    [((48, 32), (1248, 832)), ((36, 68), (720, 1456)), ((20, 20), (1024, 1024))],
)
def test_preferred_references_are_resized_as_the_pipeline_resizes_them(folders, size, resized):
    """``reference_size=preferred``: the pipeline's default resize to the preferred Kontext
    resolution nearest the (16-px floored) aspect ratio, pixel for pixel."""
    image = picture(*size, seed=2)
    array = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    ours = ref.reference_pixels(array.float() / 127.5 - 1, multiple=16, mode="preferred")
    pipe = pipeline(folders[0])
    seen = {}

    def caught(image, *args, **kwargs):
        seen["image"] = image
        raise _Caught  # the pixels are all this test needs

    pipe.prepare_latents = caught
    with pytest.raises(_Caught):
        pipe(image=image, prompt="a", max_area=32 * 32, max_sequence_length=TOKENS)
    assert ours.shape[-2:] == seen["image"].shape[-2:] == resized[::-1]
    assert torch.equal(ours, seen["image"])


def test_the_teacher_is_the_base_given_the_same_reference(folders):
    """Two items with references of different sizes (zero-padded in the batch, as the cache's
    batches are): the teacher is a separately loaded base transformer run on each item's target
    and reference tokens, sliced to the target, bit for bit; the LoRA changes it."""
    family, model = load(folders[0])
    text = family.encode_prompts(model, ["a red cat", "a blue dog"])
    references = [
        family.encode_conditioning(model, "reference", [torch.rand(3, h, w) * 2 - 1])
        for h, w in ((24, 40), (32, 32))
    ]
    family.release_encoders(model, keep_decoder=False)
    length = max(r[ref.TOKENS_KEY].shape[1] for r in references)
    padded = torch.zeros(2, length, 64)
    for row, r in enumerate(references):
        padded[row, : r[ref.TOKENS_KEY].shape[1]] = r[ref.TOKENS_KEY][0]
    grids = torch.cat([r[ref.GRID_KEY] for r in references])
    inputs = {**text, ref.TOKENS_KEY: padded, ref.GRID_KEY: grids}
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "proj_mlp"])
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([0.3, 0.8])
    student = family.predict(model, noisy, t, inputs)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, inputs)
    base = FluxTransformer2DModel.from_pretrained(folders[0] / "transformer")
    expected = []
    for row, r in enumerate(references):
        grid = ref.grids(r)[0]
        with torch.no_grad():
            out = base(
                hidden_states=torch.cat([pack(noisy[row : row + 1]), r[ref.TOKENS_KEY]], dim=1),
                encoder_hidden_states=text["embeds"][row : row + 1],
                pooled_projections=text["pooled"][row : row + 1],
                timestep=t[row : row + 1],
                img_ids=torch.cat([image_ids(2, 3, CPU), ref.reference_ids(grid, CPU)]),
                txt_ids=torch.zeros(TOKENS, 3),
                guidance=torch.tensor([family.options.guidance]),
                return_dict=False,
            )[0]
        expected.append(out[:, :6])  # the target's 2 x 3 tokens
    reference = unpack(torch.cat(expected), 16, 4, 6)
    assert student.shape == teacher.shape == noisy.shape
    assert torch.equal(teacher, reference)
    assert not torch.allclose(student, teacher)


def test_an_edit_sample_is_the_pipeline_s_edit(folders):
    """``sample`` with an encoded reference: the same noise, schedule and embedded guidance as
    ``FluxKontextPipeline``'s 2-step edit of that reference, hence the same image (the first of
    two prompts: one row of ``conditioning`` serves both)."""
    family, model = load(folders[0])
    image = picture(40, 24, seed=3)
    array = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    encoded = family.encode_conditioning(model, "reference", [array])
    text = family.encode_prompts(model, ["a red cat", "a red cat"])
    ours = family.sample(
        model,
        text,
        size=(32, 48),
        steps=2,
        generator=torch.Generator().manual_seed(0),
        conditioning=encoded,
    )
    plain = family.sample(
        model, text, size=(32, 48), steps=2, generator=torch.Generator().manual_seed(0)
    )
    expected = pipeline(folders[0])(
        image=image,
        prompt="a red cat",
        height=48,
        width=32,
        max_area=32 * 48,
        num_inference_steps=2,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        _auto_resize=False,
    ).images
    assert ours.shape == (2, 3, 48, 32)
    assert torch.allclose((ours[:1] + 1) / 2, expected, atol=1e-4)
    assert not torch.allclose(plain, ours, atol=1e-3)  # the reference matters


# ------------------------------------------------------------------------------- the CLI

STEPS = 3


def write_pairs(root: Path) -> tuple[Path, Path, Path]:
    """Three 32 px targets with captions and masks (a learnt square, the rest background),
    their references beside them as ``name-ref.png`` in one folder and, with the same bytes,
    in a reference folder of the same names in another; references of two sizes."""
    beside, targets, refs = root / "beside", root / "targets", root / "refs"
    for folder in (beside, targets, refs):
        folder.mkdir(parents=True)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for i in range(3):
        target, reference = picture(32, 32, seed=10 + i), picture(40 + 8 * (i % 2), 24, seed=20 + i)
        for folder in (beside, targets):
            target.save(folder / f"p{i}.png")
            mask.save(folder / f"p{i}-masklabel.png")
            (folder / f"p{i}.txt").write_text("make the square red", encoding="utf-8")
        reference.save(beside / f"p{i}-ref.png")
        reference.save(refs / f"p{i}.png")
    return beside, targets, refs


def train(folder, root, name, *extra):
    overrides = [
        f"model.path={folder}",
        "model.dtype=float32",
        f"model.flux1.text_tokens={TOKENS}",
        "model.flux1.reference_size=own",  # small references: few tokens on the CPU
        f"data.cache_dir={root / 'cache'}",
        "data.resolution=32",
        f"training.steps={STEPS}",
        "training.learning_rate=0.01",
        "training.mixed_precision=no",
        "training.gradient_checkpointing=false",
        "lora.rank=4",
        "lora.alpha=8",
        "output.save_every=0",
        *extra,
    ]
    preset = REPO / "presets/flux1-kontext-prior.json"
    config = resolve_config(str(preset), overrides, str(root / name))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_train(config)
    assert code == 0, err.getvalue()
    return root / name, out.getvalue()


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext-runs")
    beside, targets, refs = write_pairs(root / "pairs")
    samples = (
        'sampling.prompts=["make the square red"]',
        f"sampling.every={STEPS}",
        "sampling.steps=2",
    )
    comfy = train(folders[0], root, "comfy", f"data.concepts.0.path={beside}", *samples)
    diffusers = train(
        folders[0],
        root,
        "diffusers",
        f"data.concepts.0.path={targets}",
        f'data.concepts.0.reference_dirs=["{refs}"]',
        "output.format=diffusers",
    )
    return comfy, diffusers


@pytest.mark.slow
def test_the_preset_trains_on_pairs_in_either_layout(runs):
    for run_dir, stdout in runs:
        assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in stdout
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    assert "conditioning 0 reused, 3 encoded" in runs[0][1]
    # An edit of the first pair's reference, with the LoRA beside the base model's.
    assert (runs[0][0] / f"samples/step{STEPS:06d}-0-pair.png").is_file()
    # The same bytes in the other layout: the cached references are reused.
    assert "conditioning 3 reused, 0 encoded" in runs[1][1]


def _edit(pipe):
    return pipe(
        image=picture(40, 24, seed=5),
        prompt="make the square red",
        height=32,
        width=32,
        max_area=32 * 32,
        num_inference_steps=2,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        _auto_resize=False,
    ).images


@pytest.mark.slow
def test_the_loras_load_into_the_kontext_pipeline_and_change_an_edit(folders, runs):
    (comfy, _), (diffusers, _) = runs
    pipe = pipeline(folders[0])
    base = _edit(pipe)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    tuned = _edit(pipe)
    assert not torch.allclose(base, tuned, atol=1e-4)
    # The ComfyUI file: diffusers names with a per-module alpha, read back tensor for tensor
    # (both runs trained the same pairs from the same seed).
    reference = load_file(diffusers / "lora.safetensors")
    state, alphas = FluxKontextPipeline.lora_state_dict(
        str(comfy / "lora.safetensors"), return_alphas=True
    )
    assert set(state) == set(reference) and {float(a) for a in alphas.values()} == {8.0}
    for key, value in reference.items():
        assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-7), key
    other = pipeline(folders[0])
    other.load_lora_weights(str(comfy / "lora.safetensors"))
    assert torch.allclose(_edit(other), tuned, atol=1e-4)
