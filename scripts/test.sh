#!/usr/bin/env bash
# Set up (or reuse) .venv and run the test suite. README's test command.
#
#   bash scripts/test.sh                 # everything: unit, distributed (gloo), e2e
#   bash scripts/test.sh tests/unit -k config   # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The test environment has the [bench] extra too (TRL): the loss-parity test against TRL runs (and fails,
# instead of skipping, when TRL is missing from an environment set up with it).
export MEGATRON_RAL_EXTRAS="${MEGATRON_RAL_EXTRAS:-video,test,bench,plot}"
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
# Tests run on CPU with gloo; keep thread counts small so multi-process tests share 2 cores well.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ $# -eq 0 ]]; then
  set -- tests
fi
exec "$ROOT/.venv/bin/python" -m pytest "$@"
