"""Memory per GPU of a training step: GPT-2 medium / large / xl x {ddp, fsdp} x {activation
checkpointing off, on}, from a formula over parameter counts taken from the model built on the `meta`
device (no memory, no GPU); and, for sizes that fit this machine, one real CPU step's peak memory
next to the formula's prediction for it.

    uv run bench/memory_table.py                                      # the table (8 GPUs, bf16 autocast)
    uv run bench/memory_table.py --gpus 16 --micro-batch-sizes 4 8    # another cluster, other batches
    uv run bench/memory_table.py --measure gpt2-medium                # + a real CPU step (fp32): measured vs formula
    uv run bench/memory_table.py --measure tiny --parallel fsdp --ranks 2   # the same under FSDP2, 2 gloo ranks

The formula and what it leaves out: memory.py (the trainer refuses a run that cannot fit with it).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from cli import STRATEGIES, field, parse_config  # noqa: E402
from train_config import MODEL_PRESETS, context_length  # noqa: E402

TABLE_SIZES = ("gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass(frozen=True)
class MemoryConfig:
    models: tuple[str, ...] = field(TABLE_SIZES, "model presets to tabulate", choices=tuple(MODEL_PRESETS))
    gpus: int = field(8, "GPUs the run is spread over (one node of H100s)")
    micro_batch_sizes: tuple[int, ...] = field((4, 8, 16, 32), "micro-batch sizes to tabulate")
    seq_len: int = field(1024, "tokens per sequence")
    grad_accum: int = field(1, "micro-steps per optimizer step (> 1 adds FSDP's unsharded gradients)")
    loss_chunk_rows: int = field(0, "the trainer's --loss-chunk-rows (0: full logits)")
    gpu_gib: float = field(80.0, "GPU memory to compare with (H100 80 GB)")
    precision: str = field(
        "bf16", "bf16 (CUDA autocast, fused AdamW) or fp32 (CPU, foreach AdamW)", choices=("bf16", "fp32")
    )
    measure: str = field(
        "",
        "also run one real CPU training step of this model and print its peak memory next to the formula's",
        choices=("", *MODEL_PRESETS),
    )
    parallel: str = field("ddp", "--measure: ddp (one process, no wrapper) or fsdp", choices=STRATEGIES)
    ranks: int = field(1, "--measure: processes (gloo) for --parallel fsdp")
    micro_batch_size: int = field(1, "--measure: rows per micro-step")
    activation_checkpointing: bool = field(False, "--measure: with activation checkpointing")
    json_out: str = field("", "also write the rows as JSON lines here")


def parse_args(argv=None) -> MemoryConfig:
    return parse_config(MemoryConfig, argv, __doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

from memory import GiB, memory_bytes  # noqa: E402


def table(cfg: MemoryConfig) -> list[dict]:
    rows = []
    for model_name in cfg.models:
        for parallel in STRATEGIES:
            for ac in (False, True):
                for mbs in cfg.micro_batch_sizes:
                    parts = memory_bytes(
                        model_name,
                        parallel,
                        ac,
                        mbs,
                        cfg.seq_len,
                        cfg.gpus,
                        cfg.grad_accum,
                        cfg.precision,
                        cfg.loss_chunk_rows,
                    )
                    rows.append(
                        {
                            "model": model_name,
                            "parallel": parallel,
                            "activation_checkpointing": ac,
                            "micro_batch_size": mbs,
                            **{k: v / GiB for k, v in parts.items()},
                        }
                    )
    return rows


def print_table(rows: list[dict], cfg: MemoryConfig) -> None:
    precision = "bf16 autocast, fused AdamW" if cfg.precision == "bf16" else "fp32, foreach AdamW"
    print(
        f"GiB per GPU, {cfg.gpus} GPUs, seq-len {cfg.seq_len}, {precision}, grad accumulation "
        f"{cfg.grad_accum}{f', --loss-chunk-rows {cfg.loss_chunk_rows}' if cfg.loss_chunk_rows else ''} "
        f"(fits: total <= {cfg.gpu_gib:.0f} GB minus ~2 GiB of CUDA context)"
    )
    print(
        "| model | parallel | AC | micro-batch | weights+grads+optimizer | other model state | activations | logits | "
        "total | fits |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    budget = cfg.gpu_gib * 1e9 / GiB - 2
    for r in rows:
        state = r["weights"] + r["gradients"] + r["optimizer"]
        other = r["ddp_buckets"] + r["compute_copies"] + r.get("accumulation", 0)
        print(
            f"| {r['model']} | {r['parallel']} | {'on' if r['activation_checkpointing'] else 'off'} | "
            f"{r['micro_batch_size']} | {state:.1f} | {other:.1f} | {r['activations']:.1f} | {r['logits']:.1f} | "
            f"{r['total']:.1f} | {'yes' if r['total'] <= budget else 'no'} |"
        )


# ---- one real CPU step ------------------------------------------------------------------------------
def measure_step(cfg: MemoryConfig) -> dict:
    """Peak memory (max RSS of each rank) of two real training steps on the CPU (the second has the
    AdamW state), minus the process's RSS before the model was built; with the formula for fp32."""
    import runtime  # noqa: PLC0415
    from dataloader import RandomTokens  # noqa: PLC0415
    from train_gpt2 import TrainConfig, build_run, train_step  # noqa: PLC0415 - heavy imports only here

    dist_info = runtime.setup_distributed("cpu")
    seq_len = min(cfg.seq_len, context_length(cfg.measure))
    rows_per_step = cfg.micro_batch_size * seq_len * dist_info.world_size
    train_cfg = TrainConfig(
        model=cfg.measure,
        seq_len=seq_len,
        micro_batch_size=cfg.micro_batch_size,
        tokens_per_step=rows_per_step * cfg.grad_accum,
        device="cpu",
        compile=False,
        val_every=0,
        hellaswag_every=0,
        sample_every=0,
        parallel=cfg.parallel,
        activation_checkpointing=cfg.activation_checkpointing,
        loss_chunk_rows=cfg.loss_chunk_rows,
        spike_guard=0,
        warmup_steps=0,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loader = RandomTokens(cfg.micro_batch_size, seq_len, 50257, pin_memory=False, seed=dist_info.rank)
    run = build_run(train_cfg, dist_info, train_loader=loader)
    for step in range(2):
        train_step(run, step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = memory_bytes(
        cfg.measure,
        cfg.parallel,
        cfg.activation_checkpointing,
        cfg.micro_batch_size,
        seq_len,
        dist_info.world_size,
        cfg.grad_accum,
        precision="fp32",
        loss_chunk_rows=cfg.loss_chunk_rows,
    )
    result = {
        "model": cfg.measure,
        "parallel": cfg.parallel,
        "ranks": dist_info.world_size,
        "activation_checkpointing": cfg.activation_checkpointing,
        "micro_batch_size": cfg.micro_batch_size,
        "seq_len": seq_len,
        "rank": dist_info.rank,
        "measured_gib": (peak - before) / GiB,
        "predicted_gib": predicted["total"] / GiB,
        "seconds": time.perf_counter() - started,
        "predicted_parts_gib": {k: round(v / GiB, 3) for k, v in predicted.items()},
    }
    runtime.teardown_distributed()
    return result


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.measure and cfg.ranks > 1 and "RANK" not in os.environ:  # start the ranks, as torchrun would
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={cfg.ranks}",
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
        ]
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
    sys.exit(cli.run_main(main))
