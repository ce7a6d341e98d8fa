"""What a resume checks and keeps, without training: the dataset's print (items added, removed,
edited), settings refused with the backup's value beside the new one and the harmless ones
allowed, ``training.steps`` at or below the backup's step, and TensorBoard event files cut back
to a step (still readable by TensorBoard) or carried to another run folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch.utils.tensorboard import SummaryWriter

from modules.config import ConfigError, TrainConfig, config_from_dict, resolved_config_json
from modules.data.concept import scan_concept
from modules.trainer.backups import check_steps, compare_configs
from modules.trainer.fingerprint import dataset_changes, dataset_print
from modules.trainer.run_folder import copy_events, earlier_run_files, trim_events

SUBJECT = {"path": "subject", "caption": {"default": "a photo"}}


def resolved(**changes: dict) -> dict:
    data: dict = {"schema_version": 3, "data": {"concepts": [SUBJECT]}, "mask": {"enabled": True}}
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return json.loads(resolved_config_json(config_from_dict(data)))


def concept(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"caption {name}")
    config = TrainConfig.model_validate(
        {"data": {"concepts": [{"path": str(folder)}]}}
    ).data.concepts[0]
    return lambda: [scan_concept(config)]


def test_the_dataset_print_counts_items_added_removed_and_edited(tmp_path):
    scan = concept(tmp_path / "subject", ["a", "b", "c", "d"])
    before = dataset_print(scan())
    assert dataset_print(scan(), before) == before  # nothing changed: nothing differs
    assert dataset_changes(before, dataset_print(scan(), before)) is None

    folder = tmp_path / "subject"
    (folder / "a.png").unlink()  # removed
    (folder / "a.txt").unlink()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(folder / "e.png")  # added
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "b.png")  # the image edited
    (folder / "c.txt").write_text("another caption")  # the caption edited
    Image.new("L", (8, 8), 255).save(folder / "d-masklabel.png")  # a mask added
    now = dataset_print(scan(), before)
    assert dataset_changes(before, now) == (
        "1 added, 1 removed, 3 edited (image, mask or caption) of the backup's 4 items"
    )


def test_a_copied_dataset_is_the_same_and_an_edit_keeping_size_and_time_is_found(tmp_path):
    scan = concept(tmp_path / "subject", ["a", "b"])
    before = dataset_print(scan())
    # A copy without its times (cp -r): the contents decide, not the modification times.
    shutil.copytree(tmp_path / "subject", tmp_path / "copy", copy_function=shutil.copyfile)
    copy = concept(tmp_path / "copy", [])
    assert dataset_changes(before, dataset_print(copy(), before)) is None
    # The same size and time but other bytes: hashed again only without a print to go by.
    image = tmp_path / "subject" / "a.png"
    stat = image.stat()
    image.write_bytes(bytes(reversed(image.read_bytes())))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset_changes(before, dataset_print(scan())) is not None


def test_a_refused_setting_shows_the_backup_value_beside_the_new_one():
    old = resolved(prior={"weight": 1.0}, lora={"rank": 4})
    new = resolved(prior={"weight": 2.5}, lora={"rank": 8})
    with pytest.raises(ConfigError) as error:
        compare_configs(old, new)
    text = str(error.value)
    assert "lora.rank (backup: 4, now: 8)" in text
    assert "prior.weight (backup: 1.0, now: 2.5)" in text


def test_settings_that_change_no_number_are_allowed():
    old = resolved(output={"run_dir": "runs/a", "name": "lora", "format": "diffusers"})
    new = resolved(
        output={"run_dir": "moved/b", "name": "renamed", "format": "comfyui"},
        data={"cache_dir": "elsewhere/cache", "concepts": [SUBJECT]},
        training={"steps": 5000},
    )
    assert set(compare_configs(old, new)) == {
        "data.cache_dir",
        "output.format",
        "output.name",
        "output.run_dir",
        "training.steps",
    }


@pytest.mark.parametrize("steps", [30, 12])
def test_training_steps_at_or_below_the_backup_step_are_refused(steps):
    with pytest.raises(ConfigError) as error:
        check_steps(30, resolved(training={"steps": 40}), steps)
    text = str(error.value)
    assert f"training.steps={steps} (the backup's: 40)" in text
    assert "above the backup's step 30" in text
    check_steps(30, resolved(training={"steps": 40}), 31)


def events(path):
    return [
        (event.step, value.tag)
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    ]


def test_tensorboard_events_after_a_step_are_dropped_and_carried_up_to_it(tmp_path):
    logs = tmp_path / "run" / "logs"
    writer = SummaryWriter(logs / "lora")
    for step in range(1, 7):
        writer.add_scalar("loss_total", 1.0 / step, step)
    writer.close()
    (file,) = list(logs.rglob("*tfevents*"))
    assert [step for step, _ in events(file)] == [1, 2, 3, 4, 5, 6]

    copied = copy_events(logs, tmp_path / "other" / "logs", 4)
    assert copied == 5  # the file's version record and steps 1-4
    carried = tmp_path / "other" / "logs" / file.relative_to(logs)
    assert events(carried) == [(step, "loss_total") for step in range(1, 5)]

    assert trim_events(logs, 4) == 2
    assert events(file) == [(step, "loss_total") for step in range(1, 5)]
    assert trim_events(logs, 4) == 0


def test_the_logs_folder_moves_with_the_run_and_a_logs_file_stays(tmp_path):
    (tmp_path / "logs" / "lora").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    assert {p.name for p in earlier_run_files(tmp_path)} == {"metrics.jsonl"}  # nothing logged
    (tmp_path / "logs" / "lora" / "events.out.tfevents.1").write_bytes(b"")
    assert {p.name for p in earlier_run_files(tmp_path)} == {"logs", "metrics.jsonl"}
    shutil.rmtree(tmp_path / "logs")
    (tmp_path / "logs").write_text("the user's notes")
    assert {p.name for p in earlier_run_files(tmp_path)} == {"metrics.jsonl"}
