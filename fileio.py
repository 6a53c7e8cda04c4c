"""Files that are never half-written, with the permissions a plain `open()` would give them.

Every file this repo writes for a user (checkpoints, token shards, manifests, metrics, exports,
figures) goes through `atomic_path` / `atomic_dir`: written to a temp name in the same folder,
fsynced, with the mode the user's umask allows (0644 / 0755 with the usual 022, so teammates on a
shared cluster can read them; `mkstemp` would leave 0600), then renamed over the target and the
folder's entry fsynced. A kill at any moment leaves the old file or the new one, never a torn
one. No torch here: fineweb.py and plot.py use it without importing torch.

`FolderLock` keeps a folder to one writing run at a time (training holds its --log-dir with it).

    uv run python -c "import fileio; fileio.atomic_write_bytes('/tmp/hello.txt', b'hi')"
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import cli

# errnos that mean "no room": a full disk, a quota, a file-size limit (ulimit -f)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (before a rename publishes it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp_prefix: str | None = None):
    """Yield a temp path beside `path` to write by name; when the block ends without an error the
    file is fsynced, renamed to `path` and the rename fsynced. On an error
    (a full disk, a kill signal turned into an exception) the temp file is removed and `path` is
    untouched. `tmp_prefix` names the temp file (default `.<name>.`; fineweb.py uses one without
    "train"/"val" so that no split-matching loader can pick up a half-written shard)."""
    path = Path(path)
    tmp = temp_name(path, tmp_prefix)
    # Created 0o666 for the umask to narrow, as open() does: writers that open it by name keep the mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield str(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_name(path: Path, tmp_prefix: str | None = None) -> Path:
    """A new name beside `path` (64 random bits; O_EXCL / mkdir refuse the unlikely clash)."""
    return path.parent / f"{tmp_prefix or f'.{path.name}.'}{secrets.token_hex(8)}.tmp"


def remove_temps(folder: str | Path, tmp_prefix: str) -> None:
    """Delete temp files `atomic_path` left behind when a process was killed mid-write (and temp
    folders: a sharded checkpoint that was still being written)."""
    for stale in Path(folder).glob(f"{tmp_prefix}*.tmp"):
        remove(stale)


def remove(path: str | Path) -> None:
    """Delete a file or a folder with everything in it, whichever `path` is; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, tmp_prefix: str | None = None) -> None:
    with atomic_path(path, tmp_prefix) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON object as one line (flushed, so `tail -f` and plot.py see it at once)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_examples(path: str | Path, check, what: str, fix: str, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSON-lines data file (HellaSwag's, a CORE task's), each passed through
    `check(example) -> problem or None`; the first `limit` if given. Anything wrong (not UTF-8, a line
    that is not JSON, an example `check` refuses, no examples) is a one-line UserError naming the file,
    the line, what it is not (`what`: "HellaSwag", "multiple_choice") and the `fix`. Lines end at "\n"
    only, as a `for line in f` reader's: str.splitlines would also split at U+2028 and the like, which
    JSON strings may hold unescaped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise cli.UserError(f"{path} is not UTF-8 text: the file is corrupt; delete it and {fix}") from None
    examples = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise cli.UserError(
                f"{path} line {line_number}: not valid JSON ({e.msg}): the file is torn or corrupt; delete it and {fix}"
            ) from None
        problem = check(example)
        if problem:
            raise cli.UserError(
                f"{path} line {line_number}: {problem}: not a {what} example; delete the file and {fix}"
            )
        examples.append(example)
    if not examples:
        raise cli.UserError(f"{path} holds no examples: delete it and {fix}")
    return examples


def append_result(folder: str | Path, file_name: str, record: dict) -> Path:
    """Append an evaluation's record to `folder`/`file_name` (a results JSONL), making the folder only
    now: an evaluation that failed leaves none behind."""
    path = Path(folder) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, record)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty staging folder beside `path`; when the block succeeds it replaces `path`
    (any folder there is moved aside first and deleted only once the new one is in place). The
    caller decides beforehand whether an existing `path` may be replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(path)
    staging.mkdir(0o777)  # the umask narrows it, as for any new folder: _follow_umask copies that mode
    try:
        yield staging
        _follow_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    aside = None
    if path.exists():
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=".tmp"))
        os.replace(path, aside / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        if aside is not None:
            os.replace(aside / path.name, path)  # put the old folder back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Some writers (safetensors) make 0600 files: give the tree under `folder`, made with 0o777 and
    so holding the umask's mode, the modes a plain mkdir / open() would."""
    dir_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), dir_mode & 0o666)


# ---- one writer per folder ----------------------------------------------------------------------
LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30  # how often a holder re-writes its record (and checks it is still its own)
LEASE_SECONDS = 120  # a record from another host not re-written for this long belongs to a dead run
# Heartbeats in a row that could not stat, read or re-write the lock file before the hold counts as
# lost: one NFS ESTALE or Lustre EIO is no reason to stop a long run, a folder unreadable for minutes
# is. Below LEASE_SECONDS / HEARTBEAT_SECONDS, so the run stops before its unrefreshed lease lapses
# and a run on another host could take the folder.
MAX_UNKNOWN_HEARTBEATS = 3
COMMAND_SHOWN_CHARS = 300  # a holder's command longer than this is shown up to a whole word, then " ..."
# errnos of a filesystem without working flock (Lustre mounted without -o flock, some FUSE / NFS)
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


class FolderInUse(cli.UserError):
    """Another live run writes into the folder (a one-line, user-fixable error)."""


class FolderLock:
    """An exclusive hold on a folder for the run that writes into it (training's --log-dir).

    The hold is an flock on `<folder>/run.lock`, which the kernel drops when the process dies however
    it dies (a crashed run never leaves a stale lock); a second run asking for it is refused at once,
    before it writes anything, naming the holder (host, pid, start time, command) recorded in the
    file. Readers (plot.py, sample.py, TensorBoard, ...) never ask for it.

    Where flock does not work (an error from the filesystem, or NFS mounted `nolock`, where each node
    only sees its own locks), a record that is kept alive catches two live writers instead: every
    HEARTBEAT_SECONDS the holder re-writes it, and checks the file still names itself; a run that
    finds a record of another live process (on this host: its pid exists; elsewhere: re-written less
    than LEASE_SECONDS ago, clocks in sync) is refused, and a holder that finds another run's record
    in place of its own stops at its next `check()` (the trainer checks at every log step and before
    every checkpoint)."""

    def __init__(self, folder: str | Path, command: list[str] | None = None):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_FILE
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "token": secrets.token_hex(8),
            "command": " ".join(command or []),
        }
        self.fd: int | None = None
        self.created = False  # the folder did not exist: removed again if the run leaves nothing in it
        self.flock = False
        self.lost: str | None = None  # why the hold was lost (another run's record in its place)
        self._stop = threading.Event()

    def acquire(self) -> FolderLock:
        """Create the folder if needed and hold it; FolderInUse (one line) when it cannot be."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FolderInUse(f"--log-dir {self.folder} is a file, not a folder: choose another --log-dir")
        try:
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise FolderInUse(
                f"cannot write in --log-dir {self.folder} ({e.strerror}): fix its permissions or choose "
                "another --log-dir"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.flock = True
        except BlockingIOError:
            holder = self._describe(self._read())
            self._close()
            raise FolderInUse(
                f"{self.folder} is in use by another run ({holder}): wait for it to end or stop it, "
                "or give this run its own --log-dir"
            ) from None
        except OSError as e:
            if e.errno not in NO_FLOCK_ERRNOS:
                self._close()
                raise
        other = self._read()
        if self._alive(other):
            self._close()
            dead = (
                f"; if it died, this clears {LEASE_SECONDS} s after its last heartbeat"
                if other.get("host") != self.record["host"]
                else ""
            )
            raise FolderInUse(
                f"{self.folder} is in use by another run ({self._describe(other)}, not seen by this "
                f"filesystem's locks{dead}): wait for it to end or stop it, or give this run its own --log-dir"
            )
        self._write()
        if not self.flock:  # two runs may have written at once: the one whose record stayed goes on
            time.sleep(1.0)
            if self._read().get("token") != self.record["token"]:
                self._close()
                raise FolderInUse(
                    f"{self.folder} was taken by another run at the same moment: give this run its own --log-dir"
                )
        threading.Thread(target=self._heartbeat, name="folder-lock", daemon=True).start()
        return self

    def check(self) -> None:
        """Raise FolderInUse when another run's record replaced this one's."""
        if self.lost:
            raise FolderInUse(self.lost)

    def release(self) -> None:
        """Mark the record released (the next run need not wait for the lease) and drop the lock; a
        folder this lock created and nothing else wrote into (a run that failed at start) goes again."""
        self._stop.set()
        if self.fd is not None and not self.lost:
            self._write(released=True)
        self._close()
        if self.created and {p.name for p in self.folder.iterdir()} <= {LOCK_FILE}:
            remove(self.folder)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- the record -----------------------------------------------------------------------------
    def _read(self) -> dict:
        """The record in the file; {} when there is none to go by (no file, unreadable, being written)."""
        try:
            return self._read_or_raise()
        except OSError:
            return {}

    def _read_or_raise(self) -> dict:
        """The record in the file; {} while it is being written or is not a record of ours; OSError when
        the file cannot be read (the heartbeat must tell "cannot see" from "nothing there")."""
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            record = json.loads(data or b"{}")
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self, released: bool = False) -> None:
        data = json.dumps({**self.record, "heartbeat": time.time(), "released": released}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _alive(self, other: dict) -> bool:
        """Does `other` (a record found in the file) belong to another run that still writes here?"""
        if not other.get("token") or other.get("released") or other.get("token") == self.record["token"]:
            return False
        if other.get("host") == self.record["host"]:
            # flock works between the processes of one host (even on NFS mounted `nolock`): holding it
            # is the answer. Without it, the pid must exist and be no younger than the record (a pid
            # the kernel gave to a new process since is not that run).
            if self.flock or other.get("pid") == os.getpid():
                return False
            return _pid_started_before(other.get("pid"), other.get("started", 0))
        return time.time() - other.get("heartbeat", 0) < LEASE_SECONDS

    @staticmethod
    def _describe(record: dict) -> str:
        if not record.get("host"):
            return "its record is being written"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
        command = _whole_words(str(record.get("command", "")), COMMAND_SHOWN_CHARS)
        return f"pid {record.get('pid')} on {record['host']}, started {started}: {command}"

    def _heartbeat(self) -> None:
        """Re-write the record every HEARTBEAT_SECONDS and set `lost` once another run may write here.

        Unknown is not lost: on a shared filesystem a stat, read or write of the file can fail for a
        moment (NFS ESTALE, Lustre EIO), and such a heartbeat only counts; the hold is lost on evidence
        (`_taken`) or after MAX_UNKNOWN_HEARTBEATS unknown heartbeats in a row. An error never ends
        this thread, which would silently end the heartbeat that other hosts' runs go by."""
        unknown = 0
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                taken = self._taken()
                if taken is None:
                    self._write()
            except OSError as e:
                unknown += 1
                if unknown >= MAX_UNKNOWN_HEARTBEATS:
                    self.lost = (
                        f"{self.folder}: its lock file could not be read or written for {unknown} heartbeats "
                        f"in a row ({e.strerror or e}), so this run cannot tell whether another run writes "
                        "there and stops; its last checkpoint is intact: fix the filesystem, then resume"
                    )
                    return
                continue
            if taken is not None:
                self.lost = (
                    f"{self.folder}: {taken}: two runs were writing there, so this one stops; "
                    "its last checkpoint is intact"
                )
                return
            unknown = 0

    def _taken(self) -> str | None:
        """What shows that another run may write into the folder now, or None when the file is still this
        run's; OSError when that cannot be told this time. Evidence is a file gone from the path (a new
        run could lock a new one), another file at the path, or another run's record in it."""
        on_path = _inode(self.path)
        if on_path is None:
            return "its lock file was deleted"
        if on_path != os.fstat(self.fd).st_ino:
            return "its lock file was replaced by another file"
        try:
            found = self._read_or_raise()
        except FileNotFoundError:  # deleted between the stat and the read
            return "its lock file was deleted"
        if found.get("token") and found["token"] != self.record["token"]:
            return f"another run took it over ({self._describe(found)})"
        return None

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also drops the flock
            self.fd = None


def _inode(path: Path) -> int | None:
    """The inode at `path`; None when nothing is there. ENOENT is the filesystem's answer that the
    name is gone (an NFS server does not give it for a file that exists); any other error (ESTALE,
    EIO, EACCES) is a failure to ask, says nothing about the file, and is raised for the caller to
    count as unknown."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _whole_words(text: str, limit: int) -> str:
    """`text` whole when it fits in `limit` characters, else its words up to there and " ...": a
    command cut mid-flag ("--micro-bat") reads as a flag that does not exist."""
    words = text.split()
    if len(text) <= limit or len(words) <= 1:  # one word is shown whole, however long
        return text
    kept = 1
    while kept < len(words) and len(" ".join(words[: kept + 1])) <= limit:
        kept += 1
    return " ".join(words[:kept]) + (" ..." if kept < len(words) else "")


def _pid_started_before(pid, when: float) -> bool:
    """Is `pid` a live process that started before `when` (seconds since the epoch)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    try:  # Linux: the 22nd field of /proc/<pid>/stat is its start, in clock ticks after boot
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK") <= when + 1
    except (OSError, ValueError, IndexError, StopIteration):
        return True  # no /proc: alive is all we know
