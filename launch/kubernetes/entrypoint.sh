#!/usr/bin/env bash
# The command of every pod of an acctrain job on Kubernetes: one `torchrun` per pod (a node), for that pod's
# processes, on train.py with this script's arguments (`[config.yaml] [key=value ...]`, as everywhere).
#
#   bash launch/kubernetes/entrypoint.sh /config/run.yaml output_dir=/runs/exp1
#
# Where the node layout comes from (torchrun's own PET_* names, so that both manifests speak one vocabulary):
#   PET_NNODES          pods in the job (a Kubeflow PyTorchJob sets it: Master + Workers)
#   PET_NPROC_PER_NODE  processes per pod: a number (the pod's GPUs), or `gpu` (torchrun counts them)
#   PET_NODE_RANK       this pod's rank, 0..PET_NNODES-1 (PyTorchJob: Master 0, Worker i is i+1); in a plain
#                       Indexed Job it is taken from JOB_COMPLETION_INDEX, which Kubernetes sets per pod
#   PET_MASTER_ADDR     the host of node 0 (PyTorchJob: the Master's Service; plain Job: `<job>-0.<service>`)
#   PET_MASTER_PORT     the rendezvous port on that host
# A missing or malformed value is refused (exit 2) with a message naming the variable, before torchrun starts.
# The rendezvous is static (fixed node count and ranks): `PET_NNODES=MIN:MAX` and another PET_RDZV_BACKEND
# (a PyTorchJob with elasticPolicy) are refused; for elastic jobs use launch/torchrun_elastic.sh.
#
# Optional: ACCTRAIN_SCRIPT (default train.py), TORCHRUN and PYTHON (command names), MASTER_WAIT_SECONDS (how
# long a pod waits for the master's DNS name to resolve, default 600: pod 0's record appears only once it runs).
#
# Preemption (the exit code 75 contract): Kubernetes sends SIGTERM to the container's PID 1, this script, and
# SIGKILLs every process terminationGracePeriodSeconds later. The script passes SIGTERM (and SIGUSR1) on to
# torchrun's workers, the training processes, which agree on a step on every pod, save a checkpoint and exit
# 75; torchrun itself is not signalled (it would kill its workers after its shutdown timeout, 30 s by
# default, and a checkpoint write may take longer). torchrun reports any failed worker as exit 1, so after a
# signal a failure is reported as 75: "preempted, checkpoint saved, restart me". The pod restarted by the job's
# restart policy runs the same command and continues from the newest complete checkpoint (resume=auto).
set -u
PREEMPTED_EXIT_CODE=75
USAGE_EXIT_CODE=2  # as train.py's config errors: a bad manifest, not a failure that a restart can fix

refuse() {
    echo "kubernetes/entrypoint.sh: $1" >&2
    exit "$USAGE_EXIT_CODE"
}

# Require variable $1 to be set and match the regex $2; $3 says what it must be.
require() {
    local name=$1 pattern=$2 what=$3
    [[ -n ${!name:-} ]] || refuse "$name is not set: $what"
    [[ ${!name} =~ $pattern ]] || refuse "$name='${!name}' is not valid: $what"
}

# The node layout from the environment (PyTorchJob, or an Indexed Job's JOB_COMPLETION_INDEX); refused if incomplete.
read_layout() {
    if [[ -n ${JOB_COMPLETION_INDEX:-} ]]; then  # a plain Indexed Job: the pod's index is its node rank
        [[ -z ${PET_NODE_RANK:-} || $PET_NODE_RANK == "$JOB_COMPLETION_INDEX" ]] \
            || refuse "PET_NODE_RANK='$PET_NODE_RANK' and JOB_COMPLETION_INDEX='$JOB_COMPLETION_INDEX' disagree: set only one"
        PET_NODE_RANK=$JOB_COMPLETION_INDEX
    fi
    [[ ${PET_NNODES:-} != *:* ]] || refuse "PET_NNODES='$PET_NNODES' is a MIN:MAX range (elastic): this entry point" \
        "runs a fixed number of pods; remove the PyTorchJob's elasticPolicy, or use launch/torchrun_elastic.sh"
    [[ -z ${PET_RDZV_BACKEND:-} || $PET_RDZV_BACKEND == static ]] || refuse "PET_RDZV_BACKEND='$PET_RDZV_BACKEND':" \
        "this entry point uses the static rendezvous (fixed pods and ranks); remove the PyTorchJob's elasticPolicy"
    require PET_NNODES '^[1-9][0-9]*$' "the number of pods in the job (PyTorchJob: set by the operator; plain Job: = parallelism)"
    require PET_NPROC_PER_NODE '^([1-9][0-9]*|gpu)$' \
        "processes per pod: the pod's GPUs (nvidia.com/gpu), or 'gpu'; 'auto' and 'cpu' are refused: on a pod without GPUs they start one process per CPU core"
    require PET_NODE_RANK '^(0|[1-9][0-9]*)$' "this pod's node rank (PyTorchJob: set by the operator; plain Job: JOB_COMPLETION_INDEX)"
    ((PET_NODE_RANK < PET_NNODES)) || refuse "PET_NODE_RANK=$PET_NODE_RANK is not below PET_NNODES=$PET_NNODES"
    require PET_MASTER_ADDR '^[^[:space:]]+$' "the host of node 0 (plain Job: <job>-0.<headless service>)"
    require PET_MASTER_PORT '^[1-9][0-9]*$' "the rendezvous port on PET_MASTER_ADDR"
    ((PET_MASTER_PORT <= 65535)) || refuse "PET_MASTER_PORT=$PET_MASTER_PORT is not a TCP port (1..65535)"
    [[ -f ${ACCTRAIN_SCRIPT:-train.py} ]] || refuse "${ACCTRAIN_SCRIPT:-train.py} not found in $PWD:" \
        "set the container's workingDir to the repository (/app in the project's image) or ACCTRAIN_SCRIPT"
}

# Wait until PET_MASTER_ADDR resolves: a headless Service publishes pod 0's name only once pod 0 exists.
wait_for_master() {
    local waited=0 limit=${MASTER_WAIT_SECONDS:-600}
    until "${PYTHON:-python}" -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$PET_MASTER_ADDR" 2>/dev/null; do
        ((waited < limit)) || refuse "PET_MASTER_ADDR=$PET_MASTER_ADDR did not resolve within $limit s" \
            "(MASTER_WAIT_SECONDS): check the Service name, the pods' subdomain, and that pod 0 is scheduled"
        ((waited % 30 == 0)) && echo "kubernetes/entrypoint.sh: waiting for $PET_MASTER_ADDR to resolve" >&2
        sleep 2
        waited=$((waited + 2))
    done
}

# Send signal $1 to the child processes of $2 (torchrun's workers), through /proc: slim images have no pkill.
signal_children() {
    local sig=$1 parent=$2 f line pid rest
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) }  # after "(command name) ": state, ppid, ...
        rest=${rest#* }
        [[ ${rest%% *} == "$parent" ]] && kill "-$sig" "$pid" 2>/dev/null
    done
    return 0
}

main() {
    read_layout
    wait_for_master
    # shellcheck disable=SC2206  # TORCHRUN may hold a command with arguments ("python -m torch.distributed.run")
    local cmd=(${TORCHRUN:-torchrun} --nnodes "$PET_NNODES" --nproc-per-node "$PET_NPROC_PER_NODE"
               --node-rank "$PET_NODE_RANK" --master-addr "$PET_MASTER_ADDR" --master-port "$PET_MASTER_PORT"
               --rdzv-backend static "${ACCTRAIN_SCRIPT:-train.py}" "$@")
    echo "kubernetes/entrypoint.sh: node $PET_NODE_RANK of $PET_NNODES: $(printf '%q ' "${cmd[@]}")"
    local signalled=""
    trap 'signalled=TERM' TERM
    trap 'signalled=USR1' USR1
    "${cmd[@]}" &  # in the background, so that the traps run at once rather than when torchrun ends
    local launcher=$! nap rc
    while kill -0 "$launcher" 2>/dev/null; do
        # Repeated until torchrun ends: a worker still starting up (before training) ignores the first one.
        [[ -n $signalled ]] && signal_children "$signalled" "$launcher"
        sleep 2 & nap=$!
        wait "$nap"  # returns at once when a trapped signal arrives
        kill "$nap" 2>/dev/null
    done
    wait "$launcher"; rc=$?
    if [[ -n $signalled && $rc -ne 0 ]]; then
        echo "kubernetes/entrypoint.sh: training stopped after SIG$signalled (torchrun exit $rc): exit $PREEMPTED_EXIT_CODE" >&2
        rc=$PREEMPTED_EXIT_CODE
    fi
    return "$rc"
}

main "$@"
exit $?
