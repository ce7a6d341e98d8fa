"""End to end, as a user runs it: the CLI trains a masked-prior edit LoRA with
``qwen-image-edit-prior.json`` on a tiny Qwen-Image-Edit-2511 folder and a few pairs, in each
dataset layout (``name-ref.png`` beside the targets, saved for ComfyUI as the preset ships; two
reference folders, saved for diffusers with samples). The diffusers file loads into
``QwenImageEditPlusPipeline`` and changes a 2-step edit of a reference; the ComfyUI file converts
back through diffusers' converter to the same LoRA. The runs use the CLI's own config and train
functions in this process (the same code, without the 10 s of imports a process costs)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus_module
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from PIL import Image
from safetensors.torch import load_file

from modules.cli.main import resolve_config
from modules.cli.main import train as cli_train
from tests.qwen_image.tiny_qwen_image_edit import build_tiny_qwen_image_edit, edit_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
AREA = 64 * 64


def _pairs(root: Path) -> tuple[Path, list[Path]]:
    """Targets a, b (a red square put on the reference), masks of that square, captions; each
    with ``-ref.png`` beside it and a file of its name in each of two reference folders."""
    targets = root / "targets"
    folders = [root / "refs1", root / "refs2"]
    for folder in (targets, *folders):
        folder.mkdir(parents=True)
    for index, name in enumerate("ab"):
        reference = Image.new("RGB", (48, 32), (30 + 80 * index, 120, 200))
        reference.save(targets / f"{name}-ref.png")
        reference.save(folders[0] / f"{name}.png")
        Image.new("RGB", (32, 40), (200, 200, 40)).save(folders[1] / f"{name}.png")
        target = reference.copy()
        target.paste((220, 20, 20), (8, 8, 24, 24))
        target.save(targets / f"{name}.png")
        mask = Image.new("L", (48, 32), 0)
        mask.paste(255, (8, 8, 24, 24))
        mask.save(targets / f"{name}-masklabel.png")
        (targets / f"{name}.txt").write_text("put a red square on it")
    return targets, folders


def _train(folder: Path, targets: Path, run_dir: Path, *extra: str) -> str:
    overrides = [
        f"model.path={folder}",
        "model.dtype=float32",
        f"model.qwen_image.reference_pixels={AREA}",
        f"data.concepts.0.path={targets}",
        f"data.cache_dir={run_dir}-cache",
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
    config = resolve_config(
        str(REPO / "presets/qwen-image-edit-prior.json"), overrides, str(run_dir)
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_train(config)
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-edit-runs")
    folder = build_tiny_qwen_image_edit(root / "Qwen-Image-Edit-2511")
    targets, folders = _pairs(root / "data")
    beside = _train(folder, targets, root / "beside")
    dirs = json.dumps([str(f) for f in folders])
    in_folders = _train(
        folder,
        targets,
        root / "folders",
        f"data.concepts.0.reference_dirs={dirs}",
        "output.format=diffusers",
        'sampling.prompts=["put a red square on it"]',
        f"sampling.every={STEPS}",
        "sampling.steps=2",
    )
    return folder, {"beside": (root / "beside", beside), "folders": (root / "folders", in_folders)}


@pytest.mark.parametrize("layout", ["beside", "folders"])
def test_each_layout_trains_both_loss_terms_on_its_pairs(runs, layout):
    _, done = runs
    run_dir, stdout = done[layout]
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in stdout
    assert "conditioning 0 reused, 2 encoded" in stdout  # one encoding per pair
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == STEPS and all(x["teacher_fraction"] == 1.0 for x in lines)
    assert lines[-1]["loss_prior"] > 0
    # Every reference the layout gives is encoded: one beside each target, two in the folders.
    cached = sorted(Path(f"{run_dir}-cache", "conditioning").rglob("*.safetensors"))
    grids = [load_file(path)["reference_shapes"].tolist() for path in cached]
    grid = [1, 4, 4]  # 64 x 64 px: 4096 px in sides of multiples of 32
    wanted = [grid] if layout == "beside" else [grid, grid]
    assert grids == [wanted, wanted]
    if layout == "folders":  # samples edit the first pair's two references
        assert (run_dir / "samples" / f"step{STEPS:06d}-0-pair.png").is_file()


def _edit(pipeline: QwenImageEditPlusPipeline) -> torch.Tensor:
    return pipeline(
        image=[Image.new("RGB", (48, 32), (30, 120, 200))],
        prompt="put a red square on it",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_the_lora_loads_into_the_edit_pipeline_and_changes_an_edit(runs, monkeypatch):
    folder, done = runs
    monkeypatch.setattr(edit_plus_module, "VAE_IMAGE_SIZE", AREA)  # as trained
    pipeline = edit_pipeline(folder)
    assert isinstance(pipeline, QwenImageEditPlusPipeline)
    base = _edit(pipeline)
    pipeline.load_lora_weights(str(done["folders"][0] / "lora.safetensors"))
    assert not torch.allclose(_edit(pipeline), base, atol=1e-6)


def test_the_comfyui_file_converts_back_through_diffusers_converter(runs):
    folder, done = runs
    comfy = load_file(done["beside"][0] / "lora.safetensors")
    assert all(key.startswith("diffusion_model.transformer_blocks.") for key in comfy)
    state = QwenImageEditPlusPipeline.lora_state_dict(str(done["beside"][0] / "lora.safetensors"))
    modules = {key.rsplit(".lora_", 1)[0] for key in state}
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
    mlp = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    wanted = {
        f"transformer.transformer_blocks.{block}.{name}"
        for block in (0, 1)
        for name in (*(f"attn.{a}" for a in attention), "attn.to_add_out", *mlp)
    }
    assert modules == wanted
    # The same tensors, diffusers' converter folding alpha / rank (8 / 4 = 2) into lora_A.
    for key, value in state.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        saved = comfy[f"diffusion_model.{module}.lora_{'down' if kind[0] == 'A' else 'up'}.weight"]
        expected = saved * 2 if kind[0] == "A" else saved
        assert torch.allclose(value, expected, rtol=1e-5, atol=1e-7), key
    pipeline = edit_pipeline(folder)
    pipeline.load_lora_weights(str(done["beside"][0] / "lora.safetensors"))
