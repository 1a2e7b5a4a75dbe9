"""The ``FIPO_TRL_*`` environment variables (docs/environment.md), each read by one function here.

A value that is set but not understood is an error naming the variable and what it accepts, never silently replaced
by the default. An empty value means unset. ``check_environment()`` reads them all at once (``fipo-trl`` calls it
before loading anything) and warns about a ``FIPO_TRL_*`` name that none of them reads (a typo).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
CC_TIMEOUT = 120.0  # seconds for one compiler call; a build takes about one second
MAX_CC_TIMEOUT = 24 * 3600.0  # a day: anything above is a mistake (and overflows the timeouts underneath)
TRITON_VARIANTS = ("auto", "row", "chunk")


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _invalid(name: str, value: str, accepted: str) -> ValueError:
    return ValueError(f"environment variable {name}={value!r} is invalid: {accepted}. Fix: set it to one of those, or "
                      f"unset it (docs/environment.md).")


def env_flag(name: str, default: bool) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off, in any case."""
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in TRUE_WORDS + FALSE_WORDS:
        return value.lower() in TRUE_WORDS
    raise _invalid(name, value, f"it takes {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)} (any case)")


def cpu_kernel_enabled() -> bool:
    """FIPO_TRL_CPU_KERNEL: build and load the fused C kernel (default yes)."""
    return env_flag("FIPO_TRL_CPU_KERNEL", True)


def show_traceback() -> bool:
    """FIPO_TRL_TRACEBACK: ``fipo-trl`` shows the full traceback of a bad-input error (default no)."""
    return env_flag("FIPO_TRL_TRACEBACK", False)


def cc_timeout() -> float:
    """FIPO_TRL_CC_TIMEOUT: seconds one compiler call may take (default 120)."""
    value = _raw("FIPO_TRL_CC_TIMEOUT")
    if value is None:
        return CC_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_CC_TIMEOUT:  # NaN fails too
        raise _invalid("FIPO_TRL_CC_TIMEOUT", value, f"it takes a number of seconds > 0 and <= {MAX_CC_TIMEOUT:g} "
                       f"(default {CC_TIMEOUT:g})")
    return seconds


def cache_dir() -> Path | None:
    """FIPO_TRL_CACHE: the C kernel's build cache folder (``~`` expanded), or None for the default."""
    value = _raw("FIPO_TRL_CACHE")
    return None if value is None else Path(value).expanduser()


def triton_variant() -> str:
    """FIPO_TRL_TRITON_VARIANT: the Triton kernel's variant for calls left at "auto" (default "auto")."""
    value = _raw("FIPO_TRL_TRITON_VARIANT")
    if value is None:
        return "auto"
    if value.lower() not in TRITON_VARIANTS:
        raise _invalid("FIPO_TRL_TRITON_VARIANT", value, f"it takes one of {'/'.join(TRITON_VARIANTS)}")
    return value.lower()


READERS = {
    "FIPO_TRL_CACHE": cache_dir,
    "FIPO_TRL_CC_TIMEOUT": cc_timeout,
    "FIPO_TRL_CPU_KERNEL": cpu_kernel_enabled,
    "FIPO_TRL_TRACEBACK": show_traceback,
    "FIPO_TRL_TRITON_VARIANT": triton_variant,
}


def check_environment() -> None:
    """Read every FIPO_TRL_* variable (ValueError for the first bad value) and warn about unknown FIPO_TRL_* names."""
    for read in READERS.values():
        read()
    for name in sorted(os.environ):
        if name.startswith("FIPO_TRL_") and name not in READERS:
            warnings.warn(f"environment variable {name} is not one fipo_trl reads, so it has no effect (a typo?). "
                          f"The variables are {', '.join(READERS)} (docs/environment.md).", UserWarning, stacklevel=2)
