from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.models.demo.family import DemoFamily, build_demo_model, demo_architecture
from scripts.pretrain_demo import CHECKPOINT, LOSS_LOG, PretrainRun, encode_captions, pretrain

CPU = torch.device("cpu")


def _run(out: Path, **overrides: object) -> PretrainRun:
    settings: dict = {
        "steps": 3,
        "batch_size": 2,
        "warmup_steps": 1,
        "log_every": 1,
        "sample_count": 2,
        "sample_steps": 2,
        "tiny": True,
    }
    return PretrainRun(out=out, **(settings | overrides))


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    straight = pretrain(_run(tmp_path / "straight"))
    assert straight is not None and straight["step"] == 3

    stopped = _run(tmp_path / "resumed", session_steps=2)
    assert pretrain(stopped) is None
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    assert not (tmp_path / "resumed" / "model").exists()
    assert [row["step"] for row in _losses(tmp_path / "resumed")] == [1, 2]
    resumed = pretrain(_run(tmp_path / "resumed"))
    assert resumed is not None and resumed["step"] == 3

    rows = _losses(tmp_path / "straight")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert set(rows[0]) == {"step", "loss", "lr", "elapsed_s", "steps_per_s"}
    assert [r["loss"] for r in _losses(tmp_path / "resumed")] == [r["loss"] for r in rows]
    weights = "model/transformer/diffusion_pytorch_model.safetensors"
    one, two = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(v.dtype == torch.float16 for v in one.values() if v.is_floating_point())


def test_scenes_drawn_by_worker_processes_train_the_same_steps(tmp_path: Path) -> None:
    inline = pretrain(_run(tmp_path / "inline"))
    workers = pretrain(_run(tmp_path / "workers", workers=2))
    assert inline is not None and workers is not None
    assert [r["loss"] for r in _losses(tmp_path / "workers")] == [
        r["loss"] for r in _losses(tmp_path / "inline")
    ]


@pytest.mark.parametrize(("architecture", "folder"), [("wan", "transformer"), ("unet", "unet")])
def test_the_exported_folder_loads_through_the_demo_family(
    tmp_path: Path, architecture: str, folder: str
) -> None:
    summary = pretrain(_run(tmp_path, steps=1, architecture=architecture))
    assert summary is not None and summary["run"]["architecture"] == architecture
    exported = [p.name for p in (tmp_path / "model").iterdir()]
    assert sorted(exported) == sorted([folder, "text_encoder", "tokenizer"])
    assert (tmp_path / "samples.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 1
    family = DemoFamily()
    model = family.load(str(tmp_path / "model"), dtype=torch.float32, device=CPU)
    assert demo_architecture(model.denoiser) == architecture
    text = family.encode_prompts(model, ["a red star on a plain background"])
    images = family.sample(
        model, text, size=(32, 32), steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_a_checkpoint_refuses_other_data_settings(tmp_path: Path) -> None:
    assert pretrain(_run(tmp_path, session_steps=1)) is None
    with pytest.raises(ValueError, match="batch_size=2, this run asks for 3"):
        pretrain(_run(tmp_path, batch_size=3))


def test_trainable_encoding_equals_the_familys() -> None:
    model = build_demo_model(seed=0)
    prompts = ["a red star on a plain background", ""]
    with torch.no_grad():
        ours = encode_captions(model, prompts)["embeds"]
    assert torch.equal(ours, DemoFamily().encode_prompts(model, prompts)["embeds"])


def test_a_checkpoint_refuses_another_architecture(tmp_path: Path) -> None:
    assert pretrain(_run(tmp_path, session_steps=1)) is None
    with pytest.raises(ValueError, match="architecture='wan', this run asks for 'unet'"):
        pretrain(_run(tmp_path, architecture="unet"))


def test_a_preview_exports_the_checkpoint_and_trains_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint to preview"):
        pretrain(_run(tmp_path / "none", preview=True))
    assert pretrain(_run(tmp_path, session_steps=2)) is None
    log = (tmp_path / LOSS_LOG).read_text()
    checkpoint = (tmp_path / CHECKPOINT).read_bytes()
    summary = pretrain(_run(tmp_path, preview=True))
    assert summary is not None and summary["step"] == 2
    assert (tmp_path / "preview/samples.png").is_file()
    assert json.loads((tmp_path / "preview/summary.json").read_text())["step"] == 2
    assert (tmp_path / LOSS_LOG).read_text() == log
    assert (tmp_path / CHECKPOINT).read_bytes() == checkpoint
    assert not (tmp_path / "model").exists()
    DemoFamily().load(str(tmp_path / "preview/model"), dtype=torch.float32, device=CPU)
    finished = pretrain(_run(tmp_path))  # the run itself goes on from its checkpoint
    assert finished is not None and finished["step"] == 3


def test_a_stop_step_exports_early_on_the_full_runs_schedule(tmp_path: Path) -> None:
    full = pretrain(_run(tmp_path / "full", steps=4))
    stopped = pretrain(_run(tmp_path / "stopped", steps=4, stop_step=2))
    assert full is not None and stopped is not None and stopped["step"] == 2
    assert (tmp_path / "stopped/model").is_dir() and (tmp_path / "stopped/samples.png").is_file()

    # Its two steps are the full run's first two, learning rate included.
    def curve(out: Path) -> list[tuple]:
        return [(row["step"], row["loss"], row["lr"]) for row in _losses(out)]

    assert curve(tmp_path / "stopped") == curve(tmp_path / "full")[:2]
    carried_on = pretrain(_run(tmp_path / "stopped", steps=4))
    assert carried_on is not None and carried_on["step"] == 4
