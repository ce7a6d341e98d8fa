"""LoRAs trained for the families' tests: through the public CLI with a family's shipped
preset, or in this process, the model as trained (in memory) next to the file the trainer saved,
so a test can check that the file, loaded by the family's own pipeline, predicts what the
trained model predicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from modules.config import config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer


def train_in_process(root: Path, model: dict[str, Any]) -> tuple[torch.nn.Module, Path]:
    """Train two steps of a masked-prior LoRA (rank 4, alpha 8, attention and MLP layers) on
    the demo subject at 32 px; return the trained denoiser (eval mode) and the diffusers-layout
    LoRA file it was saved to."""
    data = write_demo_dataset(root / "data", size=64).root / "subject"
    config = config_from_dict(
        {
            "model": {**model, "dtype": "float32"},
            "data": {
                "concepts": [{"path": str(data)}],
                "resolution": 32,
                "cache_dir": str(root / "cache"),
            },
            "mask": {"enabled": True, "normalize_per_sample": True},
            "prior": {"weight": 1.0},
            "lora": {"rank": 4, "alpha": 8, "targets": "attention_ffn"},
            "training": {"steps": 2, "learning_rate": 0.01, "mixed_precision": "no"},
            "output": {"run_dir": str(root / "run"), "format": "diffusers", "save_every": 0},
        }
    )
    trainer = GenericTrainer(config)
    finished = trainer.run()
    assert finished.error is None, finished.error
    denoiser = trainer.built.model.denoiser
    return denoiser.eval(), root / "run" / "lora.safetensors"


REPO = Path(__file__).resolve().parents[1]
SAMPLES = ('sampling.prompts=["a photo of sks"]', "sampling.every=3", "sampling.steps=2")
"""Overrides for a sample at the last of three steps (with the base model's beside it)."""


def train_preset(preset: str, root: Path, name: str, model_path: Path, *extra: str) -> Path:
    """Train a shipped preset through the public CLI, three steps of a rank 4 / alpha 8 LoRA
    on the demo subject at 32 px in float32, into ``root / name``; ``extra``: more ``--set``
    overrides (the family's options, the output format, samples)."""
    data = write_demo_dataset(root / "data", size=64).root / "subject"
    overrides = [
        f"model.path={model_path}",
        "model.dtype=float32",
        f"data.concepts.0.path={data}",
        f"data.cache_dir={root / 'cache'}",
        "data.resolution=32",
        "training.steps=3",
        "training.learning_rate=0.01",
        "training.mixed_precision=no",
        "lora.rank=4",
        "lora.alpha=8",
        "output.save_every=0",
        *extra,
    ]
    command = [sys.executable, "-m", "modules.cli", "train", preset]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(
        [*command, "--run-dir", str(root / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return root / name
