"""Samples during training: each prompt with the LoRA, beside the base model's (sampled once per
run: the base does not change), at the sample size, saved under ``RUN_DIR/samples/``.

The trainer calls :meth:`Samples.write` between steps; a file that cannot be written is said and
skipped, and training goes on. Image-to-video samples start from ``sampling.images`` (or the first
frames of the first training clips); an edit model's samples edit ``sampling.references`` (or the
references of the first training pairs). Both are encoded when the samples are set up, while the
encoders are still loaded, as the prompts are.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from modules.config import ConfigError, TrainConfig
from modules.data.buckets import Size
from modules.data.concept import DataError, name_list, scan_concept
from modules.data.conditioning import conditioning_sources
from modules.data.dataset import stack_encodings
from modules.data.images import image_size, load_image
from modules.data.video import load_clip
from modules.lora import lora_disabled
from modules.models import LoadedModel, ModelFamily
from modules.models.base import TextEncoding, eval_mode
from modules.models.registry import conditioning_kinds
from modules.models.spec import ConditioningKind
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
        self.frames = config.sampling.frames
        """Frames per sample: ``sampling.frames``, for image-to-video at least ``data.frames``'s
        clip when it is 1 (a 1-frame sample would be the start image itself)."""
        self.conditioning = self._conditioning() if text is not None else None
        """Image-to-video: each prompt's start image, encoded (batch-first); an edit model:
        each prompt's references, encoded (batch-first); else None."""

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

    def _conditioning(self) -> TextEncoding | None:
        """What the family's sampler takes besides the prompts, encoded batch-first: the
        start images of image-to-video, the references of an edit model; None for the others
        (which say so when ``sampling.images`` or ``sampling.references`` is set)."""
        kinds = conditioning_kinds(self.config.model)
        sampling = self.config.sampling
        starts = [kind for kind in kinds if kind.clips_only]
        references = [kind for kind in kinds if kind.source == "references"]
        if sampling.images and not starts:
            self.status(
                "warning: sampling.images is for image-to-video models and this model "
                "is text-to-video: the samples start from noise alone",
                "warning",
            )
        if sampling.references and not references:
            self.status(
                "warning: sampling.references is for edit models and this model takes no "
                "reference images: they are not used",
                "warning",
            )
        if starts:
            return self._start_images(starts[0])
        if references:
            return self._references(references[0])
        return None

    def _references(self, kind: ConditioningKind) -> TextEncoding:
        """An edit model: each prompt's references, ``sampling.references`` (one entry per
        prompt, several separated by ';') or else those of the first training pairs (prompt
        i takes pair i, round the pairs), each at its own size, encoded as the cache encodes
        a pair's (with the prompt for a kind that reads the caption)."""
        prompts = self.config.sampling.prompts
        given = sampling_reference_paths(self.config, kind)
        if given is None:
            pairs = _first_pairs(self.config, kind)
            given = [list(pairs[i % len(pairs)]) for i in range(len(prompts))]
        rows = []
        for number, (prompt, paths) in enumerate(zip(prompts, given, strict=True)):
            images = [_sampling_reference(path, number) for path in paths]
            extra = {"caption": prompt} if kind.with_caption else {}
            encoded = self.family.encode_conditioning(  # type: ignore[attr-defined]
                self.model, kind.name, images, frames=1, **extra
            )
            rows.append({key: value[0] for key, value in encoded.items()})  # drop the batch of 1
        # Prompts with different reference counts or sizes: zero-padded as a training batch is.
        return stack_encodings(rows, f"sampling.references' {kind.name} encodings")

    def _start_images(self, kind: ConditioningKind) -> TextEncoding:
        """Image-to-video: ``sampling.images`` (one per prompt), or else the first frames of
        the first training clips, encoded by the family at the sample size and frame count."""
        config = self.config
        sampling = config.sampling
        if self.frames == 1:
            self.frames = config.data.frames
            self.status(
                f"Image-to-video samples are clips: sampling.frames=1, so they have "
                f"data.frames={self.frames} frames",
                "info",
            )
        prompts = len(sampling.prompts)
        if sampling.images:
            if len(sampling.images) != prompts:
                raise ConfigError(
                    f"sampling.images: {len(sampling.images)} images for {prompts} prompts; "
                    "give one start image per prompt, in order (or none: the first frames of "
                    "the first training clips)"
                )
            pictures = [self._start_image(Path(path).expanduser()) for path in sampling.images]
        else:
            clips = _first_clips(config)
            pictures = [
                load_clip(clips[i % len(clips)], [0], self.size)[:, 0] for i in range(prompts)
            ]
        rows = [
            self.family.encode_conditioning(  # type: ignore[attr-defined]
                self.model, kind.name, [picture], frames=self.frames
            )
            for picture in pictures
        ]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def _start_image(self, path: Path) -> torch.Tensor:
        """A start image at the sample size (3, H, W); a ConfigError naming it if unreadable."""
        try:
            return load_image(path, self.size)
        except (OSError, DataError, ValueError) as error:
            raise ConfigError(
                f"sampling.images: cannot read '{path}' ({error}); give image files (png, jpg, "
                "webp), one per prompt"
            ) from None

    def generate(self, text: TextEncoding) -> torch.Tensor:
        """Every sampling starts from the same noise (``sampling.seed``), at the sample size;
        a clip when ``sampling.frames`` > 1 (video families), from each prompt's start image
        for image-to-video."""
        sampling = self.config.sampling
        generator = torch.Generator().manual_seed(sampling.seed)
        clip: dict[str, object] = {"frames": self.frames} if self.frames > 1 else {}
        if self.conditioning is not None:
            clip["conditioning"] = self.conditioning
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


def _first_clips(config: TrainConfig) -> list[Path]:
    """The clips of the training concepts, in order (the preflight has refused stills and
    concepts without clips for image-to-video)."""
    clips = []
    for concept in config.data.concepts:
        try:
            clips += [item.image for item in scan_concept(concept).items if item.clip]
        except DataError:
            continue  # the preflight named it
    if not clips:
        raise ConfigError(
            "sampling.images: empty and no training clip to take first frames from; give one "
            "start image per prompt"
        )
    return clips


def sampling_reference_paths(
    config: TrainConfig, kind: ConditioningKind
) -> list[list[Path]] | None:
    """``sampling.references`` as each prompt's reference files (None when it is empty: the
    first training pairs' are used); a ConfigError naming the field for a count that is not
    one entry per prompt, an empty entry or more references than ``kind`` takes. Reads no
    file: the preflight checks them before the model loads, the samples read them."""
    sampling = config.sampling
    if not sampling.references:
        return None
    prompts = len(sampling.prompts)
    if len(sampling.references) != prompts:
        raise ConfigError(
            f"sampling.references: {len(sampling.references)} entries for {prompts} prompts; "
            "give one per prompt, in order, several references of one prompt separated by "
            "';' (or none: the references of the first training pairs)"
        )
    found = []
    for number, entry in enumerate(sampling.references):
        paths = [Path(part.strip()).expanduser() for part in entry.split(";") if part.strip()]
        if not paths:
            raise ConfigError(
                f"sampling.references: prompt {number + 1}'s entry is empty: give its reference "
                "image(s), several separated by ';' (or leave sampling.references empty to use "
                "the first training pairs' references)"
            )
        if len(paths) > kind.most:
            raise ConfigError(
                f"sampling.references: prompt {number + 1} has {len(paths)} references "
                f"({name_list(paths)}) and this model takes at most {kind.most}: remove some"
            )
        found.append(paths)
    return found


def _sampling_reference(path: Path, number: int) -> Tensor:
    """A reference of prompt ``number`` (from 0) at its own size, (3, H, W) in [-1, 1];
    a ConfigError naming ``sampling.references`` and the file when it cannot be read."""
    try:
        return _reference_pixels(path)
    except (OSError, DataError, ValueError) as error:
        raise ConfigError(
            f"sampling.references: cannot read '{path}' (prompt {number + 1}: {error}); give "
            "image files (png, jpg, webp)"
        ) from None


def _first_pairs(config: TrainConfig, kind: ConditioningKind) -> list[tuple[Path, ...]]:
    """The references of the training pairs, in order (the preflight has named every target
    without its references)."""
    pairs = []
    for concept in config.data.concepts:
        folders = [Path(folder).expanduser() for folder in concept.reference_dirs]
        try:
            items = scan_concept(concept, references=True).items
        except DataError:
            continue  # the preflight named it
        pairs += [found for item in items if (found := conditioning_sources(item, kind, folders))]
    if not pairs:
        raise ConfigError(
            "sampling.references: empty and no training pair to take references from; give "
            "each prompt's reference images (several separated by ';')"
        )
    return pairs


def _reference_pixels(path: Path) -> Tensor:
    """A reference image at its own size, (3, H, W) in [-1, 1], as the cache reads it."""
    return load_image(path, image_size(path))


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
