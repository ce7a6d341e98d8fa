"""The shipped demo presets with the square centre crop (``data.buckets`` off) give the losses
recorded before aspect-ratio buckets and the split cache existed, step for step (same seed):
bucketing and the cache layout change nothing for a run that does not bucket. With buckets on,
the square demo images share one bucket, and the bucketed batch order is the shuffled order of
before, so the losses are the same too.

Recorded with ``python -m tests.trainer.test_square_crop_losses`` (which rewrites the file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modules.config import config_from_dict, load_preset
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer

REPO = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "square_crop_losses.json"
PRESETS = ("demo-no-prior", "demo-prior", "demo-threshold", "demo-prior-prediction")
STEPS = 5
KEYS = ("loss_total", "loss_target", "loss_prior")


def preset_losses(name: str, root: Path, *, buckets: bool = False) -> list[dict[str, float]]:
    """The first STEPS steps' losses of a shipped preset on the demo dataset (64 px), without
    samples, saves or drift readings, and with the square crop."""
    demo = write_demo_dataset(root / "demo-data", size=64)
    data = load_preset(REPO / "presets" / f"{name}.json").model_dump(mode="json")
    for concept in data["data"]["concepts"]:
        concept["path"] = str(demo.root / Path(concept["path"]).name)
    data["data"]["cache_dir"] = str(root / "cache")
    if "buckets" in data["data"]:
        data["data"]["buckets"] = buckets
    data["training"]["steps"] = STEPS
    data["output"].update(run_dir=str(root / "run" / name), save_every=0)
    data["sampling"]["every"] = 0
    data["drift"]["every"] = 0
    finished = GenericTrainer(config_from_dict(data)).run()
    assert finished.error is None, finished.error
    rows = (root / "run" / name / "metrics.jsonl").read_text().splitlines()
    return [{key: json.loads(row)[key] for key in KEYS} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [False, True], ids=["square", "one-bucket"])
@pytest.mark.parametrize("name", PRESETS)
def test_square_crop_gives_the_recorded_losses(name, buckets, tmp_path):
    recorded = json.loads(RECORDED.read_text())[name]
    losses = preset_losses(name, tmp_path, buckets=buckets)
    assert len(losses) == STEPS
    for step, (now, before) in enumerate(zip(losses, recorded, strict=True), start=1):
        for key in KEYS:
            # Float32 on the CPU: equal on one machine; another CPU rounds differently (a few
            # 1e-6 at the first step, growing to about 5e-5 by the fifth on one measured pair),
            # far below what another batch order or crop would change (percents).
            assert now[key] == pytest.approx(before[key], rel=2e-4, abs=1e-8), (step, key)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        found = {name: preset_losses(name, Path(folder)) for name in PRESETS}
    RECORDED.write_text(json.dumps(found, indent=1) + "\n")
    sys.exit(0)
