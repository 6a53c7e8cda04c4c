#!/usr/bin/env bash
# The prepared GPU check (issue "speed you can measure"): one call on a lent H100, under 8 minutes.
# GPT-2 124M at T=1024 on synthetic tokens: reference-equivalent settings (AdamW fused, compile,
# B=64, plain loss, PyTorch's attention choice) against each lever alone. Prints one JSON row per
# configuration (bench.py --json) and a copy under $OUT when the device tool provides it.
#
#   bash bench/gpu_levers.sh            # on the GPU machine, from the repo root (its own python3)
#
# 262,144 tokens per step (4 micro-steps of 64 x 1024) keeps each timed step short; tokens/s per
# micro-step is what the reference's 8-step accumulation would show, less the optimizer's share.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-.}
common=(--model gpt2 --seq-len 1024 --micro-batch-size 64 --tokens-per-step 262144 --steps 8 --warmup 3 --json)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
{
    "$PY" bench.py "${common[@]}"                                      # reference-equivalent
    "$PY" bench.py "${common[@]}" --loss-chunk-rows 8192               # memory-lean loss
    "$PY" bench.py "${common[@]}" --sweep attn_backend=flash,cudnn     # attention kernels
    "$PY" bench.py "${common[@]}" --micro-batch-size 32 --tokens-per-step 262144 --loss-chunk-rows 8192
} 2>&1 | tee "$out/gpu_levers.jsonl"
