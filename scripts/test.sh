#!/usr/bin/env bash
# The README's "test" command: set up .venv if needed, then run the test suite (extra args go to pytest).
#   bash scripts/test.sh                  the locked versions (requirements/lock.txt), in .venv
#   bash scripts/test.sh --latest-deps    the newest versions pyproject.toml allows, in .venv-latest
set -euo pipefail
if [ "${1:-}" = "--latest-deps" ]; then
  shift
  export SWARM_DEPS=latest SWARM_VENV="${SWARM_VENV:-.venv-latest}"
fi
. "$(dirname "${BASH_SOURCE[0]}")/setup-venv.sh"
if [ "${SWARM_DEPS:-locked}" = latest ]; then
  echo "Testing with the newest allowed versions:"
  python -m pip list 2>/dev/null | grep -iE '^(transformers|peft|bitsandbytes|hivemind|torch|protobuf|numpy) '
fi
exec python -m pytest "$@"
