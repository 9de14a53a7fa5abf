#!/usr/bin/env bash
# Full UNet++ training + validation on 8 device(s) (ends with per-class Dice). Overrides: see _launch.sh.
MODE=train NPROC=${NPROC:-8} source "$(dirname "$0")/_launch.sh"
