"""Backups and exact resume: 2N steps straight and N, a stop, and a resume to 2N give the same
metrics.jsonl losses and the same LoRA tensors, with mask dropout, caption dropout, gradient
accumulation and the drift meter on; a backup with another prior weight is refused by name."""

from __future__ import annotations

import json
import queue

import pytest
import torch
from safetensors.torch import load_file

from modules.config import config_from_dict
from modules.data.demo_dataset import write_demo_dataset
from modules.trainer import GenericTrainer
from modules.trainer.backups import backups

pytestmark = pytest.mark.slow
LOSSES = ("loss_total", "loss_target", "loss_prior", "heldout_subject_loss", "drift_background")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), size=64)


def config(demo, root, name, steps, **changes):
    data = {
        "schema_version": 3,
        "data": {
            "concepts": [{"path": str(demo.subject), "caption": {"dropout": 0.3}}],
            "resolution": 32,
            "cache_dir": str(root / "cache"),
        },
        "mask": {"enabled": True, "unmasked_probability": 0.5, "normalize_per_sample": True},
        "prior": {"weight": 1.0, **changes.get("prior", {})},
        "lora": {"rank": 4, "alpha": 4, "dropout": 0.1},
        "training": {"steps": steps, "batch_size": 2, "gradient_accumulation": 2},
        "output": {"run_dir": str(root / name), "backup_every": 2, "backup_keep": 2},
        "drift": {"every": 2, "subject_path": str(demo.heldout_subject), "max_images": 2},
    }
    return config_from_dict(data)


def rows(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in ("step", *LOSSES)} for r in map(json.loads, lines)]


def test_stopping_and_resuming_gives_the_run_trained_straight(demo, tmp_path):
    straight = GenericTrainer(config(demo, tmp_path, "straight", 8)).run()
    assert straight.error is None, straight.error
    first = GenericTrainer(config(demo, tmp_path, "resumed", 4)).run()
    assert first.error is None and [p.name for p in backups(tmp_path / "resumed")] == [
        "step000002",
        "step000004",
    ]
    events: queue.Queue = queue.Queue()
    resumed = GenericTrainer(config(demo, tmp_path, "resumed", 8), events, resume="latest").run()
    assert resumed.error is None, resumed.error
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    expected = load_file(tmp_path / "straight" / "lora.safetensors")
    found = load_file(tmp_path / "resumed" / "lora.safetensors")
    assert expected.keys() == found.keys()
    assert all(torch.equal(found[key], value) for key, value in expected.items())
    texts = []
    while not events.empty():
        texts.append(getattr(events.get(), "text", ""))
    assert any("training.steps (allowed)" in text for text in texts)
    assert [p.name for p in backups(tmp_path / "resumed")] == ["step000006", "step000008"]


def test_a_backup_of_other_settings_is_refused_by_name(demo, tmp_path):
    assert GenericTrainer(config(demo, tmp_path, "run", 2)).run().error is None
    changed = config(demo, tmp_path, "run", 4, prior={"weight": 2.0})
    finished = GenericTrainer(changed, resume="latest").run()
    assert finished.error_kind == "config" and "prior.weight" in finished.error
    missing = GenericTrainer(config(demo, tmp_path, "empty", 2), resume="latest").run()
    assert "has no backup" in missing.error


def test_a_backup_cut_short_is_ignored_and_the_previous_one_resumes(demo, tmp_path):
    assert GenericTrainer(config(demo, tmp_path, "run", 4)).run().error is None
    partial = tmp_path / "run" / "backups" / ".step000006.partial"  # killed while writing
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x00" * 10)
    assert backups(tmp_path / "run")[-1].name == "step000004"
    events: queue.Queue = queue.Queue()
    finished = GenericTrainer(config(demo, tmp_path, "run", 6), events, resume="latest").run()
    assert finished.error is None, finished.error
    texts = []
    while not events.empty():
        texts.append(getattr(events.get(), "text", ""))
    assert any("step000004 at step 4" in text for text in texts)
    assert not partial.exists() and backups(tmp_path / "run")[-1].name == "step000006"
