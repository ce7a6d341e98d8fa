"""``lora.init_from`` in a run: the new run's LoRA starts as the file's, its optimizer is new,
it is said, a bad file stops the run before the model loads, and a resume takes the backup's
weights instead."""

import pytest
import torch

from modules.config import ConfigError
from modules.lora import load_lora
from modules.models.demo.family import DemoFamily
from modules.trainer import GenericTrainer, StatusMessage
from modules.trainer.preflight import preflight
from tests.trainer.test_generic_trainer import builtin_base, demo_root, make_config, run  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_lora(demo_root, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("first")
    # With the ResNet convolutions: their LoRA weights are 4-D.
    config = make_config(demo_root, tmp, training={"steps": 3}, lora={"targets": "attention_conv"})
    finished, _ = run(config)
    assert finished.error is None
    return finished.lora_path


def _prediction(model):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    family = DemoFamily()
    text = family.encode_prompts(model, ["a sks heart on a plain background", "a red square"])
    with torch.no_grad():
        return family.predict(model, noisy, torch.tensor([0.2, 0.9]), text)


def test_the_run_starts_from_the_file_with_a_fresh_optimizer(demo_root, first_lora, tmp_path):  # noqa: F811
    config = make_config(
        demo_root,
        tmp_path,
        lora={"rank": 8, "alpha": 2, "targets": "attention_conv", "init_from": str(first_lora)},
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    said = []
    while not trainer.events.empty():
        event = trainer.events.get()
        if isinstance(event, StatusMessage):
            said.append(event.text)
    assert any(text.startswith(f"LoRA starts from {first_lora}") for text in said)
    assert trainer.built.optimizer.state_dict()["state"] == {}  # fresh: no moments yet
    expected = builtin_base()
    load_lora(expected.denoiser, first_lora)
    trainer.built.denoiser.eval()
    got = _prediction(trainer.built.model)
    assert torch.allclose(got, _prediction(expected), atol=1e-5)
    assert not torch.allclose(got, _prediction(builtin_base()), atol=1e-4)


def test_a_file_that_is_no_lora_stops_the_run_before_the_model_loads(demo_root, tmp_path):  # noqa: F811
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    config = make_config(demo_root, tmp_path, lora={"init_from": str(broken)})
    with pytest.raises(ConfigError, match="lora.init_from: .*broken.safetensors"):
        preflight(config, create_run_dir=False)
    finished, _ = run(config)
    assert finished.error_kind == "config" and "lora.init_from" in finished.error


def test_a_lora_of_other_layers_is_refused_naming_the_field(demo_root, first_lora, tmp_path):  # noqa: F811
    # The first LoRA trained the ResNet convolutions too; a run on attention alone cannot hold
    # them: refused before training, nothing written.
    config = make_config(demo_root, tmp_path, lora={"init_from": str(first_lora)})
    finished, _ = run(config)
    assert finished.error_kind == "config" and finished.step == 0
    assert "lora.init_from" in finished.error and "conv" in finished.error
    assert not (tmp_path / "run" / "lora.safetensors").exists()
