"""Which compute path runs (backend="auto" and explicit), what each says when it cannot, the C kernel's build
(one build for racing processes, the fallbacks) and its side of the shared contract."""

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from kernel_utils import needs_c_kernel, needs_interpreter, random_batch

from fipo_trl import fipo_loss, fipo_weights, kernels
from fipo_trl.kernels import STAT_NAMES, c_kernel_usable
from fipo_trl.kernels.fipo_cpu import contract_header


@pytest.mark.parametrize("api", [fipo_loss, fipo_weights])
def test_auto_dispatch_on_cpu(api):
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    auto = api(logps, old, adv, mask)
    assert auto.backend == ("c" if c_kernel_usable() else "torch")  # never the interpreter implicitly
    reference = api(logps, old, adv, mask, backend="torch")
    assert reference.backend == "torch"
    torch.testing.assert_close(auto.weights, reference.weights, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        api(logps, old, adv, mask, backend="cuda")
    assert api(logps.double(), old.double(), adv.double(), mask).backend == "torch"  # the reference dtype


@needs_interpreter
def test_explicit_triton_backend_on_cpu_under_the_interpreter():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    explicit = fipo_loss(logps, old, adv, mask, backend="triton")
    assert explicit.backend == "triton"
    torch.testing.assert_close(explicit.weights, fipo_loss(logps, old, adv, mask, backend="torch").weights,
                               rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="float64"):
        fipo_loss(logps.double(), old.double(), adv.double(), mask, backend="triton")


@needs_c_kernel
def test_c_kernel_rejects_float64_and_reports_bad_inputs_itself():
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    with pytest.raises(TypeError, match="float64"):
        fipo_loss(logps.double(), old.double(), adv.double(), mask, backend="c")
    bad = logps.clone()
    bad[0, 0] = math.nan  # row 0 is fully on the response
    with pytest.raises(ValueError, match="1 unmasked token.*NaN log-ratio"):
        fipo_loss(bad, old, adv, mask, backend="c")
    bad_adv = adv.clone()
    bad_adv[0] = math.inf
    with pytest.raises(ValueError, match=f"{int(mask[0].sum())} unmasked token.*non-finite advantage"):
        fipo_loss(logps, old, bad_adv, mask, backend="c")


@needs_c_kernel
def test_the_old_cpu_names_still_work_with_a_deprecation_warning():
    """0.1.0 called the C kernel's backend \"cpu\": the name, and the kernels package's old function names, are kept
    for one release, each with a DeprecationWarning naming the new one."""
    logps, old, adv, mask = random_batch(3, 20, seed=1)
    with pytest.warns(DeprecationWarning, match="backend='c'"):
        out = fipo_weights(logps, old, adv, mask, backend="cpu")
    assert out.backend == "c"
    torch.testing.assert_close(out.weights, fipo_weights(logps, old, adv, mask, backend="c").weights, rtol=0, atol=0)
    for old_name, new_name in (("compute_cpu", "compute_c"), ("cpu_kernel_usable", "c_kernel_usable"),
                               ("cpu_kernel_status", "c_kernel_status")):
        with pytest.warns(DeprecationWarning, match=new_name):
            assert getattr(kernels, old_name) is getattr(kernels, new_name)
    with pytest.raises(AttributeError):
        kernels.naive_loss  # noqa: B018 (not a name of the package)


def test_c_kernel_columns_are_generated_from_row_stats():
    """The C kernel's column enum is generated from the one list, in its order (the loaded build's column count is
    checked against it at load time)."""
    header = contract_header()
    assert re.findall(r"^    COL_(\w+),$", header, flags=re.MULTILINE) == list(STAT_NAMES)
    assert "N_STATS" in header and header.count("INFINITY") == sum(n.startswith(("min_", "max_")) for n in STAT_NAMES)


def run_python(code, **env_overrides):
    env = dict(os.environ, **env_overrides)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


REPORT_BACKEND = (
    "import torch\n"
    "from fipo_trl import fipo_loss\n"
    "from fipo_trl.kernels import c_kernel_status\n"
    "x = torch.zeros(2, 3); m = torch.ones(2, 3, dtype=torch.bool)\n"
    "print('BACKEND', fipo_loss(x, x, torch.ones(2), m).backend)\n"
    "print('STATUS', c_kernel_status())\n"
    "try:\n"
    "    fipo_loss(x, x, torch.ones(2), m, backend='c')\n"
    "except RuntimeError as error:\n"
    "    print('RAISED', error)\n"
)


@pytest.mark.slow
@needs_c_kernel
def test_c_kernel_builds_once_into_the_cache_even_when_processes_race(tmp_path):
    """Two processes build into an empty cache at once (as DDP ranks do): both load it, one file is left, and a
    third process loads that file without compiling."""
    env = dict(os.environ, FIPO_TRL_CACHE=str(tmp_path))
    racers = [subprocess.Popen([sys.executable, "-c", REPORT_BACKEND], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    for racer, (stdout, stderr) in zip(racers, outputs):
        assert racer.returncode == 0, stderr[-2000:]
        assert "BACKEND c\n" in stdout and "RAISED" not in stdout
    built = list(tmp_path.glob("fipo_cpu_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    assert f"at {built[0]}" in run_python(REPORT_BACKEND, FIPO_TRL_CACHE=str(tmp_path))
    assert built[0].stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.parametrize(("env", "reason"), [({"FIPO_TRL_CPU_KERNEL": "0"}, "disabled by FIPO_TRL_CPU_KERNEL=0"),
                                             ({"CC": "/nonexistent/cc"}, "no C compiler found"),
                                             ({"CC": shutil.which("false") or "/bin/false"}, "failed")])
def test_without_the_c_kernel_cpu_falls_back_to_the_torch_path(tmp_path, env, reason):
    stdout = run_python(REPORT_BACKEND, FIPO_TRL_CACHE=str(tmp_path), **env)
    assert "BACKEND torch" in stdout and reason in stdout
    assert "RAISED" in stdout and "backend='torch'" in stdout  # an explicit backend='c' says why and what to do
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.slow
def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from fipo_trl import fipo_loss\n"
        "x = torch.zeros(2, 3); m = torch.ones(2, 3, dtype=torch.bool)\n"
        "assert fipo_loss(x, x, torch.ones(2), m).backend != 'triton'\n"
        "try:\n"
        "    fipo_loss(x, x, torch.ones(2), m, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RAISED" in result.stdout and "TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout
