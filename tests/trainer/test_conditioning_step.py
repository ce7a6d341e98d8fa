"""The conditioning slot in the step, the sharding and the preflight, with the test family that
reads a reference image per item (tests/data/conditioned_family.py): the teacher gets exactly
the rows of its samples, of the prompt and the conditioning alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from modules.config import ConfigError, TrainConfig
from modules.data.dataset import Batch
from modules.lora import add_lora
from modules.models import registry
from modules.models.base import with_conditioning
from modules.trainer.preflight import preflight
from modules.trainer.processes import Processes
from modules.trainer.step import StepParts, draw, train_step
from tests.data.conditioned_family import SPEC, TOKENS_KEY, ReferenceFamily
from tests.trainer.test_step import make_parts as step_parts

SEED = 7


@pytest.fixture(scope="module")
def family() -> ReferenceFamily:
    return ReferenceFamily()


@pytest.fixture(scope="module")
def model(family):
    """The demo model with a LoRA whose up-projections are not zero: student and teacher
    differ."""
    loaded = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    targets = family.lora_targets(loaded)["attention"]
    add_lora(loaded.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=targets)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in loaded.denoiser.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    loaded.denoiser.eval()
    return loaded


def make_batch(family, model) -> Batch:
    """Four 8 x 8 latents, each with its own reference: sample 0 unmasked (no teacher), 1 and 3
    with a prior region, 2 from a prior_prediction concept."""
    generator = torch.Generator().manual_seed(2)
    masks = torch.ones(4, 1, 8, 8)
    masks[1, :, :, :4] = 0.0
    masks[3, :, :4, :4] = 0.0
    references = [torch.rand(3, 24, 40, generator=generator) * 2 - 1 for _ in range(4)]
    tokens = [family.encode_conditioning(model, "reference", [r])[TOKENS_KEY] for r in references]
    return Batch(
        latents=torch.randn(4, 48, 8, 8, generator=generator),
        masks=masks,
        text=family.encode_prompts(model, ["a red ball", "a cat", "", "a blue cube"]),
        prior_prediction=torch.tensor([False, False, True, False]),
        loss_weight=torch.ones(4),
        has_mask=torch.ones(4, dtype=torch.bool),
        caption_dropped=torch.zeros(4, dtype=torch.bool),
        conditioning={TOKENS_KEY: torch.cat(tokens)},  # (4, 16, 64)
    )


def make_parts(family, model, processes=None) -> StepParts:
    return step_parts(model, family=family, processes=processes)


def test_the_teacher_gets_exactly_the_conditioning_rows_of_its_samples(family, model, monkeypatch):
    batch = make_batch(family, model)
    calls: list[dict[str, torch.Tensor]] = []
    original = ReferenceFamily.predict

    def predict(self, model, noisy, timesteps, text):
        calls.append({key: value.clone() for key, value in text.items()})
        return original(self, model, noisy, timesteps, text)

    monkeypatch.setattr(ReferenceFamily, "predict", predict)
    result = train_step(batch, make_parts(family, model), prior_weight=1.0)
    teacher, student = calls
    rows = torch.tensor([1, 2, 3])  # prior regions (1, 3) and the prior_prediction sample (2)
    assert torch.equal(teacher[TOKENS_KEY], batch.conditioning[TOKENS_KEY][rows])
    assert torch.equal(teacher["embeds"], batch.text["embeds"][rows])
    assert torch.equal(student[TOKENS_KEY], batch.conditioning[TOKENS_KEY])
    assert result.teacher_fraction == 0.75
    assert float(result.loss.prior.detach()) > 0


def test_the_prediction_depends_on_the_reference(family, model):
    batch = make_batch(family, model)
    noisy, t = batch.latents[:2], torch.tensor([0.5, 0.5])
    text = with_conditioning(
        {"embeds": batch.text["embeds"][:2]}, {TOKENS_KEY: batch.conditioning[TOKENS_KEY][:2]}
    )
    swapped = {**text, TOKENS_KEY: text[TOKENS_KEY].flip(0)}
    with torch.no_grad():
        assert not torch.allclose(
            family.predict(model, noisy, t, text), family.predict(model, noisy, t, swapped)
        )


def test_each_process_takes_the_conditioning_rows_of_its_share(family, model):
    batch = make_batch(family, model)
    parts = make_parts(family, model)
    draws = draw(batch, parts, 1.0)
    share = Processes(index=1, count=2).split(batch, draws, 4)
    assert torch.equal(share.batch.conditioning[TOKENS_KEY], batch.conditioning[TOKENS_KEY][2:])
    assert torch.equal(share.batch.text["embeds"], batch.text["embeds"][2:])
    # A batch smaller than the processes repeats its samples, conditioning included.
    one = Processes(index=2, count=3).split(share.batch, share.draws, 2)
    assert torch.equal(one.batch.conditioning[TOKENS_KEY], batch.conditioning[TOKENS_KEY][2:3])


def test_a_conditioning_key_that_is_a_prompt_key_is_refused_by_name(family, model):
    batch = make_batch(family, model)
    clashing = Batch(**{**batch.__dict__, "conditioning": {"embeds": batch.text["embeds"]}})
    with pytest.raises(ValueError, match=r"'embeds' names both a prompt encoding"):
        train_step(clashing, make_parts(family, model), prior_weight=1.0)


def test_the_preflight_names_every_missing_reference(tmp_path: Path, monkeypatch):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("a", "a-ref", "b", "c"):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / f"{name}.png")
    config = TrainConfig.model_validate(
        {
            "model": {"family": "demo"},
            "data": {"concepts": [{"path": str(folder)}], "cache_dir": str(tmp_path / "cache")},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    # The demo family takes no references: a-ref.png is an image like the others.
    assert len(preflight(config, create_run_dir=False).scans[0].items) == 4

    monkeypatch.setitem(registry.SPECS, "demo", SPEC)
    with pytest.raises(ConfigError) as raised:
        preflight(config, create_run_dir=False)
    lines = str(raised.value).splitlines()
    assert len(lines) == 2, lines
    for line, name in zip(lines, ("b", "c"), strict=True):
        assert line.startswith(f"data.concepts.0 ({folder}): '{name}.png' has no reference")
        assert f"add '{folder / f'{name}-ref.png'}' beside it" in line
    assert not (tmp_path / "cache").exists()  # before anything was cached
