"""``check`` makes every check ``train`` makes before loading the model, and errors are said
once: run as a user runs them, in a subprocess."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from modules.models.demo.family import build_demo_model, save_demo_model
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


# ------------------------------------------------------------- check says what train will say


def image_concept(tmp_path, mask_size=None):
    """One 64 x 64 image, with a mask of ``mask_size`` when given."""
    folder = tmp_path / "concept"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    if mask_size is not None:
        Image.new("L", mask_size, 255).save(folder / "a-masklabel.png")
    return folder


BOTH_COMMANDS = """
import contextlib, io, json, sys
from modules.cli.main import main
results = {}
for case, preset, run_dir in json.loads(sys.argv[1]):
    for command in ("check", "train"):
        error = io.StringIO()
        with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([command, preset, "--run-dir", run_dir])
            except Exception as crash:  # a result too: the case's test shows it
                code = f"{type(crash).__name__}: {crash}"
        results.setdefault(case, []).append([code, error.getvalue()])
print(json.dumps(results))
"""
"""Every case through ``check`` and ``train`` in one process, torch imported once."""


REFUSED_AT_THE_START = {
    "empty model.path": (
        {"model": {"family": "flux2", "path": ""}},
        "model.path: the flux2 family has no built-in weights; set model.path to a local "
        "FLUX.2 diffusers folder",
    ),
    "missing model.path": (
        {"model": {"family": "qwen_image", "path": "{tmp}/nowhere"}},
        "model.path: '{tmp}/nowhere' does not exist; point model.path at a local Qwen-Image "
        "diffusers folder",
    ),
    "FLUX.2 on a FLUX.1 folder": (
        {"model": {"family": "flux2", "path": "{flux1}"}},
        "model.path holds a FLUX.1 folder (FluxPipeline), not FLUX.2: use model.family=flux1",
    ),
    "WAN on a FLUX.1 folder": (
        {"model": {"family": "wan", "path": "{flux1}"}},
        "model.path holds a FLUX.1 folder (FluxPipeline), not WAN: use model.family=flux1",
    ),
    "Qwen-Image on a WAN folder": (
        {"model": {"family": "qwen_image", "path": "{wan}"}},
        "model.path holds a WAN folder (WanPipeline), not Qwen-Image: use model.family=wan",
    ),
    "a .safetensors file as model.path": (
        {"model": {"family": "flux1", "path": "{flux1}/transformer/"
                   "diffusion_pytorch_model.safetensors"}},
        "is a file, not a folder: model.path is a local FLUX.1 diffusers folder",
    ),
    "comfyui on the demo UNet": (
        {"output": {"format": "comfyui"}},
        "output.format=comfyui: the ComfyUI layout here is WAN's, and this model's denoiser is "
        "a UNet2DConditionModel; set output.format=diffusers",
    ),
    "the conv preset on a demo transformer": (
        {"model": {"family": "demo", "path": "{demo_wan}"}, "lora": {"targets": "attention_conv"}},
        "lora.targets=attention_conv: this model's denoiser (WanTransformer3DModel) has no such "
        "preset; choose one of attention, attention_ffn",
    ),
    "a mask of another size": (
        {"mask_size": (32, 64)},
        "mask '{tmp}/concept/a-masklabel.png' is 32×64 but its image is 64×64: re-export the "
        "mask at 64×64",
    ),
    "a file named logs": (
        {"output": {"log_with": "tensorboard"}, "logs_file": True},
        "output.log_with=tensorboard: {tmp}/run/logs is a file, not a folder, and the tracker "
        "writes its logs there; move or delete that file, or set output.log_with=none",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_flux1, tiny_wan):
    """Each case's folder, its expected line, and what ``check`` then ``train`` said of it
    (exit status, stderr), run in one process that is stopped should it grow past
    :data:`WATCHDOG_MB` (as FLUX.2 on a FLUX.1 folder did, to 23 GB; the bound of one refusal
    is :func:`test_flux2_on_a_flux1_folder_stops_within_a_few_hundred_mb`'s)."""
    demo_wan = tmp_path_factory.mktemp("demo") / "wan"
    save_demo_model(build_demo_model(seed=0, architecture="wan"), demo_wan)
    jobs, cases = [], {}
    for case, (sections, expected) in REFUSED_AT_THE_START.items():
        tmp = tmp_path_factory.mktemp("case")
        sections = json.loads(
            json.dumps(sections)
            .replace("{tmp}", str(tmp))
            .replace("{flux1}", str(tiny_flux1))
            .replace("{wan}", str(tiny_wan))
            .replace("{demo_wan}", str(demo_wan))
        )
        concept = image_concept(tmp, sections.pop("mask_size", None))
        if sections.pop("logs_file", False):
            (tmp / "run").mkdir()
            (tmp / "run" / "logs").write_text("not a folder")
        sections.setdefault("model", {"family": "demo"})
        sections["output"] = {"format": "diffusers", **sections.get("output", {})}
        jobs.append([case, preset(tmp, [{"path": str(concept)}], **sections), str(tmp / "run")])
        cases[case] = (tmp, expected.replace("{tmp}", str(tmp)))
    command = [sys.executable, "-c", BOTH_COMMANDS, json.dumps(jobs)]
    code, output, peak = run_with_peak_rss(command, WATCHDOG_MB, timeout=120)
    assert code == 0 and peak < WATCHDOG_MB, f"peak {peak:.0f} MB\n{output[-3000:]}"
    said = json.loads(output.strip().splitlines()[-1])
    return {case: (*cases[case], said[case]) for case in cases}


@pytest.mark.parametrize("case", list(REFUSED_AT_THE_START))
def test_check_says_what_train_says_at_the_start(case, refusals):
    """Each of these stopped ``train`` at its start (or, worse, not until the model had
    loaded, or never) while ``check`` said OK: both now refuse it with the same line, before
    a model loads or anything is cached."""
    tmp, expected, [[check_code, check_error], [train_code, train_error]] = refusals[case]
    assert (check_code, train_code) == (2, 2), (check_error, train_error)
    assert expected in check_error
    assert check_error.strip() == train_error.strip()  # word for word
    assert check_error.count("error: ") == 1
    assert not (tmp / "cache").exists()  # nothing cached, by the wrong VAE or any
    assert not (tmp / "run" / "lora.safetensors").exists()


# --------------------------------------------------------- a wrong folder never eats memory

PEAK_RSS_BOUND_MB = 800
"""A refused ``train`` imports torch, diffusers and accelerate and stops: measured 416 MB at
its peak on a CPU-only machine (``check``: 51 MB). Building FLUX.2's default-size Mistral 3
from a FLUX.1 folder's CLIP config grew past 23 GB; a tiny model that really loads and trains
one step peaks at about 550 MB."""
WATCHDOG_MB = 2000
"""Ten cases in one process add up what each imports and caches (about 950 MB measured), far
below the default-size text encoder that one wrong folder used to build."""


def run_with_peak_rss(command, bound_mb, timeout=180):
    """Run ``command`` and return (exit status, output, its peak RSS in MB); it is killed as
    soon as its RSS passes ``bound_mb`` (then the peak is reported above the bound), so a
    failing run cannot take the machine's memory.

    The peak is the process's own high-water mark (``VmHWM``), read every 20 ms: not
    ``ru_maxrss``, which on Linux keeps the RSS of the process before ``exec``, here this test
    process's (1.5 GB late in the suite). ``Popen`` returns once the ``exec`` has happened."""
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        peak = 0.0
        while True:
            rss, high_water = _memory_mb(process.pid)
            peak = max(peak, high_water, rss)
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if rss > bound_mb or time.monotonic() > deadline:
                process.kill()
                _, status, _ = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        return process.returncode, output.read(), peak


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB; zeros once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    values = {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in status.splitlines()
        if line.startswith(("VmRSS:", "VmHWM:"))
    }
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("command", ["train", "check"])
def test_flux2_on_a_flux1_folder_stops_within_a_few_hundred_mb(tmp_path, tiny_flux1, command):
    concept = image_concept(tmp_path)
    arguments = [sys.executable, "-m", "modules.cli", command, "presets/flux2-prior.json"]
    for override in (
        f"model.path={tiny_flux1}",
        f"data.concepts.0.path={concept}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ):
        arguments += ["--set", override]
    arguments += ["--run-dir", str(tmp_path / "run")]
    code, output, peak = run_with_peak_rss(arguments, PEAK_RSS_BOUND_MB)
    assert peak < PEAK_RSS_BOUND_MB, f"peak RSS {peak:.0f} MB\n{output[-2000:]}"
    assert code == 2, output
    assert (
        "error: model.path holds a FLUX.1 folder (FluxPipeline), not FLUX.2: use model.family=flux1"
    ) in output
    assert "Traceback" not in output
    assert not (tmp_path / "cache").exists()  # no latent was cached with FLUX.1's VAE
