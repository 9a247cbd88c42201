#!/usr/bin/env bash
# torchrun, elastic: workers that fail are restarted, and a job that loses nodes carries on with those left.
# Run it on every node with the same RDZV_ENDPOINT and RDZV_ID (no node ranks: the rendezvous assigns them).
#
#   every node:  NNODES=2:4 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=exp1 bash launch/torchrun_elastic.sh my_run.yaml output_dir=/shared/runs/exp1
#
# NNODES: MIN:MAX nodes (or N): the job starts with MAX nodes (or MIN, once RDZV_LAST_CALL seconds have passed
#   without more), and after a node is lost it goes on with the nodes left as long as there are MIN.
# MAX_RESTARTS: how often each node's agent restarts its workers after a failure (default 3).
# NPROC: processes per node (default: the GPUs nvidia-smi lists, or 1 without GPUs).
# RDZV_CONF: extra rendezvous settings (e.g. is_host=true on the node that hosts the endpoint).
#
# Each round, the workers resume from the newest complete checkpoint in output_dir (resume=auto), on however
# many processes the round has, with the same global batch and data position: output_dir must be on a
# filesystem every node shares. The c10d rendezvous store lives in the agent on the endpoint's host, so that
# node must survive (an etcd rendezvous backend removes that single point). A hang, or a rank that never
# joins, ends the workers after hang_timeout (exit 124), which the agent counts as a failure and restarts.
set -euo pipefail
: "${NNODES:?set NNODES (MIN:MAX nodes, e.g. 2:4)}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of the rendezvous)}"
if [[ -z ${NPROC:-} ]]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ $NPROC -ge 1 ]] || NPROC=1
fi
conf="last_call_timeout=${RDZV_LAST_CALL:-30}${RDZV_CONF:+,$RDZV_CONF}"
# shellcheck disable=SC2086  # TORCHRUN and ACCTRAIN_SCRIPT may hold several words ("python -m ...", "-m module")
exec ${TORCHRUN:-torchrun} --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
    --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-acctrain}" --rdzv_conf "$conf" \
    --max-restarts "${MAX_RESTARTS:-3}" --monitor-interval "${MONITOR_INTERVAL:-1}" \
    ${ACCTRAIN_SCRIPT:-train.py} "$@"
