"""The memory benchmark at its small size on the CPU (one family, one round): every variant
measured through the real training step, block swap's transfers, the teacher unchanged by the
swap, each storage form's dtype, the estimate's error for the weights and optimizer state; its
real-size configs are the published models; ``--size real`` without CUDA says what it needs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from accelerate import init_empty_weights

from benchmarks.memory import MODELS, main, parameter_counts, published_config
from modules.config.schema import ModelConfig
from modules.models import get_family
from modules.models.memory_estimate import PUBLISHED

WAN_VARIANTS = ["masked", "teacher", "swap 1", "swap 2", "swap 4", "bf16", "fp8", "int8", "nf4"]
"""The small WAN's 4 blocks: a quarter, half and all of them swapped; the preset's fp8_scaled
is the teacher's form, the other forms each a row."""
STORED = {
    "fp8_scaled": "uint8 codes (fp8_scaled)",
    "auto": "bfloat16",
    "fp8": "float8_e4m3fn",
    "int8": "int8 codes (int8)",
    "nf4": "uint8 codes (nf4)",
}


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """The benchmark's printed table and its ``--json`` rows, for the small WAN."""
    path = tmp_path_factory.mktemp("memory-benchmark") / "rows.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["--families", "wan", "--size", "small", "--rounds", "1", "--steps", "1",
              "--json", str(path)])  # fmt: skip
    return out.getvalue(), json.loads(path.read_text())


def test_every_variant_is_measured_with_its_mechanics(wan_run):
    """Each variant trained (a ratio to ``masked``, no note); N swapped blocks are copied 3N
    times per step (the teacher, the student's forward, its backward) and none without the
    swap; the teacher's prediction with blocks swapped equals the unswapped model's (==); each
    form's weights are stored in its dtype."""
    _, payload = wan_run
    rows = payload["rows"]
    assert payload["size"] == "small"
    assert [row["variant"] for row in rows] == WAN_VARIANTS
    for row in rows:
        assert row["note"] == "", row
        assert row["ratio"] is not None and row["ratio"] > 0
        assert row["peak_gb"] is None and row["seconds_per_step"] is None  # a CPU: ratios only
        assert row["storage_ok"] is True and row["stored_as"] == STORED[row["base_weights"]]
        swap = row["blocks_to_swap"]
        if swap:
            assert row["transfers_per_step"] == 3 * swap
            assert row["teacher_unchanged"] is True
        else:
            assert row["transfers_per_step"] == 0
            assert row["teacher_unchanged"] is None
    assert rows[0]["ratio"] == 1.0 and rows[0]["prior_weight"] == 0.0


def test_the_estimate_of_weights_and_state_is_within_15_percent(wan_run):
    """The estimate's base weights + LoRA, gradients and optimizer state, read from the small
    model's files, against the bytes allocated after a step (with swap: the resident blocks
    and the two in flight), for every storage form and swap count."""
    _, payload = wan_run
    for row in payload["rows"]:
        assert row["measured_gb"] > 0
        assert abs(row["estimate_error_pct"]) < 15, row
    by_name = {row["variant"]: row for row in payload["rows"]}
    assert by_name["swap 4"]["measured_gb"] < by_name["teacher"]["measured_gb"]
    assert by_name["nf4"]["measured_gb"] < by_name["int8"]["measured_gb"]
    assert by_name["int8"]["measured_gb"] < by_name["bf16"]["measured_gb"]


def test_the_table_prints_every_row_with_ratios_not_times(wan_run):
    out, payload = wan_run
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header, _, *body = lines
    assert "x masked" in header and "| s/step |" not in header
    assert len(body) == len(payload["rows"])
    assert [line.split("|")[2].strip() for line in body] == WAN_VARIANTS
    assert all(line.split("|")[5].strip().endswith("x") for line in body)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_real_configs_are_the_published_models(name):
    """Built on the meta device, each real config has the parameters per block and outside the
    blocks that the memory estimate's PUBLISHED table gives the released model."""
    with init_empty_weights(include_buffers=False):
        denoiser = MODELS[name].transformer(**published_config(name, "real"))
    blocks, outside = parameter_counts(denoiser, get_family(ModelConfig(family=name)))
    published = PUBLISHED[name]["14b" if name == "wan" else ""]
    assert blocks == published.blocks
    assert outside == published.outside


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real size runs where CUDA is")
def test_the_real_size_without_cuda_says_it_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--size", "real", "--families", "wan"])
    assert exit.value.code == 2
    assert "--size real needs a CUDA GPU" in capsys.readouterr().err
