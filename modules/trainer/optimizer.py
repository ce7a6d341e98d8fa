"""The optimizer and the learning-rate schedule of a run's LoRA weights."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from modules.config import TrainConfig


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    training = config.training
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.learning_rate, momentum=0.9)
    return torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)


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
