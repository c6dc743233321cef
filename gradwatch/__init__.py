"""gradwatch: per-layer gradient monitoring, statistical explosion detection and
adaptive clipping for PyTorch, with no host synchronisation on the training step.

Quick use::

    import gradwatch
    monitor = gradwatch.attach(model, optimizer=optimizer)
    ...
    loss.backward()
    monitor.step()          # measure, detect, clip in place
    optimizer.step()

``import gradwatch`` imports torch and nothing heavier, and only when one of its names
is first used (so ``gradwatch --version`` and ``gradwatch --help`` answer at once);
pandas is imported when a table is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers
    from .attaching import attach
    from .config import MonitorConfig
    from .monitor import GradMonitor
    from .result import StepResult

__all__ = ["GradMonitor", "MonitorConfig", "StepResult", "attach", "__version__"]

# The public names, by the module that defines them: imported on first use (PEP 562).
_LAZY = {"attach": "attaching", "MonitorConfig": "config", "GradMonitor": "monitor",
         "StepResult": "result"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    try:  # a submodule, e.g. gradwatch.distributed
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but one of its own imports failed
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
