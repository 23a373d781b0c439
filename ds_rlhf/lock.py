"""One run per output directory: rank 0 holds OUTPUT_DIR/run.lock while the run lives.

The lock is an advisory `flock` on that file, which the kernel (or the NFS server, once the
holder's lease runs out) releases when the holder dies however it dies, so a crashed or
kill -9'd run never blocks the next one. The file's text names the holder (host, PID, start
time) for the refusal message; a run that ends normally empties it, so a text found with the
lock free was left by a run that died, which the new run says when it takes over.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ds_rlhf.config import UserInputError

NAME = "run.lock"
_HELD: dict[Path, int] = {}  # lock file -> the open descriptor holding it, for this process's
# lifetime


class RunLockedError(UserInputError):
    """Another live run holds the output directory."""


def _holder_text(path: Path) -> str:
    """The holder's record; retried briefly, as a new holder writes it just after locking."""
    for _ in range(20):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.05)
    return ""


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"PID {h['pid']} on host {h['host']} (since {h['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def acquire(output_dir: str | Path) -> Path:
    """Lock `output_dir` for this process (rank 0) before anything in it is read or written.

    Raises RunLockedError naming the holder when another run holds it; prints one line when
    taking over from a run that died without releasing it.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = (out / NAME).resolve()
    if path in _HELD:  # this process already holds it: the same run, built again (a resume)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{out} is in use by another run: {_describe(_holder_text(path))} holds {path}. "
            "Wait for it to finish or stop it, or give this run another output_dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {path}: this file system has no file locks ({e.strerror}); nothing "
              "stops a second run from using the same output_dir", flush=True)
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        print(f"{path}: taking over the lock of {_describe(previous)}, which ended without "
              "releasing it (crash or kill)", flush=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    _HELD[path] = fd
    atexit.register(release)  # any normal exit, errors included; a kill leaves the record
    return path


def release() -> None:
    """Empty the record and unlock. The file stays: unlinking a locked file lets a newcomer
    lock a new file of the same name while a third process still holds the old one."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock
