"""Keep freed CPU tensor memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB,
raised adaptively up to 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, and it
trims the heap's free top back to the kernel above the trim threshold. Either way the next tensor of
that size starts on pages the kernel must fault in and zero again. A guided sampling forward of
200 rows (the Table-1 study's evaluation chunk: 1,024 tokens each, D 96, 1 thread) allocates 78 MB
activations over and over: ``benchmarks/bench_malloc.py`` measured 770 k minor page faults and 2.7 s
of system time per forward beside 5.2 s of compute; with both thresholds raised, 37 k faults and
0.08 s, 0.69× the wall time, and 1.21× the process's peak RSS (1.58 → 1.92 GB: freed blocks stay
reserved). The isoflop DiT/2 gains less (0.76×). A training step at batch 32 allocates blocks glibc
already reuses and does not change (docs/benchmarks.md, *CPU memory allocator*).

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
