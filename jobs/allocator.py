"""What glibc's allocator keeps of freed tensors, and how a process gives it back.

glibc serves an allocation below its mmap threshold from the heap and raises that threshold (up to 32 MB) each
time it frees a larger mapped block; heap pages stay resident once freed. A process that frees many
mid-sized tensors (a merge's masks, the full-size parameters a ZeRO-3 load creates and partitions) then holds
memory it no longer uses. Both functions do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def unmap_large_frees(threshold: int = 16 << 20) -> None:
    """Fix the mmap threshold: every block from ``threshold`` up is mapped on its own and unmapped when freed;
    smaller ones (a layer's tensors) stay in the heap, whose pages are already resident (a lower threshold
    faults every such block in again, which docs/benchmarks.md measured on the merge). Process-wide."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_free_memory() -> None:
    """Return the heap's free pages to the system (``malloc_trim(0)``), e.g. after a model was loaded."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
