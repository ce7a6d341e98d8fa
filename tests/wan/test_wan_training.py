"""The trainer on tiny WAN models and a tiny video dataset: the teacher is the base model (the
same expert for WAN 2.2 A14B), and the memory options train."""

import json
import queue

import pytest
import torch

from modules.config import config_from_dict
from modules.models.wan import WanOptions
from modules.models.wan.family import WanFamily
from modules.trainer import GenericTrainer, StatusMessage

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def make_config(model_path, concept, tmp_path, **sections):
    data = {
        "model": {"family": "wan", "path": str(model_path)},
        "data": {
            "concepts": [{"path": str(concept)}],
            "resolution": 32,
            "frames": 9,
            "cache_dir": str(tmp_path / "cache"),
        },
        "mask": {"enabled": True, "normalize_per_sample": True},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4, "targets": "attention_ffn"},
        "training": {"steps": 3, "learning_rate": 1e-2},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def spy_on_predict(monkeypatch):
    records = []
    original = WanFamily.predict

    def spy(self, model, noisy, timesteps, text):
        out = original(self, model, noisy, timesteps, text)
        records.append(
            (torch.is_grad_enabled(), noisy.clone(), timesteps.clone(), dict(text), out.detach())
        )
        return out

    monkeypatch.setattr(WanFamily, "predict", spy)
    return records, original


def run(config):
    events = queue.Queue()
    finished = GenericTrainer(config, events).run()
    assert finished.error is None, finished.error
    texts = []
    while not events.empty():
        event = events.get()
        if isinstance(event, StatusMessage):
            texts.append(event.text)
    return finished, texts


def test_the_teacher_is_the_base_wan_model_on_the_same_inputs(
    tiny_wan, video_concept, tmp_path, monkeypatch
):
    records, original = spy_on_predict(monkeypatch)
    config = make_config(tiny_wan, video_concept, tmp_path)
    _, texts = run(config)
    assert any("4 items (3 clips, 1 image): 4 with a mask" in t for t in texts)
    (t_grad, t_noisy, t_steps, t_text, teacher), (s_grad, s_noisy, *_, student) = records[-2:]
    assert not t_grad and s_grad
    assert torch.equal(t_noisy, s_noisy) and t_noisy.dim() == 5  # (B, C, F', h, w)
    family = WanFamily(config.model.wan)
    base = family.load(str(tiny_wan), dtype=torch.float32, device=CPU)
    with torch.no_grad():
        expected = original(family, base, t_noisy, t_steps, t_text)
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert not torch.allclose(student, expected, atol=1e-4)  # the LoRA was on for the student
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(x["teacher_fraction"] == 1.0 for x in lines) and lines[-1]["loss_prior"] > 0


def test_an_a14b_expert_trains_on_its_range_with_itself_as_teacher(
    tiny_wan_a14b, video_concept, tmp_path, monkeypatch
):
    records, original = spy_on_predict(monkeypatch)
    config = make_config(
        tiny_wan_a14b,
        video_concept,
        tmp_path,
        model={"wan": {"expert": "low_noise"}},
        sampling={"prompts": ["a photo of sks heart"], "every": 3, "steps": 2},
    )
    run(config)
    # Samples switch experts like the pipeline: the untrained high-noise expert loads for them.
    samples = sorted(p.name for p in (tmp_path / "run/samples").iterdir())
    assert samples == ["base", "step000003-0-lora.png", "step000003-0-pair.png"]
    assert all(bool((timesteps < 0.875).all()) for _, _, timesteps, _, _ in records)
    _, noisy, timesteps, text, teacher = records[-2]
    family = WanFamily(config.model.wan)
    base = family.load(str(tiny_wan_a14b), dtype=torch.float32, device=CPU)
    with torch.no_grad():
        expected = original(family, base, noisy, timesteps, text)
        high = WanFamily(WanOptions(expert="high_noise"))
        other = high.load(str(tiny_wan_a14b), dtype=torch.float32, device=CPU)
        wrong = original(high, other, noisy, timesteps, text)
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert not torch.allclose(teacher, wrong, atol=1e-3)  # not the high-noise expert


def test_memory_options_train(tiny_wan, video_concept, tmp_path, monkeypatch):
    """fp8 base weights, bf16 autocast and gradient checkpointing together (GPU settings)."""
    stored = []
    original = WanFamily.predict

    def spy(self, model, *inputs):
        stored.append(model.denoiser.blocks[0].attn1.to_q.base_layer.weight.dtype)
        return original(self, model, *inputs)

    monkeypatch.setattr(WanFamily, "predict", spy)
    config = make_config(
        tiny_wan,
        video_concept,
        tmp_path,
        model={"dtype": "bfloat16", "memory": {"base_weights": "fp8"}},
        training={"mixed_precision": "bf16", "gradient_checkpointing": True, "steps": 2},
    )
    finished, _ = run(config)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["loss_total"] > 0 for x in lines)
    assert finished.lora_path.is_file()
    assert stored and set(stored) == {torch.float8_e4m3fn}  # the run applied model.memory
