#!/usr/bin/env bash
# The one-call GPU acceptance check (see bench/gpu_check.py for what it checks and writes).
#
#   bash bench/gpu_check.sh --data-dir gpu_shards [--hellaswag hellaswag/hellaswag_val.jsonl]   # on the GPU machine
#   bash bench/gpu_check.sh --dry-run                                                          # on a CPU, tiny
#
# Runs with the machine's python3 (PYTHON overrides it); results in $OUT (else gpu_check_out):
# gpu_check.json (rewritten after every check: "finished" says whether the run got to its end) and
# gpu_check.log, nothing else; checkpoints go to a temp folder outside it. It ends within --budget
# (480 s) plus seconds: pass a smaller --budget when the machine's limit is under 600 s.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
