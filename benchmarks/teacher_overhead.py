"""What the teacher pass costs: seconds per step (and GPU memory where there is a GPU).

Variants, all on the demo family with the same data, seed and batch:

- ``masked``: masked loss, no prior preservation (the teacher never runs);
- ``prior``: prior weight 1 (the teacher runs on every sample);
- ``prior+unmasked0.5``: prior weight 1, unmasked probability 0.5 (the teacher runs only on the
  samples that kept their mask, and not at all when none did).

The variants are timed in interleaved rounds in one process, so a slow moment of the machine
hits all of them alike; the ratios against ``masked`` are the result. Then, in the same
rounds on the ``prior`` trainer, the teacher's parts against its whole step: the switch
(``lora_disabled``: every adapter layer off and on again), diffusers' own
``disable_adapters`` / ``enable_adapters`` pair for comparison, and the no-grad teacher forward.

    python benchmarks/teacher_overhead.py [--rounds 5] [--steps 10] [--batch 4]
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
from modules.lora import lora_disabled
from modules.trainer import GenericTrainer

VARIANTS = {
    "masked": {"prior": {"weight": 0.0}},
    "prior": {"prior": {"weight": 1.0}},
    "prior+unmasked0.5": {"prior": {"weight": 1.0}, "mask": {"unmasked_probability": 0.5}},
}


def make_trainer(name: str, root: Path, batch: int, resolution: int) -> GenericTrainer:
    demo = write_demo_dataset(root / "demo-data")
    overrides = VARIANTS[name]
    config = config_from_dict(
        {
            "data": {
                "concepts": [{"path": str(demo.subject)}],
                "resolution": resolution,
                "cache_dir": str(root / "cache"),
            },
            "mask": {"enabled": True, "normalize_per_sample": True, **overrides.get("mask", {})},
            "prior": overrides["prior"],
            "lora": {"rank": 8, "alpha": 8},
            "training": {"steps": 1_000_000, "batch_size": batch},
            "output": {"run_dir": str(root / "runs" / name)},
        }
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    return trainer


def time_teacher_parts(trainer: GenericTrainer, repeats: int) -> dict[str, float]:
    """Seconds per step of the teacher's switch (ours and diffusers'), and of its forward."""
    family, model = trainer.built.family, trainer.built.model
    denoiser = model.denoiser
    batch = next(trainer.built.batches)
    latents = batch.latents.to(trainer.built.device)
    text = {k: v.to(trainer.built.device) for k, v in batch.text.items()}
    timesteps = family.sample_timesteps(
        latents.shape, generator=torch.Generator().manual_seed(0), device=trainer.built.device
    )
    noisy, _ = family.noisy_input_and_target(latents, torch.randn_like(latents), timesteps)

    def switch() -> None:
        with lora_disabled(denoiser):
            pass

    def diffusers_switch() -> None:
        denoiser.disable_adapters()
        denoiser.enable_adapters()

    def forward() -> None:
        with torch.no_grad(), trainer.built.precision.autocast(), lora_disabled(denoiser):
            family.predict(model, noisy, timesteps, text)

    found = {}
    for label, run in (
        ("switch (lora_disabled, the layers found once)", switch),
        ("switch (diffusers' disable/enable_adapters)", diffusers_switch),
        ("teacher forward (no grad, switch included)", forward),
    ):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        found[label] = (time.perf_counter() - start) / repeats
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: make_trainer(name, Path(tmp), args.batch, args.resolution) for name in VARIANTS
        }
        for trainer in trainers.values():  # warm-up: first steps allocate and initialise
            for _ in range(3):
                trainer.optimizer_step()
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        teacher: dict[str, list[float]] = {name: [] for name in VARIANTS}
        memory: dict[str, int] = {}
        pieces: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(args.steps):
                    teacher[name].append(trainer.optimizer_step().teacher_fraction)
                if cuda:
                    torch.cuda.synchronize()
                    memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated())
                times[name].append((time.perf_counter() - start) / args.steps)
            parts = time_teacher_parts(trainers["prior"], args.steps)
            for part, seconds in parts.items():
                pieces.setdefault(part, []).append(seconds)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"demo family, batch {args.batch}, {args.resolution}px, {args.rounds} rounds x "
        f"{args.steps} steps, {device}"
    )
    base = statistics.median(times["masked"])
    header = f"{'variant':<20} {'s/step (median)':>16} {'vs masked':>10} {'teacher ran':>12}"
    if cuda:
        header += f" {'peak GiB':>9}"
    print(header)
    for name in VARIANTS:
        median = statistics.median(times[name])
        row = (
            f"{name:<20} {median:>16.4f} {median / base:>9.2f}x "
            f"{statistics.mean(teacher[name]):>11.0%}"
        )
        if cuda:
            row += f" {memory[name] / 2**30:>9.2f}"
        print(row)
    step = statistics.median(times["prior"])
    print(f"\nthe teacher's parts, per step of 'prior' ({step * 1000:.1f} ms)")
    for part, seconds in pieces.items():
        median = statistics.median(seconds)
        print(f"{part:<44} {median * 1000:>8.2f} ms {median / step:>8.1%}")


if __name__ == "__main__":
    main()
