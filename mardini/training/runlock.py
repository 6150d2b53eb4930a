"""One run per run folder: ``<run dir>/run.lock``, held while a run uses the folder.

The file holds JSON ``{"pid", "host", "started", "command"}`` of the holder, and the holder keeps an exclusive
``flock`` on it. The kernel drops an flock when its process dies, however it dies (kill -9 included), so a lock
file whose flock can be taken is stale: the next run takes it over and logs whose it was. A clean release deletes
the file, and the folder too when acquire() created it and nothing else was written there (a run refused at
start-up leaves no empty folder). Locking the same folder again in one process is re-entrant (tests and notebooks
build several Trainers); forked children (DataLoader workers) close their copy, so a dead run's workers never keep
its lock alive. Where the filesystem has no flock (some network mounts) the run warns and goes on unprotected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = "run.lock"
log = logging.getLogger("mardini.train")

# lock path -> [file descriptor or None (unprotected), how many acquire() calls, whether acquire() made the folder]
_held: dict[str, list] = {}


class RunLockedError(RuntimeError):
    """Another live run holds the run folder."""


def acquire(run_dir: str | os.PathLike) -> None:
    """Lock run_dir (created if missing) for this process; RunLockedError if a live run holds it."""
    path = os.path.join(os.path.abspath(run_dir), LOCK_NAME)
    if path in _held:
        _held[path][1] += 1
        return
    created = not os.path.isdir(run_dir)
    if fcntl is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return _unprotected(path, "this platform has no flock", created)
    while True:
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # again: a run that made it may have removed it
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLockedError(
                f"{run_dir} is in use by another run ({_describe(holder)}; lock file {path}). Wait for it to end or "
                f"stop it, or choose another run_name / train.output_dir") from None
        except OSError as e:
            os.close(fd)
            return _unprotected(path, f"flock failed: {e}", created)
        if _still_at(fd, path):
            break
        os.close(fd)  # the holder released (deleted) the file between our open and flock: lock the new one
    previous = _read(fd)
    if previous:
        log.warning("taking over %s: the run that held it (%s) is no longer running", path, _describe(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[path] = [fd, 1, created]


def release(run_dir: str | os.PathLike) -> None:
    """Undo one acquire(); the last one deletes the lock file (while still holding it), unlocks, and removes the
    folder if acquire() created it and it is empty."""
    path = os.path.join(os.path.abspath(run_dir), LOCK_NAME)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[path]
    if entry[0] is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(entry[0])
    if entry[2]:
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty: the run wrote there
            pass


def _unprotected(path: str, why: str, created: bool) -> None:
    log.warning("cannot lock %s (%s): nothing stops a second run from using this folder", path, why)
    _held[path] = [None, 1, created]


def _still_at(fd: int, path: str) -> bool:
    """Is the file we locked still the one at path?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?", "command": "(unreadable lock file)"}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _close_in_child() -> None:
    """After fork: the child must not keep the parent's locks alive (the flock lives while any copy is open)."""
    for fd, *_ in _held.values():
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
