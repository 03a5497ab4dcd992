#!/usr/bin/env bash
# Set up orch on this machine: system tools (as root, via apt), a venv at .venv with the laptop
# install plus the worker extra (for the `local` target) and dev tools. Idempotent: a second run
# with an unchanged pyproject.toml installs nothing.
#
#   bash scripts/setup.sh            # laptop + worker + dev
#   ORCH_SETUP_EXTRAS=worker bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]}; brew install rsync tmux on macOS)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python >= 3.10 is needed ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

extras=${ORCH_SETUP_EXTRAS:-worker,dev}
stamp=".venv/.orch-setup-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing orch[$extras] into .venv (first time takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on Linux.
  case ",$extras," in *,worker,*) .venv/bin/python -m pip install -q "torch==2.13.0" ;; esac
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.orch-setup-*
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/orch)"
