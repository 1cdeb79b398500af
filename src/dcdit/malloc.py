"""Keep freed CPU tensor memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB,
raised adaptively up to 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, and it
trims the heap's free top back to the kernel above the trim threshold. Either way the next tensor of
that size starts on pages the kernel must fault in and zero again. A guided sampling forward of the
Table-1 study's DC-DiT (an evaluation chunk: 200 rows of 1,024 tokens, D 96, 1 thread) allocates
78 MB activations over and over: it took 0.9 M minor page faults and 3.3 s of system time per
forward against 6.6 s of compute. With both thresholds raised, 23 k faults and 0.06 s: the forward's
CPU time fell by 30% and its peak RSS rose from 1.52 to 2.08 GB (freed blocks stay reserved;
docs/benchmarks.md, *CPU memory allocator*; ``benchmarks/bench_malloc.py``). A training step at batch
32 allocates smaller blocks and barely changes (12 k → 0.4 k faults, sys 0.05 → 0 s per step).

The ``dcdit`` command and ``scripts/reproduce_mnist.py`` call :func:`reuse_freed_memory` first;
``DCDIT_MALLOC=default`` keeps glibc's own behaviour. In your own scripts call it once, early.
Outputs are the same bit for bit: only where memory comes from changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: Set to "default" to leave glibc's thresholds alone.
ENV = "DCDIT_MALLOC"
# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and are reused; larger ones are still mapped.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top is kept up to this size (the largest value ``mallopt`` takes).
TRIM_THRESHOLD = (1 << 31) - 1
_applied = False


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so freed tensors' pages are reused without page faults.
    Returns whether it was applied: False with ``DCDIT_MALLOC=default``, on a C library other than
    glibc (macOS, musl, Windows) and if ``mallopt`` refuses a value. Process-wide; safe to call again."""
    if os.environ.get(ENV, "").strip().lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting it also stops glibc's adaptive raising of both thresholds
    global _applied
    _applied = _applied or (bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _applied


def applied() -> bool:
    """Whether :func:`reuse_freed_memory` took effect in this process (timings record it)."""
    return _applied
