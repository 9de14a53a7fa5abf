#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the built-in demo: synthetic Task03-like data -> nnU-Net pipeline ->
# short UNet++ training -> validation Dice and training FPS. Extra arguments go to nnpp_demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/nnpp_demo "$@"
