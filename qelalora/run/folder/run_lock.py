"""One writer per run folder: an exclusive lock held for as long as a process trains into it.

The lock is `fcntl.flock` on a file in the folder, so the kernel releases it
when the holder exits in any way (SIGKILL and crashes included): a stale lock
never blocks a later `--resume`. A second process that finds it held stops
with a clear error instead of writing checkpoints over the first one's.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from qelalora.errors import RunDirError

from .layout import RunFolder


class RunLock:
    """`with RunLock(run_dir):` holds the folder (created if missing) exclusively."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = RunFolder(run_dir).lock
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.run_dir} is in use by another qelalora process ({holder}); wait for it to finish "
                "(or stop it), or train into another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held, so nobody else can be holding it
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
