"""Process memory settings for training and evaluation (glibc's allocator)."""

from __future__ import annotations

import os


def keep_freed_memory() -> None:
    """glibc: reuse freed blocks below 32 MiB instead of returning them to the kernel.

    Training frees and reallocates the same activation-sized blocks every step. By default glibc
    hands blocks above a moving threshold back with munmap/trim, and each step then pays page faults
    to get them again: ~10% of a T5 step on CPU. M_MMAP_THRESHOLD=32 MiB (the most every glibc
    accepts; larger blocks still go back) and M_TRIM_THRESHOLD=1 GiB keep them. The trim setting is
    made only once the threshold is accepted: on its own it freezes the threshold at 128 KiB, which
    halves speed. LLMKIT_MALLOC=default opts out; other C libraries (musl, macOS) are left alone.
    """
    import platform

    if platform.libc_ver()[0] != "glibc" or os.environ.get("LLMKIT_MALLOC") == "default":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, 32 << 20) == 1:  # M_MMAP_THRESHOLD; mallopt returns 1 on success
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
