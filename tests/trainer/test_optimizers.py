"""``training.optimizer``: each optimizer beyond AdamW and SGD (adamw8bit, adafactor, prodigy,
came) continues exactly after a stop. On the demo model's LoRA, k steps, the optimizer and
schedule written into a backup and read back by the backup's own functions, then more steps,
give the weights training straight through gives (==); the 8-bit one also through a whole run
stopped and resumed. An unknown name is refused naming the field; a missing package is named
with its pip command; a learning rate meant for AdamW is warned of with Prodigy and Adafactor."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from modules.config import ConfigError, config_from_dict
from modules.config.schema import config_warnings
from modules.lora.lora import add_lora
from modules.models.demo import UNET_LORA_TARGETS
from modules.models.demo.family import TEXT_ENCODER_CONFIG, UNET_CONFIG, build_demo_model
from modules.trainer import GenericTrainer
from modules.trainer.backups import read_backup, write_backup
from modules.trainer.optimizer import make_optimizer, make_scheduler
from tests.trainer.test_resume import config as resume_config
from tests.trainer.test_resume import demo, rows  # noqa: F401 (demo: the dataset fixture)

NEW = ("adamw8bit", "adafactor", "prodigy", "came")
RATES = {"adamw8bit": 1e-3, "adafactor": 1e-2, "prodigy": 1.0, "came": 1e-3}
"""Each one's usual rate: a step big enough that a wrong state would show in the weights."""
RANK = 32
"""The LoRA's rank: its larger layers (32 x 128 values) reach the 4096 values from which
bitsandbytes keeps a layer's state in 8 bits."""


def training(name: str, **changes):
    return config_from_dict(
        {
            "training": {
                "optimizer": name,
                "learning_rate": RATES[name],
                "weight_decay": 0.01,
                "warmup_steps": 1,
                "steps": 4,
                **changes,
            }
        }
    )


def lora_model(config):
    """The demo UNet with a LoRA on its attention layers, made alike each time."""
    denoiser = build_demo_model().denoiser
    torch.manual_seed(0)
    params = add_lora(
        denoiser,
        rank=RANK,
        alpha=RANK,
        dropout=0.0,
        target_modules=list(UNET_LORA_TARGETS["attention"]),
    )
    optimizer = make_optimizer(config, params)
    return denoiser, params, optimizer, make_scheduler(config, optimizer)


def train(denoiser, optimizer, scheduler, steps: range) -> None:
    """Steps of a velocity-like loss on inputs fixed by the step's number."""
    for step in steps:
        draw = torch.Generator().manual_seed(step)
        size = UNET_CONFIG["sample_size"] // 2
        latents = torch.randn(2, UNET_CONFIG["in_channels"], size, size, generator=draw)
        text = torch.randn(2, 6, TEXT_ENCODER_CONFIG["d_model"], generator=draw)
        target = torch.randn(latents.shape, generator=draw)
        time = torch.tensor([100.0 + step, 700.0 - step])
        predicted = denoiser(latents, time, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(predicted, target).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def dtypes(state) -> set[torch.dtype]:
    """The dtypes of the tensors in an optimizer's state dict (bitsandbytes nests its own)."""
    if torch.is_tensor(state):
        return {state.dtype}
    if isinstance(state, dict):
        return set().union(*map(dtypes, state.values()))
    return set()


def lora_weights(params) -> list[torch.Tensor]:
    return [param.detach().clone() for param in params]


@pytest.mark.parametrize("name", NEW)
def test_each_optimizer_continues_from_its_backup_as_training_straight_through(name, tmp_path):
    config = training(name)
    denoiser, params, optimizer, scheduler = lora_model(config)
    start = lora_weights(params)
    train(denoiser, optimizer, scheduler, range(4))
    straight = lora_weights(params)
    assert not all(torch.equal(a, b) for a, b in zip(straight, start, strict=True))

    denoiser, params, optimizer, scheduler = lora_model(config)
    train(denoiser, optimizer, scheduler, range(2))
    state = {
        "step": 2,
        "lora": {str(i): param.detach().clone() for i, param in enumerate(params)},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": {"pass_start": 0, "taken": 0, "in_pass": 0},
        "rng": {"torch": torch.get_rng_state(), "cuda": [], "noise": None, "mask": None},
    }
    folder = write_backup(tmp_path, 2, state, "{}", keep=1)
    read, _ = read_backup(folder)  # the loader of --resume (torch.load, weights only)

    denoiser, params, optimizer, scheduler = lora_model(config)  # a new process
    with torch.no_grad():
        for i, param in enumerate(params):
            param.copy_(read["lora"][str(i)])
    optimizer.load_state_dict(read["optimizer"])
    scheduler.load_state_dict(read["scheduler"])
    train(denoiser, optimizer, scheduler, range(2, 4))
    resumed = lora_weights(params)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight, strict=True))
    if name == "adamw8bit":  # the state that was resumed was 8-bit where a layer is large
        assert torch.uint8 in dtypes(read["optimizer"]["state"])


@pytest.mark.slow
def test_a_run_with_adamw8bit_stopped_and_resumed_is_the_run_trained_straight(demo, tmp_path):  # noqa: F811
    def run_config(steps, run_dir):
        made = resume_config(demo, tmp_path, "A", steps, run_dir=run_dir)
        made.training.optimizer = "adamw8bit"
        made.training.learning_rate = 1e-3
        made.lora.rank = made.lora.alpha = RANK
        made.drift.every = 0
        return made

    straight = tmp_path / "straight"
    finished = GenericTrainer(run_config(4, straight)).run()  # backups of steps 2 and 4
    assert finished.error is None, finished.error
    state = torch.load(straight / "backups" / "step000004" / "state.pt", weights_only=True)
    assert torch.uint8 in dtypes(state["optimizer"]["state"])  # 8-bit moments were resumed

    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "backups" / "step000004")  # as if stopped after step 2
    resumed = GenericTrainer(run_config(4, run), resume="latest").run()
    assert resumed.error is None, resumed.error
    assert rows(run) == rows(straight)
    expected, found = load_file(straight / "lora.safetensors"), load_file(run / "lora.safetensors")
    assert expected.keys() == found.keys()
    assert all(torch.equal(found[key], value) for key, value in expected.items())


def test_an_unknown_optimizer_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"training": {"optimizer": "adam8bit"}})
    assert "training.optimizer" in str(error.value)
    assert "adamw8bit" in str(error.value)  # the values allowed are listed


def test_a_missing_package_is_named_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError) as error:
        make_optimizer(training("prodigy"), params)
    said = str(error.value)
    assert "training.optimizer=prodigy" in said and "pip install prodigyopt==1.1.2" in said


def test_the_preflight_names_a_missing_package_before_the_model_loads(monkeypatch, tmp_path):
    """``check`` and ``train`` say it with the other problems, before anything loads."""
    from modules.trainer.preflight import preflight

    monkeypatch.setitem(sys.modules, "came_pytorch", None)  # as if not installed
    config = config_from_dict(
        {
            "training": {"optimizer": "came"},
            "output": {"run_dir": str(tmp_path / "run")},
            "data": {"concepts": [{"path": str(tmp_path / "missing")}]},
        }
    )
    with pytest.raises(ConfigError) as error:
        preflight(config, create_run_dir=False)
    said = str(error.value).splitlines()
    assert any("pip install came-pytorch==0.1.3" in line for line in said)
    assert any("missing" in line for line in said)  # with the other problems, all at once
    monkeypatch.delitem(sys.modules, "came_pytorch")
    with pytest.raises(ConfigError) as error:
        preflight(config, create_run_dir=False)
    assert "training.optimizer" not in str(error.value)  # installed: only the folder


def test_a_rate_meant_for_adamw_is_warned_of_with_prodigy_and_adafactor():
    def warned(name, rate):
        said = config_warnings(training(name, learning_rate=rate))
        return [text for text in said if text.startswith(f"training.optimizer={name}")]

    assert warned("prodigy", 1e-4) and not warned("prodigy", 1.0)
    assert warned("adafactor", 1e-4) and not warned("adafactor", 1e-2)
    assert not warned("came", 1e-4)
