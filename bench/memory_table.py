"""Memory per GPU of a training step: GPT-2 medium / large / xl x {ddp, fsdp} x {activation
checkpointing off, on}, from a formula over parameter counts taken from the model built on the `meta`
device (no memory, no GPU); and, for sizes that fit this machine, one real CPU step's peak memory
next to the formula's prediction for it.

    uv run bench/memory_table.py                                      # the table (8 GPUs, bf16 autocast)
    uv run bench/memory_table.py --gpus 16 --micro-batch-sizes 4 8    # another cluster, other batches
    uv run bench/memory_table.py --measure gpt2-medium                # + a real CPU step (fp32): measured vs formula
    uv run bench/memory_table.py --measure tiny --parallel fsdp --ranks 2   # the same under FSDP2, 2 gloo ranks

The formula (bytes per GPU; P parameters, N GPUs, L layers, d width, V = 50,304 padded vocab,
R = micro-batch x seq-len tokens per micro-step):

  weights         4P (fp32 master)                              fsdp: 4P/N
  gradients       4P (fp32)                                     fsdp: 4P/N
  DDP buckets     4P (DDP's flat copy of the gradients to all-reduce; N > 1)
  optimizer       AdamW 8P (exp_avg, exp_avg_sq)                fsdp: 8P/N
  compute copies  CUDA: 2P (autocast's bf16 copy of each weight, kept for backward)
                  fsdp CUDA: 2 x 2 x P_block (one block gathered + the next prefetched, bf16) + 2 x P_root
                  (wte/wpe/ln_f gathered for the whole step; fp32 on CPU: 4 x ...)
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

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import field, parse_config  # noqa: E402
from model import MODEL_PRESETS, GPT, GPTConfig  # noqa: E402
from parallel import STRATEGIES  # noqa: E402

GiB = 2**30
TABLE_SIZES = ("gpt2-medium", "gpt2-large", "gpt2-xl")
ACTIVATION_BYTES = {"bf16": 38, "fp32": 68}  # per layer, per token, per unit of width (see the docstring)


@dataclass(frozen=True)
class MemoryConfig:
    models: tuple[str, ...] = field(TABLE_SIZES, "model presets to tabulate", choices=tuple(MODEL_PRESETS))
    gpus: int = field(8, "GPUs the run is spread over (one node of H100s)")
    micro_batch_sizes: tuple[int, ...] = field((4, 8, 16, 32), "micro-batch sizes to tabulate")
    seq_len: int = field(1024, "tokens per sequence")
    grad_accum: int = field(1, "micro-steps per optimizer step (> 1 adds FSDP's unsharded gradients)")
    loss_chunk_rows: int = field(0, "the trainer's --loss-chunk-rows (0: full logits)")
    gpu_gib: float = field(80.0, "GPU memory to compare with (H100 80 GB)")
    precision: str = field("bf16", "bf16 (CUDA autocast, fused AdamW) or fp32 (CPU, foreach AdamW)", choices=("bf16", "fp32"))
    measure: str = field("", "also run one real CPU training step of this model and print its peak memory next to the formula's", choices=("", *MODEL_PRESETS))
    parallel: str = field("ddp", "--measure: ddp (one process, no wrapper) or fsdp", choices=STRATEGIES)
    ranks: int = field(1, "--measure: processes (gloo) for --parallel fsdp")
    micro_batch_size: int = field(1, "--measure: rows per micro-step")
    activation_checkpointing: bool = field(False, "--measure: with activation checkpointing")
    json_out: str = field("", "also write the rows as JSON lines here")


def parameter_counts(model_name: str) -> dict[str, int]:
    """Parameters of the whole model, of one block, of the root (embeddings + ln_f), from a model
    built on the meta device (shapes only: no memory, no init)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**MODEL_PRESETS[model_name]))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    total = model.num_params()
    return {"total": total, "block": block, "root": total - block * model.config.n_layer,
            "layers": model.config.n_layer, "width": model.config.n_embd, "vocab": model.config.padded_vocab_size}


def memory_bytes(model_name: str, parallel: str, activation_checkpointing: bool, micro_batch_size: int,
                 seq_len: int, gpus: int, grad_accum: int = 1, precision: str = "bf16",
                 loss_chunk_rows: int = 0) -> dict[str, float]:
    """The docstring's formula: bytes per GPU, by component, and "total"."""
    n = parameter_counts(model_name)
    P, L, d, V = n["total"], n["layers"], n["width"], n["vocab"]
    rows = micro_batch_size * seq_len
    shard = gpus if parallel == "fsdp" else 1
    compute = 2 if precision == "bf16" else 4  # bytes of the weights a matmul reads
    parts = {
        "weights": 4 * P / shard,
        "gradients": 4 * P / shard,
        "ddp_buckets": 4 * P if parallel == "ddp" and gpus > 1 else 0,
        "optimizer": 8 * P / shard,
    }
    if parallel == "fsdp":
        parts["compute_copies"] = compute * (2 * n["block"] + n["root"]) if gpus > 1 or precision == "bf16" else 0
        parts["accumulation"] = 4 * P if grad_accum > 1 else 0
    else:
        parts["compute_copies"] = 2 * P if precision == "bf16" else 0
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


def table(cfg: MemoryConfig) -> list[dict]:
    rows = []
    for model_name in cfg.models:
        for parallel in STRATEGIES:
            for ac in (False, True):
                for mbs in cfg.micro_batch_sizes:
                    parts = memory_bytes(model_name, parallel, ac, mbs, cfg.seq_len, cfg.gpus, cfg.grad_accum,
                                         cfg.precision, cfg.loss_chunk_rows)
                    rows.append({"model": model_name, "parallel": parallel, "activation_checkpointing": ac,
                                 "micro_batch_size": mbs, **{k: v / GiB for k, v in parts.items()}})
    return rows


def print_table(rows: list[dict], cfg: MemoryConfig) -> None:
    precision = "bf16 autocast, fused AdamW" if cfg.precision == "bf16" else "fp32, foreach AdamW"
    print(f"GiB per GPU, {cfg.gpus} GPUs, seq-len {cfg.seq_len}, {precision}, grad accumulation "
          f"{cfg.grad_accum}{f', --loss-chunk-rows {cfg.loss_chunk_rows}' if cfg.loss_chunk_rows else ''} "
          f"(fits: total <= {cfg.gpu_gib:.0f} GB minus ~2 GiB of CUDA context)")
    print("| model | parallel | AC | micro-batch | weights+grads+optimizer | other model state | activations | logits | total | fits |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    budget = cfg.gpu_gib * 1e9 / GiB - 2
    for r in rows:
        state = r["weights"] + r["gradients"] + r["optimizer"]
        other = r["ddp_buckets"] + r["compute_copies"] + r.get("accumulation", 0)
        print(f"| {r['model']} | {r['parallel']} | {'on' if r['activation_checkpointing'] else 'off'} | "
              f"{r['micro_batch_size']} | {state:.1f} | {other:.1f} | {r['activations']:.1f} | {r['logits']:.1f} | "
              f"{r['total']:.1f} | {'yes' if r['total'] <= budget else 'no'} |")


# ---- one real CPU step ------------------------------------------------------------------------------
def measure_step(cfg: MemoryConfig) -> dict:
    """Peak memory (max RSS of each rank) of two real training steps on the CPU (the second has the
    AdamW state), minus the process's RSS before the model was built; with the formula for fp32."""
    from train_gpt2 import TrainConfig, build_run, train_step  # noqa: PLC0415 - heavy imports only here
    import runtime  # noqa: PLC0415
    from bench import SyntheticLoader  # noqa: PLC0415

    dist_info = runtime.setup_distributed("cpu")
    seq_len = min(cfg.seq_len, GPTConfig(**MODEL_PRESETS[cfg.measure]).block_size)
    rows_per_step = cfg.micro_batch_size * seq_len * dist_info.world_size
    train_cfg = TrainConfig(model=cfg.measure, seq_len=seq_len, micro_batch_size=cfg.micro_batch_size,
                            tokens_per_step=rows_per_step * cfg.grad_accum, device="cpu", compile=False,
                            val_every=0, hellaswag_every=0, sample_every=0, parallel=cfg.parallel,
                            activation_checkpointing=cfg.activation_checkpointing, loss_chunk_rows=cfg.loss_chunk_rows,
                            spike_guard=0, warmup_steps=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loader = SyntheticLoader(cfg.micro_batch_size, seq_len, 50257, pin_memory=False, seed=dist_info.rank)
    run = build_run(train_cfg, dist_info, train_loader=loader)
    for step in range(2):
        train_step(run, step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = memory_bytes(cfg.measure, cfg.parallel, cfg.activation_checkpointing, cfg.micro_batch_size, seq_len,
                             dist_info.world_size, cfg.grad_accum, precision="fp32", loss_chunk_rows=cfg.loss_chunk_rows)
    result = {"model": cfg.measure, "parallel": cfg.parallel, "ranks": dist_info.world_size,
              "activation_checkpointing": cfg.activation_checkpointing, "micro_batch_size": cfg.micro_batch_size,
              "seq_len": seq_len, "rank": dist_info.rank, "measured_gib": (peak - before) / GiB,
              "predicted_gib": predicted["total"] / GiB, "seconds": time.perf_counter() - started,
              "predicted_parts_gib": {k: round(v / GiB, 3) for k, v in predicted.items()}}
    runtime.teardown_distributed()
    return result


def main(argv=None) -> int:
    cfg = parse_config(MemoryConfig, argv, __doc__)
    if cfg.measure and cfg.ranks > 1 and "RANK" not in os.environ:  # start the ranks, as torchrun would
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.ranks}",
               __file__, *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd).returncode
    if cfg.measure:
        result = measure_step(cfg)
        print(json.dumps(result))
        if cfg.json_out:
            with open(f"{cfg.json_out}.rank{result['rank']}" if result["ranks"] > 1 else cfg.json_out, "w") as f:
                f.write(json.dumps(result) + "\n")
        return 0
    rows = table(cfg)
    print_table(rows, cfg)
    if cfg.json_out:
        Path(cfg.json_out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
