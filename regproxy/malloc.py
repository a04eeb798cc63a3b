"""Keep glibc's malloc from returning and re-faulting the relay's chunk memory.

Every chunk the proxy relays is a fresh C{bytes} of up to C{--read-size}
(256 KiB): above glibc's initial mmap threshold (128 KiB). glibc adapts that
threshold as blocks are freed, and trims the top of the heap once 128 KiB (or
twice the adapted threshold) lie free there; depending on the order in which
chunks of a transfer are freed, a process settles either where the chunks are
reused from the heap, or where every chunk is handed back to the kernel and
faulted in again: measured here at ~458,000 minor page faults and twice the
CPU per GiB relayed, and a process could switch between the two modes from one
download to the next (benchmarks/README.md, "Profiles"). Fixed thresholds
above the largest chunk keep the process in the first mode for good.

The cost is bounded: at most C{trim} bytes of freed heap stay mapped.
An operator's own C{MALLOC_*_THRESHOLD_} environment variables win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from twisted.logger import Logger

log = Logger()

#: mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_MAX = 32 << 20
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def thresholds(read_size: int) -> tuple[int, int]:
    """The (mmap, trim) thresholds for chunks of C{read_size}: room for a joined write buffer of several."""
    mmap = min(_MMAP_MAX, max(4 << 20, 4 * read_size))
    return mmap, 4 * mmap


def pin_thresholds(read_size: int) -> bool:
    """Fix glibc's mmap and trim thresholds above the relay's chunk size; whether they were set."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): nothing to pin
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap, trim = thresholds(read_size)
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1)
    if not ok:
        log.warn("mallopt refused the thresholds; relayed chunks may be page-faulted in again")
    return ok
