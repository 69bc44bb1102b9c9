#!/usr/bin/env bash
# README command 2: install what is needed, then run the whole test suite
# (lint, types, unit and integration tests against real PostgreSQL, Prometheus and
# HAProxy, and the Kubernetes code against a fake API server over HTTP).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export ORCHESTRATE_LOG_FORMAT="${ORCHESTRATE_LOG_FORMAT:-json}"
echo "[test] ruff"; .venv/bin/ruff check orchestrator tests scripts
echo "[test] mypy --strict"; .venv/bin/mypy orchestrator
echo "[test] import contracts"; .venv/bin/lint-imports --no-cache
echo "[test] pytest"; # Two workers, one test file each at a time (module-scoped sandboxes stay on one
# worker); ORCHESTRATE_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/pytest -q -ra --durations=15 \
  -n "${ORCHESTRATE_TEST_WORKERS:-2}" --dist loadfile "$@"
