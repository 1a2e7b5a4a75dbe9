"""The fused FIPO loss on CPU: ``fipo_cpu.c`` compiled on first use, called through ctypes.

Why C and not more torch ops: on CPU the torch path's cost at a few thousand tokens is ~200 dispatcher calls of a
few microseconds each, not arithmetic, so its time per token falls 5x from T = 2K to 32K. The C kernel does the
whole official loss (log-ratio, filter, reverse scan, weights, dual-clip loss, gradient, the metrics' sums) in one
read of the inputs, like the Triton kernel on GPU: vectorised loops over 256-token chunks around a scalar scan, one
thread (so it never competes with torch's thread pool), and the same cost per token at any T.

The shared object is built with the system C compiler (``$CC``, split like a shell command line, else
``cc``/``gcc``/``clang``; Triton needs one too; ``FIPO_TRL_CC_TIMEOUT`` seconds at most, default 120) into
``$FIPO_TRL_CACHE`` (default ``~/.cache/fipo_trl``), named by a hash of the source, compiler command, flags, CPU
architecture and the compiler's target and version; concurrent processes (DDP ranks) each compile in a scratch
directory and rename the result into place. Without a compiler, or with ``FIPO_TRL_CPU_KERNEL=0``,
``cpu_kernel_usable()`` is False and ``fipo_loss(backend="auto")`` takes the torch path; ``cpu_kernel_status()``
says why.

Loading a shared object runs its code, so a cached build is loaded only when this process can trust it: the cache
directory is owned by the current user and not group- or world-writable (else a private temporary directory is used,
with a warning); the library is a regular file (not a link) owned by the user, not group- or world-writable, and its
sha256 matches the ``<name>.sha256`` record written next to it at build time (this also catches a truncated file,
which used to crash the process with SIGBUS). Anything else is never loaded: it is rebuilt, with a warning. What is
loaded is the very file that was checked (through its open descriptor); directories and files are created 0700 and
0600 whatever the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .fipo_torch import FIPOTorchResult, _LossWithStoredGradient, non_finite_error, weight_bounds

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fipo_cpu.c")
# Order of the stats the C kernel writes (the keys of fipo_torch._stats), then the loss and two error counts.
STATS_KEYS = ("n_tokens", "n_final_tokens", "sum_neg_log_ratio", "sum_future_kl", "n_active", "n_filtered",
              "n_pg_clipped", "n_dual_clipped", "n_safety", "sum_weight", "min_weight", "max_weight",
              "sum_raw_weight", "min_raw_weight", "max_raw_weight", "n_upper_clipped", "n_lower_clipped",
              "n_neg_ratio_2_3", "n_neg_ratio_3_4", "n_neg_ratio_4_c", "n_pos_mini", "max_neg_ratio",
              "max_pos_ratio", "min_pos_ratio", "n_rows", "n_dropped_rows")
N_OUT = len(STATS_KEYS) + 3  # + loss, NaN log-ratios, non-finite advantages
CHUNK_SIZE = 256  # tokens the kernel handles per step of a row (its CHUNK)
_BAD_RATIO, _BAD_ADV = N_OUT - 2, N_OUT - 1
# No -ffast-math (it would break the inf/NaN handling) and no -march=native (a cache on a shared home directory
# may be loaded by another CPU model: the source picks AVX2 at run time instead). -fno-trapping-math only lets the
# comparisons become vector selects (it ignores FP exception flags, which nothing reads).
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
CC_TIMEOUT = 120.0  # seconds for one compiler call (FIPO_TRL_CC_TIMEOUT overrides); a build takes about one second
_MAX_LIBRARY_BYTES = 64 << 20  # far above a real build (~50 KB): refuse to read anything bigger
_RECORD_SUFFIX = ".sha256"  # the sidecar holding the library's sha256, written with it at build time

_status = "not built yet"
_loaded_fds: list[int] = []  # descriptors of the loaded libraries, kept open for the process's life (see _dlopen)


class _Untrusted(Exception):
    """A cache directory or cached file that this process must not use; the message says why."""


def _cache_dir() -> Path:
    if os.environ.get("FIPO_TRL_CACHE"):
        return Path(os.environ["FIPO_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fipo_trl"


def _compiler() -> tuple[list[str] | None, str]:
    """The compiler command ($CC split like a shell command line, its program found on PATH), or why there is none."""
    cc = os.environ.get("CC", "").strip()
    if not cc:
        found = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
        return ([found], "") if found else (None, "no C compiler found (set $CC, or install gcc or clang)")
    try:
        words = shlex.split(cc)
    except ValueError as error:
        return None, f"no C compiler found: CC={cc!r} is not a valid command line ({error})"
    program = shutil.which(words[0])
    if program is None:
        return None, f"no C compiler found: CC={cc!r}: {words[0]!r} not found"
    return [program, *words[1:]], ""


def _cc_timeout() -> float:
    try:
        return float(os.environ.get("FIPO_TRL_CC_TIMEOUT", CC_TIMEOUT))
    except ValueError:
        return CC_TIMEOUT


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a compiler command with a timeout (subprocess.TimeoutExpired past it).

    In a process group of its own, killed as a whole: subprocess.run's timeout kills only the first process (the
    driver, or ccache) and then waits for the output pipes, which its children (cc1, as, ld) keep open.
    """
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C: leave no compiler running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _compiler_identity(command: list[str], timeout: float) -> str:
    """The compiler's target triple and version, for the cache key: a cache on a home directory shared between
    machines must not hand one architecture's (or compiler's) build to another."""
    return "\n".join(_run([*command, flag], timeout).stdout.strip() for flag in ("-dumpmachine", "--version"))


def _check_private(info: os.stat_result) -> None:
    """Raise _Untrusted unless the file is the current user's and nobody else can write it."""
    if info.st_uid != os.geteuid():
        raise _Untrusted(f"it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise _Untrusted(f"it is group- or world-writable (mode {stat.S_IMODE(info.st_mode):o})")


def _open_private_dir(path: Path) -> int:
    """A descriptor of the directory path (created 0700 where missing), which pins it: the files are then opened
    relative to it, so a directory swapped in afterwards is never read. Raises _Untrusted if others could write it."""
    missing = [directory for directory in (path, *path.parents) if not directory.exists()]
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # created by a racing process; checked below like any existing directory
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask, which may be anything
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check_private(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_private(dir_fd: int, name: str) -> tuple[int, bytes]:
    """Open name in the pinned directory and read it, after checking that it is a regular file of this user's that
    nobody else can write; returns the open descriptor (the caller closes it) and the bytes read from it.

    O_NOFOLLOW: a symbolic link is refused, not followed; O_NONBLOCK: a FIFO does not block the open.
    FileNotFoundError if there is no such file; _Untrusted for anything else wrong with it.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as error:  # ELOOP for a symbolic link, EACCES, ...
        raise _Untrusted(f"it cannot be opened safely ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Untrusted("it is not a regular file")
        _check_private(info)
        if info.st_size > _MAX_LIBRARY_BYTES:
            raise _Untrusted(f"it is implausibly large ({info.st_size} bytes)")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return fd, b"".join(chunks)
    except BaseException:
        os.close(fd)
        raise


def _cached(dir_fd: int, name: str) -> int | None:
    """The descriptor of the cached library, verified against its hash record; None when it is not there.

    Raises _Untrusted for a library that must not be loaded (foreign, writable by others, truncated, no record).
    Checking the hash before dlopen is what keeps a truncated file from crashing the process with SIGBUS.
    """
    for attempt in range(2):
        try:
            fd, data = _read_private(dir_fd, name)
        except FileNotFoundError:
            return None
        try:
            record_fd, record = _read_private(dir_fd, name + _RECORD_SUFFIX)
            os.close(record_fd)
        except FileNotFoundError:
            reason = f"its hash record {name}{_RECORD_SUFFIX} is missing"
        except _Untrusted as error:
            reason = f"its hash record {name}{_RECORD_SUFFIX} is not trusted: {error}"
        else:
            if hashlib.sha256(data).hexdigest() == record.decode("ascii", "replace").strip():
                return fd
            reason = f"its sha256 does not match {name}{_RECORD_SUFFIX} (a truncated, corrupt or replaced file)"
        os.close(fd)
        if attempt == 0:
            time.sleep(0.05)  # a racing build may be between its two renames: look once more before rebuilding
    raise _Untrusted(reason)


def _build(command: list[str], flags: tuple[str, ...], dir_fd: int, directory: Path, name: str,
           timeout: float) -> int | None:
    """Compile into a private scratch directory in the cache, hash the result, and rename it and its hash record into
    place (atomic: another process never sees a half-written file). Returns the descriptor of the built library, or
    None if the compiler fails; subprocess.TimeoutExpired past the timeout.

    The result is read through the pinned scratch directory, not by path: if the path were redirected during the
    compile, the compiler would write elsewhere and nothing would be found here.
    """
    scratch = f"tmp{secrets.token_hex(8)}"
    os.mkdir(scratch, 0o700, dir_fd=dir_fd)
    scratch_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        os.fchmod(scratch_fd, 0o700)
        command = [*command, *flags, str(SOURCE), "-o", str(directory / scratch / name), "-lm"]
        result = _run(command, timeout)
        if result.returncode != 0:
            logger.debug("fipo_trl: %s failed: %s", shlex.join(command), result.stderr.strip())
            return None
        try:
            os.chmod(name, 0o600, dir_fd=scratch_fd)  # the compiler's output mode follows the umask
            fd, data = _read_private(scratch_fd, name)
        except (OSError, _Untrusted) as error:
            logger.debug("fipo_trl: %s left no usable library: %s", shlex.join(command), error)
            return None
        record_fd = os.open(name + _RECORD_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                            dir_fd=scratch_fd)
        with os.fdopen(record_fd, "w") as record:
            os.fchmod(record_fd, 0o600)
            record.write(hashlib.sha256(data).hexdigest() + "\n")
        try:  # the record first: a process that finds the new library finds its record too
            for file in (name + _RECORD_SUFFIX, name):
                os.replace(file, file, src_dir_fd=scratch_fd, dst_dir_fd=dir_fd)
        except OSError as error:
            logger.warning("fipo_trl: could not store the CPU kernel in %s (%s); this process uses its build, the next "
                           "one compiles again.", directory / name, error)
        return fd
    finally:
        for leftover in os.listdir(scratch_fd):
            os.unlink(leftover, dir_fd=scratch_fd)
        os.close(scratch_fd)
        os.rmdir(scratch, dir_fd=dir_fd)


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the verified library that fd holds open.

    Through /proc/self/fd/N the kernel maps the very inode that was checked and hashed, without looking up a path
    again, so nothing swapped in since (another file, a link, another directory) can be loaded; and the inode cannot
    change, as only its owner (this user) may write it and fipo_trl only ever replaces cached files by rename. This
    needs no private copy (which would cost a second file, that a noexec /tmp may refuse to map or a crash may leave
    behind). The descriptor stays open: glibc takes an already loaded library's name as its identity, so a reused
    /proc/self/fd/N must never name another file. Without /proc (not Linux), the path is loaded after checking that
    it still names the verified file.
    """
    proc_path = f"/proc/self/fd/{fd}"
    if os.path.exists(proc_path):
        library = ctypes.CDLL(proc_path)
        _loaded_fds.append(fd)
        return library
    opened, named = os.fstat(fd), os.stat(path)
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise OSError(f"{path} changed while it was being loaded")
    library = ctypes.CDLL(str(path))
    os.close(fd)
    return library


def _open_cache() -> tuple[Path, int, str]:
    """The cache directory and a descriptor pinning it, and a note for the status: a fresh private temporary
    directory (removed once loaded) when the configured one is not safe or cannot be created."""
    directory = _cache_dir()
    try:
        return directory, _open_private_dir(directory), ""
    except (_Untrusted, OSError) as error:
        reason = f"the cache directory {directory} is not used: {error}"
    logger.warning("fipo_trl: %s. The CPU kernel is built in a private temporary directory instead, once per process; "
                   "make that directory yours and private (chmod 700), or set FIPO_TRL_CACHE to one that is.", reason)
    directory = Path(tempfile.mkdtemp(prefix="fipo_trl-"))
    return directory, _open_private_dir(directory), f" (a private temporary directory, as {reason})"


def _load(command: list[str], identity: str, timeout: float) -> ctypes.CDLL | None:
    """Load the cached build, or build and load it; None (and _status says why) if neither works."""
    global _status
    source = SOURCE.read_bytes()
    directory, dir_fd, note = _open_cache()
    try:
        for flags in (BASE_FLAGS + ("-fopenmp-simd",), BASE_FLAGS):  # OpenMP's simd pragmas, when the compiler has them
            key_data = repr((command, flags, platform.machine(), identity)).encode()
            name = f"fipo_cpu_{hashlib.sha256(source + key_data).hexdigest()[:16]}.so"
            try:
                fd, how = _cached(dir_fd, name), "reused"
            except _Untrusted as error:
                logger.warning("fipo_trl: not loading %s: %s. It is rebuilt and replaced; if this repeats, check "
                               "what else writes to that directory.", directory / name, error)
                fd = None
            if fd is None:
                fd, how = _build(command, flags, dir_fd, directory, name, timeout), "built"
                if fd is None:
                    continue
            try:
                library = _dlopen(fd, directory / name)
            except OSError as error:
                os.close(fd)
                logger.debug("fipo_trl: loading %s failed: %s", directory / name, error)
                continue
            if (library.fipo_cpu_n_out(), library.fipo_cpu_chunk()) != (N_OUT, CHUNK_SIZE):
                raise RuntimeError(f"fipo_trl: {directory / name} does not match fipo_cpu.py (stale build); delete it.")
            library.fipo_cpu_forward.restype = ctypes.c_int
            library.fipo_cpu_forward.argtypes = (
                [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                + [ctypes.c_double] * 7 + [ctypes.c_void_p] * 8
            )
            _status = f"built with {shlex.join(command)} {' '.join(flags)} at {directory / name} ({how}){note}"
            return library
    finally:
        os.close(dir_fd)
        if note:
            shutil.rmtree(directory, ignore_errors=True)  # what was loaded stays mapped
    _status = (f"compiling {SOURCE.name} with {shlex.join(command)} failed (see the debug log of {__name__})"
               + note)
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("FIPO_TRL_CPU_KERNEL", "1") == "0":
        _status = "disabled by FIPO_TRL_CPU_KERNEL=0"
        return None
    command, why = _compiler()
    if command is None:
        _status = why
        return None
    timeout = _cc_timeout()
    try:
        library = _load(command, _compiler_identity(command, timeout), timeout)
    except subprocess.TimeoutExpired as error:
        _status = (f"the C compiler did not finish within {timeout:g} s ({shlex.join(error.cmd)}; set "
                   "FIPO_TRL_CC_TIMEOUT to wait longer)")
        library = None
    except OSError as error:  # the compiler cannot be run, the scratch directory cannot be made, ...
        _status = f"building {SOURCE.name} with {shlex.join(command)} failed: {error}"
        library = None
    if library is None:
        logger.warning("fipo_trl: the fused CPU kernel is unavailable, %s; fipo_loss uses the slower torch path on "
                       "CPU.", _status)
    return library


def cpu_kernel_usable() -> bool:
    """Whether the fused CPU kernel is built (or builds now) and loads in this process."""
    return _library() is not None


def cpu_kernel_status() -> str:
    """How the fused CPU kernel was built, or why it is not available."""
    _library()
    return _status


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 tensor to hand the kernel a pointer to (the tensor itself when it is one already)."""
    if tensor.dtype == torch.float32 and tensor.is_contiguous():
        return tensor
    return tensor.detach().to(torch.float32).contiguous()


def fipo_loss_cpu(logps, old_logps, advantages, mask, *, gamma, clip_ratio, clip_high_only, safety_threshold,
                  dual_clip, epsilon_low, epsilon_high) -> FIPOTorchResult:
    """The official FIPO loss (SPEC §1.1) in one C pass; same inputs and result as ``fipo_loss_torch``.

    Computes in float32 (bf16/fp16/fp32 inputs; sums in float64); the gradient w.r.t. logps comes back in logps'
    dtype. Unlike the other paths it checks the inputs' finiteness itself, in the same pass: a NaN log-ratio or a
    non-finite advantage at a response token raises the ``fipo_loss`` ValueError.
    """
    library = _library()
    if library is None:
        raise RuntimeError(f"fipo_trl: the fused CPU kernel is not available ({_status}). Use backend='torch'.")
    if logps.device.type != "cpu":
        raise RuntimeError(f"fipo_trl: the fused CPU kernel runs on CPU tensors, got {logps.device}. Use "
                           "backend='auto' (Triton on CUDA) or backend='torch'.")
    if logps.dtype == torch.float64:
        raise TypeError("fipo_trl: the fused CPU kernel computes in float32; float64 inputs (the reference dtype) "
                        "go through backend='torch'.")
    needs_grad = torch.is_grad_enabled() and logps.requires_grad
    B, T = logps.shape
    mask = mask if mask.dtype == torch.bool else mask != 0
    inputs = [_as_float32(t) for t in (logps, old_logps, advantages)] + [mask.contiguous()]  # bool: one byte each
    weights, future_kl, weighted_advantages = torch.empty(B, T), torch.empty(B, T), torch.empty(B, T)
    grad = torch.empty(B, T) if needs_grad else None
    keep = torch.empty(B, dtype=torch.bool)
    row_scale, loss, out = torch.empty(B), torch.empty(()), torch.empty(N_OUT, dtype=torch.float64)
    lower, upper = weight_bounds(clip_ratio, clip_high_only)
    status = library.fipo_cpu_forward(
        inputs[0].data_ptr(), inputs[1].data_ptr(), inputs[2].data_ptr(), int(advantages.dim() == 2),
        inputs[3].data_ptr(), B, T, gamma, lower, upper, safety_threshold, dual_clip,
        1.0 - epsilon_low, 1.0 + epsilon_high, weights.data_ptr(), future_kl.data_ptr(), weighted_advantages.data_ptr(),
        grad.data_ptr() if needs_grad else None, keep.data_ptr(), row_scale.data_ptr(), loss.data_ptr(),
        out.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"fipo_trl: the fused CPU kernel could not allocate its (B = {B}) row buffer.")
    values = out.tolist()  # the stats as Python floats: one transfer, no per-stat tensors
    if values[_BAD_RATIO] or values[_BAD_ADV]:
        raise non_finite_error(int(values[_BAD_RATIO]), int(values[_BAD_ADV]))
    if needs_grad:
        loss = _LossWithStoredGradient.apply(logps, loss, grad, row_scale)
    return FIPOTorchResult(loss, weights, future_kl, keep, dict(zip(STATS_KEYS, values)), weighted_advantages)


__all__ = ["CHUNK_SIZE", "STATS_KEYS", "cpu_kernel_status", "cpu_kernel_usable", "fipo_loss_cpu"]
