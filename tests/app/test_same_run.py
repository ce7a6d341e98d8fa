"""One preset, one run: the UI and the headless CLI train the same numbers."""

import json
import subprocess
import sys

import pytest

from tests.app.driving import REPO, pump, settle

pytestmark = [pytest.mark.ui, pytest.mark.slow]

STEPS = 8
PRESET = "presets/demo-prior.json"
LOSSES = ("loss_total", "loss_target", "loss_prior", "target_weight_mean", "prior_weight_mean")


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    # The drift meter's step-0 reading is a row of its own, without losses: compare step rows.
    keys = ("step", "lr", *LOSSES)
    return [{key: row[key] for key in keys} for row in rows if "loss_total" in row]


def test_the_ui_and_the_cli_train_the_same_run_from_one_preset(window, tmp_path):
    overrides = {"training.steps": STEPS, "data.resolution": 32}
    cli_dir, ui_dir = tmp_path / "cli", tmp_path / "ui"
    command = [sys.executable, "-m", "modules.cli", "train", PRESET, "--run-dir", str(cli_dir)]
    for path, value in {**overrides, "data.cache_dir": tmp_path / "cli-cache"}.items():
        command += ["--set", f"{path}={value}"]
    # Both run at once to keep the test short; each has its own run and cache folders.
    cli = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    assert window.load_preset_file(REPO / PRESET)
    for path, value in {
        **overrides,
        "data.cache_dir": str(tmp_path / "ui-cache"),
        "output.run_dir": str(ui_dir),
    }.items():
        window.form.row(path).set(value)
    settle(window)
    window.run_panel.start_button.invoke()
    pump(window, lambda: window.run_panel.state == "idle", 300, "the UI run to finish")
    assert window.run_panel.last_end.error is None

    output, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, output.decode()
    ui_metrics, cli_metrics = metrics(ui_dir), metrics(cli_dir)
    assert len(ui_metrics) == STEPS
    assert ui_metrics == cli_metrics  # exactly: the seeds make CPU runs deterministic
    ui_config = json.loads((ui_dir / "lora.json").read_text())
    cli_config = json.loads((cli_dir / "lora.json").read_text())
    for config in (ui_config, cli_config):
        del config["output"]["run_dir"], config["data"]["cache_dir"]
    assert ui_config == cli_config
