"""--micro-batch-size auto (the default) and --plan.

auto: the largest of 64, 32, ... that this device's free memory holds by memory.py's formula, then on
CUDA a real forward and backward at it, halving on out-of-memory; the step's tokens never change.
The GPUs are fake (tests/fake_cuda.py) with the free memory a card of that size reports; an
out-of-memory is raised where a card of that size would raise it. --plan prints what a command would
do and how long it would take, and exits 0 having written nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from fake_cuda import fake_cuda

import memory
import runtime
import train_gpt2
from model import GPT
from train_config import TrainConfig, parse_args

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
CUDA = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0), is_main=True)


def free(gib: float):
    """A card reporting `gib` GiB free of its memory (what torch.cuda.mem_get_info says)."""
    return mock.patch("torch.cuda.mem_get_info", return_value=(int(gib * GiB), int(gib * GiB)))


@pytest.mark.parametrize(
    "model, card_gib, expected",
    [("gpt2", 79.1, 64), ("gpt2", 23.6, 16), ("gpt2-medium", 23.6, 8), ("gpt2", 15.6, 8), ("gpt2", 7.6, 4)],
)
def test_auto_takes_the_largest_micro_batch_the_formula_fits(model, card_gib, expected):
    """An 80 GB H100 (79.1 GiB free) keeps the reference's 64; a 24 GB card takes 16 for 124M, 8 for 350M."""
    with fake_cuda(), free(card_gib):
        args = (model, "ddp", False, 1024, 524_288, 1, "bf16", 0, torch.device("cuda", 0))
        chosen, need, have, _ = memory.largest_micro_batch(*args)
    assert chosen == expected and need <= have
    if expected < 64:  # the next size up would not have fitted
        bigger = memory.memory_bytes(model, "ddp", False, 2 * expected, 1024, 1, 524_288 // (2048 * expected), "bf16")
        assert bigger["total"] + memory.OVERHEAD_BYTES["cuda"] > card_gib * GiB


def test_auto_counts_the_chunked_loss_and_keeps_the_step():
    with fake_cuda(), free(23.6):
        plain = memory.largest_micro_batch("gpt2", "ddp", False, 1024, 524_288, 1, "bf16", 0, torch.device("cuda", 0))
        chunked = memory.largest_micro_batch("gpt2", "ddp", False, 1024, 524_288, 1, "bf16", 8192, torch.device("cuda"))
        cfg, choice = train_gpt2.choose_micro_batch(parse_args(["--model", "gpt2", "--device", "cuda"]), CUDA)
    assert chunked[0] > plain[0]  # without the full logits a bigger micro-batch fits
    assert cfg.micro_batch_size == choice["chosen"] and cfg.tokens_per_step == 524_288
    assert cfg.grad_accum_steps(1) * cfg.micro_batch_size * cfg.seq_len == 524_288  # accumulation grows instead


def test_a_forward_that_runs_out_of_memory_halves_the_micro_batch(capsys):
    """The formula says 64 fits an 80 GB card, the card disagrees above 16 (another process, a
    fragmented allocator): the real forward and backward find 16 before the run starts."""
    forward = GPT.forward

    def oom_above_16(self, idx, *args, **kwargs):
        if idx.size(0) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return forward(self, idx, *args, **kwargs)

    with fake_cuda(), free(79.1), mock.patch.object(GPT, "forward", oom_above_16):
        cfg, choice = train_gpt2.choose_micro_batch(parse_args(["--model", "gpt2", "--device", "cuda"]), CUDA)
    assert cfg.micro_batch_size == 16 and choice["tried"]
    line = capsys.readouterr().out
    assert "micro-batch auto: 16 x 1024 tokens, 32 micro-steps per step" in line and "a forward and backward" in line


def test_an_explicit_micro_batch_is_kept_and_auto_is_a_flag_value():
    assert parse_args(["--micro-batch-size", "32"]).micro_batch_size == 32
    assert parse_args(["--micro-batch-size", "auto"]).micro_batch_size == 0 == TrainConfig().micro_batch_size
    cfg, choice = train_gpt2.choose_micro_batch(TrainConfig(micro_batch_size=8), CUDA)
    assert cfg.micro_batch_size == 8 and choice is None


def test_the_choice_is_stored_in_the_config_record(data_dir, tmp_path):
    """The tiny run with its micro-batch left to auto, on fake CUDA: the config record says what was
    chosen and from what; a resume on another card may choose another (a change, not a refusal)."""
    log_dir = tmp_path / "log"
    flags = ["--model", "tiny", "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--seq-len", "32"]
    flags += ["--tokens-per-step", "128", "--max-steps", "2", "--warmup-steps", "1", "--val-every", "0"]
    flags += ["--hellaswag-every", "0"]
    flags += ["--sample-every", "0", "--no-compile", "--device", "cuda"]
    with fake_cuda(), free(79.1):
        assert train_gpt2.main(flags) == 0
    config = json.loads((log_dir / "metrics.jsonl").read_text().splitlines()[0])
    choice = config["micro_batch_choice"]
    assert choice["chosen"] == config["config"]["micro_batch_size"] == 4  # 128 tokens / 32: at most 4 rows
    assert choice["tried"] and choice["estimate_gib"] > 0 and "GiB free" in choice["available"]


def run_plan(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_gpt2.py"), "--plan", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_plan_says_what_the_command_would_do_and_writes_nothing(tmp_path):
    result = run_plan(
        tmp_path, "--model", "tiny", "--device", "cpu", "--tokens-per-step", "2048", "--max-steps", "3000"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "plan: tiny on 1 x cpu" in out and "fp32 (auto)" in out
    assert "step: 2,048 tokens = 1 rank(s) x 1 micro-steps x 8 x 256 (micro-batch auto)" in out
    assert "GiB per process by memory.py's formula; this machine has" in out
    assert "run: 3,000 steps, 0.01B tokens" in out and "s per step" in out and "3,000 steps: ~" in out
    assert not list(tmp_path.iterdir())  # no log dir, no data, no lock


@pytest.mark.parametrize("card_gib, micro_batch", [(23.6, 16), (79.1, 64)])
def test_plan_of_the_reference_run_on_a_24_gb_and_an_80_gb_card(card_gib, micro_batch, capsys):
    """The README's "Your GPU" in one line each: 124M on a 24 GB card takes micro-batch 16, on an H100 64."""
    with fake_cuda(), free(card_gib), mock.patch.object(train_gpt2, "train_step"):
        cfg, choice = train_gpt2.choose_micro_batch(parse_args(["--device", "cuda"]), CUDA)
        assert train_gpt2.plan(cfg, CUDA, choice, timed=1) == 0
    out = capsys.readouterr().out
    accumulation = 524_288 // (micro_batch * 1024)
    assert f"step: 524,288 tokens = 1 rank(s) x {accumulation} micro-steps x {micro_batch} x 1024" in out
    assert f"has {card_gib:.1f} GiB free" in out and "bf16 (auto)" in out
