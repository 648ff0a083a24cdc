"""A seccomp filter that makes `fallocate(2)` fail with EOPNOTSUPP inside the sandboxes.

Why: `fallocate -l 100G f` reserves 100 GB of the host's disk in microseconds, a loop of them
fills the disk before any watchdog can look (`disk.DiskGuard` polls a few times a second, and
RLIMIT_FSIZE bounds one file, not their number). Without the call, programs fall back to writing
the bytes (glibc's `posix_fallocate` does this on EOPNOTSUPP), which takes time the watchdog sees.

The filter is a classic-BPF program of 5-instruction blocks, one per (audit arch, syscall number)
to refuse, then ALLOW:

    ld  [4]                    seccomp_data.arch
    jeq ARCH, 0, 3             another arch: next block
    ld  [0]                    seccomp_data.nr
    jeq NR, 0, 1               another syscall: next block
    ret ERRNO | EOPNOTSUPP
    ...
    ret ALLOW

bubblewrap loads it with `--seccomp FD` (`filter_bytes()`). Inside a docker container the same
file runs as a script, `python3 -S -E -c "$(this file)" PROGRAM ARGS...`: it installs the filter
for its own machine (`platform.machine()`, which a remote engine may not share with this host)
and execs PROGRAM. So this file must stay self-contained and Python-3.6-compatible (SWE-bench
images ship old interpreters): standard library only, no `from __future__`, no walrus.
"""

import ctypes
import os
import platform
import struct
import sys

EOPNOTSUPP = 95
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_X32_BIT = 0x40000000

# machine -> [(AUDIT_ARCH_*, fallocate's number)], the native ABI and its 32-bit compat ABIs.
DENIED = {
    "x86_64": [(0xC000003E, 285), (0xC000003E, _X32_BIT | 285), (0x40000003, 324)],
    "aarch64": [(0xC00000B7, 47), (0x40000028, 352)],
}
DENIED["amd64"] = DENIED["x86_64"]
DENIED["arm64"] = DENIED["aarch64"]


def filter_bytes(machine=None):
  """The BPF program (struct sock_filter[], 8 bytes each) for `machine` (default: this one);
  b"" for a machine without a table (then nothing is filtered)."""
  rules = DENIED.get(machine or platform.machine(), [])
  if not rules:
    return b""
  insns = []
  for arch, nr in rules:
    insns += [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, 3, arch), (_LD_W_ABS, 0, 0, 0),
              (_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, _RET_ERRNO | EOPNOTSUPP)]
  insns.append((_RET_K, 0, 0, _RET_ALLOW))
  return b"".join(struct.pack("=HBBI", *i) for i in insns)


def install(program):
  """Loads `program` as this process's seccomp filter (inherited by its children and execs)."""
  class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

  libc = ctypes.CDLL(None, use_errno=True)
  buf = ctypes.create_string_buffer(program, len(program))
  prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
  pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
  if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
  if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":  # inside a container: filter, then exec the command
  program = filter_bytes()
  if program:
    install(program)
  os.execvp(sys.argv[1], sys.argv[1:])
