"""What a model family declares as plain data: readable without torch or diffusers.

The config validates a family's options and LoRA targets, and the UI builds its widgets and the
weight-map preview, from a :class:`FamilySpec` alone. The family's code (torch, diffusers) is
imported only when the family is used (:func:`modules.models.registry.load_family`).

A family is one package under ``modules/models/``: its ``__init__`` holds ``SPEC`` (and its
options model) and imports nothing heavy; ``family.py`` holds the class implementing
:class:`modules.models.base.ModelFamily`. Adding one is that package, its tests, its presets and
one line in the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

LossLayout = Literal["video", "layered"]


class FamilyOptions(BaseModel):
    """Base of a family's own options (``model.<family>``): unknown keys are errors and
    assignments are validated, like every config section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    def warnings(self) -> list[str]:
        """Settings of this family that are allowed but do nothing as set (said with the
        config's other warnings when the family is the run's)."""
        return []


FILE_FIELD = {"file": True}
"""Field metadata of a family option that names a file: checked to exist before a run loads
anything (``modules.trainer.preflight``)."""


class NoOptions(FamilyOptions):
    """A family without options of its own."""


@dataclass(frozen=True)
class LatentGrid:
    """How images map onto the family's latent grid, along H and W."""

    pixels_per_cell: int
    """Pixels per latent cell (the VAE's spatial factor): masks are reduced to this grid."""
    pixel_multiple: int
    """What an image side must be a multiple of (the VAE factor times the transformer's patch
    or packing size)."""


ConditioningSource = Literal["item", "references"]


@dataclass(frozen=True)
class ConditioningKind:
    """One kind of per-item conditioning other than the prompt that a family's denoiser takes
    (a clip's first frame, an edit's reference images). The family encodes it
    (``ConditionedFamily.encode_conditioning``), the cache keeps it as its own kind, keyed by its
    source files and the encoder, and batches carry it beside the prompt encodings."""

    name: str
    """What the family calls it ("first_frame", "reference"); passed back to its encoder."""
    source: ConditioningSource
    """Where an item's source images come from: ``item``, the item's own file (a still, or a
    clip's first frame), at the item's training size and crop; ``references``, its reference
    images at their own size: files of the same name in the concept's reference folders, in
    order, or else ``name-ref.png``, ``name-ref1.png``, ... beside ``name.png``."""
    most: int = 1
    """The most source images an item may have (references the model takes)."""
    with_caption: bool = False
    """The encoding depends on the item's caption too (an edit model's vision-language encoder
    reads the prompt with the references): the encoder is given the caption and the cache key
    includes it. Caption dropout is refused for such a kind (its empty prompt would need a
    second encoding)."""
    with_geometry: bool = False
    """An ``item`` source whose encoding depends on where the item's training crop came from
    (SDXL's size and crop conditioning): the encoder is also given ``geometry``, an
    :class:`ItemGeometry`."""
    clips_only: bool = False
    """An ``item`` source that must be a clip (image-to-video: the first frame conditions the
    rest of the clip); a still image is refused by name."""


@dataclass(frozen=True)
class ItemGeometry:
    """How an item's training pixels were made from its file: the file's size, the centred
    crop taken from it (as the buckets chose it) and the training size it was resized to."""

    original: tuple[int, int]
    """(width, height) of the image or clip as stored (upright)."""
    crop: tuple[float, float, float, float]
    """(left, top, right, bottom) of the crop in the original's pixels."""
    size: tuple[int, int]
    """(width, height) it trains at."""


@dataclass(frozen=True)
class SingleFileLayout:
    """What the family's single-file transformers look like, whatever their key layout
    (original, ComfyUI's or diffusers'; prefixes such as ``model.diffusion_model.`` removed), so
    that a file of another family or of another size is refused before anything loads
    (:mod:`modules.models.single_file_check`)."""

    markers: tuple[str, ...]
    """Regular expressions: a file is the family's when one of them matches one of its keys..."""
    excludes: tuple[str, ...] = ()
    """... and none of these does (a family whose layout shares the markers)."""
    width: tuple[str, ...] = ()
    """Keys whose first dimension is the transformer's width (the config's
    ``num_attention_heads`` x ``attention_head_dim``), in the layouts the family reads."""
    blocks: Mapping[str, str] = field(default_factory=dict)
    """The transformer config's block-count field → a regular expression of that kind of
    block's keys, capturing the block's index."""


@dataclass(frozen=True)
class FolderKind:
    """A model folder a family trains, as its JSON files say: ``model_index.json``'s pipeline
    class and each part's config type. Read before anything is built, so another family's or
    another variant's folder is refused by name (:mod:`modules.models.folder_check`)."""

    title: str
    """The model as messages name it ("FLUX.2 klein")."""
    pipeline: str
    """``_class_name`` in ``model_index.json``."""
    parts: Mapping[str, tuple[str, ...]]
    """Subfolder → the types its ``config.json`` may name: a diffusers ``_class_name``, a
    transformers class in ``architectures`` or its ``model_type``. A part listed here but not
    in the folder is not checked (``transformer_2`` exists only in some folders)."""


@dataclass(frozen=True)
class FamilySpec:
    name: str
    title: str
    """One line for the family menu's tooltip and the README."""
    implementation: str
    """``module:Class`` of the family's code, imported only when the family is used."""
    lora_targets: Mapping[str, tuple[str, ...]]
    """``lora.targets`` preset name → peft ``target_modules``."""
    grid: LatentGrid
    """The grid of the family's usual model; :meth:`latent_grid` reads a model folder's."""
    options: type[FamilyOptions] = NoOptions
    video: bool = False
    """Whether the latents have a time axis (the family can train clips)."""
    loss_layout: LossLayout = "video"
    needs_path: bool = True
    """False for a family with built-in weights (``model.path`` may be empty)."""
    grid_from_folder: Callable[[Path], LatentGrid | None] | None = field(default=None, repr=False)
    """Reads the grid from a model folder's JSON files (no torch); None: always ``grid``."""
    label: str = ""
    """The models' name in messages ("FLUX.2"); empty: the family's name."""
    folders: tuple[FolderKind, ...] = ()
    """The diffusers folders the family trains; empty: a family with a layout of its own."""
    parts: tuple[str, ...] = ()
    """The subfolders ``model.path`` must hold."""
    example: str = ""
    """A folder to point ``model.path`` at, in words ("a download of ...")."""
    not_trained: Mapping[str, str] = field(default_factory=dict)
    """Pipeline classes of the family's models that it does not train → why, in words."""
    folder_check: Callable[[Path, Mapping[str, Any], Any], str | None] | None = field(
        default=None, repr=False
    )
    """What else the family refuses in a folder, from its JSON files and listing and the
    family's options (``model.<family>``): (folder, model_index.json or {}, options) → the
    message, or None. Runs after the checks of :mod:`modules.models.folder_check`."""
    denoiser_targets: Callable[[str], tuple[str, Mapping[str, tuple[str, ...]]]] | None = field(
        default=None, repr=False
    )
    """For a family whose denoiser depends on the folder: ``model.path`` → (the denoiser's
    class name, its ``lora.targets`` presets), from the folder alone; None: ``lora_targets``."""
    comfyui_check: Callable[[str], str | None] | None = field(default=None, repr=False)
    """Why the LoRA of the model at ``model.path`` cannot be saved in the ComfyUI layout
    (``output.format=comfyui``), from its folder alone; None: it can."""
    single_file: SingleFileLayout | None = None
    """How the family's single-file transformers (``transformer_file``) look; None: the family
    reads none."""
    conditioning: tuple[ConditioningKind, ...] = ()
    """The per-item conditioning the family's denoiser takes besides the prompt; empty for most.
    A family that declares some implements ``modules.models.base.ConditionedFamily``."""
    conditioning_from_folder: Callable[[Path, Any], tuple[ConditioningKind, ...]] | None = field(
        default=None, repr=False
    )
    """For a family whose conditioning depends on the folder (WAN: image-to-video or not):
    (model folder, the family's options) → its kinds, from the JSON files alone; None:
    ``conditioning``."""

    folder_summary: Callable[[Path, Any], str | None] | None = field(default=None, repr=False)
    """What the model folder is, in one line for the Model tab ("WAN 2.1 image-to-video ..."),
    from its JSON files and the family's options; None: the family says nothing."""
    file_check: Callable[[Path, Any], str | None] | None = field(default=None, repr=False)
    """For a family that also loads a single-file checkpoint as ``model.path`` (SDXL): (the
    file, the family's options) → why it cannot, or None, from the file's header and JSON
    files alone; None: ``model.path`` must be a folder."""

    def summary_of(self, path: str, options: Any = None) -> str | None:
        """:attr:`folder_summary` of the folder at ``path``; None without one or a folder."""
        if not path or self.folder_summary is None:
            return None
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return None
        try:
            return self.folder_summary(folder, options)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            return None  # another family's configs: the folder check names the problem

    def conditioning_of(self, path: str, options: Any = None) -> tuple[ConditioningKind, ...]:
        """The conditioning kinds of the model at ``path`` with the family's ``options``
        (``model.<family>``); ``conditioning`` when the family does not read the folder or
        there is no folder (its check names the problem)."""
        if path and self.conditioning_from_folder is not None:
            folder = Path(path).expanduser()
            if folder.is_dir():
                try:
                    return self.conditioning_from_folder(folder, options)
                except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                    return self.conditioning  # another family's configs: the check says so
        return self.conditioning

    def latent_grid(self, path: str = "") -> LatentGrid:
        """The grid of the model at ``path`` (a folder), or the usual one."""
        if path and self.grid_from_folder is not None:
            folder = Path(path).expanduser()
            if folder.is_dir():
                try:
                    found = self.grid_from_folder(folder)
                except (TypeError, ValueError, KeyError, IndexError):
                    # Another family's configs (FLUX.1's int patch_size read as WAN's list):
                    # the folder check names that folder; a preview keeps the usual grid.
                    found = None
                if found is not None:
                    return found
        return self.grid


def read_json(path: Path) -> dict[str, Any] | None:
    """A model folder's JSON file, or None when it is missing or unreadable (a family's own
    loader reports those with the fix; a grid lookup falls back to the usual grid)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
