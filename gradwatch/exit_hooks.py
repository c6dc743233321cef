"""Flushing at interpreter exit, and telling a crash from a normal end.

Monitors with reporters register a callback here: they are held until they detach,
and at interpreter exit each callback runs with the type name of the uncaught
exception that is ending the program, if one is, so a run record closed then says
the program crashed instead of finished, and holds every step even when the monitor
itself went out of scope (a training function that returned, a notebook cell run
again).

The callbacks belong to the process that registered them. A child made with
``os.fork()`` inherits the table and the atexit hook, yet must never flush or close its
parent's records (the parent is still writing them): the table is emptied in the child
at the fork, and the hook does nothing in any process other than the one that
registered them (for a fork that bypasses ``os.fork``'s hooks).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import Any

# key -> (pid of the registering process, owner, callback(error)); insertion-ordered,
# so callbacks run in registration order.
_callbacks: dict[int, tuple[int, Any, Callable[[str | None], None]]] = {}
# The type of the uncaught exception that is ending the program, if one is (recorded
# by the excepthook below, which runs before the exit hooks).
_uncaught: str | None = None
_excepthook_installed = False


def register(owner: Any, callback: Callable[[str | None], None]) -> None:
    """Run ``callback(error)`` at interpreter exit unless ``owner`` unregisters first.

    ``owner`` is kept alive until then. Registering again puts gradwatch's exit hook
    after everything registered since (atexit runs the last-registered hook first),
    so its flush runs before the exit hooks of what the reporters started (W&B's).
    """
    _callbacks[id(owner)] = (os.getpid(), owner, callback)
    _install_excepthook()
    atexit.unregister(_run)
    atexit.register(_run)


def unregister(owner: Any) -> None:
    _callbacks.pop(id(owner), None)


def _run() -> None:
    pid = os.getpid()
    for owner_pid, _, callback in list(_callbacks.values()):
        if owner_pid != pid:  # a forked child: the records are its parent's
            continue
        try:
            callback(_uncaught)
        except Exception:  # noqa: BLE001 - exiting: never raise from atexit
            pass


def _install_excepthook() -> None:
    """Note the type of an uncaught exception, then hand it to the previous hook."""
    global _excepthook_installed
    if _excepthook_installed:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):  # noqa: ANN001 - sys.excepthook's signature
        global _uncaught
        _uncaught = getattr(kind, "__name__", str(kind))
        previous(kind, value, tb)

    sys.excepthook = hook
    _excepthook_installed = True


def _forget_in_child() -> None:
    """In a forked child: drop the parent's callbacks (and its uncaught exception)."""
    global _uncaught
    _callbacks.clear()
    _uncaught = None


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_in_child)
