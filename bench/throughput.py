"""Benchmark the real training step (forward, backward, clip, AdamW, gradient accumulation as
configured): tokens/s, MFU, ms/step, peak memory, one table row per configuration.

    uv run bench/throughput.py --model tiny --micro-batch-size 2 --seq-len 64 --tokens-per-step 256 --steps 3 --warmup 1
    uv run bench/throughput.py                        # GPT-2 124M, reference batch, on a GPU
    uv run bench/throughput.py --sweep micro_batch_size=16,32,64 --sweep loss_chunk_rows=0,8192 --json

The flags of train_gpt2.py that shape the step (model, batch, optimizer, speed levers) are accepted
and mean the same; --help lists them apart from the benchmark's own. The step is built by the
trainer's own build_run and train_step. Tokens are synthetic (uniform random ids, a fixed seed)
unless --data-dir is given, so it runs anywhere with no data. Warm-up steps (torch.compile included)
are not timed; timed steps are measured with CUDA events on a CUDA GPU (on Apple's MPS with the host
clock, after waiting for the GPU), and each step's time is printed to stderr as it ends. MFU uses
the trainer's formula and peak table (none for MPS: n/a). It imports neither `datasets` nor
`transformers`, so it runs on a bare GPU machine with torch + numpy + tiktoken.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from cli import UserError, add_config_flags, field, parse_flags, parse_value  # noqa: E402
from train_config import TrainConfig, resolve_flags  # noqa: E402

# The train_gpt2.py settings that shape a training step, offered with the same meaning; the others
# (evaluations, checkpoints, logging, the schedule's length) mean nothing to a benchmark.
STEP_FLAGS = (
    *("model", "data_dir", "shuffle", "tokens_per_step", "micro_batch_size", "seq_len", "seed", "recipe"),
    *("optimizer", "max_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "muon_lr", "muon_momentum"),
    *("spike_guard", "device", "compile", "compile_on_cpu", "compile_mode", "precision", "attn_backend"),
    *("loss_chunk_rows", "fused_adamw", "activation_checkpointing", "parallel", "ddp_bucket_mb"),
)
CPU_SIZED = "--model tiny --micro-batch-size 2 --seq-len 64 --tokens-per-step 256 --steps 3 --warmup 1"


@dataclass(frozen=True)
class BenchConfig:
    steps: int = field(10, "timed optimizer steps")
    warmup: int = field(3, "untimed steps first (compilation, allocator, cuDNN autotuning)")
    sweep: tuple[str, ...] = field((), "NAME=V1,V2,... over a train_gpt2 setting; repeat for a grid", flag="--sweep")
    profile: bool = field(False, "write a torch.profiler trace of 2 steps and print the top kernels by time")
    trace_path: str = field("bench_trace.json", "where --profile writes its Chrome trace")
    json: bool = field(False, "print one JSON object per configuration instead of a table")

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0")


def parse(argv=None) -> tuple[BenchConfig, dict]:
    """(the benchmark's settings, the train_gpt2 flags given), from a parser that groups the two."""
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser.add_argument_group("benchmark"), BenchConfig)
    add_config_flags(
        parser.add_argument_group("the training step (train_gpt2.py's flags, same meaning)"),
        TrainConfig,
        only=STEP_FLAGS,
    )
    flags = parse_flags(parser, argv)
    bench_fields = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in flags.items() if k in bench_fields}), {
        k: v for k, v in flags.items() if k not in bench_fields
    }


def sweep_grid(cfg: TrainConfig, sweeps: tuple[str, ...]) -> list[tuple[dict, TrainConfig]]:
    """Expand ("micro_batch_size=16,32", "compile=true,false") into the grid of TrainConfigs."""
    axes = []
    for spec in sweeps:
        name, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserError(
                f"--sweep {spec!r}: write NAME=V1,V2 with a train_gpt2 setting name, e.g. micro_batch_size=16,32"
            )
        name = name.replace("-", "_")
        axes.append([(name, parse_value(TrainConfig, name, v)) for v in values.split(",")])
    grid = []
    for combo in itertools.product(*axes) if axes else [()]:
        overrides = dict(combo)
        grid.append((overrides, dataclasses.replace(cfg, **overrides)))
    return grid


def parse_all(argv=None) -> tuple[BenchConfig, dict, TrainConfig, list[tuple[dict, TrainConfig]]]:
    """(the benchmark's settings, the train_gpt2 flags given, their config, its sweep grid): every flag
    and every swept value checked."""
    bench, train_flags = parse(argv)
    cfg = TrainConfig(**resolve_flags(train_flags))
    return bench, train_flags, cfg, sweep_grid(cfg, bench.sweep)


if __name__ == "__main__":
    cli.parse_first(parse_all)  # --help and a bad flag are answered before torch loads

import torch  # noqa: E402

import metrics  # noqa: E402
import runtime  # noqa: E402
from dataloader import RandomTokens  # noqa: E402
from train_gpt2 import build_run, choose_micro_batch, train_step  # noqa: E402


def detect_attention_kernel(fn) -> str:
    """Which SDPA kernel a CUDA step ran, from the kernel names the profiler saw."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for key, label in (("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "efficient"), ("efficient", "efficient")):
        if key in names:
            return label
    return "math"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        # torch.mps keeps no peak; what Metal holds for this process after the timed steps is the
        # caching allocator's pool, which keeps the blocks of the largest step until empty_cache
        return torch.mps.driver_allocated_memory() / 2**30
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak RSS
    return peak_rss / (2**30 if sys.platform == "darwin" else 2**20)  # macOS counts it in bytes, Linux in KiB


def release_row_memory(device: torch.device) -> None:
    """Free the previous configuration before the next one. Dynamo's compiled graphs are dropped
    first (CPU too, under --compile-on-cpu): while cached they can hold the previous model, and a
    collection or empty_cache before the reset would leave its weights in memory for the next row."""
    torch._dynamo.reset()  # each configuration compiles afresh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def bench_one(cfg: TrainConfig, bench: BenchConfig, dist_info: runtime.DistInfo, synthetic: bool) -> dict:
    device = dist_info.device
    cfg, _ = choose_micro_batch(cfg, dist_info)  # --micro-batch-size auto (the default), as the trainer does
    loader = None
    if synthetic:
        loader = RandomTokens(
            cfg.micro_batch_size,
            cfg.seq_len,
            cfg.model_config.vocab_size,
            device.type == "cuda",
            seed=cfg.seed + dist_info.rank,
        )
    run = build_run(dataclasses.replace(cfg, val_every=0), dist_info, train_loader=loader)
    step = iter(range(10**9))
    total = bench.warmup + bench.steps

    wait_for_device = runtime.device_sync(device)  # None on a CPU: nothing is queued

    def sync():
        if wait_for_device is not None:
            wait_for_device()

    def one_step():
        t0, index = time.perf_counter(), next(step)
        out = train_step(run, index)
        # Progress on stderr: every step on a CPU (minutes each at 124M); on a GPU (CUDA, MPS) only the
        # warm-up (compilation), since a host sync between timed steps would change what is timed.
        if dist_info.is_main and (device.type == "cpu" or index < bench.warmup):
            sync()
            what = "warm-up" if index < bench.warmup else "timed"
            print(f"  step {index + 1}/{total} ({what}): {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        return out

    for _ in range(bench.warmup):
        one_step()
    sync()
    kernel = cfg.attn_backend
    if device.type == "cuda" and cfg.attn_backend == "auto":
        kernel = "auto->" + detect_attention_kernel(one_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    losses = [one_step()[0] for _ in range(bench.steps)]
    if device.type == "cuda":
        end.record()
        sync()
        seconds = start.elapsed_time(end) / 1000
    else:  # MPS queues its work as CUDA does: the clock stops once the GPU has done it
        sync()
        seconds = time.perf_counter() - t0
    if bench.profile:
        profile_steps(one_step, bench.trace_path, device)
    tokens_per_sec = bench.steps * cfg.tokens_per_step / seconds
    flops_per_token = run.model.flops_per_token(cfg.seq_len)
    row = {
        "model": cfg.model,
        "micro_batch_size": cfg.micro_batch_size,
        "seq_len": cfg.seq_len,
        "tokens_per_step": cfg.tokens_per_step,
        "grad_accum": run.grad_accum,
        "world_size": dist_info.world_size,
        "parallel": run.parallel.name,
        "compile": run.compiled,
        "compile_mode": cfg.compile_mode,
        "attention": kernel,
        "loss_chunk_rows": cfg.loss_chunk_rows,
        "fused_adamw": run.fused_adamw,
        "activation_checkpointing": cfg.activation_checkpointing,
        "spike_guard": cfg.spike_guard,
        "tokens_per_sec": tokens_per_sec,
        "step_ms": 1000 * seconds / bench.steps,
        "mfu": metrics.mfu(
            flops_per_token,
            tokens_per_sec,
            runtime.peak_flops(device, run.precision.name, cfg.peak_tflops),
            dist_info.world_size,
        ),
        "peak_memory_gb": peak_memory_gb(device),
        "final_loss": losses[-1].item(),
        "device": runtime.device_name(device),
        "torch": torch.__version__,
        "synthetic": synthetic,
    }
    return row


def profile_steps(one_step, trace_path: str, device: torch.device) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(trace_path)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"trace written to {trace_path} (open in chrome://tracing or ui.perfetto.dev)")


def format_row(row: dict, overrides: dict) -> str:
    setting = " ".join(f"{k}={v}" for k, v in overrides.items()) or "as configured"
    if "error" in row:
        return f"{setting:40s} | {row['error']}"
    mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "  n/a "
    return (
        f"{setting:40s} | {row['tokens_per_sec']:11,.0f} tok/s | mfu {mfu} | {row['step_ms']:9.1f} ms/step | "
        f"{row['peak_memory_gb']:6.2f} GiB | B={row['micro_batch_size']} x{row['grad_accum']} | "
        f"attn {row['attention']} | "
        f"loss {row['final_loss']:.4f} | {row['device']} | torch {row['torch']}"
    )


def main(argv=None) -> int:
    """Exit 0, or for a sweep whose rows could not all be measured (each row says why): 2 when a row
    failed, 3 when one ran out of memory (bench/gpu_check.py tells these from crashes)."""
    bench, train_flags, cfg, grid = parse_all(argv)
    dist_info = runtime.setup_distributed(cfg.device)
    synthetic = "data_dir" not in train_flags
    if dist_info.device.type == "cpu" and dist_info.is_main:
        shape = (
            f"{cfg.micro_batch_size} x {cfg.seq_len} x {cfg.grad_accum_steps(1)} micro-steps"
            if cfg.micro_batch_size
            else f"micro-batch auto x {cfg.seq_len}, {cfg.tokens_per_step:,} tokens per step"
        )
        print(
            f"bench: timing {cfg.model} at {shape} on the CPU ({bench.warmup} warm-up + {bench.steps} timed steps, "
            "each printed as it ends)"
            + (
                f"; the reference configuration takes minutes per step here: for a CPU-sized run use {CPU_SIZED}"
                if "model" not in train_flags
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
    status = 0
    try:
        for overrides, run_cfg in grid:
            try:
                row = bench_one(run_cfg, bench, dist_info, synthetic)
            except (ValueError, RuntimeError) as e:  # e.g. a forced attention kernel that cannot run
                if runtime.is_out_of_memory(e):
                    row, status = {"error": "out of memory: lower --micro-batch-size or use --loss-chunk-rows"}, 3
                else:
                    row, status = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}, 2
            if dist_info.is_main:
                print(json.dumps({**overrides, **row}) if bench.json else format_row(row, overrides), flush=True)
            release_row_memory(dist_info.device)
    finally:
        runtime.teardown_distributed()
    return status


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
