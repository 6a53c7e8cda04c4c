#!/usr/bin/env bash
# The one-call GPU acceptance check (see bench/gpu_check.py for what it checks and writes).
#
#   bash bench/gpu_check.sh --data-dir gpu_shards [--hellaswag hellaswag/hellaswag_val.jsonl]   # on the GPU machine
#   bash bench/gpu_check.sh --dry-run                                                          # on a CPU, tiny
#
# Runs with the machine's python3 (PYTHON overrides it); results in $OUT (else gpu_check_out):
# gpu_check.json and gpu_check.log.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
