"""The ``flux2`` family's declaration: FLUX.2 dev and klein (no torch).

The code is in :mod:`modules.models.flux2.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modules.models.flux1 import FLUX_BLOCKS
from modules.models.spec import (
    FILE_FIELD,
    ConditioningKind,
    FamilyOptions,
    FamilySpec,
    FolderKind,
    LatentGrid,
    SingleFileLayout,
    read_json,
)

SINGLE_BLOCK_OUT = "single_transformer_blocks.{}.attn.to_out"
"""The single-stream blocks' fused output projection, named per block (``{}``: the block index,
filled in for the loaded model by the family's ``lora_targets``): peft matches target names as
suffixes, and a bare ``attn.to_out`` would also match the double-stream blocks' ``attn.to_out``
(a ModuleList holding ``to_out.0``), which peft cannot adapt."""

_ATTENTION = (
    # The double-stream blocks' image and text attention.
    *("to_q", "to_k", "to_v", "to_out.0"),
    *("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    # The single-stream blocks' q, k and v exist only fused with the MLP's input projection
    # (to_qkv_mlp_proj: q, k, v and the 2 x MLP-in rows of one Linear), so "attention" takes
    # the fused layer, as FLUX.1's preset takes its single blocks' q, k, v; without it the
    # single blocks, most of the model, would get no adapter at all.
    "to_qkv_mlp_proj",
)
LORA_TARGETS = {
    "attention": _ATTENTION,
    # Also the MLPs: ff / ff_context in the double-stream blocks, and the single-stream blocks'
    # fused attention + MLP output (as FLUX.1's proj_out is only in this preset).
    "attention_ffn": (
        *_ATTENTION,
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        SINGLE_BLOCK_OUT,
    ),
}
"""``lora.targets`` preset → peft target names (``SINGLE_BLOCK_OUT`` once per single block)."""


REFERENCE_LIMITS = {"klein": 4, "dev": 10}
"""The most reference images each model takes (Black Forest Labs' model documentation: klein 4;
dev 10, with 6 recommended): more are refused by name."""


class Flux2Options(FamilyOptions):
    """``model.flux2``."""

    guidance: float = Field(
        1.0,
        ge=0.0,
        le=20.0,
        title="Training guidance (dev)",
        description=(
            "The guidance value FLUX.2 dev's guidance embedding gets during training (and for "
            "the teacher). 1.0 is what diffusers' FLUX.2 DreamBooth LoRA examples "
            "(--guidance_scale=1) and SimpleTuner's FLUX.2 guide train with; samples then use "
            "the usual 3-5. klein has no guidance embedding."
        ),
    )
    sample_guidance: float = Field(
        4.0,
        ge=0.0,
        le=20.0,
        title="Sample guidance",
        description=(
            "The training samples' guidance, the pipelines' default 4.0. dev: the embedded "
            "guidance. klein base: the classifier-free guidance scale, with the empty prompt as "
            "negative (none at 1 or below). Step-distilled klein: ignored (no guidance)."
        ),
    )
    text_tokens: int = Field(
        512,
        ge=16,
        le=512,
        title="Text tokens",
        description=(
            "Prompt length the text encoder is padded to (the pipelines' max_sequence_length, "
            "512). Lower is faster and lighter; longer prompts, with the chat template around "
            "them (dev: its system message too), are cut there."
        ),
    )
    task: Literal["text_to_image", "edit"] = Field(
        "text_to_image",
        title="Task",
        description=(
            "What the LoRA learns. edit: each target image is made from its reference images "
            "(files of the same name in the concept's reference folders, or name-ref.png, "
            "name-ref1.png, ... beside it), given to the transformer as Flux2Pipeline's image= "
            "references; the loss covers the target only. text_to_image: the prompt alone."
        ),
    )
    references: int = Field(
        1,
        ge=1,
        le=max(REFERENCE_LIMITS.values()),
        title="References per image (edit)",
        description=(
            "The most reference images a target may have with task edit. FLUX.2 klein takes up "
            f"to {REFERENCE_LIMITS['klein']}, dev up to {REFERENCE_LIMITS['dev']} (Black Forest "
            "Labs recommend at most 6 for dev). An image with more is refused by name, never "
            "trained on fewer."
        ),
    )

    def warnings(self) -> list[str]:
        if self.task != "edit" and self.references != 1:
            return [
                f"model.flux2.references={self.references} is for model.flux2.task=edit; "
                "with task text_to_image no reference is read."
            ]
        return []

    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single-file transformer (the original BFL .safetensors, e.g. "
            "flux2-dev.safetensors) used instead of the folder's; the folder still gives its "
            "config, the VAE and the text encoder."
        ),
    )


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's spatial factor (8) times its 2x2 patchify: one latent cell is one token."""
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    patch = int((vae.get("patch_size") or [2, 2])[-1])
    return LatentGrid(pixels_per_cell=scale * patch, pixel_multiple=scale * patch)


def variant_of(folder: Path) -> Literal["dev", "klein"] | None:
    """dev or klein, from ``model_index.json`` (or, without one, the transformer's guidance
    embedding, which only dev has); None: neither file is readable, or another model's folder
    (the folder check names it)."""
    index = read_json(folder / "model_index.json")
    name = str((index or {}).get("_class_name", ""))
    if name:
        return {"Flux2Pipeline": "dev", "Flux2KleinPipeline": "klein"}.get(name)
    transformer = read_json(folder / "transformer" / "config.json") or {}
    if transformer.get("_class_name") != "Flux2Transformer2DModel":
        return None
    return "dev" if transformer.get("guidance_embeds") else "klein"


def _conditioning(folder: Path, options: Any) -> tuple[ConditioningKind, ...]:
    """``model.flux2.task=edit``: the references, up to ``model.flux2.references`` per image."""
    if getattr(options, "task", "text_to_image") != "edit":
        return ()
    return (ConditioningKind(name="reference", source="references", most=options.references),)


def _folder_problem(folder: Path, index: Any, options: Any) -> str | None:
    """More references per image than the folder's model takes."""
    variant = variant_of(folder)
    if variant is None or getattr(options, "task", "text_to_image") != "edit":
        return None
    limit = REFERENCE_LIMITS[variant]
    if options.references > limit:
        return (
            f"model.flux2.references={options.references}: FLUX.2 {variant} takes at most "
            f"{limit} reference images per image; set model.flux2.references to {limit} or "
            "fewer (and give no image more references than that)"
        )
    return None


def _summary(folder: Path, options: Any) -> str | None:
    """The detected model and what a run trains on it, for the Model tab."""
    variant = variant_of(folder)
    if variant is None:
        return None
    problem = _folder_problem(folder, {}, options)
    if problem is not None:
        return problem
    if getattr(options, "task", "text_to_image") != "edit":
        return f"Detected: FLUX.2 {variant}; trains text-to-image"
    return (
        f"Detected: FLUX.2 {variant}; trains editing with up to {options.references} "
        f"reference image(s) per target (the model takes {REFERENCE_LIMITS[variant]})"
    )


SPEC = FamilySpec(
    name="flux2",
    title=(
        "FLUX.2 dev and klein text-to-image and editing with reference images (Mistral 3 / "
        "Qwen3 text, 16 px latent tokens)"
    ),
    implementation="modules.models.flux2.family:Flux2Family",
    single_file=SingleFileLayout(
        markers=(r"^double_stream_modulation_img\.",),
        width=("img_in.weight", "x_embedder.weight"),
        blocks=FLUX_BLOCKS,
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=16, pixel_multiple=16),
    options=Flux2Options,
    grid_from_folder=_grid,
    label="FLUX.2",
    folders=(
        FolderKind(
            title="FLUX.2 dev",
            pipeline="Flux2Pipeline",
            parts={
                "transformer": ("Flux2Transformer2DModel",),
                "vae": ("AutoencoderKLFlux2",),
                "text_encoder": ("Mistral3ForConditionalGeneration", "mistral3"),
            },
        ),
        FolderKind(
            title="FLUX.2 klein",
            pipeline="Flux2KleinPipeline",
            parts={
                "transformer": ("Flux2Transformer2DModel",),
                "vae": ("AutoencoderKLFlux2",),
                "text_encoder": ("Qwen3ForCausalLM", "qwen3"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    example="a download of black-forest-labs/FLUX.2-klein-4B or FLUX.2-dev",
    folder_check=_folder_problem,
    conditioning_from_folder=_conditioning,
    folder_summary=_summary,
)
