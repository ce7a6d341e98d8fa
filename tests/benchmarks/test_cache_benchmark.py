"""The cache benchmark runs and prints its three timings and the two sizes per item."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_cache_benchmark_prints_its_table():
    result = subprocess.run(
        [sys.executable, "benchmarks/cache.py", "--images", "6", "--size", "64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "start again on the filled cache" in out and "latents 6 reused, 0 encoded" in out
    assert "masks 0 reused, 6 made" in out.split("repainted")[1]
    assert "one file per item" in out and "split (now)" in out
