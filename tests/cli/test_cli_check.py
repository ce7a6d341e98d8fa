"""``check`` makes every check ``train`` makes before loading the model, and errors are said
once: run as a user runs them, in a subprocess."""

import json
import subprocess
import sys

import pytest

from tests.cli.test_cli import REPO, cli


def preset(tmp_path, concepts, **sections):
    data = {
        "schema_version": 1,
        "data": {"concepts": concepts, "cache_dir": str(tmp_path / "cache")},
        "output": {"run_dir": str(tmp_path / "run")},
        **sections,
    }
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data))
    return str(path)


def empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


@pytest.mark.parametrize(
    ("concepts", "message"),
    [
        ([], "data.concepts: no concepts"),
        ([{"path": "/no/such/folder"}], "concept folder '/no/such/folder' does not exist"),
        ("empty", "has no images"),
    ],
)
@pytest.mark.parametrize("command", ["check", "train"])
def test_a_config_that_cannot_train_exits_2_in_check_and_train(
    tmp_path, command, concepts, message
):
    if concepts == "empty":
        concepts = [{"path": str(empty_folder(tmp_path))}]
    result = cli(command, preset(tmp_path, concepts))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    output = result.stdout + result.stderr
    assert output.count(message) == 1  # said once, not by a log handler, a status and the CLI
    assert "Traceback" not in output
    if command == "check":
        assert not (tmp_path / "run").exists()  # check writes nothing


def test_check_reports_a_missing_model_folder_and_every_missing_path_at_once(tmp_path):
    result = cli(
        "check",
        preset(
            tmp_path,
            [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}],
            model={"path": str(tmp_path / "model")},
        ),
    )
    assert result.returncode == 2
    assert "model.path:" in result.stderr
    assert f"'{tmp_path / 'a'}' does not exist" in result.stderr
    assert f"'{tmp_path / 'b'}' does not exist" in result.stderr


def test_check_refuses_a_run_folder_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("a file")
    result = cli("check", "presets/demo-prior.json", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "is a file, not a folder" in result.stderr


def test_check_says_the_notes_a_run_would_say(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (80, 80), (1, 2, 3)).save(folder / "a.png")
    Image.new("RGB", (80, 80), (1, 2, 3)).save(folder / "b.gif")
    result = cli("check", preset(tmp_path, [{"path": str(folder)}]))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 file in a format that is not read (b.gif)" in result.stdout
    assert "1 item without a caption file (a.png)" in result.stdout
    assert "OK (1 items in 1 concepts)" in result.stdout


@pytest.mark.slow
def test_a_missing_model_folder_in_train_is_said_once(tmp_path):
    result = cli(
        "train", "presets/demo-prior.json", "--set", f"model.path={tmp_path / 'nowhere'}",
        "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2
    assert (result.stdout + result.stderr).count("does not exist") == 1


@pytest.mark.slow
def test_an_unexpected_error_shows_one_traceback_and_one_error_line(tmp_path):
    """A bug in the trainer, as a user's terminal shows it: the CLI in a real process."""
    script = (
        "import sys\n"
        "from modules.cli import main\n"
        "from modules.trainer import generic_trainer\n"
        "def broken_setup(self):\n"
        "    raise RuntimeError('boom in setup')\n"
        "generic_trainer.GenericTrainer.setup = broken_setup\n"
        "sys.exit(main.main(sys.argv[1:]))\n"
    )
    arguments = ["train", "presets/demo-prior.json", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 1
    assert text.count("Traceback") == 1
    assert text.count("error: unexpected error: RuntimeError: boom in setup") == 1
