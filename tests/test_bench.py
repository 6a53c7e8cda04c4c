"""bench/throughput.py: the real training step timed, one row per configuration, honest MFU."""

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import metrics
from bench.throughput import release_row_memory, sweep_grid
from dataloader import RandomTokens
from train_gpt2 import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model",
    "tiny",
    "--micro-batch-size",
    "2",
    "--seq-len",
    "64",
    "--tokens-per-step",
    "256",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--device",
    "cpu",
]


@pytest.mark.slow
def test_bench_prints_a_json_row_per_sweep_point():
    result = subprocess.run(
        [sys.executable, "bench/throughput.py", *TINY, "--sweep", "loss_chunk_rows=0,48", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["loss_chunk_rows"] for r in rows] == [0, 48]
    for row in rows:
        assert row["tokens_per_sec"] > 0 and row["step_ms"] > 0 and row["peak_memory_gb"] > 0
        assert row["mfu"] is None  # no peak FLOPs for a CPU: never a made-up number
        assert row["grad_accum"] == 2 and row["device"].startswith("cpu") and row["torch"]
    # Same synthetic tokens, same seed: the chunked loss path trains to the same loss.
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 1e-4


def test_sweep_grid_is_the_cartesian_product():
    grid = sweep_grid(TrainConfig(), ("micro_batch_size=16,32", "compile=false,true"))
    assert [o for o, _ in grid] == [
        {"micro_batch_size": 16, "compile": False},
        {"micro_batch_size": 16, "compile": True},
        {"micro_batch_size": 32, "compile": False},
        {"micro_batch_size": 32, "compile": True},
    ]
    assert grid[3][1].micro_batch_size == 32 and grid[3][1].compile is True
    with pytest.raises(ValueError, match="NAME=V1,V2"):
        sweep_grid(TrainConfig(), ("micro_batch_size",))


def test_synthetic_batches_are_contiguous_like_the_trainer_s():
    """Strided views of one (B, T+1) buffer would make bench time a copy training never does. (The
    pinning of each, on CUDA, needs a GPU to check.)"""
    x, y = RandomTokens(micro_batch_size=3, seq_len=8, vocab_size=50, pin_memory=False).next_batch()
    assert x.shape == y.shape == (3, 8) and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token


def test_after_a_row_the_compiled_model_is_freed_and_the_next_row_compiles_afresh():
    compiles = []

    def counting_backend(graph_module, example_inputs):  # a real dynamo backend: runs the captured graph
        compiles.append(graph_module)
        return graph_module.forward

    def one_row():
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        torch.compile(model, backend=counting_backend)(torch.randn(4, 8)).sum().backward()
        return weakref.ref(model[0].weight)

    first = one_row()
    compiles.clear()  # the captured graphs hold the weights as attributes
    release_row_memory(torch.device("cpu"))
    assert first() is None  # nothing of the previous row survives into the next
    one_row()
    assert len(compiles) == 1  # dynamo was reset on the CPU too: the same code compiles again
    release_row_memory(torch.device("cpu"))


def test_mfu_is_a_fraction_never_above_one():
    h100 = 989.4e12
    assert metrics.mfu(860e6, 300_000, h100) == pytest.approx(860e6 * 300_000 / h100)
    assert metrics.mfu(860e6, 1e9, h100) == 1.0  # an impossible rate is clamped, not reported as 870%
    assert metrics.mfu(860e6, 300_000, None) is None


def test_help_offers_only_the_flags_that_shape_a_step_in_two_groups():
    text = subprocess.run(
        [sys.executable, "bench/throughput.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert "benchmark:" in text and "the training step (train_gpt2.py's flags, same meaning):" in text
    for flag in ("--steps", "--sweep", "--micro-batch-size", "--loss-chunk-rows", "--attn-backend", "--optimizer"):
        assert flag in text, flag
    for flag in (
        "--demo",
        "--resume",
        "--wandb",
        "--tensorboard",
        "--log-dir",
        "--val-every",
        "--hellaswag-every",
        "--ckpt-every",
        "--sample-prompt",
    ):
        assert flag not in text, flag


def test_cpu_run_says_what_it_times_at_once_shows_each_step_and_prints_a_row():
    result = subprocess.run(
        [sys.executable, "bench/throughput.py", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "mfu" in result.stdout and "ms/step" in result.stdout
    lines = result.stderr.splitlines()
    first = next(line for line in lines if line.startswith("bench:"))
    assert "timing tiny at 2 x 64 x 2 micro-steps on the CPU" in first and "--model tiny" not in first
    assert [line.split(":")[0].strip() for line in lines if line.strip().startswith("step ")] == [
        "step 1/4 (warm-up)",
        "step 2/4 (timed)",
        "step 3/4 (timed)",
        "step 4/4 (timed)",
    ]
    # the reference configuration on a CPU: told at once, with the command for a CPU-sized run
    proc = subprocess.Popen(
        [sys.executable, "bench/throughput.py", "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("bench: timing gpt2 at micro-batch auto x 1024, 524,288 tokens per step on the CPU")
    assert "--model tiny" in first
    bad = subprocess.run(
        [sys.executable, "bench/throughput.py", *TINY, "--sweep", "no_such_knob=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("throughput.py: error: unknown setting")
