#!/usr/bin/env bash
# The main job on a fresh machine: virtual environment, the compiled extension, the default corpus (built from
# this Python installation, offline), then stratified sampling against Aioli on the two-group default setting
# (code + noise) over paired seeds. Tables, JSON, CSV and plots go to runs/main_job/.
#   bash scripts/main_job.sh [extra `aioli-ext compare` flags, e.g. --seeds 0-4 --jobs 2]
# About 10 minutes of compute on 2 idle cores after set-up (6 runs of 1000 steps, two at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/aioli-ext prepare
.venv/bin/aioli-ext compare --corpus runs/corpus --groups code,noise --methods stratified,aioli --seeds 0-2 \
  --jobs 2 --out runs/main_job --resume "$@"
