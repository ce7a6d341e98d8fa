"""The optimizer and the learning-rate schedule of a run's LoRA weights.

``training.optimizer`` names the optimizer. The ones outside torch come from
maintained packages (pinned in requirements.txt) and are imported only when chosen, so a
missing package is a :class:`ConfigError` naming the field and the pip command, not an import
failure at start.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from diffusers.optimization import get_scheduler

from modules.config import ConfigError, TrainConfig
from modules.trainer.preflight import OPTIMIZER_PACKAGES, optimizer_package_problem


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``training.optimizer`` names over ``params``, with ``training.learning_rate``
    and ``training.weight_decay``; the other settings are each package's defaults (the ones its
    authors tuned), except where said."""
    training = config.training
    name, lr, decay = training.optimizer, training.learning_rate, training.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    if name == "adafactor":
        # torch's Adafactor reads lr as the cap of its relative step size (the paper's 0.01):
        # each update is about max(1e-3, RMS(weight)) * min(lr, 1/sqrt(step)).
        return torch.optim.Adafactor(params, lr=lr, weight_decay=decay)
    if name == "adamw8bit":
        # bitsandbytes runs it on the GPU and on the CPU alike, without compiling; tensors
        # under 4096 values keep 32-bit state (its default), as quantising them saves little.
        bitsandbytes = _package(name)
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=decay)
    if name == "prodigy":
        # lr multiplies the step size Prodigy estimates (its convention: 1). safeguard_warmup
        # is what its authors advise with a warm-up, which would otherwise hold its estimate low.
        prodigyopt = _package(name)
        return prodigyopt.Prodigy(
            params, lr=lr, weight_decay=decay, safeguard_warmup=training.warmup_steps > 0
        )
    if name == "came":
        came_pytorch = _package(name)
        return came_pytorch.CAME(params, lr=lr, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def _package(name: str) -> ModuleType:
    """The package of ``training.optimizer=name`` (the preflight has said when it is missing;
    an import that fails all the same is the same ConfigError)."""
    module, _ = OPTIMIZER_PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        problem = optimizer_package_problem(name) or f"training.optimizer={name}: {error}"
        raise ConfigError(problem) from None


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Stepped once per optimizer step, so ``training.steps`` and the schedule mean those
    steps on any number of processes and with any gradient accumulation."""
    training = config.training
    name = training.scheduler
    if name == "constant" and training.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=training.warmup_steps,
        num_training_steps=training.steps,
    )
