#!/usr/bin/env bash
# Set up orch on this machine: system tools (as root, via apt), a venv at .venv with the laptop
# install plus the worker extra (for the `local` target) and dev tools. Idempotent: a second run
# with an unchanged pyproject.toml installs nothing (a stamp file in .venv).
#
#   bash scripts/setup.sh            # laptop + worker + dev
#   ORCH_SETUP_EXTRAS=worker bash scripts/setup.sh
#
# One line per step; what apt and pip say goes to a log file, shown (the failing step's own tail)
# only when a step fails, and deleted when everything worked.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG=$(mktemp "${TMPDIR:-/tmp}/orch-setup.XXXXXX.log")
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# step "what" COMMAND...: one line saying what and how long; the command's output in $LOG.
# On failure, the last lines of that step's own output (not the earlier steps').
step() {
  local what=$1 t0=$SECONDS rc start
  shift
  start=$(($(wc -c <"$LOG") + 1))
  printf 'setup: %s ... ' "$what"
  if "$@" >>"$LOG" 2>&1; then
    echo "done ($((SECONDS - t0))s)"
  else
    rc=$?
    echo "FAILED"
    echo "---- last lines of what it said ($LOG):" >&2
    tail -c "+$start" "$LOG" | tail -n 40 >&2
    echo "setup: $what failed (exit $rc); full log: $LOG" >&2
    exit 1
  fi
}

apt_install() {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

need_apt=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
# The Slurm test cluster (tests/slurm/): a private munged + slurmctld + slurmd on loopback.
{ [ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null 2>&1; } || need_apt+=(slurm-wlm)
{ [ -x /usr/sbin/munged ] || command -v munged >/dev/null 2>&1; } || need_apt+=(munge)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "system tools: installing ${need_apt[*]} with apt-get" apt_install "${need_apt[@]}"
  else
    echo "setup: please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]}; brew install rsync tmux on macOS)" >&2
    exit 1
  fi
else
  echo "setup: system tools: ssh, sshd, rsync, tmux, slurm, munge present"
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python >= 3.10 is needed ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ -x .venv/bin/python ]; then
  echo "setup: venv: .venv ($(.venv/bin/python --version 2>&1)) present"
else
  step "venv: creating .venv with $("$PY" --version 2>&1)" "$PY" -m venv .venv
fi

extras=${ORCH_SETUP_EXTRAS:-worker,dev}
stamp=".venv/.orch-setup-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  echo "setup: orch[$extras]: installed, pyproject.toml unchanged (nothing to do)"
else
  step "pip: upgrading pip in .venv" .venv/bin/python -m pip install --upgrade pip
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on Linux.
  case ",$extras," in
    *,worker,*) step "torch: installing torch 2.13.0 (first time: a few minutes)" \
      .venv/bin/python -m pip install "torch==2.13.0" ;;
  esac
  step "orch: installing orch[$extras] and its deps" .venv/bin/python -m pip install -e ".[$extras]"
  rm -f .venv/.orch-setup-*
  touch "$stamp"
fi
rm -f "$LOG"
echo "setup: ready (.venv/bin/orch)"
