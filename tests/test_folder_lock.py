"""fileio.FolderLock: one writing run per --log-dir. The flock path as the kernel gives it on this
machine's filesystems (tmp folders: ext4 / overlay / tmpfs, whichever pytest's tmp_path is on), and
the path for filesystems without working flock (Lustre without -o flock, NFS mounted `nolock`), where
the record kept alive by the holder catches two live writers. That path is reached here by making
flock fail as such a filesystem makes it fail (ENOLCK): no such filesystem can be mounted in CI.
The trainer's use of it (a second run refused, a killed run's rerun not) is in test_train_gpt2.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fileio
from fileio import LOCK_FILE, FolderInUse, FolderLock

ROOT = Path(__file__).resolve().parent.parent
HOLD = (
    "import fileio, sys, time; fileio.FolderLock(sys.argv[1], ['holder']).acquire(); print('held', flush=True); "
    "time.sleep(60)"
)


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def no_flock(monkeypatch):
    """flock failing as on a filesystem without locks; heartbeats every 0.1 s instead of 30."""

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", refuse)
    monkeypatch.setattr(fileio, "HEARTBEAT_SECONDS", 0.1)


@pytest.fixture
def quick_heartbeat(monkeypatch):
    """Heartbeats every 0.05 s instead of 30, so tests see several in a row."""
    monkeypatch.setattr(fileio, "HEARTBEAT_SECONDS", 0.05)


class LockFileFaults:
    """Makes one access of a held lock file fail as a shared filesystem does now and then (NFS ESTALE,
    Lustre EIO): its stat (Path.stat of the lock's path), its read (fileio's open of it) or its
    re-write (os.ftruncate of the holder's fd). Only that file's accesses fail, and only `fail(n)` times."""

    def __init__(self, monkeypatch, lock: FolderLock, where: str, code: int):
        self.code, self.left, self.last = code, 0, 0.0  # failures still to give; time.time() of the latest

        def failing(real, is_lock_file):
            def call(target, *args, **kwargs):
                if self.left > 0 and is_lock_file(target):
                    self.left -= 1
                    self.last = time.time()
                    raise OSError(code, os.strerror(code))
                return real(target, *args, **kwargs)

            return call

        if where == "stat":
            monkeypatch.setattr(Path, "stat", failing(Path.stat, lambda path: path == lock.path))
        elif where == "read":
            opens_lock = failing(open, lambda file: isinstance(file, str | os.PathLike) and Path(file) == lock.path)
            monkeypatch.setattr(fileio, "open", opens_lock, raising=False)
        else:
            monkeypatch.setattr(fileio.os, "ftruncate", failing(os.ftruncate, lambda fd: fd == lock.fd))

    def fail(self, times: int) -> None:
        self.left = times


def heartbeat_after(folder: Path, faults: LockFileFaults | None = None, moment: float = 0.0) -> bool:
    """Does the record in `folder` get re-written after `moment`, or after the last of `faults`' failures
    (its heartbeat goes on)? Waits for it, giving up after 30 s: a heartbeat that stopped never comes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if faults is None or not faults.left:
            after = faults.last if faults else moment
            try:
                if json.loads((folder / LOCK_FILE).read_text()).get("heartbeat", 0) > after:
                    return True
            except ValueError:  # read while the holder writes it
                pass
        time.sleep(0.02)
    return False


def write_record(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "host": socket.gethostname(),
        "pid": 1,
        "started": time.time() - 60,
        "token": "someone-else",
        "command": "train_gpt2.py --other",
        "heartbeat": time.time(),
        "released": False,
        **fields,
    }
    (folder / LOCK_FILE).write_text(json.dumps(record))


def assert_lost(lock: FolderLock, reason: str) -> None:
    """The holder's heartbeat notices within seconds, and check() then raises naming the reason."""
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(FolderInUse, match=reason):
        lock.check()


def test_a_held_folder_is_refused_naming_its_holder_and_free_again_after_release(tmp_path):
    (tmp_path / "log").mkdir()
    first = FolderLock(tmp_path / "log", ["train_gpt2.py", "--log-dir", "log"]).acquire()
    assert first.flock and not first.created
    with pytest.raises(
        FolderInUse, match=rf"in use by another run \(pid {os.getpid()} on .*train_gpt2.py --log-dir log\)"
    ):
        FolderLock(tmp_path / "log").acquire()
    first.release()
    assert json.loads((tmp_path / "log" / LOCK_FILE).read_text())["released"]
    FolderLock(tmp_path / "log").acquire().release()
    made = FolderLock(tmp_path / "new").acquire()
    assert made.created
    made.release()
    assert not (tmp_path / "new").exists()  # made by the lock, nothing written into it: removed again


def test_a_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path):
    proc = holder(tmp_path)
    with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):
        FolderLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    FolderLock(tmp_path).acquire().release()  # the kernel dropped the flock with the process


def test_a_deleted_lock_file_is_noticed_by_its_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "HEARTBEAT_SECONDS", 0.1)
    lock = FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).unlink()  # a second run could now lock a new file: two writers
    assert_lost(lock, "lock file was deleted")
    lock.release()


def test_without_flock_a_live_holder_on_this_host_is_refused_and_a_dead_one_is_not(tmp_path, no_flock):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_record(tmp_path, pid=proc.pid, started=time.time() + 5)  # the holder is that live process
        with pytest.raises(FolderInUse, match=f"pid {proc.pid} on .*not seen by this filesystem's locks"):
            FolderLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    write_record(tmp_path, pid=proc.pid)  # now dead (or its pid reused by a younger process)
    lock = FolderLock(tmp_path).acquire()
    assert not lock.flock and json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.record["token"]
    lock.release()


def test_without_flock_another_hosts_record_counts_while_its_heartbeat_is_fresh(tmp_path, no_flock):
    write_record(tmp_path, host="node7", heartbeat=time.time() - 5)
    with pytest.raises(FolderInUse, match="node7.*clears 120 s after its last heartbeat"):
        FolderLock(tmp_path).acquire()
    write_record(tmp_path, host="node7", heartbeat=time.time() - fileio.LEASE_SECONDS - 1)
    FolderLock(tmp_path).acquire().release()
    write_record(tmp_path, host="node7", released=True)  # a run that ended cleanly: no wait
    FolderLock(tmp_path).acquire().release()


def test_with_flock_another_hosts_live_record_is_still_refused(tmp_path):
    """NFS mounted `nolock`: each node's flock is local, so flock succeeds on both; the other node's
    fresh record still stops the second run."""
    write_record(tmp_path, host="node7")
    with pytest.raises(FolderInUse, match="node7"):
        FolderLock(tmp_path).acquire()


def test_without_flock_a_holder_whose_record_was_replaced_stops(tmp_path, no_flock):
    lock = FolderLock(tmp_path).acquire()
    write_record(tmp_path, host="node7")  # a second run that did not see this one took the folder
    assert_lost(lock, "another run took it over .*node7.*this one stops")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node7"  # its record is left alone


@pytest.mark.parametrize(
    ("where", "code"),
    [("stat", errno.ESTALE), ("stat", errno.EIO), ("read", errno.EIO), ("write", errno.EIO)],
    ids=["stat-ESTALE", "stat-EIO", "read-EIO", "write-EIO"],
)
def test_a_lock_file_unreadable_for_a_moment_is_not_a_lost_hold(tmp_path, quick_heartbeat, monkeypatch, where, code):
    """Unknown is not lost: MAX_UNKNOWN_HEARTBEATS - 1 heartbeats in a row that cannot stat, read or
    re-write the file do not stop the run, the heartbeat goes on, and a good one starts the count again."""
    lock = FolderLock(tmp_path).acquire()
    faults = LockFileFaults(monkeypatch, lock, where, code)
    for _ in range(2):  # twice over: the good heartbeat in between clears the count
        faults.fail(fileio.MAX_UNKNOWN_HEARTBEATS - 1)
        assert heartbeat_after(tmp_path, faults), "the heartbeat stopped at a failed access"
        assert lock.lost is None
    lock.check()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["released"]


@pytest.mark.parametrize("where", ["stat", "read", "write"])
def test_a_lock_file_unreadable_heartbeat_after_heartbeat_loses_the_hold(tmp_path, quick_heartbeat, monkeypatch, where):
    """A folder that stays unreadable may hold another run's record unseen: after MAX_UNKNOWN_HEARTBEATS
    in a row the run stops, naming the folder and the error."""
    lock = FolderLock(tmp_path).acquire()
    LockFileFaults(monkeypatch, lock, where, errno.ESTALE).fail(10**9)
    assert_lost(
        lock,
        rf"^{re.escape(str(tmp_path))}: its lock file could not be read or written for "
        rf"{fileio.MAX_UNKNOWN_HEARTBEATS} heartbeats in a row \(Stale file handle\)",
    )
    lock.release()


def test_a_record_read_mid_write_is_not_a_lost_hold(tmp_path, quick_heartbeat):
    lock = FolderLock(tmp_path).acquire()
    torn = time.time()
    (tmp_path / LOCK_FILE).write_text('{"host": "node7", "tok')  # what a read sees while a record is written
    assert heartbeat_after(tmp_path, moment=torn)
    assert lock.lost is None and json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.record["token"]
    lock.release()


def test_a_lock_file_replaced_by_another_is_noticed_by_its_holder(tmp_path, quick_heartbeat):
    lock = FolderLock(tmp_path).acquire()
    other = tmp_path / "other.lock"
    other.write_text(json.dumps({**lock.record, "heartbeat": time.time()}))  # even with this run's record in it
    os.replace(other, tmp_path / LOCK_FILE)  # another inode at the path: a second run could lock it
    assert_lost(lock, "lock file was replaced by another file: two runs were writing there")
    lock.release()


def test_after_a_failed_stat_another_runs_record_still_stops_the_holder(tmp_path, quick_heartbeat, monkeypatch):
    lock = FolderLock(tmp_path).acquire()
    faults = LockFileFaults(monkeypatch, lock, "stat", errno.ESTALE)
    faults.fail(1)
    assert heartbeat_after(tmp_path, faults)
    write_record(tmp_path, host="node7")
    assert_lost(lock, "another run took it over .*node7.*this one stops")
    lock.release()


def test_the_holders_command_is_shown_whole_or_cut_between_flags(tmp_path):
    """A refusal names the holder's command; one cut mid-flag ("--micro-bat") reads as a flag that
    does not exist, so a long one is cut between words and ends with " ..."."""
    usual = ["train_gpt2.py", "--model", "gpt2", "--micro-batch-size", "16", "--batch-size", "524288"]
    usual += ["--log-dir", "runs/gpt2-124m-fineweb10b-seed1337", "--data-dir", "data/fineweb10B", "--max-lr", "6e-4"]
    usual += ["--warmup-steps", "700", "--eval-every", "250", "--hellaswag-every", "1000", "--compile"]
    longest = usual + [f"--extra-flag-{i} {i * 1000}" for i in range(30)]

    def shown(command: list[str]) -> str:
        held = FolderLock(tmp_path, command).acquire()
        try:
            with pytest.raises(FolderInUse) as refused:
                FolderLock(tmp_path).acquire()
        finally:
            held.release()
        return re.search(r"started [\d-]+ [\d:]+: (.*)\): wait for it", str(refused.value)).group(1)

    assert 120 < len(" ".join(usual)) <= fileio.COMMAND_SHOWN_CHARS
    assert shown(usual) == " ".join(usual)
    cut = shown(longest)
    words = " ".join(longest).split()
    assert cut.endswith(" ...")
    kept = cut.removesuffix(" ...").split()
    assert kept == words[: len(kept)]  # whole words only
    assert len(" ".join(kept)) <= fileio.COMMAND_SHOWN_CHARS < len(" ".join(words[: len(kept) + 1]))
