#!/usr/bin/env bash
# The README's "test" command: set up .venv if needed, then run the test suite (extra args go to pytest).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup-venv.sh"
exec python -m pytest "$@"
