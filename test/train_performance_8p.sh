#!/usr/bin/env bash
# Throughput on 8 device(s): nnpp_train --other_use fps (ends with the [nnpp fps] line). Overrides: see _launch.sh.
MODE=fps NPROC=${NPROC:-8} source "$(dirname "$0")/_launch.sh"
