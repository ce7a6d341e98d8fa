"""The mask benchmark runs and prints a row per photograph with every stage."""

import subprocess
import sys
from pathlib import Path

from tests.masks.photos import require_models

REPO = Path(__file__).resolve().parents[2]


def test_the_masks_benchmark_prints_its_table():
    require_models()
    result = subprocess.run(
        [sys.executable, "benchmarks/masks.py", "--repeats", "1", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()[1:]
    assert "segmentation" in header and "hair (GrabCut)" in header and "whole generator" in header
    assert [row.split()[0] for row in rows] == ["astronaut", "camera"]
    assert all(len(row.split()) == 5 for row in rows)
