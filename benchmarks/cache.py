"""What the split cache saves: filling it, starting again on it, starting after every mask was
edited, and its size per item against one file per item.

N images with masks and captions (a handful of distinct captions, as real datasets have) are
prepared for the demo family, the way a run prepares them (``prepare_dataset``: bucket
placement, cache lookup, encoding what is missing), three times in one process:

1. on an empty cache (every latent, mask and caption made);
2. again on the filled cache (nothing made: the start of a second run);
3. after every mask file was repainted (masks made again, no image encoded).

The size per item is measured twice: the split cache on disk (latents, masks and captions
apart, each distinct caption once), and the same tensors written as the earlier layout kept
them, one file per item holding its latent, its mask and both prompt encodings. The demo
family's image encoder is a pixel reshuffle, so filling costs little here; with a real VAE
(WAN, FLUX, Qwen-Image) the first time grows by the VAE's cost per image while the others stay.

    python benchmarks/cache.py [--images 200] [--size 256] [--captions 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.config.schema import ConceptConfig, DataConfig, ModelConfig
from modules.data.preparation import PreparedData, prepare_dataset
from modules.models.demo.family import DemoFamily
from modules.models.memory import load_model


def write_concept(folder: Path, images: int, size: int, captions: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 3 // 2)]
    for index in range(images):
        width, height = shapes[index % len(shapes)]
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        paint_mask(folder / f"{index:05d}-masklabel.png", (width, height), rng)
        (folder / f"{index:05d}.txt").write_text(f"a photo of sks, variant {index % captions}")
    return folder


def paint_mask(path: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 2, left : left + width // 2] = 255
    Image.fromarray(mask, "L").save(path)


def timed(data: DataConfig, family: DemoFamily, model) -> tuple[float, PreparedData]:
    start = time.perf_counter()
    prepared = prepare_dataset(data, family=family, model=model)
    return time.perf_counter() - start, prepared


def one_file_per_item(prepared: PreparedData) -> int:
    """Bytes of the same tensors in the earlier layout: each item its own file with its
    latent, its mask and both prompt encodings."""
    total = 0
    for index in range(len(prepared.dataset)):
        sample = prepared.dataset[index]
        tensors = {"latent": sample["latent"], "mask": sample["mask"]}
        tensors |= {f"text.{k}": v for k, v in sample["text"].items()}
        tensors |= {f"empty.{k}": v for k, v in sample["empty_text"].items()}
        total += len(save({k: v.contiguous() for k, v in tensors.items()}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="short side of the images (px)")
    parser.add_argument("--captions", type=int, default=5, help="distinct captions")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    family = DemoFamily()
    import torch

    model = load_model(family, ModelConfig(), dtype=torch.float32, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_concept(root / "concept", args.images, args.size, args.captions)
        data = DataConfig(
            concepts=[ConceptConfig(path=str(folder))],
            resolution=args.resolution,
            cache_dir=str(root / "cache"),
        )
        fill, first = timed(data, family, model)
        again, second = timed(data, family, model)
        rng = np.random.default_rng(1)
        for mask in sorted(folder.glob("*-masklabel.png")):
            with Image.open(mask) as image:
                size = image.size
            paint_mask(mask, size, rng)
        edited, third = timed(data, family, model)
        split = sum(p.stat().st_size for p in (root / "cache").rglob("*.safetensors"))
        before = one_file_per_item(second)
    n = args.images
    print(f"{n} images ({args.size} px short side, 3 aspect ratios), {args.captions} captions")
    print(f"{'':<44}{'seconds':>10}{'ratio':>9}   made")
    rows = (
        ("fill the empty cache", fill, first),
        ("start again on the filled cache", again, second),
        ("start after every mask was repainted", edited, third),
    )
    for label, seconds, prepared in rows:
        counts = prepared.counts.describe()
        print(f"{label:<44}{seconds:>10.2f}{seconds / fill:>8.2f}x   {counts}")
    print(f"{'cache size per item':<44}{'KiB':>10}{'ratio':>9}")
    print(f"{'  one file per item (the earlier layout)':<44}{before / n / 1024:>10.1f}{1:>8.2f}x")
    print(f"{'  split (now)':<44}{split / n / 1024:>10.1f}{split / before:>8.2f}x")


if __name__ == "__main__":
    main()
