"""Benchmark configuration: two threads, as on the reference machine (JIT_UNLEARN_BENCH_THREADS sets
another count), and a steady glibc heap.

glibc's malloc adapts its thresholds to the sizes a process has freed so far and hands the top of
the heap back to the system once enough of it is free; the next allocation then faults its pages in
again (and with transparent huge pages, zeroes 2 MiB at a time).  Whether that happens in a round
depends on the allocation history of the whole process, not on the code being timed, and it moved
single benchmarks by up to 30 % between runs here.  So, for every benchmark alike, the thresholds
are fixed once at start-up: no mmap below 32 MiB and no trimming below 1 GiB free.  Set
JIT_UNLEARN_BENCH_MALLOC=default to keep glibc's adaptive behaviour.
"""

import ctypes
import os
import sys

import torch

# JIT_UNLEARN_BENCH_THREADS=1 runs on one thread: on a host whose other core is busy, each OpenMP
# fork/join of a two-thread run waits for a time slice, which inflates element-wise ops many times over.
torch.set_num_threads(int(os.environ.get("JIT_UNLEARN_BENCH_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

# Benchmarks compare against the transcriptions of published code in tests/published.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _pin_glibc_malloc() -> str:
    """Fix glibc's mmap and trim thresholds; a line saying what was done."""
    if os.environ.get("JIT_UNLEARN_BENCH_MALLOC") == "default":
        return "allocator as is (JIT_UNLEARN_BENCH_MALLOC=default)"
    if not sys.platform.startswith("linux"):
        return "allocator as is (not Linux)"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "allocator as is (no glibc mallopt)"
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30):
        return "glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB"
    return "allocator as is (mallopt refused)"


ALLOCATOR = _pin_glibc_malloc()


def pytest_report_header(config):
    return f"jit_unlearn benchmarks: {torch.get_num_threads()} intra-op threads; {ALLOCATOR}"
