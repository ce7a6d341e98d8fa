"""The trainer end to end on the demo family: real diffusers model, peft LoRA, cached data."""

import json
import queue

import pytest
import torch

from modules.config import TrainConfig, config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.lora import load_lora
from modules.models.demo.family import DemoFamily, build_demo_model, save_demo_model
from modules.trainer import (
    Command,
    FileSaved,
    Finished,
    GenericTrainer,
    SampleSaved,
    StatusMessage,
    StepMetrics,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


def make_config(demo_root, tmp_path, *, prior_concept=False, **sections) -> TrainConfig:
    concepts = [{"path": str(demo_root / "subject")}]
    if prior_concept:
        concepts.append({"path": str(demo_root / "prior"), "type": "prior_prediction"})
    data = {
        "data": {"concepts": concepts, "resolution": 32, "cache_dir": str(tmp_path / "cache")},
        "mask": {"enabled": True, "normalize_per_sample": True},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4},
        "training": {"steps": 4, "batch_size": 2, "learning_rate": 1e-3},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def run(config, commands=()):
    events, command_queue = queue.Queue(), queue.Queue()
    for command in commands:
        command_queue.put(command)
    finished = GenericTrainer(config, events, command_queue).run()
    drained = []
    while not events.empty():
        drained.append(events.get())
    assert isinstance(drained[-1], Finished)
    return finished, drained


def builtin_base():
    """A separate copy of the base the trainer loads: the shipped demo weights, in float32."""
    return DemoFamily().load("", dtype=torch.float32, device=torch.device("cpu"))


def metrics(events):
    return [e for e in events if isinstance(e, StepMetrics)]


def test_prior_run_logs_both_terms_and_saves_a_lora_that_reloads(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, training={"steps": 6})
    trainer = GenericTrainer(config)
    finished = trainer.run()
    assert finished.error is None and not finished.stopped
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    for key in ("loss_total", "loss_target", "loss_prior", "target_weight_mean", "lr"):
        assert all(key in x for x in lines)
    assert all(x["teacher_fraction"] == 1.0 for x in lines)  # every demo image has background
    assert all(x["loss_target"] > 0 for x in lines)
    assert lines[-1]["loss_prior"] > 0  # the LoRA has moved away from the base
    assert 0 < lines[0]["prior_weight_mean"] < 1
    assert (tmp_path / "run/lora.json").is_file()

    # The saved file, loaded into a fresh base through diffusers, reproduces the trained model.
    family, trained = trainer.built.family, trainer.built.model
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    timesteps = torch.tensor([0.2, 0.9])
    text = family.encode_prompts(trained, ["a sks heart on a plain background", "a red square"])
    trained.denoiser.eval()
    fresh = builtin_base()
    load_lora(fresh.denoiser, finished.lora_path)
    with torch.no_grad():
        expected = family.predict(trained, noisy, timesteps, text)
        assert torch.allclose(family.predict(fresh, noisy, timesteps, text), expected, atol=1e-5)
        base = family.predict(builtin_base(), noisy, timesteps, text)
    assert not torch.allclose(expected, base, atol=1e-4)


def test_unmasked_probability_one_never_runs_the_teacher(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, mask={"unmasked_probability": 1.0})
    finished, events = run(config)
    assert finished.error is None
    steps = metrics(events)
    assert len(steps) == 4
    assert all(s.teacher_fraction == 0 and s.loss_prior == 0 for s in steps)
    assert all(s.target_weight_mean == 1 and s.prior_weight_mean == 0 for s in steps)


def test_prior_weight_zero_never_runs_the_teacher(demo_root, tmp_path, monkeypatch):
    calls = []
    original = DemoFamily.predict

    def spy(self, model, noisy, timesteps, text):
        calls.append(torch.is_grad_enabled())
        return original(self, model, noisy, timesteps, text)

    monkeypatch.setattr(DemoFamily, "predict", spy)
    config = make_config(demo_root, tmp_path, prior={"weight": 0.0})
    finished, events = run(config)
    assert finished.error is None
    assert all(s.teacher_fraction == 0 and s.loss_prior == 0 for s in metrics(events))
    assert calls == [True] * 4  # only the student forward, once per step


def test_teacher_is_the_base_model_on_the_same_inputs(demo_root, tmp_path, monkeypatch):
    """Design §5.2 test_prior_prediction_matches_base_model, against a separate base copy."""
    records = []
    original = DemoFamily.predict

    def spy(self, model, noisy, timesteps, text):
        out = original(self, model, noisy, timesteps, text)
        records.append((torch.is_grad_enabled(), noisy.clone(), timesteps.clone(), text, out))
        return out

    monkeypatch.setattr(DemoFamily, "predict", spy)
    config = make_config(demo_root, tmp_path, training={"steps": 3, "learning_rate": 1e-2})
    finished, _ = run(config)
    assert finished.error is None
    # Last step: the teacher call (no grad), then the student call (grad) on the same inputs.
    (t_grad, t_noisy, t_steps, t_text, teacher), (s_grad, s_noisy, s_steps, _, student) = records[
        -2:
    ]
    assert not t_grad and s_grad
    assert torch.equal(t_noisy, s_noisy) and torch.equal(t_steps, s_steps)
    base = builtin_base()
    with torch.no_grad():
        expected = original(DemoFamily(), base, t_noisy, t_steps, t_text)
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert not torch.allclose(student.detach(), expected, atol=1e-4)  # the LoRA is on again


def test_prior_prediction_concept_runs_the_teacher_for_its_samples_only(demo_root, tmp_path):
    config = make_config(
        demo_root,
        tmp_path,
        prior_concept=True,
        prior={"weight": 0.0},
        training={"steps": 6, "batch_size": 4},
    )
    finished, events = run(config)
    assert finished.error is None
    fractions = {s.teacher_fraction for s in metrics(events)}
    assert fractions - {0.0, 0.25, 0.5, 0.75, 1.0} == set()
    assert any(0 < f < 1 for f in fractions)  # 16 subject + 8 prior images: mixed batches
    assert all(s.loss_prior == 0 for s in metrics(events))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_lora(
    demo_root, tmp_path, monkeypatch
):
    original = DemoFamily.predict
    count = {"student": 0}

    def poisoned(self, model, noisy, timesteps, text):
        out = original(self, model, noisy, timesteps, text)
        if torch.is_grad_enabled():
            count["student"] += 1
            if count["student"] == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(DemoFamily, "predict", poisoned)
    config = make_config(demo_root, tmp_path, output={"save_every": 1, "name": "x"})
    finished, events = run(config)
    assert finished.error is not None
    assert "step 3: the loss is not finite" in finished.error
    assert "x-step000002.safetensors" in finished.error
    saved = [e.path.name for e in events if isinstance(e, FileSaved)]
    assert saved == ["x-step000001.safetensors", "x-step000002.safetensors"]
    assert finished.lora_path.name == "x-step000002.safetensors"
    assert not (tmp_path / "run/x.safetensors").exists()  # no NaN weights were written


def test_stop_save_and_sample_commands(demo_root, tmp_path):
    config = make_config(
        demo_root,
        tmp_path,
        sampling={"prompts": ["a sks heart on a plain background"], "steps": 2},
        training={"steps": 50},
    )
    finished, events = run(config, [Command.SAVE, Command.SAMPLE, Command.STOP])
    assert finished.stopped and finished.error is None and finished.step == 1
    assert (tmp_path / "run/lora.safetensors").is_file()
    samples = [e for e in events if isinstance(e, SampleSaved)]
    assert {s.with_lora for s in samples} == {True, False}
    assert all(s.path.is_file() for s in samples)
    texts = [e.text for e in events if isinstance(e, StatusMessage)]
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in texts


def test_cache_is_reused_by_a_second_run(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, training={"steps": 1})
    run(config)
    _, events = run(config)
    texts = [e.text for e in events if isinstance(e, StatusMessage)]
    reused = "latents 16 reused, 0 encoded; captions 6 reused, 0 encoded; masks 16 reused, 0 made"
    assert any(reused in t for t in texts)
    assert not any(t.startswith("Caching latents") for t in texts)


def test_missing_concept_folder_is_reported(tmp_path):
    config = config_from_dict(
        {
            "data": {"concepts": [{"path": str(tmp_path / "nope")}], "cache_dir": str(tmp_path)},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    finished, _ = run(config)
    assert finished.error and "nope" in finished.error and finished.lora_path is None


@pytest.mark.parametrize("architecture", ["unet", "wan"])
def test_memory_options_bf16_checkpointing_and_accumulation(demo_root, tmp_path, architecture):
    save_demo_model(build_demo_model(seed=4, architecture=architecture), tmp_path / "model")
    config = make_config(
        demo_root,
        tmp_path,
        model={"dtype": "bfloat16", "path": str(tmp_path / "model")},
        training={
            "steps": 3,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "gradient_accumulation": 2,
            "scheduler": "cosine",
            "warmup_steps": 1,
        },
    )
    trainer = GenericTrainer(config)
    finished = trainer.run()
    assert finished.error is None
    denoiser = trainer.built.model.denoiser
    to_q = next(m for n, m in denoiser.named_modules() if n.endswith("attn1.to_q"))
    assert to_q.base_layer.weight.dtype == torch.bfloat16
    if architecture == "wan":  # its norms are kept in float32, as diffusers does
        assert denoiser.blocks[0].norm2.weight.dtype == torch.float32
    lora = [p for n, p in trainer.built.model.denoiser.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert trainer.built.model.denoiser.is_gradient_checkpointing
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(x["loss_total"] == x["loss_total"] for x in lines)  # no NaN
    assert lines[0]["lr"] == 0 and lines[1]["lr"] == 1e-3 > lines[2]["lr"]  # warm-up, cosine


def test_a_second_run_in_the_same_folder_keeps_the_first_lora(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, training={"steps": 1})
    first, _ = run(config)
    saved = first.lora_path.read_bytes()
    second, events = run(config)
    assert second.error is None
    kept = list((tmp_path / "run/previous").glob("*/lora.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == saved
    assert (kept[0].parent / "metrics.jsonl").is_file()
    assert any("moved its files to" in e.text for e in events if isinstance(e, StatusMessage))


def test_a_unet_demo_model_trains_with_its_teacher_and_refuses_the_comfyui_layout(
    demo_root, tmp_path
):
    save_demo_model(build_demo_model(seed=4, architecture="unet"), tmp_path / "unet-model")
    model = {"path": str(tmp_path / "unet-model")}
    config = make_config(demo_root, tmp_path, model=model, lora={"targets": "attention_conv"})
    finished, events = run(config)
    assert finished.error is None and finished.lora_path is not None
    lines = metrics(events)
    assert all(m.teacher_fraction == 1.0 for m in lines) and lines[-1].loss_prior > 0
    base = DemoFamily().load(str(tmp_path / "unet-model"), dtype=torch.float32, device="cpu")
    load_lora(base.denoiser, finished.lora_path)
    names = {n for n, _ in base.denoiser.named_parameters() if "lora_A" in n}
    assert any(".resnets.0.conv1." in n for n in names) and any(".attn2.to_k." in n for n in names)

    comfy = make_config(
        demo_root,
        tmp_path / "c",
        model=model,
        output={"run_dir": str(tmp_path / "c/run"), "format": "comfyui"},
    )
    finished, events = run(comfy)
    assert finished.error is not None and "output.format=diffusers" in finished.error
    assert finished.step == 0 and finished.lora_path is None
    assert not metrics(events)


def test_the_conv_preset_is_refused_for_a_transformer_before_training(demo_root, tmp_path):
    save_demo_model(build_demo_model(seed=4, architecture="wan"), tmp_path / "wan-model")
    config = make_config(
        demo_root,
        tmp_path,
        model={"path": str(tmp_path / "wan-model")},
        lora={"targets": "attention_conv"},
    )
    finished, events = run(config)
    assert finished.error is not None and finished.step == 0 and not metrics(events)
    assert "lora.targets=attention_conv" in finished.error
    assert "WanTransformer3DModel" in finished.error and "attention_ffn" in finished.error


def test_timestep_sampling_sees_the_latent_shape(demo_root, tmp_path, monkeypatch):
    """A family whose schedule shifts with the image's token count needs the latent shape."""
    shapes, original = [], DemoFamily.sample_timesteps

    def spy(self, shape, **kwargs):
        shapes.append(tuple(shape))
        return original(self, shape, **kwargs)

    monkeypatch.setattr(DemoFamily, "sample_timesteps", spy)
    finished, _ = run(make_config(demo_root, tmp_path, training={"steps": 2}))
    assert finished.error is None
    assert shapes == [(2, 48, 8, 8)] * 2  # (B, C, h, w) of 32 px images, batch 2
