#!/bin/sh
# orch run wrapper: started by `orch launch` inside `tmux new-session -d`.
#
#   sh run_wrapper.sh RUN_DIR -- COMMAND [ARG...]
#
# Sources and deletes RUN_DIR/.secrets.env (0600, written by the launcher), runs COMMAND with
# stdout/stderr appended to RUN_DIR/stdout.log, writes the command's pid to RUN_DIR/pid, and
# writes RUN_DIR/exit_code atomically WHATEVER happens: the command's exit status, 128+N when
# it died of signal N, 128+N when the wrapper itself got SIGHUP/SIGINT/SIGTERM (tmux
# kill-session hangs the pane up). POSIX sh only: the box may have no bash.
set -u

run_dir=$1
shift
if [ "${1:-}" = "--" ]; then
    shift
fi

child=""
done_=0

write_atomic() {  # write_atomic FILE TEXT: temp file in the same dir, then rename
    tmp="$1.tmp.$$"
    printf '%s\n' "$2" >"$tmp" && mv -f "$tmp" "$1"
}

finish() {  # finish CODE: record the exit code once, then exit with it
    if [ "$done_" = 0 ]; then
        done_=1
        write_atomic "$run_dir/exit_code" "$1"
    fi
    exit "$1"
}

on_signal() {  # the session was killed or the wrapper signalled: stop the child, record 128+N
    trap '' HUP INT TERM
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        # Give the worker a moment to write .run_failed, then make sure it is gone.
        n=0
        while kill -0 "$child" 2>/dev/null && [ "$n" -lt 50 ]; do
            sleep 0.2
            n=$((n + 1))
        done
        kill -KILL "$child" 2>/dev/null
    fi
    finish $((128 + $1))
}

trap 'on_signal 1' HUP
trap 'on_signal 2' INT
trap 'on_signal 15' TERM

mkdir -p "$run_dir" || exit 1
cd "${ORCH_CODE_DIR:-.}" 2>/dev/null || true

# Secrets: read once into the environment, then removed from the box's disk.
if [ -f "$run_dir/.secrets.env" ]; then
    set -a
    . "$run_dir/.secrets.env"
    set +a
    rm -f "$run_dir/.secrets.env"
fi

if [ "$#" -eq 0 ]; then
    printf 'run_wrapper: no command given\n' >>"$run_dir/stdout.log"
    finish 2
fi

# The child runs in the background so that the traps above fire while we wait for it.
"$@" </dev/null >>"$run_dir/stdout.log" 2>&1 &
child=$!
write_atomic "$run_dir/pid" "$child"
wait "$child"
code=$?
finish "$code"
