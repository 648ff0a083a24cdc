"""What the sandboxes' commands may not call: `fallocate(2)` everywhere, and in docker the
kernel interfaces docker's default profile keeps from a container.

Why fallocate: `fallocate -l 100G f` reserves 100 GB of the host's disk in microseconds, a loop of
them fills the disk before any watchdog can look (`disk.DiskGuard` and docker.py's writable-layer
poll look a few times a second, and RLIMIT_FSIZE bounds one file, not their number). Refused with
EOPNOTSUPP, programs fall back to writing the bytes (glibc's `posix_fallocate` does), which takes
time the watchdog sees.

Each sandbox gets the filter from outside the agent's reach, so no command can take it off
(seccomp filters are inherited by every child and exec and cannot be removed):

- bubblewrap: `filter_bytes()`, a classic-BPF program bubblewrap loads with `--seccomp FD`. It is
  made of 5-instruction blocks, one per (audit arch, syscall number) to refuse, then ALLOW:

      ld  [4]                    seccomp_data.arch
      jeq ARCH, 0, 3             another arch: next block
      ld  [0]                    seccomp_data.nr
      jeq NR, 0, 1               another syscall: next block
      ret ERRNO | EOPNOTSUPP
      ...
      ret ALLOW

  The rest of the kernel is fenced by bubblewrap's own namespaces (`--unshare-all`).

- docker: `docker_profile()`, a seccomp profile in docker's JSON format that the sandbox passes
  as `security_opt=["seccomp=<json>"]` when it creates the container; the engine (runc) applies
  it to PID 1 and to every `docker exec`, by syscall name for the engine's own architecture
  (`archMap`), so a remote engine on another machine type gets the right numbers. A custom
  profile replaces the engine's default one, so this one refuses, besides fallocate, what the
  default refuses a container that has docker's default capabilities (`DOCKER_DENIED`): it is a
  deny list (`defaultAction` ALLOW) where the default is an allow list, so a system call newer
  than this list is allowed; the default capabilities (no CAP_SYS_ADMIN, CAP_SYS_MODULE, ...)
  still stand behind it. tests/test_docker_sandbox.py::test_engine_profile_refuses_what_it_lists
  gives a container CAP_SYS_ADMIN so that only the profile can refuse, and checks each entry.
"""

from __future__ import annotations

import json
import platform
import struct

EOPNOTSUPP, EPERM, ENOSYS = 95, 1, 38
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


def filter_bytes(machine: str | None = None) -> bytes:
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


# What docker's default profile refuses a container with the default capabilities, by purpose.
# They fail with EPERM, as there. Names an architecture lacks (vm86 on aarch64, ...) are skipped
# by the engine.
DOCKER_DENIED = {
    "namespaces": ["unshare", "setns"],  # and clone() with a CLONE_NEW* flag: _CLONE_NEW
    "kernel keyring (not namespaced)": ["add_key", "keyctl", "request_key"],
    "kernel modules, kexec, reboot, swap, accounting, quotas": [
        "init_module", "finit_module", "delete_module", "create_module", "query_module",
        "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
        "acct", "quotactl", "quotactl_fd"],
    "mounts": ["mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
               "fspick", "move_mount", "open_tree", "mount_setattr"],
    "the clock": ["settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime",
                  "clock_adjtime64"],
    "tracing and other processes' memory": [
        "bpf", "perf_event_open", "userfaultfd", "kcmp", "process_vm_readv",
        "process_vm_writev", "lookup_dcookie", "syslog", "fanotify_init"],
    "files by handle (escapes a bind mount)": ["open_by_handle_at", "name_to_handle_at"],
    "io_uring (bypasses seccomp for the calls it queues)": [
        "io_uring_setup", "io_uring_enter", "io_uring_register"],
    "memory policy (CAP_SYS_NICE)": ["mbind", "set_mempolicy", "get_mempolicy", "move_pages"],
    "obsolete": ["uselib", "ustat", "sysfs", "_sysctl", "vm86", "vm86old", "nfsservctl",
                 "iopl", "ioperm"],
}
# clone(2) flags that create a namespace; a clone with any of them fails (its flags are
# argument 0 on x86 and arm; clone3 passes them in memory seccomp cannot read, so clone3 fails
# with ENOSYS and the C library falls back to clone, as under docker's default profile).
_CLONE_NEW = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
              "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
              "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
              "CLONE_NEWNET": 0x40000000}
_AF_VSOCK = 40  # a socket to the host's hypervisor: refused as by the default profile


def docker_profile() -> dict:
  """The docker seccomp profile of the module docstring (a dict; `docker_profile_json()` is
  what goes into `security_opt`)."""
  def refuse(names, errno, args=()):
    return {"names": list(names), "action": "SCMP_ACT_ERRNO", "errnoRet": errno,
            "args": list(args)}

  def masked(index, bit):
    return {"index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}

  rules = [refuse(["fallocate"], EOPNOTSUPP)]
  rules += [refuse(names, EPERM) for names in DOCKER_DENIED.values()]
  rules += [refuse(["clone"], EPERM, [masked(0, bit)]) for bit in _CLONE_NEW.values()]
  rules.append(refuse(["clone3"], ENOSYS))
  rules.append(refuse(["socket"], EPERM, [{"index": 0, "value": _AF_VSOCK, "valueTwo": 0,
                                           "op": "SCMP_CMP_EQ"}]))
  return {"defaultAction": "SCMP_ACT_ALLOW",
          "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                       "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                      {"architecture": "SCMP_ARCH_AARCH64",
                       "subArchitectures": ["SCMP_ARCH_ARM"]}],
          "syscalls": rules}


def docker_profile_json() -> str:
  return json.dumps(docker_profile(), separators=(",", ":"))
