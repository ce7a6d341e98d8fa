"""Backups and exact resume: 2N steps straight and N, a stop, and a resume to 2N give the same
metrics.jsonl losses and the same LoRA tensors, with mask dropout, caption dropout, gradient
accumulation and the drift meter on; a backup with another prior weight is refused by name.
Resuming an earlier run's backup keeps the newer run and mixes no two runs in a file; a damaged
backup is named with the fix (``latest`` passes over it and says so); the dataset changed since
the backup is said with counts."""

from __future__ import annotations

import json
import os
import queue
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modules.config import config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer
from modules.trainer.backups import Backups, backups
from modules.trainer.preflight import preflight
from modules.trainer.processes import Processes

pytestmark = pytest.mark.slow
LOSSES = ("loss_total", "loss_target", "loss_prior", "heldout_subject_loss", "drift_background")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), size=64)


def config(demo, root, name, steps, run_dir=None, **changes):
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
        "output": {
            "run_dir": str(run_dir or root / name),
            "backup_every": 2,
            "backup_keep": 2,
            **changes.get("output", {}),
        },
        "drift": {"every": 2, "subject_path": str(demo.heldout_subject), "max_images": 2},
    }
    return config_from_dict(data)


def rows(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in ("step", *LOSSES)} for r in map(json.loads, lines)]


def texts(events):
    said = []
    while not events.empty():
        said.append(getattr(events.get(), "text", ""))
    return said


def scalars(logs, tag="loss_total"):
    """(step, value) of ``tag`` as TensorBoard reads the run's logs (every event file)."""
    (folder,) = [p for p in logs.iterdir() if p.is_dir()]
    found = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [(event.step, event.value) for event in found.Scalars(tag)]


def copy_run(source, target):
    """A copy of a run folder: a resume there is allowed (output.run_dir changes no number)."""
    shutil.copytree(source, target)


@pytest.fixture(scope="module")
def run_a(demo, tmp_path_factory):
    """A finished run of 4 steps with backups of steps 2 and 4 and TensorBoard logs, for tests
    to copy; and its config's root (its cache)."""
    root = tmp_path_factory.mktemp("run-a")
    finished = GenericTrainer(config(demo, root, "A", 4, output={"log_with": "tensorboard"})).run()
    assert finished.error is None, finished.error
    return root / "A", root


def test_stopping_and_resuming_gives_the_run_trained_straight(demo, run_a, tmp_path):
    a, root = run_a  # 4 steps, backups of steps 2 and 4
    straight = GenericTrainer(config(demo, root, "S", 8, run_dir=tmp_path / "straight")).run()
    assert straight.error is None, straight.error
    run = tmp_path / "resumed"
    copy_run(a, run)
    assert [p.name for p in backups(run)] == ["step000002", "step000004"]
    events: queue.Queue = queue.Queue()
    resumed = GenericTrainer(config(demo, root, "A", 8, run_dir=run), events, resume="latest").run()
    assert resumed.error is None, resumed.error
    assert rows(run) == rows(tmp_path / "straight")
    expected = load_file(tmp_path / "straight" / "lora.safetensors")
    found = load_file(run / "lora.safetensors")
    assert expected.keys() == found.keys()
    assert all(torch.equal(found[key], value) for key, value in expected.items())
    assert any("training.steps (allowed)" in text for text in texts(events))
    assert [p.name for p in backups(run)] == ["step000006", "step000008"]


def test_a_backup_of_other_settings_is_refused_by_name(demo, run_a, tmp_path):
    a, root = run_a
    changed = config(demo, root, "A", 6, run_dir=a, prior={"weight": 2.0})
    finished = GenericTrainer(changed, resume="latest").run()
    assert finished.error_kind == "config"
    assert "prior.weight (backup: 1.0, now: 2.0)" in finished.error
    missing = GenericTrainer(config(demo, tmp_path, "empty", 2), resume="latest").run()
    assert "has no backup" in missing.error


def test_a_backup_cut_short_is_ignored_and_the_previous_one_resumes(demo, run_a, tmp_path):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    partial = run / "backups" / ".step000006.partial"  # killed while writing
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x00" * 10)
    assert backups(run)[-1].name == "step000004"
    events: queue.Queue = queue.Queue()
    finished = GenericTrainer(
        config(demo, root, "A", 6, run_dir=run), events, resume="latest"
    ).run()
    assert finished.error is None, finished.error
    assert any("step000004 at step 4" in text for text in texts(events))
    assert not partial.exists() and backups(run)[-1].name == "step000006"


def test_resuming_an_earlier_runs_backup_keeps_the_newer_run_and_mixes_none(demo, run_a, tmp_path):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    tensorboard = {"log_with": "tensorboard"}
    b = config(demo, root, "B", 2, run_dir=run, output=tensorboard)  # a newer run, same folder
    assert GenericTrainer(b).run().error is None
    (a_kept,) = (run / "previous").iterdir()
    b_lora = (run / "lora.safetensors").read_bytes()

    events: queue.Queue = queue.Queue()
    resumed = config(demo, root, "A", 4, run_dir=run, output=tensorboard)
    backup = a_kept / "backups" / "step000002"
    finished = GenericTrainer(resumed, events, resume=str(backup)).run()
    assert finished.error is None, finished.error
    b_kept = next(p for p in (run / "previous").iterdir() if p != a_kept)
    said = texts(events)
    assert any(f"moved its files to {b_kept}" in text for text in said), said
    # B is whole where it was moved: its LoRA, its 2 rows, its logs.
    assert (b_kept / "lora.safetensors").read_bytes() == b_lora
    assert [row["step"] for row in rows(b_kept)] == [0, 1, 2]
    assert [step for step, _ in scalars(b_kept / "logs")] == [1, 2]
    # The run folder holds A alone, continued: as A trained straight, row for row and event
    # for event, no step twice.
    assert rows(run) == rows(a)
    assert scalars(run / "logs") == scalars(a / "logs")
    expected, found = load_file(a / "lora.safetensors"), load_file(run / "lora.safetensors")
    assert all(torch.equal(found[key], value) for key, value in expected.items())


def test_resuming_another_folders_backup_into_a_new_folder_leaves_that_folder_alone(
    demo, run_a, tmp_path
):
    """The second way to resume a backup that is not the run folder's own: into a new folder
    (``--run-dir NEW --resume BACKUP``). The new folder holds that run continued; the folder the
    backup came from is not touched."""
    a, root = run_a
    source = tmp_path / "source"
    copy_run(a, source)
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}

    run = tmp_path / "new"
    resumed = config(demo, root, "A", 4, run_dir=run)
    backup = source / "backups" / "step000002"
    finished = GenericTrainer(resumed, resume=str(backup)).run()
    assert finished.error is None, finished.error
    assert [row["step"] for row in rows(run)] == [row["step"] for row in rows(a)]
    assert rows(run) == rows(a)
    expected, found = load_file(a / "lora.safetensors"), load_file(run / "lora.safetensors")
    assert all(torch.equal(found[key], value) for key, value in expected.items())
    assert not (run / "previous").exists()  # nothing was there to move aside
    after = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert after == before


def test_resuming_from_a_backup_drops_the_later_tensorboard_events(demo, run_a, tmp_path):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    shutil.rmtree(run / "backups" / "step000004")  # a run stopped at 2 that trained on to 4
    resumed = config(demo, root, "A", 4, run_dir=run, output={"log_with": "tensorboard"})
    events: queue.Queue = queue.Queue()
    assert GenericTrainer(resumed, events, resume="latest").run().error is None
    said = texts(events)
    assert any("TensorBoard: dropped the" in t and "after step 2" in t for t in said), said
    assert scalars(run / "logs") == scalars(a / "logs")  # steps 1-4 once each


def damage_empty(folder):
    (folder / "state.pt").write_bytes(b"")


def damage_random(folder):
    (folder / "state.pt").write_bytes(os.urandom(4096))


def damage_cut_short(folder):
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])


def damage_keys(folder):
    torch.save({"step": 4, "lora": {}}, folder / "state.pt")


def damage_pickled_object(folder):
    torch.save({"step": 4, "extra": Processes.current()}, folder / "state.pt")


def damage_config(folder):
    (folder / "config.json").write_text('{"schema_version": 3, "data": {')


DAMAGES = [
    damage_empty,
    damage_random,
    damage_cut_short,
    damage_keys,
    damage_pickled_object,
    damage_config,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_a_damaged_backup_is_named_with_the_fix(demo, run_a, tmp_path, damage):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    lora = (run / "lora.safetensors").read_bytes()
    damage(run / "backups" / "step000004")
    events: queue.Queue = queue.Queue()
    resume = str(run / "backups" / "step000004")
    finished = GenericTrainer(config(demo, root, "A", 6, run_dir=run), events, resume=resume).run()
    assert finished.error_kind == "config", finished.error
    said = "\n".join([finished.error, *texts(events)])
    assert f"the backup {run / 'backups' / 'step000004'} is damaged" in finished.error
    assert f"--resume {run / 'backups' / 'step000002'}" in finished.error  # the fix
    assert "Traceback" not in said and "weights_only" not in said and "unexpected" not in said
    assert (run / "lora.safetensors").read_bytes() == lora


@pytest.mark.parametrize("damage", [damage_empty, damage_random, damage_keys])
def test_resume_latest_passes_over_a_damaged_backup_and_says_so(demo, run_a, tmp_path, damage):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    damage(run / "backups" / "step000004")
    said: list[tuple[str, str]] = []
    chosen = Backups(
        config(demo, root, "A", 6, run_dir=run),
        Processes.current(),
        lambda text, level: said.append((level, text)),
    ).to_resume("latest")
    assert chosen.folder == run / "backups" / "step000002" and chosen.step == 2
    warnings = [text for level, text in said if level == "warning"]
    assert any(
        f"{run / 'backups' / 'step000004' / 'state.pt'}" in text
        and "resuming from the newest complete backup" in text
        for text in warnings
    ), said
    damage(run / "backups" / "step000002")
    finished = GenericTrainer(config(demo, root, "A", 6, run_dir=run), resume="latest").run()
    assert finished.error_kind == "config" and "every backup in" in finished.error
    assert "step000002" in finished.error and "step000004" in finished.error


def test_a_changed_dataset_and_an_old_backup_are_said(demo, run_a, tmp_path):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    backup = run / "backups" / "step000004"
    recorded = json.loads((backup / "dataset.json").read_text())
    names = sorted(recorded["items"])
    assert len(names) == demo.subject_images
    # As if, since the backup, one image was added, one removed and one edited.
    recorded["items"]["0/gone.png"] = recorded["items"].pop(names[0])
    size, _, _ = recorded["items"][names[1]]["image"]
    recorded["items"][names[1]]["image"][0::2] = [size + 1, "0" * 32]
    (backup / "dataset.json").write_text(json.dumps(recorded))
    resumed = config(demo, root, "A", 6, run_dir=run)
    found = preflight(resumed, create_run_dir=False)
    said: list[str] = []
    Backups(resumed, Processes.current(), lambda text, _: said.append(text)).to_resume(
        "latest", found.scans
    )
    total = demo.subject_images
    assert any(
        "the dataset changed since the backup of step 4: 1 added, 1 removed, 1 edited "
        f"(image, mask or caption) of the backup's {total} items"
        in text
        and "no longer what training straight through" in text
        for text in said
    ), said

    (backup / "dataset.json").unlink()  # a backup written before backups recorded it
    said.clear()
    Backups(resumed, Processes.current(), lambda text, _: said.append(text)).to_resume(
        "latest", found.scans
    )
    assert any("whether the images changed since could not be compared" in t for t in said)


def test_training_steps_not_above_the_backup_step_are_refused(demo, run_a, tmp_path):
    a, root = run_a
    run = tmp_path / "run"
    copy_run(a, run)
    lora = (run / "lora.safetensors").read_bytes()
    finished = GenericTrainer(config(demo, root, "A", 4, run_dir=run), resume="latest").run()
    assert finished.error_kind == "config"
    assert "training.steps=4 (the backup's: 4) is not above the backup's step 4" in finished.error
    assert (run / "lora.safetensors").read_bytes() == lora
    # The run folder given for a backup: one of its backups is named.
    finished = GenericTrainer(config(demo, root, "A", 6, run_dir=run), resume=str(run)).run()
    assert f"give one of its backups, e.g. --resume {run / 'backups' / 'step000004'}" in (
        finished.error
    )
