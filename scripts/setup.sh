#!/usr/bin/env bash
# Create .venv (if missing) and install nnpp into it. torch 2.14.1 / torchvision 0.29.1 are pinned because
# nnunetv2 pulls torchvision through timm and these are the releases the project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,onnx]"
