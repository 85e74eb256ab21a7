"""Fill the kernel template's free allocator space just before it starts forking, so that what each kernel
allocates goes to memory of its own instead of into holes spread over the template's pages.

A forked kernel shares the template's pages until it writes to one; then the page is copied and counted in the
kernel's private memory (USS). Python's small-object allocator (pymalloc) serves a new object from the pools
that already have free blocks first, and glibc's malloc a larger one from its free chunks: in a fresh fork
those are the template's, left by everything it imported, set up and freed, a few free blocks per page across
megabytes. Each kernel allocates tens of thousands of objects as it sets up, and every one that lands in such
a hole costs it a copy of a whole 4 KB page (measured: ~400 KB per idle kernel). Once the template holds
those holes itself, with objects no one uses, kernels allocate from untouched pools and the top of the heap,
and pack their objects there.

How much is free is read from the allocators' own reports: `sys._debugmallocstats()` (CPython; free blocks
in used pools, per size class) and glibc's `malloc_info()` (free chunks of the main arena, per size). Where
either report is missing (another Python, musl) that allocator is left as it is: kernels work the same,
with a few hundred KB more copied. Standard library only: the template runs it in the kernel's interpreter.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

ROUNDS = 3  # filling allocates a little itself (the lists that hold the fillers); a round or two more fills that
TCACHE_SIZES = range(32, 1041, 16)  # chunk sizes glibc's per-thread cache holds, up to 7 each; malloc_info omits it
TCACHE_COUNT = 7


def fill_free_space() -> list:
    """Take up the free space of both allocators; the template keeps what is returned for its whole life."""
    return [fill_free_chunks(), fill_free_blocks()]  # chunks first: the block fillers' lists are malloc'd


def fill_free_blocks() -> list:
    """Allocate as many objects of each pymalloc size class as its used pools have free blocks. An object of
    exactly each size: `object()` (16 bytes), a float (24: the 32-byte class), a bytes of n bytes (33 + n)."""
    held: list = []
    for _round in range(ROUNDS):
        free = free_blocks()
        fillers = [None] * sum(free.values())
        index = 0
        for size, count in free.items():
            for _ in range(count):
                if size == 16:
                    fillers[index] = object()
                elif size == 32:
                    fillers[index] = float(index)
                else:
                    fillers[index] = bytes(size - 33)
                index += 1
        held.append(fillers)
    return held


def free_blocks() -> dict[int, int]:
    """Free blocks per block size in pymalloc's used pools, from the table `sys._debugmallocstats()` writes to
    the C stderr: `class size num-pools blocks-in-use avail-blocks` per size class. Empty where there is none."""
    report = getattr(sys, "_debugmallocstats", None)
    if report is None:
        return {}
    with tempfile.TemporaryFile() as text:
        saved = os.dup(2)
        try:
            os.dup2(text.fileno(), 2)
            report()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        text.seek(0)
        lines = text.read().decode(errors="replace").splitlines()
    free = {}
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and all(field.isdigit() for field in fields):
            free[int(fields[1])] = int(fields[4])
    return free


def fill_free_chunks() -> list[int]:
    """malloc every free chunk of glibc's main arena, by the sizes `malloc_info()` reports (and a few of each
    size the per-thread cache may hold, which it does not report). The template has no other thread, so no
    other arena; the chunks are never freed."""
    libc = glibc()
    if libc is None:
        return []
    held: list[int] = []
    for round_ in range(ROUNDS):
        sizes = free_chunks(libc)
        if round_ == 0:
            sizes += [(size, TCACHE_COUNT) for size in TCACHE_SIZES]
        for size, count in sizes:
            held.extend(libc.malloc(max(size - 8, 1)) for _ in range(count))  # a chunk of `size` serves size - 8
    return held


def free_chunks(libc: ctypes.CDLL) -> list[tuple[int, int]]:
    """(chunk size, count) of the main arena's free chunks. `malloc_info()` writes XML: per bin, `<size from=
    to= total= count=/>` with chunk sizes (their low flag bits set), and `<unsorted .../>`; a bin that holds
    chunks of several sizes is taken at its smallest, and what the splits leave is found the next round."""
    buffer, length = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(length))
    if not stream:
        return []
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        report = ElementTree.fromstring(ctypes.string_at(buffer, length.value))
    except ElementTree.ParseError:
        return []
    finally:
        libc.free(ctypes.cast(buffer, ctypes.c_void_p))
    main_arena = report.find("heap[@nr='0']/sizes")
    if main_arena is None:
        return []
    return [(int(entry.get("from")) & ~15, int(entry.get("count"))) for entry in main_arena
            if entry.get("from") and entry.get("count")]


def glibc() -> ctypes.CDLL | None:
    """The C library (as the process has it loaded), with the signatures used here; None where it has no
    malloc_info (not glibc)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_info"):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.restype, libc.malloc_info.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.restype, libc.fclose.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return libc
