"""Nothing lost, nothing silent: the trainer against broken weights, disks, caches and data."""

import errno
import json
import queue
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modules.config import config_from_dict
from modules.demo.dataset import write_demo_dataset
from modules.trainer import FileSaved, GenericTrainer, StatusMessage
from modules.trainer import saving as trainer_module
from tests.trainer.test_generic_trainer import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


def make_config(concepts, tmp_path, **sections):
    data = {
        "data": {"concepts": concepts, "resolution": 32, "cache_dir": str(tmp_path / "cache")},
        "mask": {"enabled": True, "normalize_per_sample": True},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4},
        "training": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def subject(demo_root):
    return [{"path": str(demo_root / "subject")}]


def warnings_of(events):
    return [e.text for e in events if isinstance(e, StatusMessage) and e.level == "warning"]


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


# ------------------------------------------------------------------------- 1. non-finite LoRAs


def test_weights_that_turn_nan_on_the_last_step_are_never_saved(demo_root, tmp_path, monkeypatch):
    """A finite loss, then an optimizer step that makes a weight NaN on the last step: the run
    used to save that LoRA and report success."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    config = make_config(subject(demo_root), tmp_path, output={"save_every": 1, "name": "x"})
    finished, events = run(config)
    assert finished.error is not None
    assert "step 3: the LoRA weights became non-finite" in finished.error
    assert "x-step000002.safetensors" in finished.error and "finite" in finished.error
    assert finished.lora_path.name == "x-step000002.safetensors"
    saved = [e.path for e in events if isinstance(e, FileSaved)]
    assert [p.name for p in saved] == ["x-step000001.safetensors", "x-step000002.safetensors"]
    assert not (tmp_path / "run/x.safetensors").exists()
    assert all(all_finite(path) for path in (tmp_path / "run").glob("*.safetensors"))


def test_an_infinite_gradient_stops_before_the_step_that_would_break_the_weights(
    demo_root, tmp_path, monkeypatch
):
    original = GenericTrainer._train_step
    calls = {"n": 0}

    def infinite_gradient(self, batch):
        result = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # the loss stays finite; its gradient does not
            self.built.params[0].register_hook(lambda grad: grad * float("inf"))
        return result

    monkeypatch.setattr(GenericTrainer, "_train_step", infinite_gradient)
    config = make_config(subject(demo_root), tmp_path, output={"save_every": 1, "name": "x"})
    finished, _ = run(config)
    assert "step 2: the gradients are not finite" in finished.error
    assert finished.lora_path.name == "x-step000001.safetensors"
    assert all(all_finite(path) for path in (tmp_path / "run").glob("*.safetensors"))


# ------------------------------------------------------------------ 6. run-folder bookkeeping


def test_a_run_with_another_name_keeps_the_earlier_runs_metrics(demo_root, tmp_path):
    first, _ = run(make_config(subject(demo_root), tmp_path, output={"name": "first"}))
    assert first.error is None
    metrics = (tmp_path / "run/metrics.jsonl").read_text()
    second, events = run(make_config(subject(demo_root), tmp_path, output={"name": "second"}))
    assert second.error is None
    kept = list((tmp_path / "run/previous").iterdir())
    assert len(kept) == 1
    assert (kept[0] / "metrics.jsonl").read_text() == metrics
    assert {p.name for p in kept[0].iterdir()} >= {"first.safetensors", "first.json"}
    assert (tmp_path / "run/second.safetensors").is_file()
    assert not (tmp_path / "run/first.safetensors").exists()
    assert any(f"moved its files to {kept[0]}" in e.text for e in events if hasattr(e, "text"))


def test_a_run_that_fails_before_training_leaves_the_earlier_lora_in_place(demo_root, tmp_path):
    concept = tmp_path / "concept"
    shutil.copytree(demo_root / "subject", concept)
    assert run(make_config([{"path": str(concept)}], tmp_path))[0].error is None
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    # Fails after the model has loaded, while encoding: an image that is not one.
    (concept / "broken.png").write_bytes(b"not a png")
    finished, _ = run(make_config([{"path": str(concept)}], tmp_path))
    assert finished.error_kind == "config" and "broken.png" in finished.error
    assert not (tmp_path / "run/previous").exists()
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


def test_the_users_own_files_in_the_run_folder_stay_where_they_are(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.json").write_text('{"my": "notes"}')
    preset = '{"schema_version": 1, "output": {"name": "lora", "save_every": 5}}'
    (run_dir / "my-preset.json").write_text(preset)  # a preset the user keeps with the run
    (run_dir / "readme.txt").write_text("mine")
    assert run(make_config(subject(demo_root), tmp_path))[0].error is None
    assert run(make_config(subject(demo_root), tmp_path))[0].error is None
    assert (run_dir / "notes.json").read_text() == '{"my": "notes"}'
    assert (run_dir / "readme.txt").read_text() == "mine"
    assert (run_dir / "my-preset.json").read_text() == preset


# ------------------------------------------------------------------- 8. run folder and disk


def test_a_run_folder_that_is_a_file_is_refused_before_the_model_loads(demo_root, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    finished, _ = run(make_config(subject(demo_root), tmp_path))
    assert finished.error_kind == "config"
    assert f"output.run_dir: '{tmp_path / 'run'}' is a file" in finished.error
    assert "unexpected" not in finished.error


def test_a_run_folder_that_cannot_be_created_names_the_file_in_the_way(demo_root, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    config = make_config(
        subject(demo_root), tmp_path, output={"run_dir": str(tmp_path / "blocker/run")}
    )
    finished, _ = run(config)
    assert finished.error_kind == "config"
    assert "blocker" in finished.error and "cannot be created" in finished.error


def test_a_read_only_run_folder_is_refused(demo_root, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("modules.trainer.run_folder.tempfile.TemporaryFile", read_only)
    finished, _ = run(make_config(subject(demo_root), tmp_path))
    assert finished.error_kind == "config"
    assert "is not writable (Read-only file system)" in finished.error


def test_a_full_disk_keeps_training_and_saves_once_there_is_space(demo_root, tmp_path, monkeypatch):
    """The final save fails twice (no space), then succeeds: the LoRA of the whole run is saved
    and the previous file at that path stayed intact meanwhile."""
    assert run(make_config(subject(demo_root), tmp_path))[0].error is None
    old_lora = (tmp_path / "run/lora.safetensors").read_bytes()
    original = trainer_module.save_lora
    failures = {"left": 3}  # the step-2 save and two tries of the final one
    seen_during_failure = []

    def full_disk(denoiser, path, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            if path.exists():
                seen_during_failure.append(path.read_bytes())
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(denoiser, path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_lora", full_disk)
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_SECONDS", 0.01)
    config = make_config(subject(demo_root), tmp_path, output={"save_every": 2})
    finished, events = run(config)
    assert finished.error is None
    assert finished.lora_path == tmp_path / "run/lora.safetensors"
    warnings = warnings_of(events)
    assert any("could not save" in w and "the disk is full" in w for w in warnings)
    assert any("trying again every" in w for w in warnings)
    assert (tmp_path / "run/lora.safetensors").read_bytes() != old_lora
    assert (tmp_path / "run/previous").is_dir()  # the earlier run's LoRA was moved, not lost
    kept = next((tmp_path / "run/previous").iterdir())
    assert (kept / "lora.safetensors").read_bytes() == old_lora


def test_giving_up_on_a_failed_final_save_names_the_lora_that_is_kept(
    demo_root, tmp_path, monkeypatch
):
    from modules.trainer import Command

    original = trainer_module.save_lora
    events, commands = queue.Queue(), queue.Queue()

    def full_for_the_final_save(denoiser, path, **kwargs):
        if "step" in path.name:
            return original(denoiser, path, **kwargs)
        commands.put(Command.STOP)  # the user gives up while it retries
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(trainer_module, "save_lora", full_for_the_final_save)
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_SECONDS", 0.01)
    config = make_config(subject(demo_root), tmp_path, output={"save_every": 2})
    finished = GenericTrainer(config, events, commands).run()
    assert finished.error_kind == "training"
    assert "could not be saved to" in finished.error
    assert "the last saved LoRA is" in finished.error and "lora-step000002" in finished.error
    assert finished.lora_path.name == "lora-step000002.safetensors"


# ---------------------------------------------------------------------- 11. damaged cache


def test_a_damaged_cache_file_is_encoded_again_and_said(demo_root, tmp_path):
    assert run(make_config(subject(demo_root), tmp_path))[0].error is None
    files = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # a copy cut short
    finished, events = run(make_config(subject(demo_root), tmp_path))
    assert finished.error is None
    assert any("is damaged" in w and "making it again" in w for w in warnings_of(events))
    assert len(files[0].read_bytes()) > 100


# ------------------------------------------------------------------ 5. masks without weight


def _concept(tmp_path, masks):
    folder = tmp_path / "concept"
    folder.mkdir()
    for index, value in enumerate(masks):
        Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text("a red square")
        if isinstance(value, tuple):
            Image.new("RGB", (32, 32), value).save(folder / f"img{index}-masklabel.png")
        else:
            Image.new("L", (32, 32), value).save(folder / f"img{index}-masklabel.png")
    return [{"path": str(folder)}]


def test_black_masks_are_counted_and_a_dataset_without_weight_is_refused(tmp_path):
    concepts = _concept(tmp_path, [0, 0, 255, 128])
    finished, events = run(make_config(concepts, tmp_path))
    assert finished.error is None
    warned = [w for w in warnings_of(events) if "no weight anywhere" in w]
    assert len(warned) == 1 and "2 of 4 masks" in warned[0]
    assert "img0-masklabel.png" in warned[0] and "img1-masklabel.png" in warned[0]

    for path in (tmp_path / "concept").glob("*-masklabel.png"):
        Image.new("L", (32, 32), 0).save(path)
    finished, _ = run(make_config(concepts, tmp_path))
    assert finished.error_kind == "config"
    assert "no mask has any weight" in finished.error
    assert not list((tmp_path / "run").glob("previous/*"))  # refused: nothing moved


def test_a_minimum_weight_gives_black_masks_weight(tmp_path):
    concepts = _concept(tmp_path, [0, 0])
    config = make_config(concepts, tmp_path, prior={"weight": 0.0}, mask={"min_weight": 0.05})
    finished, events = run(config)
    assert finished.error is None
    assert not [w for w in warnings_of(events) if "no weight" in w]


def test_a_coloured_mask_is_named(tmp_path):
    concepts = _concept(tmp_path, [255, (255, 0, 0)])
    finished, events = run(make_config(concepts, tmp_path))
    assert finished.error is None
    coloured = [w for w in warnings_of(events) if "coloured" in w]
    assert len(coloured) == 1 and "img1-masklabel.png" in coloured[0]


# ------------------------------------------------------------- 13. said once, at the start


def test_notes_at_the_start_skipped_files_captions_small_images_long_captions(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (48, 48), (10, 200, 30)).save(folder / f"{name}.png")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(folder / "tiny.png")
    (folder / "a.txt").write_text("a green square")
    (folder / "b.txt").write_text("   \n")
    (folder / "d.txt").write_text("a green square " + "with more words " * 20)
    (folder / "tiny.txt").write_text("a green square")
    Image.new("RGB", (48, 48)).save(folder / "e.gif")
    Image.new("RGB", (48, 48)).save(folder / "f.bmp")
    (folder / "g.png").symlink_to(folder / "gone.png")
    config = make_config(
        [{"path": str(folder), "caption": {"default": "a square"}}],
        tmp_path,
        mask={"enabled": False},
        prior={"weight": 0.0},
        training={"steps": 1, "mixed_precision": "fp16"},
    )
    finished, events = run(config)
    assert finished.error is None, finished.error
    warnings = warnings_of(events)

    def one(text):
        found = [w for w in warnings if text in w]
        assert len(found) == 1, (text, warnings)
        return found[0]

    skipped = one("skipped")
    assert "2 files in a format that is not read (e.gif, f.bmp)" in skipped
    assert "1 broken link (g.png)" in skipped
    captions = one("without a caption file")
    assert "1 item without a caption file and 1 item with an empty one" in captions
    assert "the default caption 'a square'" in captions
    assert "1 image upscaled to the training size (data.resolution=32" in one("upscaled")
    assert "tiny.png" in one("upscaled")
    long = one("longer than the")
    assert "1 of 3 distinct captions" in long and "96 tokens" in long
    assert "fp16 does nothing on a CPU" in one("fp16")


def test_metrics_rows_survive_a_disk_that_refuses_them_for_a_while(tmp_path, monkeypatch):
    from pathlib import Path

    from modules.trainer.run_folder import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.start()
    original = Path.open
    refused = {"left": 2}

    def sometimes_full(self, mode="r", *args, **kwargs):
        handle = original(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and mode == "a" and refused["left"] > 0:
            refused["left"] -= 1
            handle.write('{"step": 0, "half a')  # a write cut short by the full disk
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr(Path, "open", sometimes_full)
    results = [log.append({"step": step}) for step in (1, 2, 3)]
    assert [r is None for r in results] == [False, False, True]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1}, {"step": 2}, {"step": 3}]
