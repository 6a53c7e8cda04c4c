"""Files that are never half-written, with the permissions a plain `open()` would give them.

Every file this repo writes for a user (checkpoints, token shards, manifests, metrics, exports,
figures) goes through `atomic_path` / `atomic_dir`: written to a temp name in the same folder,
fsynced, given the mode the user's umask allows (0644 / 0755 with the usual 022, so teammates on a
shared cluster can read them; `mkstemp` alone would leave 0600), then renamed over the target and
the folder's entry fsynced. A kill at any moment leaves the old file or the new one, never a torn
one. No torch here: fineweb.py and plot.py use it without importing torch.

    uv run python -c "import fileio; fileio.atomic_write_bytes('/tmp/hello.txt', b'hi')"
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

# errnos that mean "no room": a full disk, a quota, a file-size limit (ulimit -f)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc); elsewhere set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    file is fsynced, given the umask's mode, renamed to `path` and the rename fsynced. On an error
    (a full disk, a kill signal turned into an exception) the temp file is removed and `path` is
    untouched. `tmp_prefix` names the temp file (default `.<name>.`; fineweb.py uses one without
    "train"/"val" so that no split-matching loader can pick up a half-written shard)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty staging folder beside `path`; when the block succeeds it replaces `path`
    (any folder there is moved aside first and deleted only once the new one is in place). The
    caller decides beforehand whether an existing `path` may be replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
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
    """mkdtemp makes 0700 and some writers (safetensors) 0600: give the tree a plain open()'s modes."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
