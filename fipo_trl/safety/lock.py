"""One run per output_dir: the main process holds ``<output_dir>/_fipo_trl_run.lock`` for the whole run."""

from __future__ import annotations

import os
import socket
import stat
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "_fipo_trl_run.lock"  # "_*": left out of Hub uploads of output_dir
_held_locks: dict[str, list] = {}  # real path of output_dir -> [open lock file, holders in this process]


def _open_lock_file(path: Path, output_dir):
    """Open (or create) the lock file for reading and writing, held open for the whole run. It never follows a
    symbolic link (O_NOFOLLOW), and refuses anything but a plain file of its own (not a FIFO or device, not a hard
    link shared with another file): the pid line is written into it, so it must be a file no one else owns."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if path.is_symlink():
            raise ValueError(
                f"output_dir {str(output_dir)!r}: the run's lock file {path} is a symbolic link (to "
                f"{os.readlink(path)!r}). fipo_trl never writes through a link, which would overwrite the file it "
                f"points to. Fix: remove the link (rm {path}), or pass another --output_dir.") from None
        raise ValueError(f"output_dir {str(output_dir)!r}: cannot create the run's lock file {path} ({error}). "
                         "Fix: pass a folder you can write to as --output_dir.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a hard link ({info.st_nlink} names)"
        raise ValueError(
            f"output_dir {str(output_dir)!r}: the run's lock file {path} is {what}; fipo_trl writes its pid line "
            f"into that file, so it must be a plain file of its own. Fix: remove it (rm {path}), or pass another "
            "--output_dir.")
    return os.fdopen(fd, "r+")


def acquire_output_dir_lock(output_dir) -> None:
    """Take the run's lock on ``output_dir`` (``<output_dir>/_fipo_trl_run.lock``, an exclusive ``flock``), or
    raise ValueError naming the run that holds it. The kernel drops the lock when its process ends, however it
    ends, so the file a dead run left behind is simply taken over. Re-entrant within a process (the CLI takes it
    before the model loads, ``train`` again): release as often as acquired."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output_dir {str(output_dir)!r} cannot be created ({error}). Fix: pass a folder you can "
                         "write to as --output_dir.") from None
    key = os.path.realpath(folder)
    if key in _held_locks:
        _held_locks[key][1] += 1
        return
    path = folder / LOCK_FILE
    while True:
        handle = _open_lock_file(path, output_dir)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(
                f"output_dir {str(output_dir)!r} is in use by another fipo_trl run ({holder}); two runs writing one "
                "output_dir overwrite each other's checkpoints. Fix: wait for that run to end, or pass another "
                f"--output_dir. (The lock is {path}; the system releases it when that run's process ends.)") from None
        except OSError:  # a filesystem without flock (some network mounts): run unlocked rather than not at all
            handle.close()
            warnings.warn(f"output_dir {str(output_dir)!r}: this filesystem does not support file locks, so a second "
                          "run into the same output_dir would not be stopped.", UserWarning, stacklevel=3)
            return
        try:  # the holder may have removed the file between our open and flock: lock the file that is there
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n")
    handle.flush()
    _held_locks[key] = [handle, 1]


def release_output_dir_lock(output_dir) -> None:
    key = os.path.realpath(output_dir)
    if key not in _held_locks:
        return
    _held_locks[key][1] -= 1
    if _held_locks[key][1] == 0:
        handle, _ = _held_locks.pop(key)
        Path(output_dir, LOCK_FILE).unlink(missing_ok=True)  # unlinked while still locked: see the samestat check
        handle.close()


@contextmanager
def output_dir_lock(output_dir, take: bool = True):
    """Hold the run's lock on ``output_dir`` for the block (``take`` False: a process that is not the main one)."""
    if take:
        acquire_output_dir_lock(output_dir)
    try:
        yield
    finally:
        if take:
            release_output_dir_lock(output_dir)

