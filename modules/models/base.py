"""The small Protocol every model family implements.

A family knows how to load its base model from local files, encode images and prompts, build the
noisy input and training target for a timestep, and run the denoiser. Everything else (LoRA,
masks, the teacher pass, the loss) is shared and lives outside the family.

The Protocol was checked against the diffusers classes the later families use:

- WAN (``WanTransformer3DModel``, ``modules.models.wan``): 5-D video latents (B, C, F, h, w),
  images as 1-frame videos; flow matching with a shift and, for WAN 2.2 A14B, one expert's
  timestep range (all inside ``sample_timesteps``; both experts in one run:
  :class:`ExpertSplit`); text from UMT5 as ``encoder_hidden_states``. Loss layout ``video``.
- FLUX.1 / FLUX.2 / Qwen-Image: latents (B, C, h, w) packed into tokens *inside* ``predict``
  and unpacked on the way out, so the loss and masks stay in latent space. Qwen-Image-Layered
  returns (B, L, C, h, w) and uses loss layout ``layered``.
- SDXL (``UNet2DConditionModel``): 4-D latents, discrete timesteps, epsilon or v target: the
  family's ``noisy_input_and_target`` hides which; ``text`` carries the pooled embeddings and
  time ids too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from modules.models.registry import family_spec, load_family
from modules.models.spec import LossLayout

if TYPE_CHECKING:
    from modules.config.schema import ModelConfig

ComfyConverter = Callable[[dict[str, Tensor], float], dict[str, Tensor]]
"""``(diffusers-layout LoRA state dict, alpha) → ComfyUI-layout state dict``."""
TextEncoding = dict[str, Tensor]
"""A batch's conditioning: the prompt encodings and any other per-sample conditioning (pooled
embeddings, attention masks, size ids, guidance), every tensor batch-first, so that the
teacher's subset of the batch is ``t[index]`` for every entry (:func:`select_text`)."""


PartsT = TypeVar("PartsT")
"""A family's own parts: a small dataclass it declares (``WanParts``, ``DemoParts``, ...)."""


class ModelLoadError(ValueError):
    """A base model that cannot be loaded. The message names the path and the fix."""


@dataclass(frozen=True)
class ExpertSplit:
    """Denoisers of one model that split its timesteps between them, each trained with a LoRA
    of its own in one run (WAN 2.2 A14B with ``model.wan.expert=both``). The family's
    ``predict`` and ``sample`` send each sample to the expert of its timestep themselves; the
    trainer adds, saves and backs up one LoRA per expert and asks ``draw`` for each optimizer
    step's expert."""

    denoisers: Mapping[str, torch.nn.Module]
    """Name → denoiser, the model's ``denoiser`` first (``high_noise``, ``low_noise``)."""
    draw: Callable[[torch.Generator], str]
    """The next optimizer step's expert, drawn from the run's generator with the probability
    of its share of the timestep distribution; the family's ``sample_timesteps`` then draws
    within its range until the next draw."""


@dataclass
class LoadedModel(Generic[PartsT]):
    """A loaded base model: the denoiser the LoRA attaches to, plus the family's other parts."""

    denoiser: torch.nn.Module
    identity: str
    """Stable description of the weights (path or built-in name), part of the cache key."""
    parts: PartsT = None  # type: ignore[assignment]
    """Everything else the family keeps (encoders, VAE, device, ...), typed by the family:
    ``LoadedModel[WanParts]``. Only the family reads it; None for a family that keeps
    nothing else (a stand-in family in the tests)."""
    wrapper: torch.nn.Module | None = None
    """The denoiser inside the trainer's data-parallel wrapper, set on the copy the student's
    forward uses when training on several processes; None everywhere else."""
    prepare_denoiser: Callable[[torch.nn.Module], None] = field(
        default=lambda denoiser: None, repr=False
    )
    """Applies the memory options (``model.memory``) to a denoiser, in place. Set by
    :func:`modules.models.memory.load_model`, which has applied it to ``denoiser``; a family
    that loads another denoiser later (WAN 2.2's second expert, for samples) calls it on that
    one before its first use, so that the family carries no memory code of its own."""
    experts: ExpertSplit | None = None
    """Several denoisers trained together, one LoRA each (``denoiser`` among them); None: the
    one ``denoiser``. The memory options are applied to each."""

    @property
    def runner(self) -> torch.nn.Module:
        """What ``predict`` calls: the data-parallel wrapper when the trainer set one (so the
        student's gradients are averaged across processes), else the denoiser itself. Anything
        else (``config``, parameters, the adapter switch) is read from ``denoiser``."""
        return self.denoiser if self.wrapper is None else self.wrapper


@runtime_checkable
class ModelFamily(Protocol):
    """One instance per run, built from the model config (``modules.models.get_family``).

    Optional methods, read where used and absent from most families:
    ``predicted_frames(shape) -> Tensor | None``, the weight of each latent frame in the loss
    (WAN TI2V image-to-video: 0 on the clean first frame; the step's ``draw``), and
    ``run_notes(model) -> list[str]``, warnings about the loaded model said at the start of a
    run (Z-Image Turbo: a plain LoRA de-distils it; ``modules.trainer.notes``)."""

    name: str
    loss_layout: LossLayout

    def lora_targets(self, model: LoadedModel) -> Mapping[str, Sequence[str]]:
        """The ``lora.targets`` presets this loaded model has → peft ``target_modules``
        (usually the declaration's ``SPEC.lora_targets``)."""
        ...

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> LoadedModel:
        """The base model at ``path``. Callers go through :func:`modules.models.load_model`,
        which applies the memory options (``model.memory``) after."""
        ...

    def blocks(self, denoiser: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The denoiser's repeated blocks, all of them, in the order its forward runs them
        (what the memory options swap or store block by block). It takes a denoiser, not a
        loaded model, so that it also answers for one the family loads later (WAN 2.2's
        second expert)."""
        ...

    def encode_images(self, model: LoadedModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → latents (B, C, h, w) or (B, C, F, h, w).

        Video families also take clips (B, 3, F, H, W) → (B, C, F', h, w); the data layer
        sends them only when ``data.frames`` > 1.
        """
        ...

    def decode_latents(self, model: LoadedModel, latents: Tensor) -> Tensor:
        """Latents → (B, 3, H, W) images in [-1, 1] (video families: (B, 3, F, H, W) when the
        latents have more than one frame)."""
        ...

    def encode_prompts(self, model: LoadedModel, prompts: list[str]) -> TextEncoding: ...

    def prompt_token_counts(self, model: LoadedModel, prompts: list[str]) -> tuple[list[int], int]:
        """Each prompt's token count as the text encoder would see it uncut, and the number of
        tokens it reads (longer prompts are cut there), so the trainer can say so."""
        ...

    def sample_timesteps(
        self, shape: torch.Size, *, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """Training timesteps (B,) in the family's own convention for latents of ``shape``
        (B, C, [F,] h, w): a family whose pipeline shifts the schedule by the image's token
        count reads that count from here."""
        ...

    def timesteps_from_fractions(self, fractions: Tensor, shape: torch.Size) -> Tensor:
        """The family's timesteps (B,) for noise fractions (B,) in (0, 1) of latents of
        ``shape``: ``drift.timesteps`` mean the same noise level for every family (0.25: a
        quarter noise), each family says which of its timesteps that is."""
        ...

    def noisy_input_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]: ...

    def predict(
        self, model: LoadedModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The denoiser's prediction, same shape as the target. ``text``: the prompt encodings,
        merged with the item's conditioning encodings for a :class:`ConditionedFamily`."""
        ...

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """The function that turns this model's diffusers-layout LoRA state dict (and its
        alpha) into the layout ComfyUI loads for the family (``output.format=comfyui``). A
        ValueError naming ``output.format`` and the fix when the model has none."""
        ...

    def lora_loader(self, model: LoadedModel) -> type:
        """The diffusers LoRA loader of the family's pipeline (e.g. ``WanLoraLoaderMixin``):
        its ``lora_state_dict`` reads every LoRA layout the family's files come in, so
        ``lora.init_from`` takes what the pipeline's ``load_lora_weights`` takes."""
        ...

    def release_encoders(self, model: LoadedModel, *, keep_decoder: bool) -> None:
        """Free what training no longer needs once the cache is filled (text encoder, and the
        image encoder unless ``keep_decoder`` because samples are decoded). A family may keep
        the denoiser off the GPU until here (WAN does), so that it never shares the GPU with
        the text encoder."""
        ...

    def sample(
        self,
        model: LoadedModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
    ) -> Tensor:
        """Generate images (B, 3, H, W) in [-1, 1] at ``size`` (W, H) for the encoded prompts.
        Video families also take ``frames`` (4n + 1) and then return clips (B, 3, F, H, W)."""
        ...


@runtime_checkable
class ConditionedFamily(ModelFamily, Protocol):
    """A family whose denoiser takes per-item conditioning besides the prompt (a clip's first
    frame, an edit's reference images): its ``SPEC.conditioning`` names the kinds, and it
    encodes them. Only such a family implements :meth:`encode_conditioning`; the others are
    unchanged, and nothing calls it for them.

    The contract with ``predict``: its ``text`` argument is the merged mapping of the prompt
    encodings and the item's conditioning encodings (:func:`with_conditioning`), every tensor
    batch-first, so the teacher's subset of the batch is selected from both alike
    (:func:`select_text`). The two never share a key (a collision is an error naming both)."""

    def encode_conditioning(
        self, model: LoadedModel, kind: str, images: Sequence[Tensor], *, frames: int = 1
    ) -> TextEncoding:
        """One item's source images of the conditioning ``kind`` (its ``ConditioningKind.name``),
        each (3, H, W) float32 in [-1, 1] on the CPU (an ``item`` source: the still, or the
        clip's first frame, at the item's training size, with ``frames`` the item's frame count;
        references at their own size, to be resized as the family's pipeline does; for a kind
        ``with_caption`` also the keyword ``caption``, the item's caption) →
        the item's encodings, each tensor batch-first with a batch of one (1, ...). Sequences
        of different lengths are zero-padded when items share a batch."""
        ...


def with_conditioning(text: TextEncoding, conditioning: TextEncoding) -> TextEncoding:
    """The prompt encodings and the conditioning encodings in one mapping, as ``predict``
    takes them; a ValueError naming the key when the two share one."""
    shared = sorted(set(text) & set(conditioning))
    if shared:
        raise ValueError(
            f"'{shared[0]}' names both a prompt encoding (of {sorted(text)}) and a conditioning "
            f"encoding (of {sorted(conditioning)}): the family must name its conditioning "
            "tensors apart from its prompt encodings"
        )
    return {**text, **conditioning}


def get_family(config: ModelConfig) -> ModelFamily:
    """The family a model config names, built with its options (imports its code)."""
    try:
        family_spec(config.family)
    except LookupError as error:
        raise ModelLoadError(str(error)) from None
    return load_family(config)


def select_text(text: TextEncoding, index: Tensor) -> TextEncoding:
    """The encodings of the samples at ``index`` (the teacher runs on a subset of the batch)."""
    return {key: value[index] for key, value in text.items()}


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block; its own mode (train or eval) comes back after,
    even on an exception."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
