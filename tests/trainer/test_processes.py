"""Training on several processes: 2 CPU processes (gloo) at batch 2 each train the LoRA one
process trains at batch 4, with the teacher on both, one metrics.jsonl written once, and the
main process alone writing the run folder; when one process dies the other saves the LoRA and
names the backup to continue from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modules.config import config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer
from modules.trainer.backups import backups, read_backup
from modules.trainer.processes import Processes, lost_peer, peer_reason
from tests.trained_lora import REPO

COMPARED = ("loss_total", "loss_target", "loss_prior", "teacher_fraction", "lr")


def test_each_process_takes_its_share_of_a_batch():
    shares = [Processes(index, 2).share(5) for index in range(2)]
    assert shares == [slice(0, 3), slice(3, 5)]
    assert [Processes(i, 3).share(3) for i in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert Processes(0, 1).share(4) == slice(0, 4)


def test_a_batch_smaller_than_the_processes_is_repeated_until_each_has_one():
    assert Processes(0, 2).padded(2) is None
    assert Processes(0, 3).padded(1).tolist() == [0, 0, 0]
    assert Processes(0, 4).padded(3).tolist() == [0, 1, 2, 0]


def test_only_the_main_process_keeps_the_runs_seed():
    seeds = {Processes(index, 3).seed(7) for index in range(3)}
    assert Processes(0, 3).seed(7) == 7 and len(seeds) == 3


def test_a_peer_that_went_away_is_told_from_other_errors():
    gone = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:39097: Connection reset by peer. This is typically caused by a remote "
        "worker hanging or bugs in the application."
    )
    assert lost_peer(gone)
    assert peer_reason(gone) == "Read error [127.0.0.1]:39097: Connection reset by peer"
    assert not lost_peer(RuntimeError("gloo does not support this dtype"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo subject (16 images) and two more concepts that leave uneven batches: three
    square images (the square bucket ends on a batch of 3: shares of 2 and 1) and one wide
    image, a bucket of its own (a batch of 1: repeated on the second process)."""
    root = tmp_path_factory.mktemp("processes")
    demo = write_demo_dataset(root / "demo", size=64)
    for name, count, box in (("square", 3, (0, 0, 64, 64)), ("wide", 1, (0, 16, 64, 48))):
        folder = root / name
        folder.mkdir()
        for i in range(count):
            stem = f"subject_{i:02d}"
            for suffix in (".png", "-masklabel.png"):
                picture = Image.open(demo.subject / f"{stem}{suffix}")
                picture.crop(box).save(folder / f"{stem}{suffix}")
            (folder / f"{stem}.txt").write_text((demo.subject / f"{stem}.txt").read_text())
    return root, demo


def write_preset(root, demo, name, batch_size):
    concepts = [str(demo.subject), str(root / "square"), str(root / "wide")]
    preset = {
        "schema_version": 3,
        "data": {
            "concepts": [{"path": path, "caption": {"dropout": 0.3}} for path in concepts],
            "resolution": 32,
            "cache_dir": str(root / "cache"),
        },
        "mask": {"enabled": True, "unmasked_probability": 0.3},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4},
        "training": {
            "steps": 4,
            "batch_size": batch_size,
            "gradient_accumulation": 2,
            # SGD: its steps are linear in the gradients, so the comparison below is tight
            # (Adam's normalisation magnifies the rounding of gradients near 0).
            "optimizer": "sgd",
            "learning_rate": 1.0,
        },
        "output": {"run_dir": str(root / name), "backup_every": 2},
        "drift": {"every": 2, "subject_path": str(demo.heldout_subject), "max_images": 2},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(preset))
    return path


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_at_batch_2_train_the_lora_of_one_at_batch_4(data):
    root, demo = data
    one = write_preset(root, demo, "one", batch_size=4)
    single = GenericTrainer(config_from_dict(json.loads(one.read_text()))).run()
    assert single.error is None, single.error

    two = write_preset(root, demo, "two", batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    result = subprocess.run(
        [*launch, "2", "-m", "modules.cli", "train", str(two)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Training on 2 processes: 2 samples each, 4 per batch" in result.stdout
    assert result.stdout.count("done at step 4") == 1  # the main process speaks

    # The same LoRA, within float rounding (the sums run in another order): the B matrices,
    # zero at the start, hold what was learnt.
    a, b = load_file(root / "one/lora.safetensors"), load_file(root / "two/lora.safetensors")
    assert a.keys() == b.keys()
    learnt = [key for key in a if "lora_B" in key]
    moved = max(float(a[key].abs().max()) for key in learnt)
    worst = max(float((a[key] - b[key]).abs().max()) for key in a)
    assert moved > 5e-3 and worst < 1e-5 * moved, (worst, moved)

    # One metrics.jsonl, every step once; the losses (the prior term included, which needs the
    # teacher on both processes' shares) are the one process's, and so is the drift meter's.
    straight, shared = rows(root / "one"), rows(root / "two")
    assert [r["step"] for r in shared] == [0, 1, 2, 3, 4]
    assert max(r["loss_prior"] for r in shared[1:]) > 0
    for mine, theirs in zip(shared, straight, strict=True):
        for key in (*COMPARED, "heldout_subject_loss", "drift_background"):
            if mine.get(key) is not None:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-9), key

    # Backups by the main process, with every process's own generators.
    found = backups(root / "two")
    assert [p.name for p in found] == ["step000002", "step000004"]
    state, _ = read_backup(found[-1])
    assert len(state["processes"]) == 2
    assert not torch.equal(state["processes"][0]["torch"], state["processes"][1]["torch"])


@pytest.mark.slow
def test_a_backup_of_two_processes_is_not_resumed_on_one(data):
    root, demo = data
    if not backups(root / "two"):
        pytest.skip("needs the two-process run above")
    preset = json.loads(write_preset(root, demo, "two", batch_size=2).read_text())
    preset["training"]["steps"] = 6  # above the backup's step 4, as a resume needs
    finished = GenericTrainer(config_from_dict(preset), resume="latest").run()
    assert "written by a run on 2 process(es) and this one has 1" in finished.error


@pytest.mark.slow
def test_when_a_process_dies_the_other_saves_the_lora_and_names_the_backup(data, tmp_path):
    root, demo = data
    preset = json.loads(write_preset(root, demo, "dies", batch_size=2).read_text())
    preset["training"]["steps"] = 100_000
    preset["drift"] = {"every": 0}
    path = tmp_path / "dies.json"
    path.write_text(json.dumps(preset))
    run_dir = root / "dies"
    logs = tmp_path / "logs"  # each process's output in its own files
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    launch += ["2", "--log-dir", str(logs), "--redirects", "3"]
    launcher = subprocess.Popen(
        [*launch, "-m", "modules.cli", "train", str(path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or len(rows(run_dir)) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, "no step 3"
            time.sleep(0.5)
        (peer,) = [
            child
            for child in psutil.Process(launcher.pid).children()
            if child.environ().get("RANK") == "1"
        ]
        peer.kill()
        killed = time.monotonic()
        launcher.wait(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and ended < 60, ended
    (stdout,) = logs.rglob("0/stdout.log")
    (stderr,) = logs.rglob("0/stderr.log")
    said = stdout.read_text() + stderr.read_text()
    assert "Traceback" not in said and "unexpected error" not in said, said[-3000:]
    (error,) = [line for line in said.splitlines() if line.startswith("error: ")]
    saved = re.search(r"The LoRA of step (\d+) is saved to (\S+)\. ", error)
    assert saved and "another process of this run ended (" in error, error
    step, lora = int(saved[1]), saved[2]
    assert lora == str(run_dir / "lora.safetensors") and step == rows(run_dir)[-1]["step"]
    assert any("lora_B" in key for key in load_file(lora))
    newest = backups(run_dir)[-1]
    assert error.endswith(
        f"run the same command with --resume latest: it continues from {newest} "
        f"(step {read_backup(newest)[0]['step']})."
    ), error
