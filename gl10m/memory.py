"""Keep freed memory in the process: glibc's malloc tuned for steps that allocate large arrays.

A scene step allocates dozens of full-size arrays (a 2680 x 2680 float64 plane is 57 MB). glibc
hands every block above its mmap threshold (at most 32 MiB by default) straight back to the kernel
when freed, so the next array of that size is fresh pages again and every page is faulted in:
``gl10m testbed scenes`` spent ~40 % of its CPU in the kernel (467 M minor page faults for 3,400
scenes; 16 scenes of seed 4242 on one worker: 6.7 s of system time and 0.72 scenes/s, against
0.9 s and 1.26 scenes/s with this). :func:`keep_freed_memory` raises the mmap and trim thresholds
(``mallopt``), so freed blocks stay in the heap and are reused; the process keeps its peak
footprint instead of returning it between steps. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """mmap and trim thresholds to ``threshold`` bytes (default 1 GiB), once per process; True when
    glibc took them (False: not glibc, or it refused)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    t = int(min(threshold, 2**31 - 1))
    ok = all(mallopt(opt, v) == 1 for opt, v in ((_M_MMAP_THRESHOLD, t), (_M_TRIM_THRESHOLD, t),
                                                  (_M_TOP_PAD, 64 << 20)))
    _done = ok
    return ok
