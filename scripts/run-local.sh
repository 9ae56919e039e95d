#!/usr/bin/env bash
# The README's "run" command: set up .venv if needed, then start a local swarm on the default model,
# generate a reply through it and stop (pass --keep-running to leave it up; --help for options).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup-venv.sh"
exec swarm-local "$@"
