#!/usr/bin/env bash
# train.sh: run train_gpt2.py under SLURM on one or more GPU nodes, requeueing the job before each
# time limit until training is finished. Without SLURM it runs torchrun on this machine.
#
#   sbatch train.sh                                    # one node, all the GPUs it was given
#   sbatch --nodes=4 train.sh --micro-batch-size 16    # 4 nodes, rendezvous on the first (32 GPUs x
#                                                      #   16 x 1024 = the 524,288 tokens of one step)
#   sbatch train.sh --max-steps 100 --model tiny       # arguments go to train_gpt2.py
#   sbatch train.sh --model gpt2-xl --parallel fsdp    # FSDP2: weights, gradients, optimizer sharded
#   LOG_DIR=runs/a DATA_DIR=/scratch/edu_fineweb10B HF_HOME=/scratch/hf sbatch train.sh
#   DRY_RUN=1 bash train.sh                            # print the launch command, run nothing
#   LOG_DIR=log_torchrun bash train.sh --demo          # no SLURM: torchrun here (the CPU demo)
#
# The #SBATCH lines you normally change: --gpus-per-node (the GPUs of one node), --cpus-per-task,
# --time (your partition's limit), --partition / --account (uncomment them). --nodes is usually
# given on the command line. Keep --signal, --requeue and --open-mode: the self-requeue needs them.
#
# Environment: LOG_DIR (default log: checkpoints, metrics.jsonl), DATA_DIR (token shards; default:
# train_gpt2.py's edu_fineweb10B), HF_HOME (Hugging Face cache, only for --init-from), PYTHON (default
# .venv/bin/python from `uv sync`), NPROC_PER_NODE (default: the GPUs SLURM gave the node, else the
# visible GPUs, else 1 process on CPU), MASTER_PORT (rendezvous port; default: a free one),
# MAX_REQUEUES (default 20), MAX_RESTARTS (default 3), DRY_RUN=1. A --log-dir argument wins over LOG_DIR.
#
# A dead training process (a kernel OOM kill, a GPU fault, SIGKILL): torchrun stops the others and
# starts every process again, up to MAX_RESTARTS times per launch, and train_gpt2.py resumes from the
# newest checkpoint (the steps since it are trained again, bitwise the same on CPU). 3 covers the
# rare transient fault of a day-long allocation. A user error (a bad flag, a corrupt shard, a
# micro-batch that does not fit: exit 2) is not restarted: each worker stops its torchrun after its
# one-line error (cli.stop_restarts), since every restart would meet the same error.
#
# Self-requeue (the job's time limit, or `scancel --signal=USR1 --batch JOBID` to stop it now):
#  1. SLURM sends USR1 to this batch shell only (B:), 300 s before the time limit.
#  2. This script is the one handler: it sends USR1 once to srun, which forwards it to every process
#     of the training step on every node. torchrun ignores it (the launcher wrapper sets it to
#     SIG_IGN); each training process sets a stop flag, the ranks agree at the next step, rank 0
#     writes <log dir>/model_NNNNN.pt and all exit 0.
#  3. srun exit 0 + the signal received + no <log dir>/model_final.pt (nor model_final/, the folder
#     of a --parallel fsdp run) = stopped: `scontrol requeue`;
#     the job restarts (same job id, same output file) and train_gpt2.py resumes from the newest
#     checkpoint (--resume auto). model_final.pt present = finished: no requeue. Any non-zero exit =
#     crashed: no requeue, the job fails with that code. At most MAX_REQUEUES requeues (counted by
#     SLURM_RESTART_COUNT); then the job fails and `sbatch train.sh` again continues the run.
#
#SBATCH --job-name=gpt2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproject
#
# ntasks-per-node=1: one torchrun launcher per node, which starts one training process per GPU.
# cpus-per-task: for that launcher and its processes (4 per GPU is plenty; the loader is a memmap).
# signal@300: enough for the step (and a HellaSwag eval) in flight plus a checkpoint write; raise
# it for gpt2-xl or a slow filesystem. open-mode=append: a requeued job appends to the same output.

set -euo pipefail

die() {
    echo "train.sh: error: $*" >&2
    exit 2
}

# sbatch runs a copy of this script from SLURM's spool: the repo is where `sbatch` was typed.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}}
cd "$REPO_DIR" || die "cannot cd to $REPO_DIR"
[ -f train_gpt2.py ] || die "no train_gpt2.py in $REPO_DIR: run sbatch from the repository root (or set REPO_DIR)"

# The venv that `uv sync` made, used directly: compute nodes need no uv, and several nodes starting
# at once never race to sync one shared .venv (which a plain `uv run` would do).
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[ -x "$PYTHON" ] || die "no Python at $PYTHON: run 'uv sync' in $REPO_DIR first (or set PYTHON)"
export PYTHONUNBUFFERED=1  # each step line reaches the SLURM output (and tail -f) at once

LOG_DIR=${LOG_DIR:-log}
log_dir=$LOG_DIR  # the one train_gpt2.py will use: argparse takes the last --log-dir given
prev=""
for arg in "$@"; do
    if [ "$prev" = --log-dir ]; then log_dir=$arg; fi
    case $arg in --log-dir=*) log_dir=${arg#--log-dir=} ;; esac
    prev=$arg
done
train_args=(--log-dir "$LOG_DIR")
if [ -n "${DATA_DIR:-}" ]; then train_args+=(--data-dir "$DATA_DIR"); fi
train_args+=("$@")

gpus_on_node() {
    if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case $CUDA_VISIBLE_DEVICES in
            "" | NoDevFiles | -1) echo 0 ;;
            *) tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
gpus=$(gpus_on_node)
NPROC_PER_NODE=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}  # no GPU: one process on CPU

MAX_RESTARTS=${MAX_RESTARTS:-3}
case $MAX_RESTARTS in '' | *[!0-9]*) die "MAX_RESTARTS must be a whole number >= 0, got '$MAX_RESTARTS'" ;; esac
# = torchrun, from whichever Python is in use
torchrun=("$PYTHON" -m torch.distributed.run --max-restarts="$MAX_RESTARTS")
if [ -z "${SLURM_JOB_ID:-}" ]; then
    cmd=("${torchrun[@]}" --standalone --nproc-per-node="$NPROC_PER_NODE" train_gpt2.py "${train_args[@]}")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        exit 0
    fi
    exec "${cmd[@]}"
fi

# ---- under SLURM: one torchrun per node, c10d rendezvous on the first node ----
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p || true)
[ -n "$head_node" ] || die "could not read the first node of SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
# The batch shell runs on the first node of the allocation, so a port free here is free there.
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

srun_args=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun of SLURM 22.05-23.02 does not inherit the job's --cpus-per-task: pass it on.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# torchrun would die of USR1 (its default action) and take the step down with it: it starts with USR1
# ignored. Its training processes install their own handler, so the signal stops them cleanly.
# shellcheck disable=SC2016  # $@ is expanded by the inner bash on each node, not here
launcher=(bash -c 'trap "" USR1; exec "$@"' torchrun)
cmd=("${srun_args[@]}" "${launcher[@]}" "${torchrun[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
    train_gpt2.py "${train_args[@]}")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

restarts=${SLURM_RESTART_COUNT:-0}
MAX_REQUEUES=${MAX_REQUEUES:-20}
echo "train.sh: job $SLURM_JOB_ID start $((restarts + 1)) at $(date '+%F %T'): $NNODES node(s) x $NPROC_PER_NODE" \
    "process(es), log dir $log_dir, data dir ${DATA_DIR:-(train_gpt2.py default)}, HF_HOME ${HF_HOME:-(unset)}"

stop_requested=0
launcher_pid=""
on_usr1() {
    # Handled once, however often it arrives. `return 0`: a bare return would pass on the status of
    # the `wait` the signal interrupted (138), and under set -e that non-zero trap would end the script.
    if [ "$stop_requested" = 1 ]; then return 0; fi
    stop_requested=1
    echo "train.sh: USR1 (time limit near): asking training to checkpoint and exit"
    if [ -n "$launcher_pid" ]; then kill -USR1 "$launcher_pid" 2>/dev/null || true; fi
    return 0
}
trap on_usr1 USR1

# In the background so the trap runs at once: bash delays traps until a foreground command ends.
"${cmd[@]}" &
launcher_pid=$!
while :; do
    status=0
    wait "$launcher_pid" || status=$?
    # > 128 with srun still alive: `wait` was interrupted by the trap, not srun's exit.
    if [ "$status" -gt 128 ] && kill -0 "$launcher_pid" 2>/dev/null; then continue; fi
    break
done

if [ "$status" -ne 0 ]; then
    echo "train.sh: training failed (exit $status): not requeued; see the messages above" >&2
    exit "$status"
fi
# The final checkpoint: model_final.pt, or the folder model_final/ of a --parallel fsdp run.
for final in "$log_dir/model_final.pt" "$log_dir/model_final"; do
    if [ -e "$final" ]; then
        echo "train.sh: training finished: $final"
        exit 0
    fi
done
if [ "$stop_requested" = 0 ]; then
    echo "train.sh: training exited 0 without $log_dir/model_final.pt (or model_final/) and without a stop signal: not requeued"
    exit 0
fi
if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
    echo "train.sh: stopped after $restarts requeues (MAX_REQUEUES=$MAX_REQUEUES): not requeued;" \
        "'sbatch train.sh' again continues from the checkpoint in $log_dir" >&2
    exit 1
fi
echo "train.sh: checkpoint saved; requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $MAX_REQUEUES)"
scontrol requeue "$SLURM_JOB_ID"
