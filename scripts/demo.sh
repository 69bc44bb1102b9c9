#!/usr/bin/env bash
# README command 1: install what is needed, then run a whole blue-green release of
# the demo shop on this machine (PostgreSQL 16 -> 17, HAProxy, Prometheus, live load).
#   ./scripts/demo.sh               # expect: promoted
#   ./scripts/demo.sh --fail-green  # expect: rolled back by the canary analysis
#   ./scripts/demo.sh --keep        # leave the sandbox running afterwards (Ctrl-C stops it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m orchestrator.sandbox.demo "$@"
