"""checkpoint.py, the one loader: round trip, every malformed file refused in one line (also by the
scripts that take a checkpoint), newest-first discovery, pruning, atomic writes with normal modes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
SMALL = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)


def save_small(path: Path, step: int = 3, **extra) -> GPT:
    torch.manual_seed(0)
    model = GPT(SMALL)
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": step, **extra}, path)
    return model


def test_load_model_round_trip_keeps_the_tie_and_reads_the_step(tmp_path):
    path = tmp_path / "model_final.pt"
    model = save_small(path, step=3)
    loaded = checkpoint.load_model(path)
    assert not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded.transformer.wte.weight is loaded.lm_head.weight  # still one tensor, as trained
    assert checkpoint.read_step(path) == 3
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])


def malformed_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    """Files a user may pass by mistake, each of which must give a one-line error."""
    files = {}
    files["six-byte text file"] = tmp_path / "notes.pt"
    files["six-byte text file"].write_text("hello\n")  # torch.load: KeyError(104) without mmap
    files["truncated checkpoint"] = tmp_path / "truncated.pt"
    files["truncated checkpoint"].write_bytes(good.read_bytes()[:1000])
    files["empty file"] = tmp_path / "empty.pt"
    files["empty file"].write_bytes(b"")
    files["a pickled list"] = tmp_path / "list.pt"
    with open(files["a pickled list"], "wb") as f:
        pickle.dump([1, 2, 3], f)
    files["a tensor, not a dict"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), files["a tensor, not a dict"])
    files["a dict without weights"] = tmp_path / "nokeys.pt"
    torch.save({"step": 3}, files["a dict without weights"])
    files["weights of another shape"] = tmp_path / "wrong.pt"
    torch.save(
        {"model": GPT(SMALL).state_dict(), "model_config": {**SMALL.__dict__, "n_embd": 64}, "step": 1},
        files["weights of another shape"],
    )
    return files


def test_every_malformed_file_is_a_one_line_value_error(tmp_path):
    good = tmp_path / "good.pt"
    save_small(good)
    for what, path in malformed_files(tmp_path, good).items():
        with pytest.raises(ValueError) as err:
            checkpoint.load_model(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message, what
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint.load_model(tmp_path / "nope.pt")


@pytest.mark.parametrize("script", ["sample.py", "export_hf.py", "hellaswag.py"])
def test_scripts_refuse_a_text_file_renamed_pt_in_one_line(tmp_path, script):
    bad = tmp_path / "model_final.pt"
    bad.write_text("hello\n")
    extra = {
        "export_hf.py": ["--out-dir", str(tmp_path / "hf")],
        "hellaswag.py": [
            "--data",
            "tests/data/hellaswag_val_300.jsonl",
            "--no-verify",
            "--limit",
            "4",
            "--device",
            "cpu",
            "--log-dir",
            str(tmp_path / "log"),
        ],
    }.get(script, ["--device", "cpu"])
    result = subprocess.run(
        [sys.executable, script, "--checkpoint", str(bad), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(f"{script}: error:") and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    assert "not a checkpoint of this repo" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]  # no --log-dir / --out-dir made


def test_a_log_dir_passed_as_checkpoint_names_its_newest_checkpoint(tmp_path):
    """`--checkpoint log` (the run's folder): every script's loader points at the checkpoint to pass."""
    save_small(tmp_path / "model_00005.pt", step=5)
    (tmp_path / "model_00010").mkdir()  # a sharded checkpoint's folder (--parallel fsdp), newer
    with pytest.raises(ValueError) as err:
        checkpoint.load_model(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is a log dir, not a checkpoint: pass one of its checkpoints, e.g. the "
        f"newest, {tmp_path / 'model_00010'}"
    )
    save_small(tmp_path / "model_final.pt")
    with pytest.raises(ValueError, match=f"e.g. the newest, {tmp_path / 'model_final.pt'}$"):
        checkpoint.read_step(tmp_path)
    (tmp_path / "empty").mkdir()  # no checkpoint in it: not a log dir, not a sharded checkpoint either
    with pytest.raises(ValueError, match="has no readable .metadata"):
        checkpoint.load_model(tmp_path / "empty")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE set", "HF_HUB_OFFLINE unset"])
def test_hf_model_missing_offline_advises_by_whether_hf_hub_offline_is_set(tmp_path, monkeypatch, offline):
    """Set: the cache is what is missing, so no advice to set it; unset (and the Hub unreachable: a
    closed local port as the endpoint): setting it, with a filled cache, is the way to work offline."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(ValueError) as err:
        checkpoint.load_hf_model("nobody/no-such-gpt2")
    message = str(err.value)
    assert message.startswith("--hf nobody/no-such-gpt2: not in the local Hugging Face cache") and "\n" not in message
    assert ("HF_HUB_OFFLINE is set" in message) == offline
    assert ("set HF_HUB_OFFLINE=1" in message) == (not offline)


def test_paths_newest_first_and_load_latest_skips_a_corrupt_one(tmp_path):
    for step in (5, 10, 15):
        save_small(tmp_path / f"model_{step:05d}.pt", step=step, optimizer={}, loader={}, config={})
    (tmp_path / "model_notes.pt").write_text("not a checkpoint name")
    assert [s for s, _ in checkpoint.paths(tmp_path)] == [15, 10, 5]
    os.truncate(tmp_path / "model_00015.pt", 500)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*model_00015.pt"):
        latest = checkpoint.load_latest(tmp_path)
    assert latest["step"] == 10 and latest["path"] == str(tmp_path / "model_00010.pt")
    save_small(tmp_path / "model_final.pt", step=20, optimizer={}, loader={}, config={})
    assert checkpoint.paths(tmp_path)[0][1].name == "model_final.pt"


def test_save_is_atomic_prunes_old_steps_and_follows_the_umask(tmp_path):
    old_mask = os.umask(0o022)
    try:
        for step in range(1, 6):
            checkpoint.save({"step": step}, tmp_path / f"model_{step:05d}.pt", keep=2)
        checkpoint.save({"step": 6}, tmp_path / "model_final.pt", keep=2)
        os.umask(0o027)
        checkpoint.save({"step": 7}, tmp_path / "model_00007.pt", keep=None)
    finally:
        os.umask(old_mask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model_00004.pt", "model_00005.pt", "model_00007.pt", "model_final.pt"]  # no temp file left
    assert (tmp_path / "model_final.pt").stat().st_mode & 0o777 == 0o644  # readable by teammates, like any file
    assert (tmp_path / "model_00007.pt").stat().st_mode & 0o777 == 0o640


def test_loading_keeps_this_runs_kernel_choices_and_lr_scale():
    """A checkpoint written on a CPU (foreach AdamW) resumed on a GPU steps with fused AdamW, as the
    resuming run chose; torch's load_state_dict alone brings back the saved choices."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))
    written = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True, fused=False)
    written.param_groups[0]["lr_scale"] = 2.0
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    written.step()
    ckpt = {"model": model.state_dict(), "optimizer": written.state_dict()}
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False, fused=True)  # fused runs on CPU too
    resumed.param_groups[0]["lr_scale"] = 3.0
    checkpoint.load_training_state(ckpt, model, resumed)
    group = resumed.param_groups[0]
    assert group["fused"] is True and group["foreach"] is False and group["lr_scale"] == 3.0
    assert resumed.state_dict()["state"][0]["step"] == written.state_dict()["state"][0]["step"]  # the state did load


SHARDED_SAVE = """
import datetime, sys
from pathlib import Path
import torch, torch.distributed as dist
import checkpoint, fileio
from model import GPT, GPTConfig

rank, store, folder = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
if rank == 0:  # the main rank cannot clear the temp folder a killed save left
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))
    fileio.remove = refuse
model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))
optimizer = torch.optim.AdamW(model.parameters())
try:
    checkpoint.save_sharded(model, optimizer, {"step": 1}, folder / "model_00001", None, rank == 0)
    print("saved", flush=True)
except OSError as e:
    print("OSError", e.strerror, flush=True)
dist.destroy_process_group()
"""


def test_a_sharded_save_that_fails_on_the_main_rank_fails_on_every_rank(tmp_path):
    """Rank 0 fails before the save's first collective: every rank learns it there and raises the
    same OSError (the trainer then stops them all in one line), none waits in a barrier rank 0 skipped."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARDED_SAVE, str(rank), str(tmp_path / "store"), str(tmp_path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [out.strip() for out, _ in outputs] == ["OSError Permission denied"] * 2, outputs
