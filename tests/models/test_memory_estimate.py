"""The memory estimate (``modules.models.memory_estimate``): its parameter and state bytes
against a tiny model's real tensors after a training step, ``blocks_to_swap=auto``, the VRAM
presets and what ``check`` says."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from modules.cli.main import main
from modules.config import load_preset
from modules.config.schema import MemoryConfig, TrainConfig
from modules.lora.lora import add_lora
from modules.models import get_family, load_model
from modules.models.memory import prepare_denoiser
from modules.models.memory_estimate import (
    GB,
    PUBLISHED,
    estimate,
    estimate_lines,
    fitting_swap,
    model_sizes,
    resolve_blocks_to_swap,
)
from modules.models.registry import family_spec
from modules.trainer.optimizer import make_optimizer

CPU = torch.device("cpu")
PRESETS = Path(__file__).resolve().parents[2] / "presets"
VRAM_PRESETS = [
    f"{model}-{gb}gb.json" for model in ("wan22-a14b", "qwen-image", "flux2-dev") for gb in (24, 16)
]


def _config(path="", family="wan", **sections) -> TrainConfig:
    data = {"model": {"family": family, "path": path}, **sections}
    return TrainConfig.model_validate(data)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    ("optimizer", "rank", "dtype"),
    [
        ("adamw", 4, "float32"),
        ("adamw", 4, "bfloat16"),
        ("adamw8bit", 192, "float32"),  # 192 x 24 values: over the 4096 that 8 bits need
        ("adafactor", 8, "float32"),
        ("came", 4, "float32"),
        ("prodigy", 4, "float32"),
        ("sgd", 4, "float32"),
    ],
)
def test_the_estimate_s_weights_and_state_are_within_15_percent_of_a_tiny_wan_s(
    tiny_wan, optimizer, rank, dtype
):
    """Read from the folder's files alone, the estimate of the base weights and of the LoRA with
    its gradients and optimizer state, against the bytes of the loaded model's real tensors
    after one optimizer step."""
    config = _config(
        str(tiny_wan),
        model={"family": "wan", "path": str(tiny_wan), "dtype": dtype},
        lora={"rank": rank, "targets": "attention_ffn"},
        training={"optimizer": optimizer},
    )
    sizes = model_sizes(config)
    assert sizes.source == "the model folder's files"
    found = estimate(config, sizes)

    family = get_family(config.model)
    model = load_model(family, config.model, dtype=getattr(torch, dtype), device=CPU)
    assert len(sizes.blocks) == len(family.blocks(model.denoiser))
    targets = list(family_spec("wan").lora_targets["attention_ffn"])
    params = add_lora(model.denoiser, rank=rank, alpha=rank, dropout=0.0, target_modules=targets)
    step = make_optimizer(config, params)
    torch.manual_seed(0)
    noisy, text = torch.randn(1, 16, 2, 4, 4), {"embeds": torch.randn(1, 5, 32)}
    family.predict(model, noisy, torch.tensor([0.5]), text).float().pow(2).mean().backward()
    step.step()

    base = [p for p in model.denoiser.parameters() if not p.requires_grad]
    state = [v for s in step.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    lora = _tensor_bytes(params) + _tensor_bytes(p.grad for p in params) + _tensor_bytes(state)
    assert found.base_weights * GB == pytest.approx(_tensor_bytes(base), rel=0.15)
    assert found.lora * GB == pytest.approx(lora, rel=0.15)


def test_the_published_sizes_are_the_released_models():
    """The table's totals are the parameter counts the models are known by."""
    totals = {
        (family, word): sum(sizes.blocks) + sizes.outside
        for family, models in PUBLISHED.items()
        for word, sizes in models.items()
        if sizes is not None
    }
    assert totals[("wan", "14b")] == pytest.approx(14.3e9, rel=0.01)
    assert totals[("wan", "5b")] == pytest.approx(5.0e9, rel=0.01)
    assert totals[("qwen_image", "")] == pytest.approx(20.4e9, rel=0.01)
    assert totals[("flux2", "")] == pytest.approx(32.2e9, rel=0.01)
    assert totals[("flux1", "")] == pytest.approx(11.9e9, rel=0.01)
    wan = model_sizes(_config("models/Wan2.2-T2V-A14B-Diffusers"))
    assert len(wan.blocks) == 40 and wan.hidden == 5120
    assert model_sizes(_config("models/Wan2.1-T2V-1.3B-Diffusers")).hidden == 1536
    assert model_sizes(_config("models/Wan2.2-TI2V-5B-Diffusers")).hidden == 3072
    assert model_sizes(_config("models/FLUX.2-klein-4B", "flux2")) is None


def test_auto_swaps_the_fewest_blocks_that_fit_and_more_swap_never_costs_more():
    config = _config(
        "models/Qwen-Image",
        "qwen_image",
        data={"resolution": 1024},
        training={"gradient_checkpointing": False, "mixed_precision": "bf16"},
        model={
            "family": "qwen_image",
            "path": "models/Qwen-Image",
            "dtype": "bfloat16",
            "memory": {"blocks_to_swap": "auto", "vram_gb": 24},
        },
    )
    sizes = model_sizes(config)
    peaks = [estimate(config, sizes, swap).training for swap in range(61)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(peaks))
    assert peaks[0] > 24 >= peaks[-1]
    chosen = fitting_swap(config, sizes, 24)
    assert peaks[chosen] <= 24 < peaks[chosen - 1]
    resolved = resolve_blocks_to_swap(config)
    assert resolved.model.memory.blocks_to_swap == chosen
    assert config.model.memory.blocks_to_swap == "auto"  # the config itself is left as it is
    lines = estimate_lines(config)
    assert f"blocks_to_swap=auto swaps {chosen} blocks" in "\n".join(lines)
    # A budget nothing fits swaps every block.
    tight = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"memory": MemoryConfig(blocks_to_swap="auto", vram_gb=2)}
            )
        }
    )
    assert resolve_blocks_to_swap(tight).model.memory.blocks_to_swap == 60


def test_auto_needs_a_budget_and_is_resolved_before_the_model_loads():
    with pytest.raises(ValidationError, match="blocks_to_swap=auto needs model.memory.vram_gb"):
        MemoryConfig(blocks_to_swap="auto")
    assert MemoryConfig(blocks_to_swap="auto", vram_gb=16).blocks_to_swap == "auto"
    assert MemoryConfig(blocks_to_swap="3").blocks_to_swap == 3
    with pytest.raises(ValueError, match="resolve"):
        prepare_denoiser(
            torch.nn.Linear(2, 2),
            memory=MemoryConfig(blocks_to_swap="auto", vram_gb=16),
            compute_dtype=torch.float32,
        )


def test_over_the_budget_the_estimate_names_what_would_fit():
    config = _config(
        "models/Wan2.2-T2V-A14B-Diffusers",
        model={
            "family": "wan",
            "path": "models/Wan2.2-T2V-A14B-Diffusers",
            "dtype": "bfloat16",
            "memory": {"vram_gb": 24},
        },
        data={"resolution": 512, "frames": 17},
        training={"gradient_checkpointing": True, "mixed_precision": "bf16"},
    )
    over = estimate_lines(config)[-1]
    assert "is over model.memory.vram_gb=24" in over
    assert "model.memory.base_weights=fp8_scaled" in over
    assert "model.memory.blocks_to_swap=" in over


@pytest.mark.parametrize("name", VRAM_PRESETS)
def test_the_vram_presets_train_with_the_teacher_and_say_their_estimate(name):
    config = load_preset(PRESETS / name)
    assert config.prior.weight > 0 and config.mask.enabled
    memory = config.model.memory
    assert memory.blocks_to_swap == "auto" and memory.vram_gb == int(name.split("-")[-1][:2])
    lines = estimate_lines(config)
    assert lines[0].startswith("memory estimate (not measured): peak")
    sizes = model_sizes(config)
    resolved = resolve_blocks_to_swap(config)
    training = estimate(resolved, sizes).training
    assert training <= memory.vram_gb
    readme = (PRESETS.parent / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
    assert f"**{training:.1f}**" in row, "the README shows each preset's estimate"


def test_check_prints_the_estimate(tmp_path, tiny_wan, capsys):
    from PIL import Image

    concept = tmp_path / "concept"
    concept.mkdir()
    Image.new("RGB", (32, 32)).save(concept / "a.png")
    (concept / "a.txt").write_text("a photo")
    preset = tmp_path / "preset.json"
    data = {
        "schema_version": 4,
        "model": {"family": "wan", "path": str(tiny_wan), "memory": {"vram_gb": 0.5}},
        "data": {"concepts": [{"path": str(concept)}], "resolution": 32},
        "mask": {"enabled": False},
        "prior": {"weight": 0.0},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    preset.write_text(json.dumps(data))
    assert main(["check", str(preset)]) == 0
    out = capsys.readouterr().out
    assert "memory estimate (not measured): peak" in out
    assert "sizes: the model folder's files" in out
    assert "warning: memory estimate: 1.0 GB is over model.memory.vram_gb=0.5" in out


def test_a_run_resolves_auto_and_says_its_estimate(tiny_wan, tmp_path, monkeypatch):
    """A budget nothing fits (the CUDA reserve alone is over it) swaps every block."""
    from modules.models import memory
    from tests.wan.test_wan_training import make_config, run
    from tests.wan.tiny_wan import write_video_concept

    swapped = []
    original = memory.swap_blocks
    monkeypatch.setattr(
        memory, "swap_blocks", lambda d, b, count: swapped.append(count) or original(d, b, count)
    )
    config = make_config(
        tiny_wan,
        write_video_concept(tmp_path / "subject"),
        tmp_path,
        model={"memory": {"blocks_to_swap": "auto", "vram_gb": 0.5}},
        training={"steps": 1},
    )
    _, texts = run(config)
    assert swapped == [2]
    assert any(t.startswith("memory estimate (not measured): peak") for t in texts)
    assert "memory estimate: blocks_to_swap=auto swaps 2 blocks" in texts


def test_a_z_image_folder_s_blocks_and_width_are_read(tmp_path):
    """Z-Image names its width ``dim`` and its blocks ``layers`` and refiners: the estimate
    reads them, one size per block the family swaps."""
    from tests.zimage.tiny_zimage import build_tiny_zimage

    folder = build_tiny_zimage(tmp_path / "Z-Image")
    config = _config(str(folder), family="zimage")
    sizes = model_sizes(config)
    assert sizes is not None and sizes.source == "the model folder's files"
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert sizes.hidden == transformer["dim"]
    family = get_family(config.model)
    model = load_model(family, config.model, dtype=torch.float32, device=CPU)
    assert len(sizes.blocks) == len(family.blocks(model.denoiser))
    in_blocks = sum(p.numel() for b in family.blocks(model.denoiser) for p in b.parameters())
    assert sum(sizes.blocks) == in_blocks


def test_an_edit_model_s_references_count_as_tokens(tmp_path):
    """Each reference the run allows adds the tokens of a reference at the pipelines' largest
    area (1024 x 1024 px: 64 x 64 tokens of 16 px) to the activations' token count."""
    from modules.models.memory_estimate import token_count

    def flux2(**options) -> TrainConfig:
        model = {"family": "flux2", "path": str(tmp_path), "flux2": options}
        return _config(model=model, data={"resolution": 512})

    assert token_count(flux2(task="edit", references=2)) - token_count(flux2()) == 2 * 64 * 64


def test_wan_2_1_image_to_video_s_clip_encoder_counts_in_the_cache_phase(tmp_path):
    """Its CLIP image encoder is on the GPU with the text encoder while the cache fills."""
    from tests.wan.tiny_wan import build_tiny_wan_i2v

    folder = build_tiny_wan_i2v(tmp_path / "i2v", version="2.1")
    sizes = model_sizes(_config(str(folder)))
    clip = sum(
        t.numel()
        for t in load_file(next((folder / "image_encoder").glob("*.safetensors"))).values()
    )
    text = sum(
        t.numel() for t in load_file(next((folder / "text_encoder").glob("*.safetensors"))).values()
    )
    assert sizes.text_encoder == clip + text
