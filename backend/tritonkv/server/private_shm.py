"""A /dev/shm of its own for tritonserver: the Python backend's regions (request and response
tensors, i.e. prompts and answers) are born where no other user can see them.

Why not umask: the backend creates its regions through boost.interprocess, which
``fchmod``s each new region to 0644 after creating it, whatever the umask (measured on
2.51: umask 077, regions 0644 until the launcher's chmod). So tritonserver runs in a mount
namespace of its own (``unshare --mount``; ``--map-root-user`` first where the launcher is
not root) with a fresh tmpfs, mode 0700, on /dev/shm. Only its processes (its stubs, what
they start) see that tmpfs; it goes away with the last of them, even after a SIGKILL, so a
crash leaves nothing in /dev/shm either. The host's /dev/shm is untouched.

Where namespaces are not allowed (a container without CAP_SYS_ADMIN and without user
namespaces), ``command_prefix`` is None and the launcher falls back to the host's /dev/shm
with its per-server region names and a chmod 0600 once the server is ready
(docs/security.md says what that window means).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# sh: mount the tmpfs in the new namespace, then become the command ("$@") keeping the pid
_MOUNT_AND_EXEC = 'mount -t tmpfs -o mode=0700,nosuid,nodev tritonkv-shm /dev/shm && exec "$@"'


@functools.lru_cache(maxsize=1)
def command_prefix() -> tuple[str, ...] | None:
    """argv prefix that runs a command with a private /dev/shm, or None where not possible."""
    unshare, sh = shutil.which("unshare"), shutil.which("sh")
    if unshare is None or sh is None or not os.path.isdir("/dev/shm"):
        return None
    prefix = (unshare, "--mount", "--propagation", "private")
    if os.geteuid() != 0:
        prefix = (unshare, "--map-root-user", "--mount", "--propagation", "private")
    prefix += (sh, "-c", _MOUNT_AND_EXEC, "tritonkv-private-shm")
    try:
        probe = subprocess.run(list(prefix) + ["true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


def shm_view(pid: int) -> str:
    """The /dev/shm that process ``pid`` sees (its mount namespace's), as a path from here."""
    return f"/proc/{pid}/root/dev/shm"
