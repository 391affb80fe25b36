#!/usr/bin/env bash
# Run the whole test suite. Tests of the service need the machine's PostgreSQL
# (127.0.0.1:5432) and Redis (127.0.0.1:6379): start them here when they are down.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure_services.sh
exec .venv/bin/python -m pytest -q "$@"
