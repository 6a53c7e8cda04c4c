"""A full disk loses nothing: a checkpoint write that fails leaves the previous checkpoint intact
and loadable, no partial file `--resume auto` could pick, valid metrics, and one line naming the path
and the fix, on every rank at once.

Two real write failures: a small tmpfs mounted for the test as the log dir (ENOSPC; needs root, as
CI runs), and a file-size limit (RLIMIT_FSIZE, EFBIG; any user). fineweb.py's shards:
tests/test_fineweb.py::test_full_disk_is_a_one_line_error_and_leaves_no_shard.

    uv run pytest tests/test_disk_full.py -q
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from conftest import limit_file_size
from test_train_gpt2 import ROOT, run_env, trainer_cmd

import checkpoint

TIMEOUT = 300


def checkpoint_bytes(data_dir: Path, tmp_path: Path) -> int:
    """Size of one checkpoint of the test run (a 1-step run's final one)."""
    log_dir = tmp_path / "probe"
    result = subprocess.run(
        trainer_cmd(data_dir, log_dir, "--max-steps", "1", "--warmup-steps", "0", "--val-every", "0"),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return (log_dir / checkpoint.FINAL).stat().st_size


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size, mounted under tmp_path and always unmounted."""
    mounts = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the file-size-limit test covers this")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def assert_no_partial_files(log_dir: Path) -> None:
    leftovers = [p.name for p in log_dir.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not leftovers, leftovers


def assert_valid_metrics(log_dir: Path) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line parses


@pytest.mark.slow
def test_disk_fills_at_the_second_checkpoint_on_two_ranks(data_dir, tmp_path, small_disk):
    size = checkpoint_bytes(data_dir, tmp_path)
    disk = small_disk(int(size * 1.6))  # room for one checkpoint and the metrics, not for a second one
    log_dir = disk / "log"
    result = subprocess.run(
        trainer_cmd(data_dir, log_dir, nproc=2),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert not [line for line in result.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line], (
        result.stderr[-3000:]
    )  # no rank's traceback (torchrun prints its own ChildFailedError report)
    message = next(line for line in errors if "no room to write" in line)
    assert f"{log_dir}/model_00010.pt" in message and "No space left on device" in message
    assert (
        f"{log_dir}/model_00005.pt is intact" in message
        and "free space" in message
        and "rerun the same command" in message
    )
    assert "lost contact" not in result.stderr  # the other rank stopped with it, not of a vanished peer
    assert_no_partial_files(log_dir)
    assert [path.name for _, path in checkpoint.paths(log_dir)] == ["model_00005.pt"]
    saved = checkpoint.load_file(log_dir / "model_00005.pt")  # loadable, and what resume will pick
    assert saved["step"] == 5 and all(torch.isfinite(v).all() for v in saved["model"].values())
    records = assert_valid_metrics(log_dir)
    assert max(r["step"] for r in records if r["type"] == "train") == 9

    # After space is freed (here: the run moved to a real disk), the same command resumes at step 5.
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(log_dir), str(moved)], check=True)
    result = subprocess.run(
        trainer_cmd(data_dir, moved), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0 and "resuming from" in result.stdout and "at step 5" in result.stdout, result.stderr[
        -2000:
    ]


def test_file_size_limit_stops_the_first_checkpoint_in_one_line(data_dir, tmp_path):
    log_dir = tmp_path / "log"
    result = subprocess.run(
        trainer_cmd(data_dir, log_dir),
        cwd=ROOT,
        env={**run_env(), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=limit_file_size(1 << 20),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("train_gpt2.py: error: no room to write") and "model_00005.pt" in message
    assert "no earlier checkpoint exists, so a rerun starts from step 0" in message
    assert not checkpoint.paths(log_dir)
    assert_no_partial_files(log_dir)
    assert_valid_metrics(log_dir)
