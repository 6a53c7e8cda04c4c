"""sample.py: text from a checkpoint through the one KV-cached sampler."""

import subprocess
import sys
from pathlib import Path

import torch

from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sample_prints_seeded_continuations(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    ckpt = tmp_path / "model_final.pt"
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 1}, ckpt)
    args = ["--checkpoint", str(ckpt), "--prompt", "Once upon a time", "--num-samples", "2", "--max-new-tokens", "12"]
    first, again, other_seed = run_sample(*args), run_sample(*args), run_sample(*args, "--seed", "7")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("--- sample") == 2 and first.stdout.count("Once upon a time") == 2
    assert first.stdout == again.stdout  # the seed fixes the draws
    assert first.stdout != other_seed.stdout


def test_sample_errors_are_one_line(tmp_path):
    missing = run_sample("--checkpoint", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    ckpt = tmp_path / "small.pt"
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 1}, ckpt)
    too_long = run_sample("--checkpoint", str(ckpt), "--max-new-tokens", "100")
    assert too_long.returncode == 2 and "block_size" in too_long.stderr and "Traceback" not in too_long.stderr
