"""gradwatch: per-layer gradient monitoring, statistical explosion detection and
adaptive clipping for PyTorch, with no host synchronisation on the training step.

Quick use::

    import gradwatch
    monitor = gradwatch.attach(model, optimizer=optimizer)
    ...
    loss.backward()
    monitor.step()          # measure, detect, clip in place
    optimizer.step()

``import gradwatch`` imports torch and nothing heavier; pandas is imported when a
table is asked for.
"""

from __future__ import annotations

from .attaching import attach
from .config import MonitorConfig
from .monitor import GradMonitor
from .result import StepResult
from .version import __version__

__all__ = ["GradMonitor", "MonitorConfig", "StepResult", "attach", "__version__"]
