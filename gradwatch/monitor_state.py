"""Checking a monitor's saved state before anything of it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

from .layers import LayerTable


def check_monitor_state(state: Any, layers: LayerTable, current: int) -> Any:
    """Refuse a state that is not a monitor's, is newer than ``current`` (the version
    this gradwatch writes), is malformed or is another model's; changes nothing.

    Returns:
        The detector's part of it (for :meth:`Detector.check_state`).
    """
    if not isinstance(state, Mapping) or "version" not in state:
        raise ValueError(
            "not a gradwatch monitor state: expected the dict returned by "
            "GradMonitor.state_dict()"
        )
    version = state["version"]
    if not isinstance(version, int) or version > current or version < 1:
        raise ValueError(
            f"monitor state version {version!r} is not supported by this gradwatch "
            f"(which reads versions 1..{current}); upgrade gradwatch to load it"
        )
    required = ("step", "layers", "stats", "window") if version == 1 else (
        "step", "layers", "detector")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"monitor state (version {version}) lacks {', '.join(map(repr, missing))}: it "
            "was not written by GradMonitor.state_dict(), or was damaged"
        )
    step = state["step"]
    if not isinstance(step, Integral) or isinstance(step, bool) or step < 0:
        raise ValueError(f"monitor state 'step' is {step!r}, expected an integer >= 0")
    for key, kind in (("layers", (list, tuple)), ("layer_numel", (list, tuple)),
                      ("events", (list, tuple)), ("config", Mapping)):
        if key in state and not isinstance(state[key], kind):
            raise ValueError(
                f"monitor state '{key}' is a {type(state[key]).__name__}, not what "
                "GradMonitor.state_dict() writes"
            )
    if not all(isinstance(e, Mapping) for e in state.get("events", ())):
        raise ValueError("monitor state 'events' holds entries that are not dicts")
    saved = list(state["layers"])
    mine = list(layers.names)
    if saved != mine:
        missing = [n for n in mine if n not in saved]
        extra = [n for n in saved if n not in mine]
        raise ValueError(
            "monitor state is from an incompatible model: layers differ "
            f"(saved {len(saved)}, this model {len(mine)}; not in the state: "
            f"{missing[:5]}; not in this model: {extra[:5]}). Load it into a monitor "
            "attached to the same architecture with the same grouping options."
        )
    numel = [rec["numel"] for rec in layers.describe()]
    saved_numel = list(state.get("layer_numel", numel))
    if saved_numel != numel:
        if len(saved_numel) != len(numel):
            raise ValueError(
                f"monitor state 'layer_numel' has {len(saved_numel)} entries for "
                f"{len(numel)} layers: the state was damaged"
            )
        i = next(i for i, (a, b) in enumerate(zip(saved_numel, numel)) if a != b)
        raise ValueError(
            f"monitor state is from an incompatible model: layer {mine[i]!r} has "
            f"{numel[i]} parameters here but {saved_numel[i]} in the saved state. Load it "
            "into a monitor attached to the same architecture."
        )
    if version == 1:  # the statistics were kept flat
        return {k: state[k] for k in ("stats", "window", "tightness") if k in state}
    return state["detector"]
