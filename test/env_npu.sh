#!/usr/bin/env bash
# Ascend NPU environment (CANN toolkit + HCCL), sourced by the launch scripts only on NPU machines.
# Adjust ASCEND_HOME to your installation.
ASCEND_HOME=${ASCEND_HOME:-/usr/local/Ascend}
for f in "$ASCEND_HOME/ascend-toolkit/set_env.sh" "$ASCEND_HOME/nnae/set_env.sh"; do
  if [ -f "$f" ]; then source "$f"; break; fi
done
export HCCL_WHITELIST_DISABLE=1          # no IP whitelist between ranks
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}   # asynchronous operator dispatch
export COMBINED_ENABLE=1                 # fuse non-contiguous views
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}   # errors only
export ASCEND_SLOG_PRINT_TO_STDOUT=0
