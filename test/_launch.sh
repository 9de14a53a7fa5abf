#!/usr/bin/env bash
# Shared body of the launch scripts (sourced). Everything is overridable from the environment:
#   DATASET (3)  CONFIG (3d_fullres)  FOLD (0)  DEVICE (auto)  AMP (auto)  TRAINER (nnUNetPlusPlusTrainer)
#   NPROC (1 or 8)  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   BATCH_SIZE (default: the plans batch on every device, global batch = NPROC x plans batch; when set, it is
#              the global batch: a copy of the plans with it, split across the ranks with --dbs)
#   EPOCHS / ITERS (nnU-Net defaults)  PYTHON (python3)  LOG_DIR (test/output)  EXTRA_ARGS
# MODE is set by the calling script: train | fps.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
DATASET=${DATASET:-3}; CONFIG=${CONFIG:-3d_fullres}; FOLD=${FOLD:-0}
DEVICE=${DEVICE:-auto}; AMP=${AMP:-auto}; TRAINER=${TRAINER:-nnUNetPlusPlusTrainer}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-$HERE/output}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/${MODE}_${NPROC}p_$(date +%Y%m%d_%H%M%S).log"

if [ "$DEVICE" = npu ] || { [ "$DEVICE" = auto ] && [ -d "${ASCEND_HOME:-/usr/local/Ascend}" ]; }; then
  source "$HERE/env_npu.sh"
fi

ARGS=("$DATASET" "$CONFIG" "$FOLD" -tr "$TRAINER" -device "$DEVICE" --amp "$AMP")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${ITERS:-}" ] && ARGS+=(--iters "$ITERS")
[ "$MODE" = fps ] && ARGS+=(--other_use fps)
if [ -n "${BATCH_SIZE:-}" ]; then
  # a copy of the plans with the new batch size (same preprocessed data), the original stays untouched
  PLANS="nnUNetPlans_bs${BATCH_SIZE}"
  "$PYTHON" -m nnpp.tools.change_bs -path "${nnUNet_preprocessed:?set nnUNet_preprocessed}" -d "$DATASET" \
      -c "$CONFIG" -size "$BATCH_SIZE" --copy_to "$PLANS" || exit 2
  ARGS+=(-p "$PLANS")
fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})

if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  if [ "$NODE_RANK" = 0 ] && ! "$PYTHON" -c "import sys; from nnpp.distributed import port_is_free; sys.exit(not port_is_free(int(sys.argv[1])))" "$MASTER_PORT"; then
    echo "error: MASTER_PORT $MASTER_PORT is already in use (another run?); set MASTER_PORT to a free port" >&2
    exit 2
  fi
  if [ -n "${BATCH_SIZE:-}" ]; then
    ARGS+=(--dbs)
    echo "[$(basename "$0")] global batch $BATCH_SIZE (BATCH_SIZE), split across $((NPROC * NNODES)) ranks"
  else
    echo "[$(basename "$0")] global batch = $((NPROC * NNODES)) ranks x the plans batch per device (set BATCH_SIZE for a global batch split across the ranks)"
  fi
  CMD=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK"
       --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m nnpp.run.train "${ARGS[@]}")
else
  CMD=("$PYTHON" -m nnpp.run.train "${ARGS[@]}")
fi

echo "[$(basename "$0")] ${CMD[*]}" | tee "$LOG"
"${CMD[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "------------------------------------------------------------ summary ($LOG)"
if [ "$MODE" = fps ]; then
  grep "\[nnpp fps\]" "$LOG"
else
  grep -E "^Dice |^Training FPS" "$LOG"
fi
exit "$rc"
