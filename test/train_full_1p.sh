#!/usr/bin/env bash
# Full UNet++ training + validation on 1 device(s) (ends with per-class Dice). Overrides: see _launch.sh.
MODE=train NPROC=${NPROC:-1} source "$(dirname "$0")/_launch.sh"
