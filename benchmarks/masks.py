"""Seconds per 512 px image for the tiered person-mask generator, and per stage.

    .venv/bin/python benchmarks/masks.py [--repeats 10] [--threads 2]

Stages, each timed on its own on the same images in one run, side by side: segmentation (the
selfie segmenter), faces (the two face detectors and the face mesh), hair (the skin model and
GrabCut), and the whole generator (the stages, the tier map and its resize). The photographs
are scikit-image's astronaut and cameraman at 512 × 512. Interpreters are built before timing
(they are built once per process); the medians over ``--repeats`` runs are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.config.schema import MaskTiersConfig


def photographs() -> dict[str, np.ndarray]:
    import skimage.data

    camera = skimage.data.camera()
    return {"astronaut": skimage.data.astronaut(), "camera": np.stack([camera] * 3, axis=-1)}


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_stages(image: np.ndarray, tiers: MaskTiersConfig, repeats: int) -> dict[str, float]:
    """Median seconds of each stage, and of the whole generator, on one image."""
    from modules.masks import person

    work = person._working_copy(image)
    person.generate_tiers(image, tiers)  # builds the interpreters
    segmented = person.segment_person(work)
    faces = person.find_faces(work)
    stages = {
        "segmentation": lambda: person.segment_person(work),
        "faces": lambda: person.find_faces(work),
        "hair (GrabCut)": lambda: person.face_and_hair(work, segmented, faces),
        "whole generator": lambda: person.generate_tiers(image, tiers),
    }
    return {stage: median_seconds(run, repeats) for stage, run in stages.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (cores) to use")
    args = parser.parse_args(argv)

    import cv2

    from modules.masks import model_files

    cv2.setNumThreads(args.threads)
    model_files.THREADS = args.threads  # read when the interpreters are built, just below
    tiers = MaskTiersConfig()
    rows = [
        (name, time_stages(image, tiers, args.repeats)) for name, image in photographs().items()
    ]
    stages = list(rows[0][1])
    print(f"tier masks, 512 px images, {args.threads} threads, median of {args.repeats}")
    print(f"{'seconds per image':<20}" + "".join(f"{stage:>18}" for stage in stages))
    for name, seconds in rows:
        print(f"{name:<20}" + "".join(f"{seconds[stage]:>18.3f}" for stage in stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
