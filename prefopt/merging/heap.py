"""The merge's memory, handed back to the OS as it goes (glibc keeps freed heap memory otherwise, and the merge's
peak RSS creeps up shard by shard)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def large_blocks_from_the_os():
    """While merging, serve every allocation over 1 MiB by mmap, so it goes back to the OS when freed (glibc
    otherwise raises that threshold as large blocks are freed, and later ones stay in the heap: the merge's peak
    RSS then varies from run to run; the figures are in docs/benchmarks.md). Afterwards the threshold is set to
    glibc's own ceiling (32 MiB), where it adapts to anyway."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to do
        yield
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        mallopt(-3, 32 << 20)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and peak RSS creeps up shard by shard)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
