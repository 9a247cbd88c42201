#!/usr/bin/env bash
# torchrun on several nodes: run this on every node with the same NNODES, MASTER_ADDR and MASTER_PORT and
# the node's own NODE_RANK (0 on the node at MASTER_ADDR). Arguments go to train.py.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh my_run.yaml output_dir=/shared/runs/exp1
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh my_run.yaml output_dir=/shared/runs/exp1
#
# NPROC: processes per node (default: the GPUs nvidia-smi lists, or 1 without GPUs); MASTER_PORT default 29500.
# Rendezvous is static (fixed node count and ranks, the TCP store on MASTER_ADDR:MASTER_PORT); every node
# must reach that address. output_dir must be on a filesystem all nodes share, under the same path: every
# rank writes its part of a checkpoint (rank 0 most of it) and reads it on resume (resume=auto, the default).
# On a cluster with a scheduler use launch/slurm.sbatch (accelerate launch, requeue on preemption).
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
if [[ -z ${NPROC:-} ]]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ $NPROC -ge 1 ]] || NPROC=1
fi
exec "${TORCHRUN:-torchrun}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --rdzv_backend static \
    "${ACCTRAIN_SCRIPT:-train.py}" "$@"
