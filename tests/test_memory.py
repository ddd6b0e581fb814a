"""gl10m.memory: freed large blocks stay in the process, so the next step's arrays are not fresh
pages (measured in a child process, whose malloc starts untuned)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import numpy as np
from gl10m.memory import keep_freed_memory

def faults_of_steps(n=4):
    for _ in range(2):                       # warm up: the heap grows once
        a = np.ones((2680, 2680)); b = a * 2.0; del a, b
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):                       # a step: two 57 MB float64 planes, freed again
        a = np.ones((2680, 2680)); b = a * 2.0; del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()   # idempotent
print(faults_of_steps())
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_arrays_are_reused_not_faulted_in_again():
    plain, tuned = faults("plain"), faults("tuned")
    # glibc's default: each plane is mmapped and faulted in anew (fewer faults than 4 kB pages
    # where the kernel backs numpy's large arrays with huge pages); tuned: the heap is reused
    assert plain > 500
    assert tuned * 20 < plain
