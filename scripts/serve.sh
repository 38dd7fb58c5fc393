#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the live avatar service on the bundled weights.
# Open http://127.0.0.1:8000 in a browser (extra arguments go to `dagan serve`, e.g. --host 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec dagan serve "$@"
