"""The seccomp filter every local kernel runs under: the system calls a kernel never needs fail with EPERM.

Defence in depth below the uid, namespaces and cgroups: these calls are where a kernel bug would turn into
an escape (new user namespaces, mounts, eBPF, io_uring, keyrings, perf), or they touch the whole machine
(kexec, modules, the clock, swap). A plain BPF program, built here with the standard library (no
libseccomp), installed by `confine` just before it becomes the kernel, with `no_new_privs` so no setuid
program can lift it. Docker's default profile is the model; docs/isolation.md lists the calls and why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# System call numbers: (x86_64, aarch64), read from <asm/unistd_64.h> and <asm-generic/unistd.h>.
DENIED = {
    # debugging other processes: reading and writing their memory
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    # mounts and new namespaces: the way out of the kernel's view of the machine
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "move_mount": (429, 429), "open_tree": (428, 428), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "unshare": (272, 97), "setns": (308, 268),
    # the running kernel itself
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
    # large kernel attack surfaces a kernel has no use for
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    # files by handle, bypassing the directory tree (a known container escape)
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    # machine-wide state
    "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "clock_adjtime": (305, 266), "syslog": (103, 116),
    "quotactl": (179, 60), "quotactl_fd": (443, 443), "lookup_dcookie": (212, 18),
    "vhangup": (153, 58), "nfsservctl": (180, 42), "fanotify_init": (300, 262),
    # x86 only: raw port I/O and obsolete calls
    "iopl": (172, None), "ioperm": (173, None), "uselib": (134, None), "_sysctl": (156, None),
}
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435  # its flags sit in memory a filter cannot read: ENOSYS, and the C library falls back to clone
NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# Classic BPF, as seccomp reads it.
LOAD_WORD, JUMP_EQUAL, JUMP_AT_LEAST, JUMP_ANY_BIT, RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW = 0x7FFF0000
ERRNO = 0x00050000
NR_OFFSET, ARCH_OFFSET, ARG0_OFFSET = 0, 4, 16  # in struct seccomp_data (args[0]'s low half, little-endian)


def supported(machine: str | None = None) -> bool:
    return (machine or os.uname().machine) in AUDIT_ARCH


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jump if true, jump if false, operand) instructions."""
    column = 0 if machine == "x86_64" else 1
    fail = lambda number: (RETURN, 0, 0, ERRNO | number)  # noqa: E731
    instructions = [
        (LOAD_WORD, 0, 0, ARCH_OFFSET),
        (JUMP_EQUAL, 1, 0, AUDIT_ARCH[machine]),
        fail(errno.ENOSYS),  # another ABI (32-bit calls on a 64-bit kernel) would bypass the numbers below
        (LOAD_WORD, 0, 0, NR_OFFSET),
    ]
    if machine == "x86_64":
        instructions += [(JUMP_AT_LEAST, 0, 1, X32_SYSCALL_BIT), fail(errno.ENOSYS)]
    instructions += [
        (JUMP_EQUAL, 0, 1, CLONE3), fail(errno.ENOSYS),
        # clone: allowed unless it asks for a new namespace
        (JUMP_EQUAL, 0, 4, CLONE[machine]), (LOAD_WORD, 0, 0, ARG0_OFFSET),
        (JUMP_ANY_BIT, 0, 1, NEW_NAMESPACES), fail(errno.EPERM), (RETURN, 0, 0, ALLOW),
    ]
    for numbers in DENIED.values():
        if numbers[column] is not None:
            instructions += [(JUMP_EQUAL, 0, 1, numbers[column]), fail(errno.EPERM)]
    return [*instructions, (RETURN, 0, 0, ALLOW)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def compiled(machine: str | None = None) -> bytes:
    """The filter as seccomp reads it: its instructions as `struct sock_filter`s, one after another."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program(machine or os.uname().machine))


def install(code: bytes | None = None) -> None:
    """no_new_privs, then the filter (`compiled()`, or made before, as the kernel template does once for all its
    kernels), for this process and all it will start; OSError where the OS refuses."""
    code = compiled() if code is None else code
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = SockFprog(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))  # 8 bytes an instruction
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"seccomp filter refused: {os.strerror(number)}")
