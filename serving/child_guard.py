"""Run a server command as a child that cannot outlive its launcher: ``python -m serving.child_guard CMD...``.

The guard asks the kernel for SIGTERM when its parent (the launcher) dies, even by SIGKILL
(``PR_SET_PDEATHSIG``, Linux), leads its own process group, and runs CMD in it. On SIGTERM
(a requested stop, or the launcher gone) it forwards SIGTERM to CMD, waits up to its grace
(``FLAP_GUARD_GRACE`` seconds, 20; 10 when the launcher is gone) and then SIGKILLs the whole
group, so vLLM's API server, engine core and workers go with it. It exits with CMD's code.
Standard library only: it starts in milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m serving.child_guard CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request took effect
        return 1
    if os.getpgrp() != os.getpid():
        os.setpgrp()
    grace = float(os.environ.get("FLAP_GUARD_GRACE", "20"))
    stopping: list[float] = []

    def on_term(signum, frame) -> None:
        if not stopping:
            orphaned = os.getppid() != parent
            stopping.append(time.monotonic() + (min(grace, 10.0) if orphaned else grace))
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    child = subprocess.Popen(argv)  # same process group: a group kill reaches every descendant
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if os.getppid() != parent:
        on_term(signal.SIGTERM, None)
    code = None
    while code is None:
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() > stopping[0]:
                break
    # the server is gone (or overdue): nothing of its tree may stay behind
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for sig, pause in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 0.0)):
        others = _group_members()
        for pid in others:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if others and pause:
            time.sleep(pause)
    if code is None:
        code = child.wait()
    return code if code >= 0 else 128 - code


def _group_members() -> list[int]:
    """The other live processes of this guard's process group (from /proc)."""
    me, group = os.getpid(), os.getpgrp()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # field 5 of stat: pgrp; skip zombies
            found.append(int(entry))
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
