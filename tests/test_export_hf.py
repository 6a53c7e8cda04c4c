"""export_hf.py: our checkpoint -> a Hugging Face GPT-2 folder with the same logits and tokenizer."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import limit_file_size
from transformers import AutoTokenizer, GPT2LMHeadModel

import cli
from export_hf import ExportConfig
from model import GPT, GPTConfig
from tokenizer import get_encoding

ROOT = Path(__file__).resolve().parent.parent


def save_random_checkpoint(path: Path, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128))
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a wrong map cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 7}, path)
    return model.eval()


def test_export_loads_in_transformers_with_same_logits_and_tokens(tmp_path):
    ours = save_random_checkpoint(tmp_path / "model_final.pt")
    out_dir = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "export_hf.py", "--checkpoint", str(tmp_path / "model_final.pt"), "--out-dir", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out_dir / "model.safetensors").is_file() and not list(out_dir.glob("*.bin"))

    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 128
    idx = torch.randint(0, 50257, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-4

    text = "Hello world! Tokenizers must agree, even on naïve café text.<|endoftext|>"
    hf_ids = AutoTokenizer.from_pretrained(out_dir)(text)["input_ids"]
    assert hf_ids == get_encoding().encode(text, allowed_special="all")


def test_export_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "export_hf.py",
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--out-dir",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("export_hf.py: error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX RLIMIT_FSIZE for a real write error")
def test_an_export_that_cannot_be_written_is_one_line_and_leaves_no_folder(tmp_path):
    """A full disk (here a real EFBIG: a 1 MiB file-size limit, the weights are 13 MB) while the
    weights are written: one line, and neither the export nor the folders made for it are left."""
    save_random_checkpoint(tmp_path / "model_final.pt")
    result = subprocess.run(
        [
            sys.executable,
            "export_hf.py",
            "--checkpoint",
            str(tmp_path / "model_final.pt"),
            "--out-dir",
            str(tmp_path / "new" / "deeper" / "hf"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size(1 << 20),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"export_hf.py: error: cannot write {tmp_path / 'new' / 'deeper' / 'hf'} (")
    assert "File too large" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]


def test_the_export_folders_the_readme_and_the_default_use_are_git_ignored():
    """Exports are outputs (hundreds of MB), never meant for a commit (the README's and docs/' examples too)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    folders = {ExportConfig().out_dir} | set(re.findall(r"export_hf\.py .*--out-dir (\S+)", readme))
    assert folders >= {"gpt2-fineweb-hf", "gpt2-demo-hf"}
    paths = [f"{folder}/model.safetensors" for folder in sorted(folders)]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == paths, result.stdout + result.stderr


@pytest.mark.slow
def test_hellaswag_on_the_export_equals_hellaswag_on_the_checkpoint(tmp_path, hellaswag_val_path):
    save_random_checkpoint(tmp_path / "model_final.pt", seed=3)
    subprocess.run(
        [
            sys.executable,
            "export_hf.py",
            "--checkpoint",
            str(tmp_path / "model_final.pt"),
            "--out-dir",
            str(tmp_path / "hf"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    common = [
        "--data",
        str(hellaswag_val_path),
        "--no-verify",
        "--limit",
        "20",
        "--device",
        "cpu",
        "--log-dir",
        str(tmp_path / "log"),
    ]
    for source in (["--checkpoint", str(tmp_path / "model_final.pt")], ["--hf", str(tmp_path / "hf")]):
        result = subprocess.run(
            [sys.executable, "hellaswag.py", *source, *common], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
    ours, theirs = [
        json.loads(line) for line in (tmp_path / "log" / "hellaswag_results.jsonl").read_text().splitlines()
    ]
    assert ours["checkpoint"] and theirs["model"] and ours["count"] == theirs["count"] == 20
    for key in ("acc", "acc_norm", "harness_acc", "harness_acc_norm"):
        assert ours[key] == theirs[key], key


def test_out_dir_is_never_emptied_unless_it_holds_a_previous_export(tmp_path, capsys, monkeypatch):
    """Each refusal is one line and leaves every file where it was; a previous export (recognised by
    its file names) is replaced; the result has the modes the umask gives any new file."""
    import export_hf

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    ckpt = log_dir / "model_final.pt"
    save_random_checkpoint(ckpt)
    (log_dir / "metrics.jsonl").write_text('{"type": "config", "step": 0}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep me")

    def export(out_dir: str) -> tuple[int, str]:
        code = cli.run_main(export_hf.main, ["--checkpoint", str(ckpt), "--out-dir", out_dir])
        return code, capsys.readouterr().err

    for out_dir, phrase in (
        (str(mine), "holds other files: choose an empty or new folder"),
        (str(log_dir), "holds the checkpoint being exported"),
        (".", "--out-dir . holds other files"),
    ):
        monkeypatch.chdir(cwd if out_dir == "." else ROOT)
        code, err = export(out_dir)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and phrase in lines[0], err
    assert (mine / "thesis.tex").read_text() == "years of work" and (cwd / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in log_dir.iterdir()) == ["metrics.jsonl", "model_final.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "log", "mine"]  # no staging folder left

    out = tmp_path / "hf"
    old_mask = os.umask(0o022)
    try:
        assert export(str(out))[0] == 0
        first = (out / "model.safetensors").read_bytes()
        save_random_checkpoint(ckpt, seed=1)
        assert export(str(out))[0] == 0  # a previous export: replaced
    finally:
        os.umask(old_mask)
    assert (out / "model.safetensors").read_bytes() != first
    assert set(export_hf.EXPORT_FILES) >= {p.name for p in out.iterdir()}
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    (out / "extra.txt").write_text("added by hand")
    assert export(str(out))[0] == 2 and (out / "extra.txt").exists()  # no longer only an export
