#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run the offline pipeline on bundled samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
dagan demo "$@"
