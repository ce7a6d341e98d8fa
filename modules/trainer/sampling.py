"""Samples during training: each prompt with the LoRA, beside the base model's (sampled once per
run: the base does not change), at the sample size, saved under ``RUN_DIR/samples/``.

The trainer calls :meth:`Samples.write` between steps; a file that cannot be written is said and
skipped, and training goes on.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from modules.config import TrainConfig
from modules.data.buckets import Size
from modules.lora import lora_disabled
from modules.models import LoadedModel, ModelFamily
from modules.models.base import TextEncoding, eval_mode
from modules.trainer.events import Event, SamplePair, SampleSaved
from modules.trainer.run_folder import os_error_reason

Status = Callable[[str, str], None]
"""The trainer's status line: (text, level)."""
OnImage = Callable[[str, Image.Image, int], None]
"""Called with (tag, picture, step) for every sample saved (the trackers' images)."""


class Samples:
    """The run's samples: the encoded prompts, the sample size, and the base samples once made."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        family: ModelFamily,
        model: LoadedModel,
        text: TextEncoding | None,
        size: Size,
        folder: Path,
        events: queue.Queue[Event],
        status: Status,
        autocast: Callable[[], object],
        on_image: OnImage | None = None,
    ) -> None:
        self.config = config
        self.family, self.model = family, model
        self.text = text
        """The sampling prompts, encoded once before the text encoder was freed."""
        self.size = size
        self.folder = folder
        self.events = events
        self.status = status
        self.autocast = autocast
        self.on_image = on_image
        self.base: list[tuple[Path, Image.Image]] | None = None
        """The prompts sampled with the LoRA off, once per run."""

    def write(self, step: int) -> None:
        """The prompts with the LoRA (and beside the base's); never stops training."""
        try:
            self._write(step)
        except OSError as error:
            where = error.filename or self.folder
            self.status(
                f"warning: could not write the samples at step {step} to {where} "
                f"({os_error_reason(error)}): training goes on",
                "warning",
            )

    @torch.no_grad()
    def _write(self, step: int) -> None:
        sampling, text = self.config.sampling, self.text
        if text is None:
            self.status("Nothing to sample: add prompts under sampling.prompts", "warning")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with eval_mode(self.model.denoiser):
            images = self.generate(text)
            base = self._base_samples(text, step) if sampling.with_base else None
        for i, (prompt, image) in enumerate(zip(sampling.prompts, images, strict=True)):
            path = self.folder / f"step{step:06d}-{i}-lora.png"
            picture = self._save(image, path)
            self.events.put(SampleSaved(path, step, prompt, with_lora=True))
            self._image(f"samples/{i}-lora", picture, step)
            if base is not None:
                base_path, base_picture = base[i]
                pair = self.folder / f"step{step:06d}-{i}-pair.png"
                joined = side_by_side(base_picture, picture)
                joined.save(pair)
                self.events.put(SamplePair(pair, step, prompt, base_path, path))
                self._image(f"samples/{i}-pair", joined, step)
        self.status(f"Sampled {len(sampling.prompts)} prompt(s) at step {step}", "info")

    def _image(self, tag: str, picture: Image.Image, step: int) -> None:
        if self.on_image is not None:
            self.on_image(tag, picture, step)

    def _base_samples(self, text: TextEncoding, step: int) -> list[tuple[Path, Image.Image]]:
        """The prompts with the LoRA off: sampled and saved (``samples/base/NN.png``) at the
        first sampling of the run, reused after, since the same seed gives the same images."""
        if self.base is None:
            folder = self.folder / "base"
            folder.mkdir(parents=True, exist_ok=True)
            with lora_disabled(self.model.denoiser):
                images = self.generate(text)
            prompts, self.base = self.config.sampling.prompts, []
            for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
                path = folder / f"{i:02d}.png"
                picture = self._save(image, path)
                self.events.put(SampleSaved(path, step, prompt, with_lora=False))
                self.base.append((path, picture))
        return self.base

    def generate(self, text: TextEncoding) -> torch.Tensor:
        """Every sampling starts from the same noise (``sampling.seed``), at the sample size;
        a clip when ``sampling.frames`` > 1 (video families)."""
        sampling = self.config.sampling
        generator = torch.Generator().manual_seed(sampling.seed)
        clip = {"frames": sampling.frames} if sampling.frames > 1 else {}
        with self.autocast():
            return self.family.sample(
                self.model,
                text,
                size=self.size,
                steps=sampling.steps,
                generator=generator,
                **clip,
            )

    def _save(self, image: torch.Tensor, path: Path) -> Image.Image:
        """Save a sample as ``path`` (PNG) and return it; a clip (3, F, H, W) also as an
        animated WebP beside it at ``data.fps``, the PNG being its first frame."""
        if image.dim() == 3:
            picture = to_pil(image)
            picture.save(path)
            return picture
        frames = [to_pil(image[:, index]) for index in range(image.shape[1])]
        duration = round(1000 / (self.config.data.fps or 16))
        frames[0].save(
            path.with_suffix(".webp"),
            save_all=True,
            append_images=frames[1:],
            duration=duration,
            loop=0,
            lossless=True,
        )
        frames[0].save(path)
        return frames[0]


def sample_size(config: TrainConfig, buckets: list[tuple[Size, int]]) -> Size:
    """``sampling.width`` x ``sampling.height``, or the training size most items have."""
    sampling = config.sampling
    if sampling.width is not None and sampling.height is not None:
        return (sampling.width, sampling.height)
    if buckets:
        return buckets[0][0]
    return (config.data.resolution, config.data.resolution)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """The two images in one, ``left`` on the left (same height: samples of one run)."""
    pair = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width, 0))
    return pair


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → an 8-bit RGB image."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy())
