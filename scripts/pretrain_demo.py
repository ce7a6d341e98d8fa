"""Pretrain the demo family's denoiser and text encoder on the synthetic world.

    python -m scripts.pretrain_demo --out runs/demo-unet --architecture unet \
        --steps 24000 --stop-step 21000          # the built-in weights
    python -m scripts.pretrain_demo --out runs/demo-pretrain --steps 7000 --minutes 88

``--architecture`` picks the denoiser: ``unet`` (``modules.models.demo.UNET_CONFIG``, the
built-in model's) or ``wan`` (the earlier built-in model's transformer). ``--stop-step`` ends
a run early on its whole ``--steps`` learning-rate schedule and exports it as finished.

Flow matching on ``train`` scenes of ``modules.demo.world``, drawn on the fly: step ``k`` sees
scenes ``k * batch_size`` onwards, and its noise, timesteps and caption dropout come from a
generator seeded by ``(seed, k)``, so a run is a pure function of its settings and a resumed
run continues exactly where the stopped one would have gone.

Writes to ``--out``:

- ``checkpoint.pt``: replaced atomically every ``--checkpoint-minutes``; a new start with the
  same ``--out`` resumes from it;
- ``loss.jsonl``: one row per ``--log-every`` steps (step, mean loss, lr, elapsed seconds);
- at the end, ``model/`` in the layout ``modules.models.demo`` loads (denoiser in float16,
  text encoder in float32: it is tiny and float32 keeps its loading dtype-proof),
  ``samples.png`` (held-out prompts: the world's rendering above, the model's sample below)
  and ``summary.json`` with the classifier's prompt-match score on held-out prompts.

``--preview`` trains nothing: it exports the checkpoint's weights as they stand, with their samples
and score, into ``--out``/``preview/`` (the same three files), to look at a long run half-way.

``--minutes`` caps the total time over all resumes; the learning-rate schedule then follows
whichever budget, steps or time, is further along, so a timed run still ends annealed.

``--device cuda`` trains on a GPU and ``--workers N`` draws the scenes in N processes (a scene
takes about a millisecond of one CPU core, so a GPU step of 32 waits on the drawing without
them). Data, noise, timesteps and caption dropout are drawn on the CPU exactly as without
them, so only the arithmetic differs between devices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, WanTransformer3DModel
from PIL import Image
from torch import Tensor
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from modules.atomic import replacing, write_text_atomic
from modules.config.schema import ModelConfig
from modules.demo.classifier import (
    SHIPPED_WEIGHTS,
    images_to_tensor,
    load_classifier,
    score_prompt_match,
)
from modules.demo.world import Scene, SceneLabels, scene
from modules.models.base import LoadedModel, TextEncoding
from modules.models.demo.family import (
    ARCHITECTURES,
    MAX_PROMPT_BYTES,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    UNET_CONFIG,
    DemoFamily,
    DemoParts,
    build_demo_model,
    save_demo_model,
)
from modules.models.memory import load_model

TINY_TRANSFORMER = {
    **TRANSFORMER_CONFIG,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "ffn_dim": 64,
    "num_layers": 1,
}
"""For smoke tests only: loads through the demo family, but is not the shipped size."""
TINY_UNET = {
    **UNET_CONFIG,
    "block_out_channels": (16, 16, 16),
    "norm_num_groups": 8,
    "attention_head_dim": (1, 1, 1),
    "time_embedding_dim": 32,
}
"""The UNet's smoke-test size."""
CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.jsonl"
_RESUME_FIELDS = ("architecture", "batch_size", "resolution", "seed", "tiny")
"""Settings a resumed run must share with its checkpoint, or its data order would change."""
CPU = torch.device("cpu")


@dataclass(frozen=True)
class PretrainRun:
    out: Path
    steps: int = 7000
    """Total optimizer steps (also the length of the cosine schedule)."""
    minutes: float = 0.0
    """Total wall-clock budget over all resumes; 0 means steps alone decide."""
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    """The cosine ends at this fraction of the peak rate, not zero: the last steps still learn."""
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    resolution: int = 64
    """The demo presets train LoRAs at 64 pixels (``data.resolution``): pretrain at the same."""
    seed: int = 0
    ema_decay: float = 0.999
    """Exported weights are this EMA of the trained ones (0: export the raw weights)."""
    caption_dropout: float = 0.1
    """Fraction of captions replaced by "": the unconditional branch classifier-free guidance
    would need, learnt at no extra cost."""
    log_every: int = 10
    checkpoint_minutes: float = 5.0
    sample_count: int = 64
    """Held-out prompts sampled and scored at the end; the first 16 go into the grid."""
    sample_steps: int = 30
    classifier: Path | None = None
    """Classifier weights for the score; None: the shipped file when present, else no score."""
    session_steps: int = 0
    """Stop this session after this many steps, checkpointed but not exported, to be resumed
    later (0: no limit). Lets a long run be split into chunks."""
    stop_step: int = 0
    """End the run at this step and export it as finished (0: at ``steps``). The learning rate
    still follows the whole ``steps`` schedule, so the steps before it are those of a full run."""
    preview: bool = False
    """Train nothing: export the checkpoint as it stands into ``out/preview/`` and score it."""
    architecture: str = "wan"
    """The denoiser: "wan" (a WAN transformer) or "unet" (as the built-in model)."""
    tiny: bool = False
    device: str = "cpu"
    """Where the networks train ("cpu", "cuda", "cuda:1"); a checkpoint resumes on any device."""
    workers: int = 0
    """Processes drawing the scenes ahead of the training step (0: drawn in the training loop)."""


@dataclass
class _State:
    model: LoadedModel
    optimizer: torch.optim.Optimizer
    ema: dict[str, Tensor]
    step: int = 0
    elapsed: float = 0.0
    """Seconds trained over all sessions of this run (the ``--minutes`` budget)."""


def pretrain(run: PretrainRun, log: bool = False) -> dict[str, Any] | None:
    """Train (or resume) until a budget is spent, then export and return the summary.

    Returns None when the session stopped at ``session_steps`` before the budget was spent."""
    if run.preview:
        if not (run.out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{run.out / CHECKPOINT}: no checkpoint to preview")
        # The run may still be training: its loss log is left alone.
        return _finish(run, _setup(run, trim_log=False), run.out / "preview")
    run.out.mkdir(parents=True, exist_ok=True)
    state = _setup(run)
    _train(run, state, log)
    if not _done(run, state):
        return None
    return _finish(run, state, run.out)


# ------------------------------------------------------------------------------------- setup


def _setup(run: PretrainRun, trim_log: bool = True) -> _State:
    model = _build_model(run)
    params = _trainable(model)
    optimizer = torch.optim.AdamW(
        params.values(), lr=run.learning_rate, weight_decay=run.weight_decay
    )
    state = _State(model, optimizer, ema={k: p.detach().clone() for k, p in params.items()})
    checkpoint = run.out / CHECKPOINT
    if checkpoint.is_file():
        _load_checkpoint(run, state, checkpoint)
    if trim_log:
        _trim_loss_log(run.out / LOSS_LOG, state.step)
    return state


def _build_model(run: PretrainRun) -> LoadedModel:
    model = _build_cpu_model(run)
    model.denoiser.to(run.device)
    model.parts.text_encoder.to(run.device)
    return model


def _build_cpu_model(run: PretrainRun) -> LoadedModel:
    """Initialised on the CPU whatever the device, so the initial weights never depend on it."""
    if not run.tiny:
        model = build_demo_model(run.seed, run.architecture)
    else:
        torch.manual_seed(run.seed)
        tiny: torch.nn.Module
        if run.architecture == "unet":
            tiny = UNet2DConditionModel(**TINY_UNET)
        else:
            tiny = WanTransformer3DModel(**TINY_TRANSFORMER)
        model = LoadedModel(
            denoiser=tiny,
            identity="demo-tiny",
            parts=DemoParts(
                text_encoder=T5EncoderModel(T5Config(**TEXT_ENCODER_CONFIG)),
                tokenizer=ByT5Tokenizer(),
            ),
        )
    model.denoiser.train()
    # Dropout stays off in the text encoder (eval mode): the model is far too small and
    # briefly trained to overfit, and eval mode keeps the encoding the family will compute.
    model.parts.text_encoder.eval()
    return model


def _trainable(model: LoadedModel) -> dict[str, torch.nn.Parameter]:
    """Every weight of both networks, named with a prefix so the EMA can be keyed by name
    (``transformer.`` for the denoiser, whichever its architecture)."""
    params = {f"transformer.{k}": p for k, p in model.denoiser.named_parameters()}
    encoder = model.parts.text_encoder
    params |= {f"text_encoder.{k}": p for k, p in encoder.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    return params


# ------------------------------------------------------------------------------------- train


def _train(run: PretrainRun, state: _State, log: bool) -> None:
    family = DemoFamily()
    params = _trainable(state.model)
    last_checkpoint = time.monotonic()
    window: list[float] = []
    session_start, session_step = time.monotonic(), state.step
    batches = iter(_scene_batches(run, state.step))
    while not _done(run, state):
        if run.session_steps and state.step - session_step >= run.session_steps:
            break
        tick = time.monotonic()
        lr = _learning_rate(run, _progress(run, state))
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        step, images, captions = next(batches)
        assert step == state.step, (step, state.step)
        loss = _train_step(run, family, state, params, images, captions)
        state.step += 1
        state.elapsed += time.monotonic() - tick
        window.append(loss)
        if state.step % run.log_every == 0:
            rate = (state.step - session_step) / max(time.monotonic() - session_start, 1e-9)
            row = {
                "step": state.step,
                "loss": sum(window) / len(window),
                "lr": lr,
                "elapsed_s": round(state.elapsed, 2),
                "steps_per_s": round(rate, 4),
            }
            window.clear()
            with (run.out / LOSS_LOG).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if log:
                print(json.dumps(row), flush=True)
        if time.monotonic() - last_checkpoint >= run.checkpoint_minutes * 60:
            _save_checkpoint(run, state)
            last_checkpoint = time.monotonic()
    _save_checkpoint(run, state)


class _SceneBatches(torch.utils.data.Dataset):
    """Item ``k``: step ``k``'s ``train`` scenes as (k, images (B, 3, res, res), captions)."""

    def __init__(self, run: PretrainRun) -> None:
        self.batch_size, self.resolution, self.steps = run.batch_size, run.resolution, run.steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[int, Tensor, list[str]]:
        first = step * self.batch_size
        scenes = [scene(i, "train") for i in range(first, first + self.batch_size)]
        images = images_to_tensor([_resized(s.image, self.resolution) for s in scenes])
        return step, images, [s.caption for s in scenes]


def _scene_batches(run: PretrainRun, start: int) -> Iterable[tuple[int, Tensor, list[str]]]:
    """Steps ``start`` … ``steps - 1`` in order, drawn ahead by ``workers`` processes."""
    batches = _SceneBatches(run)
    order = range(start, run.steps)
    if run.workers <= 0:
        return (batches[k] for k in order)
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=order,
        num_workers=run.workers,
        pin_memory=run.device.startswith("cuda"),
        persistent_workers=False,
    )


def _train_step(
    run: PretrainRun,
    family: DemoFamily,
    state: _State,
    params: dict[str, torch.nn.Parameter],
    images: Tensor,
    captions: list[str],
) -> float:
    """One flow-matching step on the step's scenes; returns the loss."""
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + state.step)
    device = torch.device(run.device)
    latents = family.encode_images(state.model, images)  # (B, 48, res/4, res/4)
    dropped = torch.rand(len(captions), generator=generator) < run.caption_dropout
    captions = ["" if drop else c for c, drop in zip(captions, dropped.tolist(), strict=True)]

    noise = torch.randn(latents.shape, generator=generator)
    timesteps = family.sample_timesteps(
        torch.Size([len(captions)]), generator=generator, device=CPU
    )
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    noisy, target, timesteps = noisy.to(device), target.to(device), timesteps.to(device)
    text = encode_captions(state.model, captions)
    prediction = family.predict(state.model, noisy, timesteps, text)
    loss = F.mse_loss(prediction.float(), target)

    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), run.max_grad_norm)
    state.optimizer.step()
    _update_ema(run, state, params)
    return float(loss.detach())


def encode_captions(model: LoadedModel, captions: list[str]) -> TextEncoding:
    """The demo family's prompt encoding with gradients (the family's own is no-grad, since
    LoRA training never trains the text encoder). A test keeps the two equal."""
    tokens = model.parts.tokenizer(
        captions,
        padding="max_length",
        max_length=MAX_PROMPT_BYTES,
        truncation=True,
        return_tensors="pt",
    )
    encoder = model.parts.text_encoder
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return {"embeds": hidden * mask.unsqueeze(-1)}  # (B, MAX_PROMPT_BYTES, d_model)


def _learning_rate(run: PretrainRun, progress: float) -> float:
    """Linear warm-up over ``warmup_steps`` of the step budget, then cosine to the floor."""
    warmup = min(run.warmup_steps / run.steps, 0.5)
    if progress < warmup:
        return run.learning_rate * (progress / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    return run.learning_rate * (run.min_lr_ratio + (1 - run.min_lr_ratio) * cosine)


def _done(run: PretrainRun, state: _State) -> bool:
    return _progress(run, state) >= 1.0 or 0 < run.stop_step <= state.step


def _progress(run: PretrainRun, state: _State) -> float:
    by_steps = state.step / run.steps
    by_time = state.elapsed / (run.minutes * 60) if run.minutes > 0 else 0.0
    return max(by_steps, by_time)


@torch.no_grad()
def _update_ema(run: PretrainRun, state: _State, params: dict[str, torch.nn.Parameter]) -> None:
    if run.ema_decay <= 0:
        return
    # Short memory early on, so the EMA is not dragged back to the random initialisation.
    decay = min(run.ema_decay, (1 + state.step) / (10 + state.step))
    for name, param in params.items():
        state.ema[name].lerp_(param.detach(), 1 - decay)


# ------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(run: PretrainRun, state: _State) -> None:
    """Atomic: a run killed mid-write keeps the old checkpoint."""
    payload = {
        "run": _resume_settings(run),
        "step": state.step,
        "elapsed": state.elapsed,
        "transformer": state.model.denoiser.state_dict(),
        "text_encoder": state.model.parts.text_encoder.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "ema": state.ema,
    }
    with replacing(run.out / CHECKPOINT) as temporary:
        torch.save(payload, temporary)


def _load_checkpoint(run: PretrainRun, state: _State, path: Path) -> None:
    payload = torch.load(path, map_location=run.device, weights_only=True)
    # Checkpoints from before the UNet option were all WAN transformers.
    saved, wanted = {"architecture": "wan", **payload["run"]}, _resume_settings(run)
    for name in _RESUME_FIELDS:
        if saved[name] != wanted[name]:
            raise ValueError(
                f"{path}: the checkpoint was trained with {name}={saved[name]!r}, this run asks "
                f"for {wanted[name]!r}; use the same {name} to resume, or another --out to start "
                "a new run"
            )
    state.model.denoiser.load_state_dict(payload["transformer"])
    state.model.parts.text_encoder.load_state_dict(payload["text_encoder"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.ema = payload["ema"]
    state.step, state.elapsed = payload["step"], payload["elapsed"]


def _resume_settings(run: PretrainRun) -> dict[str, Any]:
    return {name: getattr(run, name) for name in _RESUME_FIELDS}


def _trim_loss_log(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint: the resumed run logs those steps again."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------ finish


def _finish(run: PretrainRun, state: _State, into: Path) -> dict[str, Any]:
    """Export the (EMA) weights, sample held-out prompts, score them, write the summary."""
    into.mkdir(parents=True, exist_ok=True)
    model = _export(run, state, into)
    scenes = [scene(i, "heldout") for i in range(run.sample_count)]
    samples = _sample(run, model, [s.caption for s in scenes])
    _grid(scenes[:16], samples[:16], run.resolution).save(into / "samples.png")
    summary: dict[str, Any] = {
        "run": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()},
        "step": state.step,
        "elapsed_s": round(state.elapsed, 1),
        "prompts": [s.caption for s in scenes[:16]],
        "score": _score(run, samples, [s.labels for s in scenes]),
    }
    (into / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _export(run: PretrainRun, state: _State, into: Path) -> LoadedModel:
    """Write ``into/model/`` (atomically, via a sibling folder) and return the exported model."""
    model = _build_cpu_model(run)
    weights = state.ema if run.ema_decay > 0 else _named_weights(state.model)
    for prefix, module in (
        ("transformer.", model.denoiser),
        ("text_encoder.", model.parts.text_encoder),
    ):
        own = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=False)  # parameters only; buffers are not trained
    model.denoiser.eval()
    # Stored in float16 for size; the family's loader casts back to the dtype it is asked for
    # (keeping its float32 modules), so tensors are cast here directly, not via ``to()``.
    for tensor in [*model.denoiser.parameters(), *model.denoiser.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float16)
    shipped = LoadedModel(model.denoiser, model.identity, model.parts)
    target, partial = into / "model", into / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_demo_model(shipped, partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    config = ModelConfig(family="demo", path=str(target))
    return load_model(DemoFamily(), config, dtype=torch.float32, device=torch.device("cpu"))


def _named_weights(model: LoadedModel) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in _trainable(model).items()}


def _sample(run: PretrainRun, model: LoadedModel, prompts: list[str]) -> Tensor:
    """(N, 3, res, res) in [-1, 1], sampled in chunks of 16 to bound memory."""
    family = DemoFamily()
    generator = torch.Generator().manual_seed(run.seed)
    chunks = []
    for start in range(0, len(prompts), 16):
        text = family.encode_prompts(model, prompts[start : start + 16])
        chunks.append(
            family.sample(
                model,
                text,
                size=(run.resolution, run.resolution),
                steps=run.sample_steps,
                generator=generator,
            )
        )
    return torch.cat(chunks)


def _score(run: PretrainRun, samples: Tensor, labels: list[SceneLabels]) -> dict[str, float] | None:
    path = run.classifier if run.classifier is not None else SHIPPED_WEIGHTS
    if not path.is_file():
        return None  # no judge yet: the summary says so with a null score
    return score_prompt_match(load_classifier(path), samples, labels)


def _grid(scenes: list[Scene], samples: Tensor, resolution: int) -> Image.Image:
    """Pairs of rows: the world's rendering of each prompt above the model's sample."""
    columns = 8
    rows = math.ceil(len(scenes) / columns)
    grid = Image.new("RGB", (columns * resolution, 2 * rows * resolution), (255, 255, 255))
    pixels = ((samples.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, item in enumerate(scenes):
        x, y = (i % columns) * resolution, (i // columns) * 2 * resolution
        grid.paste(_resized(item.image, resolution), (x, y))
        grid.paste(Image.fromarray(pixels[i]), (x, y + resolution))
    return grid


def _resized(image: Image.Image, resolution: int) -> Image.Image:
    if image.width == resolution:
        return image
    return image.resize((resolution, resolution), Image.Resampling.BILINEAR)


# -------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str] | None) -> PretrainRun:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.pretrain_demo",
        description="Pretrain the demo model on the synthetic world (resumes from --out).",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumed if it exists)")
    defaults = {f.name: f.default for f in fields(PretrainRun) if f.name != "out"}
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        elif name == "classifier":
            parser.add_argument(flag, type=Path, default=None)
        elif name == "architecture":
            parser.add_argument(flag, choices=sorted(ARCHITECTURES), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    return PretrainRun(**args)


def main(argv: list[str] | None = None) -> None:
    run = _parse(argv)
    summary = pretrain(run, log=True)
    if summary is None:
        print(f"stopped after {run.session_steps} steps; run again with --out {run.out} to resume")
        return
    into = run.out / "preview" if run.preview else run.out
    print(json.dumps(summary["score"]))
    print(f"wrote {into / 'model'}, {into / 'samples.png'}, {into / 'summary.json'}")


if __name__ == "__main__":
    main()
