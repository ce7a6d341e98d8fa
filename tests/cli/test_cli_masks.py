"""``python -m modules.cli masks``, run as a user runs it: a subprocess on real photographs."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from modules.config.schema import ConceptConfig
from modules.data.concept import scan_concept
from tests.masks.photos import photo, require_models
from tests.masks.unwritable import unwritable

REPO = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "modules.cli", "masks"]


def cli(*args, timeout=120, **options):
    return subprocess.run(
        [*COMMAND, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )


def astronauts(folder: Path, count: int, side: int = 256) -> None:
    """``count`` shifted copies of the astronaut, and the coffee cup."""
    small = cv2.resize(photo("astronaut"), (side, side), interpolation=cv2.INTER_AREA)
    for index in range(count):
        Image.fromarray(np.roll(small, 2 * index, axis=1)).save(folder / f"a{index:03d}.jpg")
    Image.fromarray(photo("coffee")).save(folder / "coffee.jpg")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_masks_are_written_and_the_summary_counts_them(tmp_path):
    require_models()
    astronauts(tmp_path, 2)
    result = cli(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"no person found: {tmp_path / 'coffee.jpg'}" in result.stdout
    assert result.stdout.strip().endswith("2 written, 0 kept, 1 with no person found, 0 failed")
    assert sorted(p.name for p in tmp_path.glob("*-masklabel.png")) == [
        "a000-masklabel.png",
        "a001-masklabel.png",
    ]


def test_the_overwrite_policies(tmp_path):
    require_models()
    astronauts(tmp_path, 3)
    Image.fromarray(np.full((256, 256), 7, np.uint8)).save(tmp_path / "a000-masklabel.png")
    (tmp_path / "a001-masklabel.png").write_bytes(b"not a png")
    # Painted by hand: no person is found in it, so even "all" has nothing to replace it with.
    Image.fromarray(np.full((400, 600), 128, np.uint8)).save(tmp_path / "coffee-masklabel.png")
    before = snapshot(tmp_path)

    assert cli(tmp_path, "--overwrite", "never").returncode == 0
    after = snapshot(tmp_path)
    assert {name: after[name] for name in before} == before  # byte for byte
    assert set(after) - set(before) == {"a002-masklabel.png"}

    third = after["a002-masklabel.png"]
    result = cli(tmp_path, "--overwrite", "missing")
    after = snapshot(tmp_path)
    assert after["a000-masklabel.png"] == before["a000-masklabel.png"]  # painted: kept
    assert after["a001-masklabel.png"] == before["a001-masklabel.png"]  # broken: kept, named
    assert "a001-masklabel.png" in result.stdout + result.stderr
    assert after["a002-masklabel.png"] == third

    result = cli(tmp_path, "--overwrite", "all", "--body", "100")
    assert result.stdout.strip().endswith("3 written, 1 kept, 0 with no person found, 0 failed")
    assert f"no person found, its mask kept: {tmp_path / 'coffee.jpg'}" in result.stdout
    assert snapshot(tmp_path)["coffee-masklabel.png"] == before["coffee-masklabel.png"]
    replaced = np.asarray(Image.open(tmp_path / "a000-masklabel.png"))
    assert 100 in replaced and 7 not in replaced


def test_a_read_only_folder_is_refused_up_front(tmp_path):
    require_models()
    astronauts(tmp_path, 2)
    with unwritable(tmp_path):
        result = cli(tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: concept folder '{tmp_path}' cannot be written" in result.stderr
    assert "no person found" not in result.stdout  # nothing was detected
    assert not list(tmp_path.glob("*-masklabel*"))


def full_disk() -> None:
    """In the child: no file may grow past 0 bytes, as on a full disk (root included)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_folder_is_refused_up_front(tmp_path):
    require_models()
    astronauts(tmp_path, 2)
    result = cli(tmp_path, preexec_fn=full_disk)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"concept folder '{tmp_path}' cannot be written (File too large)" in result.stderr
    assert "no person found" not in result.stdout and "failed:" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a000.jpg", "a001.jpg", "coffee.jpg"]


def test_tier_levels_come_from_a_preset_then_the_command_line(tmp_path):
    require_models()
    concept = tmp_path / "concept"
    concept.mkdir()
    astronauts(concept, 1)
    preset = json.loads((REPO / "presets/demo-prior.json").read_text())
    preset.setdefault("mask", {})["tiers"] = {"face": 240, "body": 110}
    (tmp_path / "p.json").write_text(json.dumps(preset))
    result = cli(concept, "--preset", tmp_path / "p.json", "--hair", "60")
    assert result.returncode == 0, result.stderr
    levels = set(np.unique(np.asarray(Image.open(concept / "a000-masklabel.png"))).tolist())
    assert levels == {0, 60, 110, 240}


def test_bad_levels_and_folders_are_named(tmp_path):
    result = cli(tmp_path / "absent")
    assert result.returncode == 2 and "absent' does not exist" in result.stderr
    result = cli(tmp_path, "--face", "300")
    assert result.returncode == 2 and "0-255" in result.stderr


def test_a_batch_killed_mid_way_leaves_only_whole_masks(tmp_path):
    require_models()
    astronauts(tmp_path, 40, side=512)
    process = subprocess.Popen(
        [*COMMAND, str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("*-masklabel.png")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    masks = list(tmp_path.glob("*-masklabel.png"))
    assert 1 <= len(masks) < 40, "the batch was not killed mid-way"
    for mask in masks:  # every mask there is whole
        with Image.open(mask) as image:
            image.load()
            assert image.size == (512, 512)
    # A temporary file may be left: hidden, so the trainer's scan skips it...
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert all(p.name.endswith(".tmp") for p in leftovers)
    scan = scan_concept(ConceptConfig(path=str(tmp_path)))
    assert scan.images == 41 and scan.masks_found == len(masks)
    # ...and the next run clears it and finishes the batch.
    result = cli(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{40 - len(masks)} written, {len(masks)} kept" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_subject_mode_masks_what_lies_inside_the_margin(tmp_path):
    Image.fromarray(photo("coffee")).save(tmp_path / "cup.jpg")
    result = cli(tmp_path, "--mode", "subject", "--margin", "0.1", "--value", "200")
    assert result.returncode == 0, result.stderr
    assert "1 written, 0 kept, 0 with no subject found, 0 failed" in result.stdout
    mask = np.asarray(Image.open(tmp_path / "cup-masklabel.png"))
    assert mask.shape == (400, 600) and mask[200, 300] == 200 and mask[0, 0] == 0
