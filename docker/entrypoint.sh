#!/usr/bin/env bash
# The images' entrypoint: `accelerate launch "$@"`, made to save a checkpoint on `docker stop`.
#
# A container's first process is PID 1, and the kernel delivers PID 1 no signal it has no handler for:
# `accelerate launch` as PID 1 never sees docker stop's SIGTERM, and Docker SIGKILLs the container after the
# grace period, without a checkpoint. This script is PID 1 instead. On SIGTERM (docker stop) or SIGUSR1 it
# sends that signal to the launcher's workers, the training processes, which finish the optimizer step, save
# a checkpoint and exit 75; it repeats the signal every 2 s until the launcher ends (a worker still starting
# up may miss the first). The launcher itself is not signalled: with one process it would exit at once and
# its worker would be killed with the container; torchrun kills its workers 30 s after its own SIGTERM.
# Launchers report a worker's exit 75 as 1, so after a signal any failure is reported as 75 (preempted:
# checkpoint saved, restart to resume). With `docker run --init`, tini is PID 1 and passes signals on to this
# script, which works the same.
set -u
PREEMPTED_EXIT_CODE=75
signalled=""

# Send signal $1 to the launcher's child processes (/proc: slim images have no pkill).
signal_workers() {
    local child
    for child in $(cat /proc/"$launcher"/task/*/children 2>/dev/null); do
        kill -s "$1" "$child" 2>/dev/null
    done
}

trap 'signalled=TERM; signal_workers TERM' TERM
trap 'signalled=USR1; signal_workers USR1' USR1
"${ACCELERATE:-accelerate}" launch "$@" &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do
    [[ -n $signalled ]] && signal_workers "$signalled"
    sleep 2 & nap=$!
    wait "$nap"  # returns at once when a trapped signal arrives
done
wait "$launcher"; rc=$?
if [[ -n $signalled && $rc -ne 0 ]]; then
    echo "entrypoint: training stopped after SIG$signalled (launcher exit $rc): exit $PREEMPTED_EXIT_CODE" >&2
    rc=$PREEMPTED_EXIT_CODE
fi
exit "$rc"
