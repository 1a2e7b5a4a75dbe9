"""The C kernel's build cache (kernels/fipo_cpu.py) against corrupt, foreign and unsafe files and directories.

Every case runs in a fresh interpreter: a crash inside dlopen (SIGBUS) shows as a negative exit code, and the
module's functools cache starts empty. The child loads kernels/fipo_cpu.py on its own (not the fipo_trl package,
whose Triton import takes seconds) and reports whether the kernel loaded, its status, and whether it agrees with the
torch path. A planted library has a constructor that writes a marker file: if it is ever dlopen'ed, the marker
exists.
"""

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
COMPILER = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = [pytest.mark.slow,  # every case runs in a fresh interpreter, most build the kernel
              pytest.mark.skipif(COMPILER is None or not hasattr(os, "geteuid"), reason="needs a C compiler (POSIX)")]
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
OTHER_UID = 65534  # nobody

PROBE = r"""
import json, os, platform, sys, types
settings = json.loads(sys.argv[1])
if "umask" in settings:
    os.umask(settings["umask"])
if "machine" in settings:
    platform.machine = lambda: settings["machine"]
for name, path in (("fipo_trl", []), ("fipo_trl.kernels", [settings["kernels"]])):
    module = types.ModuleType(name)
    module.__path__ = path
    sys.modules[name] = module
import torch
from fipo_trl.kernels import common, fipo_cpu, fipo_torch
report = {"usable": fipo_cpu.c_kernel_usable(), "status": fipo_cpu.c_kernel_status()}
if report["usable"]:
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 300, generator=g)
    old = logps + 0.1 * torch.randn(3, 300, generator=g)
    adv, mask = torch.randn(3, generator=g), torch.rand(3, 300, generator=g) > 0.2
    h = common.Hyperparameters(decay_rate=32.0, clip_ratio=0.2, clip_high_only=False, delta=3.0)
    fused = fipo_cpu.compute_c(logps, old, adv, mask, h)
    reference = fipo_torch.compute_torch(logps, old, adv, mask, h)
    report["matches_torch"] = bool(torch.allclose(fused.loss, reference.loss, rtol=1e-4, atol=1e-6)
                                   and torch.allclose(fused.weights, reference.weights, rtol=1e-4, atol=1e-6))
print(json.dumps(report))
"""

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void)
{
    const char *marker = getenv("FIPO_TEST_MARKER");
    FILE *file = marker ? fopen(marker, "w") : NULL;
    if (file) { fputs("planted code ran\n", file); fclose(file); }
}
int fipo_cpu_n_stats(void) { return 26; }
int fipo_cpu_chunk(void) { return 256; }
"""


def probe(cache, *, env=None, timeout=120, **settings):
    """Run PROBE with FIPO_TRL_CACHE=cache; returns (report, stderr, seconds). A signal exit fails the test."""
    full_env = dict(os.environ, FIPO_TRL_CACHE=str(cache), FIPO_TEST_MARKER=str(Path(cache).parent / "MARKER"),
                    **(env or {}))
    settings["kernels"] = str(KERNELS)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr, time.monotonic() - start


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_private_build(library):
    """The cache holds a build of ours: a private regular file whose record matches its bytes."""
    record = Path(f"{library}.sha256")
    for path in (library, record):
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid(), path
        assert stat.S_IMODE(info.st_mode) == 0o600, (path, oct(info.st_mode))
    assert record.read_text().strip() == sha256(library)


@pytest.fixture(scope="module")
def real_build(tmp_path_factory):
    """A real build in a cache of its own: (library name, its bytes)."""
    cache = tmp_path_factory.mktemp("real") / "cache"
    report, _, _ = probe(cache)
    assert report["usable"] and report["matches_torch"] and "(built)" in report["status"], report
    (library,) = cache.glob("fipo_cpu_*.so")
    assert_private_build(library)
    return library.name, library.read_bytes()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A library whose constructor writes $FIPO_TEST_MARKER, checked to do so when loaded."""
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(PLANTED_C)
    subprocess.run([COMPILER, "-shared", "-fPIC", str(folder / "planted.c"), "-o", str(folder / "planted.so")],
                   check=True, timeout=60)
    marker = folder / "MARKER"
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(folder / 'planted.so')!r})"],
                   env=dict(os.environ, FIPO_TEST_MARKER=str(marker)), check=True, timeout=60)
    assert marker.exists()  # the detector works
    return (folder / "planted.so").read_bytes()


@pytest.fixture
def cache(tmp_path, real_build):
    """A private cache holding the real build and its record, as a previous process leaves it."""
    name, data = real_build
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for file, content in ((name, data), (f"{name}.sha256", hashlib.sha256(data).hexdigest() + "\n")):
        (cache / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        (cache / file).chmod(0o600)
    return cache


def plant(cache, name, data, *, record=True):
    (cache / name).unlink(missing_ok=True)
    (cache / name).write_bytes(data)
    (cache / name).chmod(0o600)
    if record:
        (cache / f"{name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def test_a_verified_build_is_reused_without_compiling(cache, real_build):
    """A process that finds the verified build loads it as it is: no compile, the file untouched."""
    name, _ = real_build
    mtime = (cache / name).stat().st_mtime_ns
    report, stderr, _ = probe(cache)
    assert report["usable"] and report["matches_torch"] and f"at {cache / name} (reused)" in report["status"]
    assert (cache / name).stat().st_mtime_ns == mtime and "fipo_trl" not in stderr  # and no warning


@pytest.mark.parametrize("size", [4096, 16384, 46080])
def test_a_truncated_library_is_rebuilt_not_loaded(cache, real_build, size):
    """A build cut short (a full disk, a killed copy) used to kill every later process with SIGBUS in dlopen."""
    name, data = real_build
    assert size < len(data)
    (cache / name).write_bytes(data[:size])
    report, stderr, _ = probe(cache)
    assert report["usable"] and report["matches_torch"] and "(built)" in report["status"]
    assert f"not loading {cache / name}" in stderr and "sha256 does not match" in stderr
    assert (cache / name).read_bytes() == data  # rebuilt in place (the build is deterministic)
    assert_private_build(cache / name)


def _wrong_record(cache, name, planted):
    (cache / f"{name}.sha256").write_text("0" * 64 + "\n")


def _planted_without_record(cache, name, planted):
    plant(cache, name, planted, record=False)
    (cache / f"{name}.sha256").unlink()


def _planted_with_stale_record(cache, name, planted):
    plant(cache, name, planted, record=False)  # the record is still the real build's


def _planted_owned_by_another_user(cache, name, planted):
    plant(cache, name, planted)
    os.chown(cache / name, OTHER_UID, OTHER_UID)


def _record_owned_by_another_user(cache, name, planted):
    plant(cache, name, planted)
    os.chown(cache / f"{name}.sha256", OTHER_UID, OTHER_UID)


def _planted_group_writable(cache, name, planted):
    plant(cache, name, planted)
    (cache / name).chmod(0o660)


def _planted_world_writable(cache, name, planted):
    plant(cache, name, planted)
    (cache / name).chmod(0o606)


def _planted_behind_a_symlink(cache, name, planted):
    plant(cache, "elsewhere.so", planted, record=False)
    plant(cache, name, planted)  # a record that matches the link's target
    (cache / name).unlink()
    (cache / name).symlink_to(cache / "elsewhere.so")


def _a_fifo(cache, name, planted):
    (cache / name).unlink()
    os.mkfifo(cache / name, 0o600)  # opening it for reading would block


def _a_directory(cache, name, planted):
    (cache / name).unlink()
    (cache / name).mkdir(mode=0o700)  # the rebuild cannot replace it: this process uses its build anyway


def tampering(tamper, reason, *marks):
    return pytest.param(tamper, reason, id=tamper.__name__.strip("_"), marks=marks)


@pytest.mark.parametrize(("tamper", "reason"), [
    tampering(_wrong_record, "sha256 does not match"),
    tampering(_planted_without_record, "record"),
    tampering(_planted_with_stale_record, "sha256 does not match"),
    tampering(_planted_owned_by_another_user, f"owned by uid {OTHER_UID}", needs_root),
    tampering(_record_owned_by_another_user, f"owned by uid {OTHER_UID}", needs_root),
    tampering(_planted_group_writable, "group- or world-writable (mode 660)"),
    tampering(_planted_world_writable, "group- or world-writable (mode 606)"),
    tampering(_planted_behind_a_symlink, "cannot be opened safely"),
    tampering(_a_fifo, "not a regular file"),
    tampering(_a_directory, "not a regular file"),
])
def test_a_foreign_or_unsafe_library_is_never_loaded(cache, real_build, planted, tamper, reason):
    """Whatever sits under the expected name, its code never runs unless this user built it and nobody else could
    have changed it since; the process warns, rebuilds, and computes correct results."""
    name, data = real_build
    tamper(cache, name, planted)
    report, stderr, _ = probe(cache, timeout=60)
    assert not (cache.parent / "MARKER").exists(), "the planted library's constructor ran"
    assert report["usable"] and report["matches_torch"] and "(built)" in report["status"], report
    assert f"not loading {cache / name}" in stderr and reason in stderr, stderr[-2000:]
    if tamper is _a_directory:
        assert "could not store the CPU kernel" in stderr and (cache / name).is_dir()
    else:
        assert_private_build(cache / name)
    assert not list(cache.glob("tmp*"))


@pytest.mark.parametrize("unsafe", ["group-writable", "world-writable",
                                    pytest.param("owned by another user", marks=needs_root)])
def test_an_unsafe_cache_directory_is_not_used(cache, real_build, planted, unsafe):
    """In a directory others can write, even a library that passes the file checks (ours, private, its hash
    recorded) may have been swapped: the cache is left alone and the kernel is built in a private temporary
    directory."""
    name, _ = real_build
    plant(cache, name, planted)
    if unsafe == "owned by another user":
        os.chown(cache, OTHER_UID, OTHER_UID)
    else:
        cache.chmod(0o770 if unsafe == "group-writable" else 0o777)
    before = sorted(path.name for path in cache.iterdir())
    report, stderr, _ = probe(cache)
    assert not (cache.parent / "MARKER").exists(), "the planted library's constructor ran"
    assert report["usable"] and report["matches_torch"], report
    assert f"the cache directory {cache} is not used" in stderr and "private temporary directory" in report["status"]
    assert sorted(path.name for path in cache.iterdir()) == before
    temporary = Path(report["status"].split(" at ")[1].split(" (")[0]).parent
    assert not temporary.exists()  # removed once loaded


def test_files_and_directories_are_private_under_umask_000(tmp_path):
    cache = tmp_path / "a" / "b" / "cache"
    report, _, _ = probe(cache, umask=0)
    assert report["usable"] and report["matches_torch"], report
    for directory in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    (library,) = cache.glob("fipo_cpu_*.so")
    assert sorted(path.name for path in cache.iterdir()) == [library.name, f"{library.name}.sha256"]
    assert_private_build(library)


@pytest.mark.parametrize("cc", [f"env {COMPILER}", f"{COMPILER} -O2"])
def test_cc_with_arguments_builds(tmp_path, cc):
    report, _, _ = probe(tmp_path / "cache", env={"CC": cc})
    words = shlex.split(cc)
    expected = shlex.join([shutil.which(words[0]), *words[1:]])
    assert report["usable"] and report["matches_torch"] and report["status"].startswith(f"built with {expected} -O3")


def test_a_build_whose_arithmetic_is_not_ieee_is_refused_by_its_self_check(tmp_path):
    # -ffast-math reassociates sums and assumes no inf/NaN: the library builds, loads and hashes fine, but computes
    # other numbers. The self-check against the float64 torch path refuses it; fipo_loss falls back to torch.
    report, _, _ = probe(tmp_path / "cache", env={"CC": f"{COMPILER} -ffast-math -O3"})
    assert not report["usable"], report
    assert "computes other numbers than the IEEE reference" in report["status"]
    assert "-ffast-math" in report["status"] and "Fix: drop them from CC" in report["status"]


@pytest.mark.parametrize(("cc", "status"), [
    pytest.param("nosuch-fipo-cc gcc", "no C compiler found: CC='nosuch-fipo-cc gcc': 'nosuch-fipo-cc' not found",
                 id="missing program"),
    pytest.param("gcc '-O2", "no C compiler found: CC=\"gcc '-O2\" is not a valid command line (No closing quotation)",
                 id="unbalanced quote"),
])
def test_cc_that_cannot_be_used_is_named_in_the_status(tmp_path, cc, status):
    report, _, _ = probe(tmp_path / "cache", env={"CC": cc})
    assert not report["usable"] and report["status"] == status
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("hangs", ["always", "when compiling"])
def test_a_hanging_compiler_times_out_and_falls_back(tmp_path, hangs):
    """A compiler that never returns (a stuck license server, a network file system) costs the timeout, not the
    run: the whole compiler process group is killed, the scratch directory removed, and the torch path used."""
    pid_file = tmp_path / "sleep.pid"
    script = tmp_path / "hanging-cc"
    passthrough = f'case "$1" in -dumpmachine|--version) exec {shlex.quote(COMPILER)} "$@";; esac\n'
    script.write_text("#!/bin/sh\n" + (passthrough if hangs == "when compiling" else "")
                      + f"sleep 60 &\necho $! > {shlex.quote(str(pid_file))}\nwait\n")
    script.chmod(0o755)
    report, stderr, seconds = probe(tmp_path / "cache", env={"CC": str(script), "FIPO_TRL_CC_TIMEOUT": "1"})
    assert not report["usable"] and "did not finish within 1 s" in report["status"], report
    assert "FIPO_TRL_CC_TIMEOUT" in report["status"] and "the fused CPU kernel is unavailable" in stderr
    assert seconds < 30
    stat_file = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    for _ in range(50):  # the compiler's child (the sleep) is killed too, not left holding the pipes
        if not stat_file.exists() or stat_file.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hanging compiler's child is still running")
    if hangs == "when compiling":
        assert list((tmp_path / "cache").iterdir()) == []  # no scratch directory left


def test_the_cache_key_depends_on_the_cpu_architecture(cache, real_build):
    """A cache on a home directory shared by an x86 and an ARM machine holds one build for each."""
    name, data = real_build
    report, _, _ = probe(cache, machine="fipo-test-arch")
    assert report["usable"] and "(built)" in report["status"]
    (other,) = [path for path in cache.glob("fipo_cpu_*.so") if path.name != name]
    assert f"at {other}" in report["status"] and (cache / name).read_bytes() == data
