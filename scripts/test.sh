#!/usr/bin/env bash
# Run the whole test suite on this machine, doing all set-up first (system tools, venv, deps):
#
#   bash scripts/test.sh            # lint, import contracts, types, all tests
#   bash scripts/test.sh -k monitor # extra args go to pytest
#
# Integration tests use real OpenSSH sshd, tmux and rsync on 127.0.0.1; with CI=true a missing
# tool fails the run instead of skipping. pytest exits non-zero when no test is collected.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1

echo "== ruff"
ruff check .
ruff format --check . >/dev/null || { echo "ruff format: files need formatting (run: .venv/bin/ruff format .)"; exit 1; }
echo "== import contracts"
lint-imports
python scripts/import_cycles.py  # every module of the four packages, function-level imports too
echo "== mypy (state, orchestrator)"
mypy
echo "== pytest"
# Two test processes (ORCH_TEST_WORKERS=1 for one); worksteal balances the few long scenarios.
exec python -m pytest -q -p no:cacheprovider --durations=25 \
  -n "${ORCH_TEST_WORKERS:-2}" --dist worksteal "$@"
