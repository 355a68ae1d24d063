#!/usr/bin/env bash
# Create .venv and install every part of diffstack into it (idempotent).
#   scripts/setup.sh         the service: core, server, clients, plugins
#   scripts/setup.sh --dev   plus the test and lint tools
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine, install the CUDA torch you want into .venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements.txt
[[ "${1:-}" == "--dev" ]] && requirements=requirements-dev.txt

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${DIFFSTACK_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r "$requirements"
