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


# ----------------------------------------------------------------- edit models' references


def edit_samples(tmp_path, monkeypatch, spec, concept=None, **sampling):
    """Samples of the test family that takes references (tests/data/conditioned_family),
    registered as ``demo``, for two prompts."""
    import contextlib

    import torch

    from modules.config import TrainConfig
    from modules.models import registry
    from modules.trainer.sampling import Samples
    from tests.data.conditioned_family import ReferenceFamily

    monkeypatch.setitem(registry.SPECS, "demo", spec)
    settings = TrainConfig.model_validate(
        {
            "data": {"concepts": [concept or {"path": str(tmp_path)}]},
            "sampling": {"prompts": PROMPTS, "steps": 2, **sampling},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    family = ReferenceFamily()
    model = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    said = []
    samples = Samples(
        settings,
        family=family,
        model=model,
        text=family.encode_prompts(model, PROMPTS),
        size=(32, 32),
        folder=tmp_path / "samples",
        events=queue.Queue(),
        status=lambda text, level="info": said.append((level, text)),
        autocast=contextlib.nullcontext,
    )
    return samples, family, said


def reference_files(folder, names, sizes=((40, 24), (24, 40), (32, 32))):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for name, (width, height) in zip(names, sizes, strict=False):
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_edit_samples_take_each_prompts_references_from_sampling_references(tmp_path, monkeypatch):
    import torch

    from modules.data.images import image_size, load_image
    from tests.data.conditioned_family import SPEC_TWO, TOKENS_KEY

    one, two, three = reference_files(tmp_path / "refs", ["one", "two", "three"])
    entries = [f"{one}; {two}", str(three)]
    samples, family, said = edit_samples(tmp_path, monkeypatch, SPEC_TWO, references=entries)
    assert family.captions == [None, None]  # this kind's encoding does not read the prompt
    tokens = samples.conditioning[TOKENS_KEY]
    assert tokens.shape == (2, 32, 64)  # prompt 1: two references of 16 tokens; 2: one, padded
    own = [load_image(path, image_size(path)) for path in (one, two)]  # each at its own size
    expected = family.encode_conditioning(None, "reference", own)[TOKENS_KEY][0]
    assert torch.equal(tokens[0], expected)
    assert torch.count_nonzero(tokens[1, 16:]) == 0 and torch.count_nonzero(tokens[1, :16]) > 0

    images = samples.generate(samples.text)  # the family's sampler gets them (it asserts so)
    other, _, _ = edit_samples(tmp_path, monkeypatch, SPEC_TWO, references=[str(three), str(one)])
    assert not torch.equal(images, other.generate(other.text))  # the references matter
    assert not any(level == "warning" for level, _ in said)


def test_edit_samples_default_to_the_first_training_pairs_references(tmp_path, monkeypatch):
    import torch

    from modules.data.images import image_size, load_image
    from tests.data.conditioned_family import SPEC_WITH_CAPTION, TOKENS_KEY

    targets = tmp_path / "targets"
    targets.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(targets / f"{name}.png")
    folder = tmp_path / "refs"
    first, second, _ = reference_files(folder, ["a", "b", "c"])
    concept = {"path": str(targets), "reference_dirs": [str(folder)]}
    samples, family, _ = edit_samples(tmp_path, monkeypatch, SPEC_WITH_CAPTION, concept)
    assert family.captions == PROMPTS  # the prompt goes with its references to the encoder
    for row, path, prompt in zip(
        samples.conditioning[TOKENS_KEY], (first, second), PROMPTS, strict=True
    ):
        pixels = load_image(path, image_size(path))
        expected = family.encode_conditioning(None, "reference", [pixels], caption=prompt)
        assert torch.equal(row, expected[TOKENS_KEY][0])


def test_sampling_references_errors_name_the_field_and_the_file(tmp_path, monkeypatch):
    from modules.config import ConfigError
    from tests.data.conditioned_family import SPEC

    one, two = reference_files(tmp_path / "refs", ["one", "two"])
    with pytest.raises(ConfigError, match=r"sampling\.references: 1 entries for 2 prompts"):
        edit_samples(tmp_path, monkeypatch, SPEC, references=[str(one)])
    gone = tmp_path / "gone.png"
    with pytest.raises(ConfigError, match=rf"sampling\.references: cannot read '{gone}'"):
        edit_samples(tmp_path, monkeypatch, SPEC, references=[str(one), str(gone)])
    with pytest.raises(ConfigError, match=r"prompt 1 has 2 references .* at most 1"):
        edit_samples(tmp_path, monkeypatch, SPEC, references=[f"{one};{two}", str(one)])
    with pytest.raises(ConfigError, match=r"sampling\.references: empty and no training pair"):
        edit_samples(tmp_path, monkeypatch, SPEC)  # tmp_path's images have no references


def test_sampling_references_for_a_model_without_references_are_said_unused(tmp_path, monkeypatch):
    from modules.models.demo import SPEC as DEMO_SPEC

    (one,) = reference_files(tmp_path / "refs", ["one"])
    samples, _, said = edit_samples(tmp_path, monkeypatch, DEMO_SPEC, references=[str(one)] * 2)
    assert samples.conditioning is None
    assert said == [
        (
            "warning",
            "warning: sampling.references is for edit models and this model takes no "
            "reference images: they are not used",
        )
    ]
