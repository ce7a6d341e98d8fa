"""The one typed training config.

Every field is declared once, here, with a description and bounds. The UI builds its widgets,
labels, tooltips and choices from this metadata; presets are sparse JSON overlays on these
defaults; the CLI's ``--set a.b=value`` overrides are type-checked against it.

Cross-field rules that make a config unusable raise (naming the field and the fix); rules that
only make a config questionable are returned by :func:`config_warnings` (design §4.2 and §4.6).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from modules.models.registry import SPECS
from modules.models.spec import NoOptions

SCHEMA_VERSION = 4
"""2: each model family's options moved into its own section (``model.wan.flow_shift``).
4: the families' ``fp8_base`` became ``model.memory.base_weights``."""

VIDEO_FAMILIES = frozenset(name for name, spec in SPECS.items() if spec.video)
"""Families whose latents have a time axis: the only ones that can train clips (data.frames > 1)."""
VIDEO_ONLY = {"families": sorted(VIDEO_FAMILIES)}
REFERENCE_FAMILIES = {"families": ["flux1", "flux2", "qwen_image"]}
"""The families with edit models that read reference images (FLUX.1 Kontext, FLUX.2 with
task=edit, Qwen-Image-Edit): the reference fields are shown for them only."""
"""Field metadata: the field applies to these model families only; the UI hides it for others
(its value is kept and saved)."""
TARGET_PRESETS = tuple(dict.fromkeys(name for spec in SPECS.values() for name in spec.lora_targets))
"""Every family's ``lora.targets`` preset names; each family has some of them."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class MemoryConfig(Section):
    """Where the frozen base weights live and in what form: one section for every family,
    applied to any family's denoiser after it loads (:mod:`modules.models.memory`)."""

    base_weights: Literal["auto", "fp8", "fp8_scaled", "int8", "nf4"] = Field(
        "auto",
        title="Base weights storage",
        description=(
            "How the frozen denoiser weights are stored. auto: in the base weight dtype (2 "
            "bytes per weight in bfloat16, 0.2 % weight error from rounding). fp8: in float8 "
            "(e4m3), each layer upcast to the base weight dtype for its forward only: 1 byte "
            "per weight, 3 % weight error, but small weights (around 0.001) lose most of their "
            "digits (over 50 %). fp8_scaled: float8 with a scale per output channel, for the "
            "linear layers of the denoiser's blocks: 1 byte per weight, 2.6 % error, small "
            "weights keep their precision. int8: 8-bit integers with a scale per output "
            "channel (bitsandbytes), weight-only: 1 byte per weight, 0.8 % error. nf4: 4-bit "
            "NormalFloat in blocks of 64 weights (bitsandbytes, as QLoRA): 0.56 byte per "
            "weight, 9 % error. Errors are relative RMS errors of the weights. The LoRA still "
            "trains "
            "in float32, and the teacher of prior preservation uses the same stored weights. "
            "Meant for GPUs."
        ),
    )
    blocks_to_swap: Annotated[int, Field(ge=0, le=200)] | Literal["auto"] = Field(
        0,  # the model's own block count is checked when it loads
        title="Blocks to swap",
        description=(
            "How many of the denoiser's repeated blocks (the last ones) keep their frozen "
            "weights in CPU memory and come to the GPU only while they run, copied ahead of "
            "use while the previous block computes, in the forward, the backward and the "
            "teacher's forward. 0: off; at most the model's block count (WAN 14B has 40, "
            "FLUX.1 57, FLUX.2 dev 56, Qwen-Image 60). Saves about that fraction of the base "
            "weights' GPU memory; costs 2 block copies per swapped block per step (3 with the "
            "teacher), and with gradient checkpointing off one more forward of each swapped "
            "block: the speed depends on PCIe bandwidth. The LoRA and its optimizer state "
            "stay on the GPU; training computes exactly the same. auto: the smallest count "
            "whose memory estimate fits model.memory.vram_gb."
        ),
    )
    vram_gb: float | None = Field(
        None,
        gt=0,
        le=2000,
        title="GPU memory budget (GB)",
        description=(
            "The GPU memory this run may use, in GB (e.g. 24 for a 24 GB card). check, the start "
            "of a run and the Model tab compare the memory estimate with it and name the options "
            "that would fit; blocks_to_swap=auto swaps the fewest blocks that fit. Off: no "
            "budget (the estimate is still shown)."
        ),
    )

    @model_validator(mode="after")
    def _auto_needs_a_budget(self) -> MemoryConfig:
        if self.blocks_to_swap == "auto" and self.vram_gb is None:
            raise ValueError(
                "model.memory.blocks_to_swap=auto needs model.memory.vram_gb, the budget it "
                "fits (e.g. 24); or give a number of blocks"
            )
        return self


class _ModelFields(Section):
    family: Literal[tuple(SPECS)] = Field(  # type: ignore[valid-type]
        "demo",
        title="Model family",
        description="Which model architecture to train a LoRA for. "
        + " ".join(f"{name}: {spec.title}." for name, spec in SPECS.items()),
    )
    path: str = Field(
        "",
        title="Model path",
        description=(
            "Local folder (diffusers layout) or file of the base model. Empty: the family's "
            "built-in weights (only the demo family has them)."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        title="Base weight dtype",
        description=(
            "Data type of the frozen base weights. bfloat16 halves memory on GPUs; the LoRA "
            "weights always train in float32."
        ),
    )
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig,
        title="Memory",
        description="Where the frozen base weights live and in what form (every family).",
    )


ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelFields,
    __module__=__name__,
    __doc__=(
        "The model: family, path, dtype, memory, and each family's own options "
        "(``model.<family>``)."
    ),
    **{
        name: (
            spec.options,
            Field(
                default_factory=spec.options,
                title=f"{name} options",
                description=f"Options of the {name} family only: {spec.title}.",
                json_schema_extra={"families": [name]},
            ),
        )
        for name, spec in SPECS.items()
        if spec.options is not NoOptions
    },
)
"""The model section. Built from the registry: each family with options has its own section,
validated and shown by the UI like every other (and hidden for the other families)."""


class CaptionConfig(Section):
    extension: str = Field(
        ".txt",
        title="Caption extension",
        description="Caption files sit next to each image with this extension (name.txt).",
        pattern=r"^\.[A-Za-z0-9_-]+$",
    )
    default: str = Field(
        "",
        title="Default caption",
        description="Caption used for an image that has no caption file.",
    )
    prefix: str = Field(
        "",
        title="Caption prefix",
        description="Text put before every caption of this concept, e.g. a trigger word.",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="Caption dropout",
        description="Probability of training a sample with the empty prompt, not its caption.",
    )


class ConceptConfig(Section):
    path: str = Field(
        ...,
        min_length=1,
        title="Folder",
        description=(
            "Folder of images (png, jpg, webp) with name.txt captions and name-masklabel.png "
            "masks whose grey levels are loss weights (255 = learn fully, 0 = background). For "
            "video families also clips: video files (mp4, webm, mov, mkv) and sub-folders of "
            "frames, masked by a name-masklabel video, a name-masklabel/ folder of frames or "
            "one static name-masklabel.png."
        ),
    )
    type: Literal["standard", "prior_prediction"] = Field(
        "standard",
        title="Concept type",
        description=(
            "standard: learn the images. prior_prediction: the target is the base model's own "
            "prediction (regularisation by distillation; masks are ignored)."
        ),
    )
    repeats: int = Field(
        1, ge=1, le=1000, title="Repeats", description="How many times each image counts per epoch."
    )
    loss_weight: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        title="Loss weight",
        description="Multiplies the loss of this concept's samples.",
    )
    caption: CaptionConfig = Field(default_factory=CaptionConfig, title="Captions")
    reference_dirs: list[str] = Field(
        default_factory=list,
        title="Reference folders",
        json_schema_extra=REFERENCE_FAMILIES,
        description=(
            "Edit models: folders holding each target's reference (control) images, a file of "
            "the target's name in each, in order (refs/a.png for a.png). Empty: references "
            "beside the targets, named a-ref.png, a-ref1.png, a-ref2.png."
        ),
    )


class DataConfig(Section):
    concepts: list[ConceptConfig] = Field(
        default_factory=list,
        title="Concepts",
        description="Image folders to train on. At least one is needed to start training.",
    )
    resolution: int = Field(
        64,
        ge=16,
        le=4096,
        multiple_of=16,
        title="Resolution",
        description=(
            "The training size: with buckets, each bucket holds about this many pixels squared "
            "(1024: about a megapixel); without, images are resized (short side) and "
            "centre-cropped to this square."
        ),
    )
    buckets: bool = Field(
        True,
        title="Aspect-ratio buckets",
        description=(
            "Train each image (and clip) at the bucket size nearest its aspect ratio, resized to "
            "cover it and centre-cropped by no more than the rounding; every batch comes from "
            "one bucket. Off: every image is centre-cropped to a square."
        ),
    )
    bucket_max_aspect: float = Field(
        4.0,
        ge=1.0,
        le=8.0,
        title="Widest bucket",
        description=(
            "Long side over short side of the widest and the tallest bucket (4: from 1:4 to "
            "4:1). Images beyond it are cropped to it."
        ),
    )
    bucket_step: int = Field(
        0,
        ge=0,
        le=512,
        title="Bucket side step",
        description=(
            "Bucket sides are multiples of this, in pixels (rounded up to the model's pixel "
            "multiple). 0: the model's pixel multiple (16 for most), which gives WAN's 832x480. "
            "A larger step (64) makes fewer buckets with more images each."
        ),
    )
    bucket_max_side: int = Field(
        0,
        ge=0,
        le=16384,
        title="Longest bucket side",
        description="No bucket side longer than this, in pixels. 0: only the widest bucket limits.",
    )
    cache_dir: str = Field(
        "cache",
        title="Cache folder",
        description=(
            "Where encoded latents, prompt encodings and masks are cached, each keyed by what "
            "it depends on (file content, bucket, caption, model), and reused across runs: "
            "editing a mask or a caption re-encodes no image."
        ),
    )
    frames: int = Field(
        1,
        ge=1,
        le=257,
        title="Frames per clip",
        json_schema_extra=VIDEO_ONLY,
        description=(
            "Frames taken from each clip, 4n+1 (1, 5, 9, ..., 81) to match WAN's 4x temporal "
            "compression; 1 trains images and first frames only. Still images always train as "
            "1-frame videos."
        ),
    )
    fps: float = Field(
        16.0,
        ge=0.0,
        le=240.0,
        title="Frame rate",
        json_schema_extra=VIDEO_ONLY,
        description=(
            "Clips are resampled to this rate before taking the frames (WAN 2.1 and 2.2 A14B: "
            "16, TI2V 5B: 24). 0: every source frame. Frame folders count as recorded at this "
            "rate."
        ),
    )

    frame_windows: Literal["head", "chunk", "slide", "uniform"] = Field(
        "head",
        title="Frame windows",
        json_schema_extra=VIDEO_ONLY,
        description=(
            "Which data.frames-frame windows a clip longer than that trains: head, its first "
            "frames only; chunk, consecutive windows end to end; slide, a window starting every "
            "data.window_stride frames; uniform, data.window_count windows spread evenly over "
            "the clip. Each window is an item of its own, with its mask frames and cache entry."
        ),
    )
    window_stride: int = Field(
        16,
        ge=1,
        le=10_000,
        title="Window stride",
        json_schema_extra=VIDEO_ONLY,
        description=(
            "frame_windows=slide: frames (at data.fps) from one window's start to the next's."
        ),
    )
    window_count: int = Field(
        4,
        ge=1,
        le=1000,
        title="Windows per clip",
        json_schema_extra=VIDEO_ONLY,
        description="frame_windows=uniform: how many windows each clip gives (fewer if short).",
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_given(cls, cache_dir: str) -> str:
        if not cache_dir.strip():
            raise ValueError(
                "data.cache_dir is empty, which would put the cache files in the current "
                "folder: give a folder, e.g. 'cache'"
            )
        return cache_dir

    @field_validator("frames")
    @classmethod
    def _frames_4n_plus_1(cls, frames: int) -> int:
        return _four_n_plus_one(frames, "data.frames")


def _four_n_plus_one(frames: int, name: str) -> int:
    if (frames - 1) % 4:
        lower, upper = frames - (frames - 1) % 4, frames + 4 - (frames - 1) % 4
        raise ValueError(
            f"{name}: {frames} is not 4n+1 (WAN compresses time 4x after the first frame); use "
            f"{lower} or {upper}"
        )
    return frames


class MaskTiersConfig(Section):
    """The grey levels the mask generator and the mask editor's tier brushes write (0-255)."""

    face: int = Field(
        255, ge=0, le=255, title="Face tier", description="Grey level of the face (255: weight 1)."
    )
    body: int = Field(
        128,
        ge=0,
        le=255,
        title="Body tier",
        description="Grey level of the body and clothes (128: weight 0.5).",
    )
    hair: int = Field(
        80, ge=0, le=255, title="Hair tier", description="Grey level of the hair (80: weight 0.31)."
    )


class MaskConfig(Section):
    enabled: bool = Field(
        False,
        title="Masked training",
        description="Weight the loss by each image's -masklabel.png mask.",
    )
    gamma: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        title="Mask gamma",
        description=(
            "Raw mask values are raised to this power before use. Below 1 lifts mid grey "
            "levels (e.g. 0.7 turns 0.5 into 0.62)."
        ),
    )
    min_weight: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        title="Minimum weight",
        description=(
            "Floor of the target weight outside the mask. Keep 0 with prior preservation: a "
            "floor pulls the background toward each image's own clutter."
        ),
    )
    unmasked_probability: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="Unmasked probability",
        description=(
            "Per sample and step, the probability of dropping its mask (all ones) so the model "
            "also learns globally. Recommended 0.05-0.1."
        ),
    )
    normalize_per_sample: bool = Field(
        False,
        title="Normalise per sample",
        description=(
            "Average each sample's weighted loss first, so every sample counts the same "
            "whatever its mask area. Recommended with prior preservation."
        ),
    )
    tiers: MaskTiersConfig = Field(
        default_factory=MaskTiersConfig,
        title="Mask tiers",
        description="Grey levels of generated and painted masks (Making masks in the README).",
    )


class PriorConfig(Section):
    weight: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        title="Prior preservation weight",
        description=(
            "Weight of the loss that pulls the LoRA model toward the base model's prediction "
            "outside the mask. 0 disables it; 0.5-1 recommended. Costs one extra no-grad "
            "forward pass per step."
        ),
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        title="Prior threshold",
        description=(
            "Binary mode: full prior preservation where the raw mask is below this value and "
            "none elsewhere (0.05-0.15). Empty: continuous mode (prior weight = 1 - mask)."
        ),
    )
    schedule: Literal["constant", "warmup", "decay"] = Field(
        "constant",
        title="Prior weight schedule",
        description=(
            "constant: the prior weight at every step. warmup: from 0 at the first step up to "
            "the weight over the first schedule-share of the steps, so the subject is learnt "
            "first. decay: the weight until the last schedule-share of the steps, then down to "
            "0 at the last step."
        ),
    )
    schedule_share: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        title="Schedule share",
        description="The share of the run's steps the warm-up or the decay takes (0-1).",
    )
    noise_min: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        title="Prior from noise level",
        description=(
            "Prior preservation only for samples whose noise level (timestep as a fraction: "
            "0 clean, 1 pure noise) is at least this; the teacher is skipped for the others."
        ),
    )
    noise_max: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        title="Prior up to noise level",
        description=(
            "Prior preservation only for samples whose noise level is at most this. High noise "
            "levels decide the layout, low ones the detail. 0-1: every timestep."
        ),
    )

    @property
    def gated(self) -> bool:
        """Whether the prior acts on only part of the noise levels."""
        return self.noise_min > 0 or self.noise_max < 1


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=1024, title="Rank", description="LoRA rank (inner dimension).")
    alpha: float = Field(
        16.0,
        gt=0.0,
        le=4096.0,
        title="Alpha",
        description="LoRA alpha; the update is scaled by alpha / rank.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, title="Dropout", description="Dropout on the LoRA input."
    )
    targets: Literal[TARGET_PRESETS] = Field(  # type: ignore[valid-type]
        "attention",
        title="Target layers",
        description=(
            "Which layers get LoRA adapters: the family's attention projections, attention and "
            "feed-forward (MLP) layers, or (UNet denoisers only) attention and the ResNet "
            "convolutions. Each family lists the ones it has in the README."
        ),
    )
    init_from: str = Field(
        "",
        title="Start from LoRA",
        description=(
            "A LoRA .safetensors file (this trainer's, diffusers' or ComfyUI's layout) whose "
            "weights the new run starts from, with a fresh optimizer. Empty: a new LoRA."
        ),
    )


class TrainingConfig(Section):
    steps: int = Field(
        500, ge=1, le=10_000_000, title="Steps", description="Optimizer steps to train."
    )
    batch_size: int = Field(1, ge=1, le=256, title="Batch size", description="Samples per step.")
    learning_rate: float = Field(
        1e-4, gt=0.0, le=1.0, title="Learning rate", description="Peak learning rate."
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        title="Seed",
        description="Seeds LoRA init, data order, noise, timesteps and mask dropout.",
    )
    optimizer: Literal["adamw", "sgd", "adamw8bit", "adafactor", "prodigy", "came"] = Field(
        "adamw",
        title="Optimizer",
        description=(
            "Optimizer for the LoRA weights. adamw: the default; adamw8bit: AdamW with its "
            "state in 8 bits (bitsandbytes), a quarter of AdamW's state memory on large layers; "
            "adafactor: factored second moments, no first moment (learning_rate is its largest "
            "relative step, 1e-2 in its paper); prodigy: estimates its own step size "
            "(learning_rate is a multiplier of that estimate, usually 1.0); came: "
            "Adafactor-like memory with a confidence-guided step; sgd: momentum 0.9."
        ),
    )
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="Weight decay",
        description="Weight decay (decoupled, except sgd's L2 term); every optimizer applies it.",
    )
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        title="LR scheduler",
        description="Learning-rate schedule after warm-up.",
    )
    warmup_steps: int = Field(
        0, ge=0, le=1_000_000, title="Warm-up steps", description="Linear warm-up from 0."
    )
    gradient_accumulation: int = Field(
        1,
        ge=1,
        le=1024,
        title="Gradient accumulation",
        description="Micro-batches summed per optimizer step.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        title="Mixed precision",
        description="Autocast precision of the forward passes (fp16 needs a GPU).",
    )
    gradient_checkpointing: bool = Field(
        False,
        title="Gradient checkpointing",
        description="Recompute activations in the backward pass: less memory, ~30% slower.",
    )
    compile: bool = Field(
        False,
        title="Compile",
        description=(
            "Compile the denoiser's blocks one by one with torch.compile (one graph serves "
            "every block): the first steps take longer while they compile; the teacher switch "
            "compiles once and then reuses its graph. Needs a C++ compiler; not with "
            "model.memory.blocks_to_swap."
        ),
    )
    max_grad_norm: float = Field(
        1.0,
        ge=0.0,
        le=1000.0,
        title="Max gradient norm",
        description="Gradient clipping norm; 0 disables clipping.",
    )


class OutputConfig(Section):
    run_dir: str = Field(
        "runs/demo",
        min_length=1,
        title="Run folder",
        description="Where the LoRA, the resolved config, metrics.jsonl and samples are written.",
    )
    name: str = Field(
        "lora",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=120,
        title="LoRA name",
        description="File name of the saved LoRA (letters, digits, . _ -), without extension.",
    )
    save_every: int = Field(
        0,
        ge=0,
        le=10_000_000,
        title="Save every",
        description="Also save the LoRA every N steps (0: only at the end and on stop).",
    )
    format: Literal["diffusers", "comfyui"] = Field(
        "diffusers",
        title="LoRA format",
        description=(
            "Key layout of the saved LoRA. diffusers: transformer.<module>.lora_A / lora_B "
            "(the family pipeline's load_lora_weights). comfyui: the layout ComfyUI's LoRA "
            "loaders read for the family (WAN: diffusion_model.blocks.0.self_attn.q.lora_down "
            "with alpha; the README's family sections say each one)."
        ),
    )
    backup_every: int = Field(
        0,
        ge=0,
        le=10_000_000,
        title="Backup every",
        description=(
            "Every N steps (and on Stop or Ctrl-C) write a backup to RUN_DIR/backups/: the "
            "LoRA, optimizer, scheduler and random states, so that --resume continues exactly "
            "(0: no backups)."
        ),
    )
    backup_keep: int = Field(
        2, ge=1, le=1000, title="Backups kept", description="How many of the last backups stay."
    )
    log_with: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        title="Log to",
        description=(
            "Also log the metrics.jsonl numbers, the drift readings and the samples to "
            "TensorBoard (event files in RUN_DIR/logs/) or Weights & Biases, through "
            "accelerate's trackers; the package must be installed (tensorboard comes with "
            "the requirements)."
        ),
    )


class SamplingConfig(Section):
    prompts: list[str] = Field(
        default_factory=list,
        title="Prompts",
        description="Prompts to sample during training, with and without the LoRA.",
    )
    every: int = Field(
        0,
        ge=0,
        le=10_000_000,
        title="Sample every",
        description="Sample every N steps (0: only on request).",
    )
    steps: int = Field(
        20, ge=1, le=1000, title="Sampling steps", description="Denoising steps per sample."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, title="Sampling seed", description="Noise seed of the samples."
    )
    images: list[str] = Field(
        default_factory=list,
        title="Start images",
        json_schema_extra={"families": ["wan"]},
        description=(
            "Image-to-video models: the first frame of each prompt's sample, one image per "
            "prompt in order. Empty: the first frames of the first training clips."
        ),
    )
    references: list[str] = Field(
        default_factory=list,
        title="Reference images",
        json_schema_extra=REFERENCE_FAMILIES,
        description=(
            "Edit models: each prompt's reference images, one entry per prompt in order, "
            "several references of one prompt separated by ';'. Empty: the references of the "
            "first training pairs."
        ),
    )
    width: int | None = Field(
        None,
        ge=16,
        le=8192,
        multiple_of=16,
        title="Sample width",
        description=(
            "Width of the samples in pixels, with the height. Empty: the training size the "
            "most images have (their bucket; without buckets the square data.resolution)."
        ),
    )
    height: int | None = Field(
        None,
        ge=16,
        le=8192,
        multiple_of=16,
        title="Sample height",
        description="Height of the samples in pixels, with the width. Empty: as the width says.",
    )
    frames: int = Field(
        1,
        ge=1,
        le=257,
        title="Sample frames",
        json_schema_extra=VIDEO_ONLY,
        description=(
            "Frames of each sample, 4n+1: 1 samples a still (cheap); more samples a short clip, "
            "saved as an animated .webp at data.fps next to a .png of its first frame."
        ),
    )
    with_base: bool = Field(
        True,
        title="Compare with the base model",
        description=(
            "Also sample the prompts with the LoRA off (once per run: the base does not change) "
            "and save each LoRA sample next to its base sample, base left, LoRA right."
        ),
    )

    @field_validator("frames")
    @classmethod
    def _frames_4n_plus_1(cls, frames: int) -> int:
        return _four_n_plus_one(frames, "sampling.frames")


class DriftConfig(Section):
    every: int = Field(
        0,
        ge=0,
        le=10_000_000,
        title="Measure drift every",
        description=(
            "Every N steps (and before the first and after the last), measure on a fixed "
            "held-out set how far the LoRA moved the model off the subject (0: off)."
        ),
    )
    subject_path: str = Field(
        "",
        title="Held-out subject folder",
        description=(
            "Subject images not trained on, with -masklabel masks and captions: the subject "
            "loss inside the mask, the background drift outside it."
        ),
    )
    world_path: str = Field(
        "",
        title="Held-out world folder",
        description=(
            "Images with captions that never name the subject: drift over the whole image."
        ),
    )
    timesteps: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        max_length=32,
        title="Drift timesteps",
        description=(
            "Noise levels each held-out image is measured at, each between 0 and 1 (exclusive): "
            "near 1 mostly noise, near 0 mostly image."
        ),
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, title="Drift seed", description="Noise seed of the measurement."
    )
    max_images: int = Field(
        8, ge=1, le=256, title="Images per folder", description="Held-out images used per folder."
    )

    @field_validator("timesteps")
    @classmethod
    def _timesteps_inside_0_1(cls, timesteps: list[float]) -> list[float]:
        outside = [t for t in timesteps if not 0 < t < 1]
        if outside:
            raise ValueError(
                f"drift.timesteps: {', '.join(map(str, outside))} not between 0 and 1 "
                "(exclusive); use values such as 0.25, 0.5, 0.75"
            )
        return timesteps


class TrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, title="Model")
    data: DataConfig = Field(default_factory=DataConfig, title="Data")
    mask: MaskConfig = Field(default_factory=MaskConfig, title="Masked training")
    prior: PriorConfig = Field(default_factory=PriorConfig, title="Prior preservation")
    lora: LoraConfig = Field(default_factory=LoraConfig, title="LoRA")
    training: TrainingConfig = Field(default_factory=TrainingConfig, title="Training")
    output: OutputConfig = Field(default_factory=OutputConfig, title="Output")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, title="Sampling")
    drift: DriftConfig = Field(default_factory=DriftConfig, title="Drift meter")

    @model_validator(mode="after")
    def _check_cross_field(self) -> TrainConfig:
        prior = self.prior
        if prior.noise_min >= prior.noise_max:
            raise ValueError(
                f"prior.noise_min: the noise range {prior.noise_min}-{prior.noise_max} is empty; "
                "make prior.noise_min smaller than prior.noise_max (0 and 1: every timestep)"
            )
        if self.prior.weight > 0 and not self.mask.enabled:
            raise ValueError(
                "prior.weight: masked prior preservation needs masks; set mask.enabled=true "
                "or prior.weight=0 (for whole-image regularisation use a prior_prediction "
                "concept)"
            )
        if self.drift.every > 0 and not (self.drift.subject_path or self.drift.world_path):
            raise ValueError(
                "drift.every: the drift meter needs a held-out folder; set drift.subject_path "
                "and/or drift.world_path, or drift.every=0"
            )
        if self.data.frames > 1 and self.model.family not in VIDEO_FAMILIES:
            raise ValueError(
                f"data.frames: model.family={self.model.family} trains images only; set "
                f"data.frames=1 or choose a video family ({', '.join(sorted(VIDEO_FAMILIES))})"
            )
        if (self.sampling.width is None) != (self.sampling.height is None):
            raise ValueError(
                "sampling.width, sampling.height: set both (the sample size), or neither for "
                "the size most training images have"
            )
        if self.sampling.frames > 1 and self.model.family not in VIDEO_FAMILIES:
            raise ValueError(
                f"sampling.frames: model.family={self.model.family} samples images only; set "
                "sampling.frames=1"
            )
        if self.training.compile and self.model.memory.blocks_to_swap:
            raise ValueError(
                "training.compile with model.memory.blocks_to_swap: the compiled blocks would "
                "trace the block swap's transfers; set model.memory.blocks_to_swap=0 or "
                "training.compile=false"
            )
        presets = SPECS[self.model.family].lora_targets
        if self.lora.targets not in presets:
            raise ValueError(
                f"lora.targets: model.family={self.model.family} has no '{self.lora.targets}' "
                f"preset; choose one of {', '.join(presets)}"
            )
        return self


def config_warnings(config: TrainConfig) -> list[str]:
    """Settings that are allowed but probably not what the user wants (design §4.2, §4.6)."""
    warnings: list[str] = []
    mask, prior = config.mask, config.prior
    if prior.threshold is not None and prior.weight == 0:
        warnings.append(
            "prior.threshold is set but prior.weight is 0: the threshold has no effect."
        )
    if prior.threshold is not None and mask.min_weight > 0:
        warnings.append(
            f"prior.threshold={prior.threshold} with mask.min_weight={mask.min_weight}: threshold "
            "mode removes the overlap, but the minimum weight still applies to the remaining "
            "target regions."
        )
    if prior.weight > 0 and mask.min_weight > 0:
        warnings.append(
            f"mask.min_weight={mask.min_weight} reduces the prior effect; recommended "
            "mask.min_weight=0 with prior preservation."
        )
    if prior.weight > 0 and not mask.normalize_per_sample:
        warnings.append(
            "mask.normalize_per_sample is off: recommended with prior preservation for "
            "predictable behaviour when mask coverage varies."
        )
    if prior.weight == 0 and (prior.schedule != "constant" or prior.gated):
        warnings.append(
            "prior.schedule or prior.noise_min/noise_max is set but prior.weight is 0: they "
            "have no effect."
        )
    if not mask.enabled and (mask.unmasked_probability > 0 or mask.min_weight > 0):
        warnings.append("mask settings are set but mask.enabled is false: they have no effect.")
    if mask.unmasked_probability >= 1 and prior.weight > 0:
        warnings.append(
            "mask.unmasked_probability=1 drops every mask, so prior preservation never acts."
        )
    training = config.training
    if training.optimizer == "prodigy" and training.learning_rate < 0.1:
        warnings.append(
            f"training.optimizer=prodigy with training.learning_rate={training.learning_rate}: "
            "Prodigy estimates its own step size and learning_rate multiplies it; usually 1.0 "
            "(a rate for AdamW, such as 1e-4, leaves the LoRA nearly untrained)."
        )
    if training.optimizer == "adafactor" and training.learning_rate < 1e-3:
        warnings.append(
            f"training.optimizer=adafactor with training.learning_rate={training.learning_rate}: "
            "Adafactor's learning_rate caps its relative step size (1e-2 in its paper); a rate "
            "for AdamW, such as 1e-4, leaves the LoRA nearly untrained."
        )
    warnings.extend(getattr(config.model, config.model.family, NoOptions()).warnings())
    warnings.extend(_other_family_warnings(config))
    return warnings


def _other_family_warnings(config: TrainConfig) -> list[str]:
    """Another family's options set: allowed (kept and saved), but they do nothing."""
    model = config.model
    warnings = []
    for name, spec in SPECS.items():
        options = getattr(model, name, None)
        if name == model.family or options is None:
            continue
        for field_name in spec.options.model_fields:
            default = spec.options.model_fields[field_name].get_default(call_default_factory=True)
            if getattr(options, field_name) != default:
                warnings.append(
                    f"model.{name}.{field_name} is a {name} option; model.family={model.family} "
                    "ignores it."
                )
    return warnings
