"""A dead rank does not end the job: `bash train.sh` (torchrun with --max-restarts) on 2 CPU ranks.

One training process is SIGKILLed mid-run (what a kernel OOM kill or a GPU fault does); torchrun
stops the other, starts both again, and the run resumes from its newest checkpoint and ends with
the weights of an uninterrupted 2-rank run, bitwise. A user error (a bad flag, a rank whose GPU has
no room) is not restarted: every restart would meet it again. And the launcher itself SIGKILLed (kill -9, the OOM
killer taking torchrun): its workers stop within seconds instead of training on into the log dir,
and the rerun of the command ends with the uninterrupted weights (DDP and FSDP).

    uv run pytest tests/test_restarts.py -q
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_sh import ROOT, TINY_FLAGS, TRAIN_SH, assert_same_weights, clean_env, metrics

import checkpoint

RESTART_FLAGS = [*TINY_FLAGS, "--ckpt-every", "5"]  # the last --ckpt-every wins: checkpoints at 5, 10, 15


def train_sh(log_dir: Path, shards: Path, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(TRAIN_SH), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(
            **{
                "LOG_DIR": str(log_dir),
                "DATA_DIR": str(shards),
                "CUDA_VISIBLE_DEVICES": "",
                "NPROC_PER_NODE": "2",
                **env,
            }
        ),
    )


def training_pid(log_dir: Path, local_rank: int) -> int | None:
    """The training process of `local_rank` for this log dir (its environment says which rank it is)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            any(a.endswith(b"train_gpt2.py") for a in args)
            and str(log_dir).encode() in args
            and f"LOCAL_RANK={local_rank}".encode() in environ
            and b"torch.distributed.run" not in args
        ):
            return int(proc.name)
    return None


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory, data_dir) -> Path:
    log_dir = tmp_path_factory.mktemp("two_ranks")
    proc = train_sh(log_dir, data_dir, RESTART_FLAGS)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return log_dir


@pytest.mark.slow
def test_sigkill_of_one_rank_restarts_the_group_and_ends_with_the_uninterrupted_weights(
    uninterrupted_two_ranks, data_dir, tmp_path
):
    log_dir = tmp_path / "log"
    proc = train_sh(log_dir, data_dir, RESTART_FLAGS)
    try:
        deadline = time.monotonic() + 240
        # After the step-5 checkpoint, before the step-10 one: the restart must go back to step 5.
        while not any(r["type"] == "train" and r["step"] >= 7 for r in metrics(log_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 7"
            time.sleep(0.2)
        victim = training_pid(log_dir, local_rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert (
        "train_gpt2.py: error: rank 0 lost contact with another rank" in out
    )  # the survivor says what happened, in one line
    assert "Traceback" not in out.split("lost contact")[0][-2000:]
    assert "resuming from" in out and "model_00005.pt at step 5" in out
    configs = [r for r in metrics(log_dir) if r["type"] == "config"]
    assert len(configs) == 2  # one start, one restart
    steps = [r["step"] for r in metrics(log_dir) if r["type"] == "train"]
    assert steps == list(range(20))  # the log was cut back to the checkpoint: each step once
    assert_same_weights(log_dir / "model_final.pt", uninterrupted_two_ranks / "model_final.pt")


def running(pid: int) -> bool:
    """Is `pid` a process that still runs (not gone, not a zombie waiting for its new parent to reap it)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def uninterrupted_fsdp(tmp_path_factory, data_dir) -> Path:
    log_dir = tmp_path_factory.mktemp("two_fsdp_ranks")
    proc = train_sh(log_dir, data_dir, [*RESTART_FLAGS, "--parallel", "fsdp"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return log_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.heavy)])
def test_sigkill_of_torchrun_stops_its_workers_and_the_rerun_ends_as_if_uninterrupted(
    strategy, request, data_dir, tmp_path
):
    flags = [*RESTART_FLAGS, "--parallel", strategy]
    reference = request.getfixturevalue("uninterrupted_two_ranks" if strategy == "ddp" else "uninterrupted_fsdp")
    log_dir = tmp_path / "log"
    proc = train_sh(log_dir, data_dir, flags)  # without SLURM train.sh execs torchrun: proc is torchrun
    try:
        deadline = time.monotonic() + 240
        while not any(r["type"] == "train" and r["step"] >= 7 for r in metrics(log_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 7"
            time.sleep(0.2)
        workers = [training_pid(log_dir, rank) for rank in (0, 1)]
        assert None not in workers
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15  # a step boundary, a checkpoint, the exit
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if running(pid)], "workers outlived their torchrun by 15 s"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    rerun = train_sh(log_dir, data_dir, flags)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-4000:]
    assert "resuming from" in out and "in use by another run" not in out
    steps = [r["step"] for r in metrics(log_dir) if r["type"] == "train"]
    assert steps == list(range(20))  # each step once: nothing from the orphans interleaved
    finals = [checkpoint.load_model(d / "model_final.pt").state_dict() for d in (log_dir, reference)]
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[1])
    assert sorted(p.name for p in log_dir.glob("model_final*")) == sorted(
        p.name for p in reference.glob("model_final*")
    )


@pytest.mark.slow
def test_a_user_error_is_not_restarted(tmp_path, data_dir):
    """torchrun restarts on any failed worker; a user error (exit 2) would fail the same way at every
    restart, so the workers stop torchrun instead: one attempt, one line."""
    proc = train_sh(tmp_path / "log", data_dir, [*TINY_FLAGS, "--max-lr=-1"], NPROC_PER_NODE="1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert out.count("error: --max-lr must be positive") == 1, out[-3000:]  # MAX_RESTARTS=3 left unused


@pytest.mark.slow
def test_a_rank_refused_for_memory_stops_every_rank_with_one_line(tmp_path, data_dir):
    """Rank 1 finds its GPU nearly full (a stale process on a shared node): every rank learns it at once
    and stops with one line naming rank 1 and its host; no rank waits for a peer that already left
    ("lost contact"), and torchrun does not restart into the same refusal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=3", "--standalone", "--nproc-per-node=2"]
    cmd += [str(ROOT / "tests" / "low_memory_rank.py"), *TINY_FLAGS, "--log-dir", str(tmp_path / "log")]
    result = subprocess.run(
        [*cmd, "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(CUDA_VISIBLE_DEVICES=""),
    )
    out = result.stdout + result.stderr
    errors = [line for line in out.splitlines() if line.startswith("train_gpt2.py: error:")]
    assert result.returncode != 0 and len(errors) == 1, out[-3000:]
    assert f"rank 1 on {socket.gethostname()}: this run needs about" in errors[0] and "0.1 GiB free" in errors[0]
    assert "lost contact" not in out and not (tmp_path / "log").exists()


def test_max_restarts_must_be_a_number(tmp_path):
    result = subprocess.run(
        ["bash", str(TRAIN_SH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(MAX_RESTARTS="lots", DRY_RUN="1"),
    )
    assert result.returncode == 2 and "MAX_RESTARTS must be a whole number" in result.stderr
    cmd = subprocess.run(
        ["bash", str(TRAIN_SH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(MAX_RESTARTS="5", DRY_RUN="1", CUDA_VISIBLE_DEVICES=""),
    ).stdout.split()
    assert "--max-restarts=5" in cmd
