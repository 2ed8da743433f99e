"""Keep freed heap memory in the process instead of handing it back to the operating system.

A training step of a group-sparse network creates and frees a dozen weight-sized temporaries
(σ² = exp(log σ²), the KL's gradient, the two weight gradients of the local reparameterisation).
glibc serves a block of ≥ 128 KiB with mmap and returns it with munmap when freed, and trims
the heap top when it exceeds its trim threshold; the next step then maps fresh pages and pays one
page fault per 4 KiB at first touch. On LeNet-300-100 that was ~540 page faults per Bayesian step
against ~0 for the plain step (minor faults counted with getrusage around 50 steps, during development).

`keep_freed_memory()` raises glibc's mmap threshold to its maximum (32 MiB) and its trim threshold
to 1 GiB (mallopt), so blocks below 32 MiB are reused from the heap. The process's resident memory
then stays at its high-water mark instead of shrinking between steps. It is what the PyTorch
performance guide achieves with jemalloc/tcmalloc, without a preloaded library.

It changes the whole process, so a library never does it unasked: importing bayescomp or calling `fit`
leaves the allocator alone unless BAYESCOMP_MALLOC_TUNING=1 is set (`fit` calls `keep_freed_memory()` when
it trains on the CPU). The `bayescomp` command turns it on for its own process
(`keep_freed_memory(default=True)`); BAYESCOMP_MALLOC_TUNING=0 turns it off there too. Elsewhere (macOS,
Windows, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 1024 * 1024
_TRIM = 1024 * 1024 * 1024
ENV_VAR = "BAYESCOMP_MALLOC_TUNING"
_done = False


def tuning_wanted(default: bool = False) -> bool:
    """Whether to tune: BAYESCOMP_MALLOC_TUNING=1 yes, =0 no, unset (or anything else) `default`."""
    setting = os.environ.get(ENV_VAR, "").strip()
    return setting == "1" or (default and setting != "0")


def keep_freed_memory(default: bool = False) -> bool:
    """Tune glibc's malloc once per process, if `tuning_wanted(default)` (module docstring). True once in effect.

    A library call leaves `default` False (opt-in by the environment); the command line passes True.
    """
    global _done
    if _done:
        return True
    if not tuning_wanted(default) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
    return _done
