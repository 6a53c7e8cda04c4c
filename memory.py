"""How much memory a training step needs per process, from a formula over the model's parameter
counts, and whether this machine has it: the trainer refuses a run that cannot fit before it builds
anything (`--no-memory-check` to try anyway). bench/memory_table.py tabulates the same formula and
checks it against real steps.

    uv run python -c "import memory; \\
        print(memory.memory_bytes('gpt2-xl', 'fsdp', True, 8, 1024, gpus=8)['total'] / 2**30)"

The formula (bytes per GPU; P parameters, N GPUs, L layers, d width, V = 50,304 padded vocab,
R = micro-batch x seq-len tokens per micro-step):

  weights         4P (fp32 master)                              fsdp: 4P/N
  gradients       4P (fp32)                                     fsdp: 4P/N
  DDP buckets     4P (DDP's flat copy of the gradients to all-reduce; N > 1)
  optimizer       AdamW 8P (exp_avg, exp_avg_sq)                fsdp: 8P/N
  compute copies  CUDA: 2P (autocast's bf16 copy of each weight, kept for backward)
                  fsdp: 2 x 2 x P_block (one block gathered + the next prefetched, bf16) + 4 x P_root
                  (wte/wpe/ln_f gathered in fp32 for the whole step; fp32 blocks on CPU: 4 x ...)
  accumulation    fsdp with grad accumulation > 1: 4P (unsharded fp32 gradients kept between the
                  micro-steps: reduce-scatter runs on the last one only)
  activations     per layer, per token: a x d bytes, a = 38 under bf16 autocast (fp32 residual and
                  LayerNorm inputs 2 x 4d, bf16 c_attn/c_proj/c_fc inputs 3 x 2d, q/k/v and the
                  attention output 4 x 2d, GELU input and output 2 x 8d), a = 68 in fp32 (CPU);
                  x L x R. Activation checkpointing keeps each block's input (4d x L x R) and one
                  block's activations (a x d x R) while it is recomputed.
  logits          12 V R at the start of backward: the fp32 log-softmax output saved by the loss, its
                  gradient and the gradient of the logits (--loss-chunk-rows K: 12 V K)

  optimizer step  foreach AdamW (CPU) adds a temporary of 4P (fsdp: 4P/N); fused AdamW (CUDA) none

Peak = the larger of the sum of the above (gradients of earlier micro-steps are alive while the next
one's activations are: an upper bound for one micro-step per step) and weights + gradients +
optimizer + the optimizer step's temporaries. Not counted: the CUDA context and NCCL buffers (~1-2
GiB), allocator fragmentation, torch.compile's workspace. Measured on the CPU (BENCHMARKS.md): within
10% of real steps of gpt2-medium and gpt2-large, above them when activations dominate.
"""

from __future__ import annotations

from pathlib import Path

import torch

import runtime
from cli import UserError
from model import GPT, GPTConfig
from train_config import MODEL_PRESETS

GiB = 2**30
# per layer, per token, per unit of width (see the docstring); fp16 keeps what bf16 keeps, in as many bytes
ACTIVATION_BYTES = {"bf16": 38, "fp16": 38, "fp32": 68}


def parameter_counts(model_name: str) -> dict[str, int]:
    """Parameters of the whole model, of one block, of the root (embeddings + ln_f), from a model
    built on the meta device (shapes only: no memory, no init)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**MODEL_PRESETS[model_name]))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    total = model.num_params()
    return {
        "total": total,
        "block": block,
        "root": total - block * model.config.n_layer,
        "layers": model.config.n_layer,
        "width": model.config.n_embd,
        "vocab": model.config.padded_vocab_size,
    }


def memory_bytes(
    model_name: str,
    parallel: str,
    activation_checkpointing: bool,
    micro_batch_size: int,
    seq_len: int,
    gpus: int,
    grad_accum: int = 1,
    precision: str = "bf16",
    loss_chunk_rows: int = 0,
) -> dict[str, float]:
    """The docstring's formula: bytes per GPU, by component, and "total"."""
    n = parameter_counts(model_name)
    P, L, d, V = n["total"], n["layers"], n["width"], n["vocab"]
    rows = micro_batch_size * seq_len
    shard = gpus if parallel == "fsdp" else 1
    compute = 4 if precision == "fp32" else 2  # bytes of the weights a matmul reads
    parts = {
        "weights": 4 * P / shard,
        "gradients": 4 * P / shard,
        "ddp_buckets": 4 * P if parallel == "ddp" and gpus > 1 else 0,
        "optimizer": 8 * P / shard,
    }
    if parallel == "fsdp":
        # the root's weights stay fp32 under the bf16 policy (parallel.FSDPParallel.mixed_precision)
        parts["compute_copies"] = compute * 2 * n["block"] + 4 * n["root"] if gpus > 1 or precision != "fp32" else 0
        parts["accumulation"] = 4 * P if grad_accum > 1 else 0
    else:
        parts["compute_copies"] = 2 * P if precision != "fp32" else 0
    a = ACTIVATION_BYTES[precision]
    if activation_checkpointing:
        parts["activations"] = 4 * d * L * rows + a * d * rows
    else:
        parts["activations"] = a * d * L * rows
    parts["logits"] = 12 * V * (loss_chunk_rows if loss_chunk_rows else rows)
    # The optimizer step: foreach AdamW (the CPU's) makes a temporary the size of its shard of the
    # weights; fused AdamW (CUDA, the trainer's default there) makes none.
    step_temporaries = 4 * P / shard if precision == "fp32" else 0
    model_state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    parts["total"] = max(sum(parts.values()), model_state + step_temporaries)
    return parts


# Besides the formula: the CUDA context and NCCL's buffers on a GPU; Metal's command buffers and the
# MPS allocator's caches on a Mac; the interpreter, torch and the data loader's pages on the host.
OVERHEAD_BYTES = {"cuda": 1.5 * GiB, "mps": 1.5 * GiB, "cpu": 0.75 * GiB}


def overhead_bytes(device_type: str) -> float:
    """What a process holds on `device_type` besides the formula's parts (an unknown type: a GPU's)."""
    return OVERHEAD_BYTES.get(device_type, OVERHEAD_BYTES["cuda"])


def available_bytes(device: torch.device, local_ranks: int = 1) -> tuple[float, str]:
    """(bytes one process may use on `device`, where the number comes from). A GPU: what is free on
    it now; Apple's MPS: Metal's working-set budget. The host: MemAvailable, or the cgroup's limit (a
    SLURM job's --mem) if lower, shared by the processes of this node."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = f"{torch.cuda.get_device_name(device)} has {free / GiB:.1f} GiB free"
        if free < total / 2:  # a fresh process sees nearly all of it: the rest is another process's
            where += f" of {total / GiB:.0f} (another process holds the rest: see nvidia-smi)"
        return free, where
    if device.type == "mps":  # unified memory: Metal's budget for one process's GPU allocations, not RAM free
        budget = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return budget, (
            f"this Mac's GPU may use {budget / GiB:.1f} GiB (Metal's recommended working set, "
            "torch.mps.recommended_max_memory(), less what this process holds there)"
        )
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return float("inf"), "unknown"
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    where = f"this machine has {available / GiB:.1f} GiB available"
    limit = _cgroup_room()
    if limit is not None and limit < available:
        available, where = limit, f"this job's memory limit leaves {limit / GiB:.1f} GiB"
    if local_ranks > 1:
        where += f", {available / local_ranks / GiB:.1f} GiB for each of its {local_ranks} processes"
    return available / local_ranks, where


def _cgroup_room() -> float | None:
    """Bytes left under this process's cgroup v2 memory limit, if one is set."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def check_fits(needed: dict[str, float], device: torch.device, local_ranks: int = 1) -> None:
    """ValueError (one line) when `needed` (memory_bytes' parts) plus the overhead exceeds what this
    process may use on `device`."""
    have, where = available_bytes(device, local_ranks)
    want = needed["total"] + overhead_bytes(device.type)
    if want <= have:
        return
    biggest = sorted(((v, k) for k, v in needed.items() if k != "total"), reverse=True)[:3]
    parts = ", ".join(f"{name.replace('_', ' ')} {v / GiB:.1f}" for v, name in biggest)
    raise UserError(
        f"this run needs about {want / GiB:.1f} GiB per process ({parts} GiB, by memory.py's formula) and "
        f"{where}: use --parallel fsdp over more ranks, --activation-checkpointing, a smaller "
        "--micro-batch-size or --model (or --no-memory-check to try anyway)"
    )


MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # --micro-batch-size auto's candidates: the recipe's 64, halving


def largest_micro_batch(
    model_name: str,
    parallel: str,
    activation_checkpointing: bool,
    seq_len: int,
    tokens_per_step: int,
    gpus: int,
    precision: str,
    loss_chunk_rows: int,
    device: torch.device,
    local_ranks: int = 1,
) -> tuple[int, float, float, str]:
    """--micro-batch-size auto on this machine: `fitting_micro_batch` against what this process may use
    on `device`. (micro-batch, bytes it needs with the overhead, bytes there are, where that comes from)."""
    have, where = available_bytes(device, local_ranks)
    args = (model_name, parallel, activation_checkpointing, seq_len, tokens_per_step, gpus, precision, loss_chunk_rows)
    micro_batch, need = fitting_micro_batch(*args, have, device.type)
    return micro_batch, need, have, where


def fitting_micro_batch(
    model_name: str,
    parallel: str,
    activation_checkpointing: bool,
    seq_len: int,
    tokens_per_step: int,
    gpus: int,
    precision: str,
    loss_chunk_rows: int,
    have: float,
    device_type: str = "cuda",
) -> tuple[int, float]:
    """The largest of MICRO_BATCHES that splits a step evenly over the ranks and that, by the formula
    (with the chunked loss when it is on), fits in `have` bytes with the device's overhead; the
    smallest that splits it when none fits (the memory check then refuses the run). (micro-batch,
    bytes it needs with the overhead)."""
    splits = [m for m in MICRO_BATCHES if tokens_per_step % (m * seq_len * gpus) == 0]
    if not splits:
        raise UserError(
            f"--tokens-per-step {tokens_per_step} is not a multiple of --seq-len {seq_len} x {gpus} rank(s): no "
            "micro-batch splits it"
        )
    for micro_batch in splits:
        accumulation = tokens_per_step // (micro_batch * seq_len * gpus)
        parts = memory_bytes(
            model_name,
            parallel,
            activation_checkpointing,
            micro_batch,
            seq_len,
            gpus,
            accumulation,
            precision,
            loss_chunk_rows,
        )
        need = parts["total"] + overhead_bytes(device_type)
        if need <= have:
            break
    return micro_batch, need


def refuse_if_too_big(needed: dict[str, float], device: torch.device, local_ranks: int = 1) -> None:
    """`check_fits` on every rank, agreed: each rank measures its own device (one GPU of a shared node
    may still be held by a stale process) and every rank raises the first refusal, which names that
    rank and its host, so that no rank is left waiting in a collective for one that has left."""
    problem = None
    try:
        check_fits(needed, device, local_ranks)
    except UserError as e:
        problem = str(e)
    problem = runtime.first_problem(problem)
    if problem:
        raise UserError(problem)
