"""End to end, as a user runs it: the CLI trains a masked-prior image-to-video LoRA on tiny
WAN 2.1 I2V (with ``wan-prior.json``, which trains an I2V folder too), WAN 2.2 I2V A14B
(``wan22-i2v-prior.json``) and TI2V 5B (``wan22-ti2v-prior.json``) folders and a few masked
clips; the samples start from an image, and the files load into ``WanImageToVideoPipeline`` and
change a 2-step generation from an image. WAN 2.2 runs the public command in its own process;
the other two run the CLI's own config and train functions in this one (the same code, without
the 10 s of imports a process costs)."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from PIL import Image
from safetensors.torch import load_file

from modules.cli.main import resolve_config
from modules.cli.main import train as cli_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
FORMS = {
    # form: (preset, extra overrides)
    "2.1": ("presets/wan-prior.json", ()),  # ComfyUI layout, as the preset ships
    "2.2": ("presets/wan22-i2v-prior.json", ("output.format=diffusers",)),
    "ti2v": ("presets/wan22-ti2v-prior.json", ("output.format=diffusers",)),
}


def train(preset, folder, concept, run_dir, *extra, process=False):
    overrides = [
        f"model.path={folder}",
        f"data.concepts.0.path={concept}",
        f"data.cache_dir={run_dir}-cache",
        "data.resolution=32",
        "data.frames=9",
        f"training.steps={STEPS}",
        "training.learning_rate=0.01",
        "lora.rank=4",
        "lora.alpha=4",
        "output.save_every=0",
        'sampling.prompts=["a video of sks heart"]',
        f"sampling.every={STEPS}",
        "sampling.steps=2",
        "sampling.frames=5",
        *extra,
    ]
    if not process:
        config = resolve_config(str(REPO / preset), overrides, str(run_dir))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_train(config)
        assert code == 0, err.getvalue()
        return SimpleNamespace(stdout=out.getvalue())
    command = [sys.executable, "-m", "modules.cli", "train", preset, "--run-dir", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tiny_wan_i2v21, tiny_wan_i2v22, tiny_wan_ti2v, clip_concept, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v-runs")
    start = root / "start.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(start)
    folders = {"2.1": tiny_wan_i2v21, "2.2": tiny_wan_i2v22, "ti2v": tiny_wan_ti2v}
    done = {}
    for form, (preset, extra) in FORMS.items():
        images = (f'sampling.images=["{start}"]',) if form == "2.2" else ()
        result = train(
            preset, folders[form], clip_concept, root / form, *extra, *images, process=form == "2.2"
        )
        done[form] = (root / form, result, folders[form])
    return done


@pytest.mark.parametrize("form", FORMS)
def test_each_form_trains_both_loss_terms_and_samples_from_an_image(runs, form):
    run_dir, result, _ = runs[form]
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in result.stdout
    assert "conditioning 0 reused, 3 encoded" in result.stdout  # one first frame per clip
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == STEPS and all(x["teacher_fraction"] == 1.0 for x in lines)
    assert all(x["loss_prior"] > 0 for x in lines[1:])
    samples = run_dir / "samples"
    assert (samples / f"step{STEPS:06d}-0-lora.webp").is_file()
    assert (samples / "base" / "00.png").is_file()


def _generate(pipeline, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 6, 32, generator=generator)
    return pipeline(
        image=Image.new("RGB", (32, 32), (30, 160, 60)),
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


@pytest.mark.parametrize("form", FORMS)
def test_the_lora_loads_into_the_image_to_video_pipeline_and_changes_a_generation(runs, form):
    run_dir, _, folder = runs[form]
    pipeline = WanImageToVideoPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    base = _generate(pipeline)
    # The 2.2 preset trains the low-noise expert: transformer_2, as the pipeline names it.
    pipeline.load_lora_weights(
        str(run_dir / "lora.safetensors"), load_into_transformer_2=form == "2.2"
    )
    tuned = _generate(pipeline)
    assert not torch.allclose(tuned, base, atol=1e-6)


def test_the_wan21_comfyui_file_converts_back_with_the_image_cross_attention(runs):
    state = load_file(runs["2.1"][0] / "lora.safetensors")
    assert "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight" in state
    converted = _convert_non_diffusers_wan_lora_to_diffusers(state)
    modules = {key.rsplit(".lora_", 1)[0] for key in converted}
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    wanted = {
        f"transformer.blocks.{b}.{a}.{m}"
        for b in (0, 1)
        for a in ("attn1", "attn2")
        for m in attention
        if a == "attn2" or not m.startswith("add_")  # attn1 has no image projections
    }
    ffn = {f"transformer.blocks.{b}.ffn.net.{m}" for b in (0, 1) for m in ("0.proj", "2")}
    assert modules == wanted | ffn  # the preset's attention_ffn
