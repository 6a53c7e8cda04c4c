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
