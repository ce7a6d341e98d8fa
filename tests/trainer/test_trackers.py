"""output.log_with: the metrics.jsonl numbers, the drift readings and the samples reach
TensorBoard's event files (read back with TensorBoard's own reader); a missing package is named."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modules.config import ConfigError
from modules.trainer import GenericTrainer
from modules.trainer.preflight import preflight
from tests.trainer.test_generic_trainer import make_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from modules.data.demo_dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


def test_tensorboard_gets_the_metrics_the_drift_and_the_samples(demo_root, tmp_path):
    config = make_config(
        demo_root,
        tmp_path,
        output={"log_with": "tensorboard"},
        training={"steps": 3},
        sampling={"prompts": ["a sks heart"], "every": 3, "steps": 2},
        drift={"every": 3, "subject_path": str(demo_root / "heldout-subject"), "max_images": 2},
    )
    finished = GenericTrainer(config).run()
    assert finished.error is None, finished.error
    logs = tmp_path / "run" / "logs" / "lora"
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for tag in ("loss_total", "loss_target", "loss_prior", "lr", "drift_background"):
        assert tag in tags["scalars"], tags["scalars"]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in events.Scalars("loss_total")}
    assert logged == pytest.approx({r["step"]: r["loss_total"] for r in rows if "loss_total" in r})
    drift = {e.step: e.value for e in events.Scalars("drift_background")}
    assert sorted(drift) == [0, 3]  # the baseline reading and the last step's
    assert {"samples/0-lora", "samples/0-pair"} <= set(tags["images"])


def test_a_missing_tracker_package_is_named_before_anything_loads(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, output={"log_with": "tensorboard"})
    preflight(config, create_run_dir=False)  # tensorboard is installed: no problem
    try:
        import wandb  # noqa: F401
    except ImportError:
        config.output.log_with = "wandb"
        with pytest.raises(ConfigError, match=r"output.log_with=wandb: .*pip install wandb"):
            preflight(config, create_run_dir=False)
