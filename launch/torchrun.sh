#!/usr/bin/env bash
# torchrun example: one node, NPROC processes (GPUs, or CPU processes forming a gloo group).
#   NPROC=2 bash launch/torchrun.sh max_steps=100
# Several nodes: launch/torchrun_multinode.sh (one invocation per node), or launch/slurm.sbatch.
set -euo pipefail
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" train.py "$@"
