#!/usr/bin/env bash
# Create .venv and install the requirements (torch first, pinned, so pip takes the CPU wheel
# instead of resolving a newer CUDA build). Idempotent: does nothing when requirements.txt has
# not changed since the last install. Then fetches the mask generator's model files once
# (skipped when present).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    torch_pin=$(grep -E '^torch==' requirements.txt)
    echo "Installing $torch_pin, then requirements.txt"
    .venv/bin/python -m pip install --quiet "$torch_pin"
    .venv/bin/python -m pip install --quiet -r requirements.txt
    echo "$want" > "$stamp"
fi

# The person-mask models (MediaPipe's .tflite files, Apache 2.0), taken once from its PyPI wheel.
# Training does not need them: without internet access the rest still works, and the mask
# generator says how to fetch them.
.venv/bin/python scripts/fetch_mask_models.py \
    || echo "warning: the mask models could not be fetched; run bash scripts/setup.sh again with internet access to make person masks"
