"""sample.py: text from a checkpoint through the one KV-cached sampler."""

import subprocess
import sys
from pathlib import Path

import torch

import cli
import sample
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
    assert "--max-new-tokens 8 or fewer" in too_long.stderr  # the default prompt is 8 of the 16 tokens


def test_a_log_dir_or_a_prompt_longer_than_the_context_is_named_in_one_line(tmp_path, capsys):
    """--checkpoint log points at the newest checkpoint in it; a prompt alone too long for the context
    is called too long (asking for fewer new tokens could not help)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    log = tmp_path / "log"
    log.mkdir()
    for name in ("model_00010.pt", "model_final.pt"):
        torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 10}, log / name)
    (log / "metrics.jsonl").write_text("")
    assert cli.run_main(sample.main, ["--checkpoint", str(log), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"{cli.script_name()}: error: {log} is a log dir, not a checkpoint: pass one of its checkpoints, "
        f"e.g. the newest, {log / 'model_final.pt'}"
    )
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    assert (
        cli.run_main(sample.main, ["--checkpoint", str(log / "model_final.pt"), "--prompt", prompt, "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"{cli.script_name()}: error: --prompt is too long: 16 tokens for a context of 16")
        and "\n" not in err
    )
