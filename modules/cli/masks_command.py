"""``python -m modules.cli masks CONCEPT_DIR``: write the masks of a concept folder.

    python -m modules.cli masks CONCEPT_DIR [--mode tiers|subject|difference]
        [--overwrite never|missing|all] [--preset P] [--face N] [--body N] [--hair N]
        [--model FILE.onnx] [--margin F] [--reference-dir DIR] [--threshold N] [--near F]

Tier levels come from the preset's ``mask.tiers`` (the defaults without one), then
``--face/--body/--hair``. ``--mode difference`` masks an edit concept's pairs: where each target
differs from its reference (``name-ref.png`` beside it, or the file of its name in
``--reference-dir``), changed at the face level, a band around it at the body level.

The summary counts each image and clip once (written, kept, with
nothing found, failed). Exit status: 0 done (images without a person are reported, not an
error), 1 some item failed, 2 the folder, the preset or the models could not be used (a folder
that cannot be written is refused before anything is detected), 130 when Ctrl-C stopped it
(every mask written so far is complete).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modules.config import ConfigError, load_preset
from modules.config.schema import MaskTiersConfig

EXIT_OK, EXIT_FAILED, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "masks", help="write -masklabel masks for a concept folder (face, body, hair tiers)"
    )
    sub.add_argument("concept_dir", help="folder of images and clips")
    sub.add_argument(
        "--mode",
        choices=("tiers", "subject", "difference"),
        default="tiers",
        help="tiers: people (face, body, hair levels); subject: one subject at --value; "
        "difference: edit pairs, where each target differs from its reference (changed at the "
        "face level, the band around it at the body level, the rest 0)",
    )
    sub.add_argument(
        "--overwrite",
        choices=("never", "missing", "all"),
        default="missing",
        help="missing (default): items without a mask (existing ones are kept, unusable "
        "ones named); never: the same without reading existing masks; all: replace every mask",
    )
    sub.add_argument("--preset", help="take the tier levels from this preset's mask.tiers")
    for tier in ("face", "body", "hair"):
        sub.add_argument(f"--{tier}", type=int, metavar="0-255", help=f"grey level of the {tier}")
    sub.add_argument(
        "--model", metavar="FILE.onnx", help="subject mode: your ONNX segmentation model"
    )
    sub.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="subject mode without a model: GrabCut's box lies this fraction inside each edge",
    )
    sub.add_argument("--value", type=int, default=255, help="subject mode: the mask's grey level")
    sub.add_argument(
        "--reference-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="difference mode: the folder of the references (a file of each target's name; "
        "the concept's first reference_dirs folder); without it: name-ref.png beside each target",
    )
    sub.add_argument(
        "--threshold",
        type=float,
        metavar="0-255",
        help="difference mode: grey levels a pixel must change by to count (default 24)",
    )
    sub.add_argument(
        "--near",
        type=float,
        metavar="F",
        help="difference mode: width of the partial band around the change, as a fraction of "
        "the short side (default 0.04)",
    )


def tiers_from(args: argparse.Namespace) -> MaskTiersConfig:
    """The preset's tiers (or the defaults), with the command line's levels over them."""
    tiers = load_preset(args.preset).mask.tiers if args.preset else MaskTiersConfig()
    chosen = {tier: getattr(args, tier) for tier in ("face", "body", "hair")}
    changes = {tier: level for tier, level in chosen.items() if level is not None}
    try:
        return MaskTiersConfig(**{**tiers.model_dump(), **changes})
    except ValueError as error:
        raise ConfigError(f"--face/--body/--hair must be grey levels 0-255 ({error})") from error


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from modules.data.concept import DataError
    from modules.masks import MaskModelsMissing, masks_for_concept

    try:
        tiers = tiers_from(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # Unset: the defaults of modules.masks.difference (24 levels, 0.04 of the short side).
    difference = {
        name: getattr(args, name)
        for name in ("threshold", "near")
        if getattr(args, name) is not None
    }
    bar = tqdm(unit="item", dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int, item: Path) -> None:
        bar.total = total
        bar.set_postfix_str(item.name, refresh=False)
        bar.update(done - bar.n)

    try:
        summary = masks_for_concept(
            Path(args.concept_dir),
            mode=args.mode,
            overwrite=args.overwrite,
            tiers=tiers,
            model_path=args.model,
            on_progress=progress,
            box_margin=args.margin,
            value=args.value,
            reference_dirs=[Path(folder) for folder in args.reference_dir],
            **difference,
        )
    except KeyboardInterrupt:
        bar.close()
        print("Ctrl-C: stopped; every mask written is complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, MaskModelsMissing, ValueError, OSError) as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    bar.close()
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    for note in summary.notes:
        print(f"warning: {note}", file=sys.stderr)
    sought = {"tiers": "person", "subject": "subject", "difference": "change"}[args.mode]
    for path in summary.no_person:
        print(f"no {sought} found: {path}")
    for path in summary.kept_unfound:
        print(f"no {sought} found, its mask kept: {path}")
    print(summary.line(sought))
    return EXIT_FAILED if summary.failed else EXIT_OK
