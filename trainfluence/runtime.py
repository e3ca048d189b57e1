"""Process-wide settings the command line applies once at start: the C allocator's thresholds.

PyTorch on the CPU takes every tensor's memory from the C library's ``malloc``.  glibc serves a request above its
mmap threshold (128 KiB at start) by a fresh ``mmap`` and hands it back by ``munmap`` when freed, so each batch's
activations are page-faulted in anew; it raises the threshold only after it has freed an mmapped block of at most
32 MiB, and trims the heap's free top above the trim threshold.  The speed of a batch loop therefore depends on
what the process happened to allocate before: on 2 CPU cores, the default CNN's plain forward+backward over MNIST
took about 1.3× as long after the 60,000 training images had been normalised as one tensor (188 MB, too big to
raise the threshold) as after a 4,096-image one (measured by hand, not a benchmark row).  Fixed thresholds make
each batch reuse heap memory whatever came before.  Measured on whole commands (BENCHMARKS.md, "Allocator
thresholds", ABBA over fresh processes): training 1.08×, the default gradient store 1.05×, the factored store from
the API 1.06×, EK-FAC influence 1.01–1.02× (within noise); none slower.  The price is memory held: up to
TRIM_THRESHOLD of freed heap stays in the process (a streamed top-10 query over a store grew the resident set by
122–147 MB against 101 MB; BENCHMARKS.md "memory").

``TRAINFLUENCE_MALLOC=default`` keeps glibc's own behaviour; an allocator setting of the user's own
(``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or another allocator preloaded by ``LD_PRELOAD``) is
left alone.  Elsewhere than glibc on Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest threshold glibc's own adaptation reaches on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); blocks above it
# (a chunk of the gradient store, a dataset tensor) still come from mmap and go back to the system when freed
MMAP_THRESHOLD = 32 * 2**20
# free memory kept at the heap's top before it is handed back: at most this much is held beyond what is in use
TRIM_THRESHOLD = 64 * 2**20

_outcome: tuple[bool, str] | None = None  # (tuned, in words), once tune_allocator has run


def allocator_state() -> str:
    """What :func:`tune_allocator` did in this process, in words (benchmark headers); ``"not tuned"`` before."""
    return _outcome[1] if _outcome else "not tuned"


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for this process.

    Returns True when they were set now or by an earlier call; False when left alone (not glibc, the user's own
    setting, ``TRAINFLUENCE_MALLOC=default``).  Idempotent."""
    global _outcome
    if _outcome is None:
        reason = _leave_alone()
        if reason is not None:
            _outcome = (False, reason)
        else:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _outcome = (ok, f"glibc thresholds mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB" if ok
                        else "glibc refused mallopt; its defaults kept")
    return _outcome[0]


def _leave_alone() -> str | None:
    """Why the allocator should be left as it is, or None to tune it."""
    if os.environ.get("TRAINFLUENCE_MALLOC", "").strip().lower() == "default":
        return "glibc defaults (TRAINFLUENCE_MALLOC=default)"
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return "the user's MALLOC_*_THRESHOLD_ settings"
    if os.environ.get("LD_PRELOAD"):
        return "a preloaded library (LD_PRELOAD) may replace malloc; left alone"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc; nothing to tune"
    return None


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "allocator_state", "tune_allocator"]
