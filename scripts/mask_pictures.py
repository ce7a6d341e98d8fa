"""Draw the README's before/after pictures of the mask generator on a real photograph.

    .venv/bin/python scripts/mask_pictures.py [--side 384] [--out docs/masks]

Writes, from scikit-image's astronaut photograph (NASA, public domain):

- ``astronaut.png``: the photograph at ``--side`` pixels;
- ``astronaut-mask.png``: the tier mask the generator makes of it (default tiers: face 255,
  body 128, hair 80, background 0), as it is written next to a training image;
- ``astronaut-overlay.png``: the photograph with the tiers tinted (face red, hair blue, body
  green), to see where each lands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.config.schema import MaskTiersConfig
from modules.masks import generate_tiers

TINTS = {"face": (230, 40, 40), "hair": (40, 80, 230), "body": (40, 200, 60)}


def overlay(photo: np.ndarray, mask: np.ndarray, tiers: MaskTiersConfig) -> np.ndarray:
    """The photograph with each tier's pixels mixed half and half with its tint."""
    tinted = photo.astype(np.float32)
    for tier, colour in TINTS.items():
        where = mask == getattr(tiers, tier)
        tinted[where] = 0.5 * tinted[where] + 0.5 * np.array(colour, np.float32)
    return tinted.round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--out", type=Path, default=Path("docs/masks"))
    args = parser.parse_args(argv)
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize(
        (args.side, args.side), Image.Resampling.LANCZOS
    )
    pixels = np.asarray(photo)
    tiers = MaskTiersConfig()
    result = generate_tiers(pixels, tiers)
    if result.mask is None:
        raise SystemExit(f"the generator found no person in the astronaut ({result.note})")
    args.out.mkdir(parents=True, exist_ok=True)
    photo.save(args.out / "astronaut.png", optimize=True)
    Image.fromarray(result.mask, "L").save(args.out / "astronaut-mask.png", optimize=True)
    Image.fromarray(overlay(pixels, result.mask, tiers)).save(
        args.out / "astronaut-overlay.png", optimize=True
    )
    shares = ", ".join(
        f"{tier} {float((result.mask == getattr(tiers, tier)).mean()):.1%}"
        for tier in ("face", "hair", "body")
    )
    print(f"pictures in {args.out} ({shares})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
