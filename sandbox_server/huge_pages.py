"""Put the kernel template's anonymous memory on huge pages where it can, so that each fork copies fewer
page-table entries.

fork() copies the parent's page table entry for every anonymous page it has mapped (and write-protects it, for
copy-on-write): for the template, ~82 MB in 4 KB pages, ~21,000 entries, about half of the template's CPU per
kernel (`copy_page_range`, measured with perf in a burst of 100). A 2 MB huge page is one entry, copied as one.
MADV_COLLAPSE (Linux 6.1) puts the pages of a 2 MB-aligned range onto one huge page, now and whatever the
system's THP setting; where a forked kernel later writes into such a range, Linux splits its mapping there in
that kernel alone and copies the one 4 KB page, as before: a kernel's private memory is what it was.

Which ranges: the 2 MB-aligned stretches of private, writable, anonymous mappings (the heap, pymalloc's arenas,
what extension modules allocated) that are nearly all in memory already (/proc/self/pagemap): collapsing puts
zeroes in a range's holes, so a sparse one (a thread's stack, a library's reserved buffer) would grow the
template by up to 2 MB for nothing; a mapping smaller than 2 MB, or the ends of one, stays in 4 KB pages. Where
the system cannot (an older kernel, THP turned off entirely, a range marked for small pages, no free huge page
at the moment), the memory stays as it is: kernels work the same, each fork a little slower. Nothing is asked of
the system's THP settings: khugepaged is not pointed at these ranges (no MADV_HUGEPAGE), in the template or its
kernels. What the template itself writes after a fork is split back to 4 KB pages there (its first forks take
36-48 MB on huge pages down to 16-26).

Standard library only: the template runs it in the kernel's interpreter.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import struct

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KB base pages) PMD size
PAGE = 4096
MADV_COLLAPSE = 25
MOSTLY_PRESENT = 480  # of a range's 512 pages: at most 128 KB of zeroes added per range


def collapse_anonymous_memory() -> tuple[int, str | None]:
    """Collapse this process's populated anonymous ranges onto huge pages: (how many it collapsed, why some could
    not be, or None)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed, errors = 0, collections.Counter()
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for address in candidate_ranges():
            if present_pages(pagemap, address) < MOSTLY_PRESENT:
                continue
            if libc.madvise(address, HUGE_PAGE, MADV_COLLAPSE) == 0:
                collapsed += 1
            else:
                number = ctypes.get_errno()
                errors[errno.errorcode.get(number, str(number))] += 1
    if not errors:
        return collapsed, None
    return collapsed, "MADV_COLLAPSE: " + ", ".join(f"{name} for {count}" for name, count in sorted(errors.items()))


def candidate_ranges() -> list[int]:
    """The start of each 2 MB-aligned range inside a private, writable, anonymous mapping (the heap among them;
    not the stack)."""
    starts = []
    with open("/proc/self/maps") as handle:
        for line in handle:
            fields = line.split()
            if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            starts.extend(range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE))
    return starts


def present_pages(pagemap, address: int) -> int:
    """How many of the 512 pages from `address` are in memory (bit 63 of each page's pagemap entry)."""
    entries = os.pread(pagemap.fileno(), HUGE_PAGE // PAGE * 8, address // PAGE * 8)
    return sum(entry >> 63 for entry in struct.unpack(f"{len(entries) // 8}Q", entries))
