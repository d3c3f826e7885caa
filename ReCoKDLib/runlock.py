"""One run per run folder: a lock file that names its owner, and stale locks explained.

Two ``recokd distill --out X`` (or ``train-teacher``, ``demo``) at once would overwrite each
other's ``checkpoint.pt`` and models. :class:`RunFolderLock` holds ``X/.recokd.lock`` for the
whole run:

* the file records the owner (``{"pid", "host", "started", "command"}``), so the second run is
  refused with who holds the folder, since when, and what to do;
* it is held with an OS lock (``fcntl.flock``) that the kernel drops when the owner dies, however
  it dies (``kill -9`` included): a lock file left behind by a dead process is **stale**; the next
  run says whose it was and takes the folder over (a :class:`StaleLockWarning`);
* a record from another host whose OS lock cannot be seen from here (a network file system
  without locks) is refused with how to clear it; on the same host the owner's pid is checked;
* the same process may take the lock again (nested jobs: the demo's stages); it is released when
  the outermost holder lets go, and the file removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from ReCoKDLib.data.io import InputWarning

__all__ = ["LOCK_NAME", "RunFolderBusyError", "StaleLockWarning", "RunFolderLock", "read_owner"]

LOCK_NAME = ".recokd.lock"

try:  # POSIX
    import fcntl
except ImportError:  # Windows: the owner record and its pid only
    fcntl = None  # type: ignore[assignment]

#: folders this process holds: resolved path -> [file descriptor, depth]
_HELD: dict[Path, list[int]] = {}


class RunFolderBusyError(ValueError):
    """Another run holds the run folder."""


class StaleLockWarning(InputWarning):
    """A lock left by a run that is gone was taken over."""


def read_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The owner record of ``folder``'s lock file, or ``None`` (no file, or unreadable)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another run (its lock file names no owner)"
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = f" ({owner['command']})" if owner.get("command") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}{command}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True  # it exists (owned by someone else) or cannot be told: assume alive
    return True


class RunFolderLock:
    """``with RunFolderLock(out_dir, command="recokd distill ..."):`` holds ``out_dir`` for one run.

    Raises (on enter):
        RunFolderBusyError: another live run holds the folder (the message names it).
    """

    def __init__(self, folder: str | os.PathLike, command: str | None = None) -> None:
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / LOCK_NAME
        self.stale_owner: dict[str, Any] | None = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return
        for _ in range(10):  # the file may be replaced under us by a releasing owner: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                locked = self._os_lock(fd)
                owner = read_owner(self.folder)
                if not locked:
                    raise self._busy(owner)
                if not self._same_file(fd):
                    os.close(fd)
                    continue
                if owner and owner.get("pid") is not None:
                    self._check_previous(owner, os_locked=fcntl is not None)
                self._write_record(fd)
            except BaseException:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise
            _HELD[key] = [fd, 1]
            return
        raise RunFolderBusyError(f"{self.folder}: its lock file {self.path} keeps changing; another run is starting "
                                 "there")

    def release(self) -> None:
        key = self.folder.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        try:
            if self._same_file(fd):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the OS lock

    # ------------------------------------------------------------------------------------------
    def _os_lock(self, fd: int) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # a file system without locks (some network mounts): the record decides
            return True
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _busy(self, owner: dict[str, Any] | None) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"{self.folder} is in use by {_describe(owner)}: two runs in one folder would overwrite each other's "
            f"checkpoint and models. Wait for that run to finish (or stop it), or choose another --out")

    def _check_previous(self, owner: dict[str, Any], os_locked: bool) -> None:
        """A record whose OS lock is free: stale on this host when its pid is gone (or the OS lock says so)."""
        here = socket.gethostname()
        if owner.get("host") != here:
            raise RunFolderBusyError(
                f"{self.folder} is locked by {_describe(owner)}, another host: from {here} it cannot be told whether "
                f"that run still goes on. If it does not, delete {self.path} and start again; else choose another --out")
        if owner.get("pid") == os.getpid():
            return
        if not os_locked and _pid_alive(owner.get("pid")):
            raise self._busy(owner)
        self.stale_owner = owner
        warnings.warn(StaleLockWarning(
            f"{self.folder} had a stale lock of {_describe(owner)}: that process is gone (killed or crashed) and no "
            "longer holds the folder; this run takes it over (resume with --resume to continue its checkpoint)"),
            stacklevel=4)

    def _write_record(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0) if hasattr(os, "pwrite") else (os.lseek(fd, 0, 0), os.write(fd, data))
        os.fsync(fd)
