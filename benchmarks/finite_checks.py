"""What the per-step finite checks cost: the gradient norm before the optimizer step and the
weight norm after it, against the whole step they are part of.

The trainer runs both at every step so that no LoRA with a NaN or infinite weight is ever
written. Here the demo LoRA (the demo presets' layers and rank) trains in interleaved rounds:
each round times whole optimizer steps (checks included), then the two norms alone over the
same LoRA tensors. The share of the step the checks take is the result.

    python benchmarks/finite_checks.py [--rounds 5] [--steps 10] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.config import config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer


def make_trainer(root: Path, batch: int) -> GenericTrainer:
    demo = write_demo_dataset(root / "demo-data")
    config = config_from_dict(
        {
            "data": {"concepts": [{"path": str(demo.subject)}], "cache_dir": str(root / "cache")},
            "mask": {"enabled": True, "normalize_per_sample": True},
            "prior": {"weight": 1.0},
            "lora": {"targets": "attention_conv"},
            "training": {"steps": 1_000_000, "batch_size": batch},
            "output": {"run_dir": str(root / "run")},
        }
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    return trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp), args.batch)
        for _ in range(3):  # warm-up
            trainer.optimizer_step()
        tensors = [p.detach() for p in trainer.built.params]
        steps, checks = [], []
        for _ in range(args.rounds):
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.optimizer_step()
            sync()
            steps.append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            for _ in range(args.steps):
                # As in optimizer_step: one norm for the gradients, one for the weights, each
                # read back to the CPU to decide.
                for _ in range(2):
                    bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors)))
            sync()
            checks.append((time.perf_counter() - start) / args.steps)
    parameters = sum(t.numel() for t in tensors)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"demo family, batch {args.batch}, LoRA of {parameters:,} parameters in "
        f"{len(tensors)} tensors, {args.rounds} rounds x {args.steps} steps, {device} "
        f"({torch.get_num_threads()} threads)"
    )
    step, check = statistics.median(steps), statistics.median(checks)
    print(f"{'optimizer step (checks included)':<36} {step * 1000:>9.2f} ms")
    print(f"{'the two finite checks':<36} {check * 1000:>9.3f} ms  ({check / step:.2%} of a step)")


if __name__ == "__main__":
    main()
