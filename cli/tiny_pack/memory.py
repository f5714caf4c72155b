"""The server process's memory as the soak reads it (test-only): resident memory, and how much of it the C allocator
holds as free blocks.

glibc's malloc keeps freed blocks in its heaps for reuse instead of returning them to the system, so resident memory
(RSS) counts memory the process no longer uses. mallinfo2's `fordblks` is that free total, summed over every
arena; RSS less it is the memory the process holds. malloc_trim(0) returns the free pages, which checks the figure.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

ROUTE = "/maskattn_test/memory"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    """The process's C library when it is glibc with mallinfo2 (2.33+), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_LIBC = _glibc()


def resident_bytes() -> int:
    statm = "/proc/self/statm"  # Linux: (total, resident, ...) in pages
    if os.path.exists(statm):
        with open(statm) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import psutil  # ComfyUI's own dependency

    return psutil.Process(os.getpid()).memory_info().rss


def readable() -> bool:
    """Whether process_memory can tell the allocator's free blocks (glibc 2.33+)."""
    return _LIBC is not None


def process_memory(trim: bool = False) -> dict:
    """{"rss": resident bytes, "allocator_free": bytes the allocator holds free (None off glibc)}. trim: first
    collect Python's garbage and return the allocator's free pages to the system (malloc_trim)."""
    if trim:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
    free = _LIBC.mallinfo2().fordblks if _LIBC is not None else None
    return {"rss": resident_bytes(), "allocator_free": free}


def register_route() -> None:
    """GET ROUTE on the running ComfyUI server (?trim=1 to trim first); nothing outside a server."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def memory(request):
        return web.json_response(process_memory(trim=request.query.get("trim") == "1"))
