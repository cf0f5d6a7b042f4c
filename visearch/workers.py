"""Worker processes that never outlive the process that started them.

A decoder worker forked by torch's DataLoader whose parent is SIGKILLed is re-parented to init and can wait forever
(a futex in its result queue's feeder thread); torch's own watchdog only looks every few seconds, and only while the
worker is idle. `die_with_parent` (a DataLoader worker_init_fn) asks the kernel to SIGKILL the worker the moment its
parent dies (Linux prctl PR_SET_PDEATHSIG), then checks that the parent is still the one that forked it (it may
have died before the request was made). Elsewhere the parent-pid check is all that is done.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent exits; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """worker_init_fn: exit with the parent `parent_pid` (see the module docstring)."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def worker_init(parent_pid: int | None = None) -> Callable[[int], None]:
    """A picklable worker_init_fn for a DataLoader started by this process."""
    return functools.partial(die_with_parent, os.getpid() if parent_pid is None else parent_pid)
