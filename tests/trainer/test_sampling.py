"""The trainer's samples: with the LoRA at each sampling, the base model once per run, and the
two side by side."""

import queue

import numpy as np
import pytest
from PIL import Image

from modules.demo.dataset import write_demo_dataset
from modules.lora import lora_disabled
from modules.models.demo.family import DemoFamily
from modules.trainer import GenericTrainer, SamplePair, SampleSaved
from modules.trainer.sampling import to_pil
from tests.trainer.test_generic_trainer import make_config

pytestmark = pytest.mark.slow
PROMPTS = ["a sks heart on a plain background", "a red square on a striped background"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


@pytest.fixture()
def sample_calls(monkeypatch):
    """How many times the family's sampler ran."""
    calls = []
    original = DemoFamily.sample

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DemoFamily, "sample", spy)
    return calls


def train(config):
    events = queue.Queue()
    trainer = GenericTrainer(config, events)
    finished = trainer.run()
    assert finished.error is None
    return trainer, [events.get() for _ in range(events.qsize())]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_base_is_sampled_once_and_shown_beside_each_lora_sample(
    demo_root, tmp_path, sample_calls
):
    config = make_config(
        demo_root,
        tmp_path,
        sampling={"prompts": PROMPTS, "every": 2, "steps": 2},
        training={"steps": 4, "learning_rate": 1e-2},
    )
    trainer, events = train(config)
    samples = tmp_path / "run/samples"
    assert len(sample_calls) == 3  # the LoRA at steps 2 and 4, the base once

    saved = [e for e in events if isinstance(e, SampleSaved)]
    base = [e for e in saved if not e.with_lora]
    assert [(e.path, e.step, e.prompt) for e in base] == [
        (samples / "base/00.png", 2, PROMPTS[0]),
        (samples / "base/01.png", 2, PROMPTS[1]),
    ]
    lora = [(e.path.name, e.step) for e in saved if e.with_lora]
    assert lora == [
        ("step000002-0-lora.png", 2),
        ("step000002-1-lora.png", 2),
        ("step000004-0-lora.png", 4),
        ("step000004-1-lora.png", 4),
    ]

    pairs = [e for e in events if isinstance(e, SamplePair)]
    assert [(e.path.name, e.step, e.prompt) for e in pairs] == [
        ("step000002-0-pair.png", 2, PROMPTS[0]),
        ("step000002-1-pair.png", 2, PROMPTS[1]),
        ("step000004-0-pair.png", 4, PROMPTS[0]),
        ("step000004-1-pair.png", 4, PROMPTS[1]),
    ]
    for pair in pairs:
        image = pixels(pair.path)  # (32, 64, 3): base left, LoRA right
        assert image.shape == (32, 64, 3)
        assert np.array_equal(image[:, :32], pixels(pair.base_path))
        assert np.array_equal(image[:, 32:], pixels(pair.lora_path))
        assert pair.base_path == samples / f"base/0{PROMPTS.index(pair.prompt)}.png"

    # The cached base is what the base model samples now, after training: it never changes.
    trainer.built.model.denoiser.eval()
    with lora_disabled(trainer.built.model.denoiser):
        fresh = trainer.built.samples.generate(trainer.built.samples.text)
    for index, image in enumerate(fresh):
        assert np.array_equal(np.asarray(to_pil(image)), pixels(samples / f"base/0{index}.png"))
    # ... and after four steps at a high learning rate the LoRA's samples are not the base's.
    assert not np.array_equal(pixels(pairs[2].lora_path), pixels(pairs[2].base_path))


def test_without_the_base_only_lora_samples_are_made(demo_root, tmp_path, sample_calls):
    config = make_config(
        demo_root,
        tmp_path,
        sampling={"prompts": PROMPTS[:1], "every": 1, "steps": 2, "with_base": False},
        training={"steps": 2},
    )
    _, events = train(config)
    assert len(sample_calls) == 2
    saved = [e for e in events if isinstance(e, SampleSaved)]
    assert [(e.path.name, e.with_lora) for e in saved] == [
        ("step000001-0-lora.png", True),
        ("step000002-0-lora.png", True),
    ]
    assert not any(isinstance(e, SamplePair) for e in events)
    assert not (tmp_path / "run/samples/base").exists()
