"""Events read from step rows: explosions, drifts (sustained rises), non-finite
gradients and AMP overflows, each with the layers involved, the action taken and a
reason that quotes the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import UNSTABLE_FOR, MonitorConfig
from .rows import ACTIONS, RowLayout

EVENT_COLUMNS = ("step", "kind", "layer", "layers", "action", "reason", "z", "global_norm",
                 "threshold")


class EventDecoder:
    """Turns host rows into event records (dicts with the ``EVENT_COLUMNS``).

    Args:
        layout: row layout.
        layer_names: names of the layers, aligned with the per-layer blocks.
        config: the monitor config, for the thresholds quoted in reasons.
        layer_z_threshold: the per-layer event threshold (family-corrected).
        skip_how: how this monitor skips a step, quoted in reasons.
    """

    def __init__(self, layout: RowLayout, layer_names: Sequence[str], config: MonitorConfig,
                 layer_z_threshold: float, skip_how: str) -> None:
        self.layout = layout
        self.layer_names = list(layer_names)
        self.config = config
        self.layer_z_threshold = layer_z_threshold
        self.skip_how = skip_how
        # The last step whose row was bounded: an alarm after a longer calm says that
        # bounding engages.
        self._last_bounded = -(10**9)

    def events_of(self, step: int, row: np.ndarray) -> list[dict[str, Any]]:
        lay, cfg = self.layout, self.config
        s = lay.step_values(row)
        per = lay.layer_values(row)
        action = ACTIONS[int(s["action"])]
        events = []
        if s["nonfinite"]:
            bad = np.flatnonzero((per["present"] > 0) & ~np.isfinite(per["grad_norm"]))
            names = [self.layer_names[i] for i in bad]
            where = _join(names) or "(model)"
            if s["amp"]:
                events.append(
                    self._event(
                        step, "amp_overflow", names, action,
                        f"NaN/Inf gradients under GradScaler in {where}: loss-scale overflow, "
                        "left for the scaler to skip and back off; statistics not updated",
                        s,
                    )
                )
            else:
                present = per["present"] > 0
                # Every element finite, a norm not: finite gradients whose norm is
                # beyond float32's range (about 3.4e38), not NaN or Inf in the data.
                overflow = bool(names) and bool(np.isfinite(per["max_abs"][present]).all())
                what = ("finite gradients whose norm overflows float32 (largest |g| "
                        f"{np.max(per['max_abs'][present]):.3g})" if overflow
                        else "NaN/Inf gradients")
                events.append(
                    self._event(
                        step, "nonfinite", names, action,
                        f"{what} in {where}: {self.skip_how}; statistics not updated",
                        s,
                    )
                )
            return events
        engages = bool(s["bounding"]) and step - self._last_bounded > 1
        if s["bounding"]:
            self._last_bounded = step
        if s["drift"]:
            events.append(self._drift_event(step, s, action, engages))
        if not s["explosion"]:
            return events
        z = per["z"]
        flagged = np.flatnonzero(per["flagged"] > 0)
        flagged = flagged[np.argsort(-z[flagged], kind="stable")]
        names = [self.layer_names[i] for i in flagged]
        parts = []
        if s["z"] > s["z_limit"]:
            parts.append(
                f"model norm {s['global_norm']:.3g} vs typical {s['typical_norm']:.3g} "
                f"(log-norm z={s['z']:+.1f} > {_limit(s['z_limit'], cfg.z_threshold)})"
            )
        for i in flagged[:3]:
            limit = _limit(per["z_limit"][i], self.layer_z_threshold)
            parts.append(
                f"layer {self.layer_names[i]!r} norm {per['grad_norm'][i]:.3g} vs typical "
                f"{per['typical_norm'][i]:.3g} (z={z[i]:+.1f} > {limit}, "
                f"concentration z={per['concentration_z'][i]:+.1f})"
            )
        if len(flagged) > 3:
            parts.append(f"and {len(flagged) - 3} more layer(s)")
        reason = "; ".join(parts) + ": " + self._what_was_done(action, s, per, flagged)
        if engages and not s["drift"]:
            reason += "; " + self._bounding_note()
        if not names:  # only the model-level norm crossed: name the largest layer z
            order = np.argsort(-np.where(per["present"] > 0, z, -np.inf), kind="stable")
            names = [self.layer_names[order[0]]] if len(order) else []
        events.append(self._event(step, "explosion", names, action, reason, s))
        return events

    def _drift_event(self, step: int, s: dict[str, float], action: str,
                     engages: bool) -> dict[str, Any]:
        since = step - int(round(s["drift_steps"]))
        reason = (
            f"model norm rising x{s['drift_growth']:.3g} per step since step {since} "
            f"(now {s['global_norm']:.3g}, typical {s['typical_norm']:.3g}; CUSUM of its "
            f"z-scores > drift_threshold={self.config.drift_threshold:g}): learning rate "
            "too high or growing, or an instability building up"
        )
        if engages:
            reason += "; " + self._bounding_note()
        return self._event(step, "drift", [], action, reason, s)

    def _bounding_note(self) -> str:
        cfg = self.config
        note = (
            f"step bounding on for the next {UNSTABLE_FOR} steps (an SGD-type optimizer, "
            "whose step shrinks with the gradient, and an instability): the typical level "
            "is held while norms cross the boundary"
        )
        if cfg.max_ratio is not None:
            note += f", the threshold at most {cfg.max_ratio:g}x the typical norm"
        if cfg.clip == "auto" and cfg.crossing_rate is not None:
            note += ", tightened towards it on frequent crossings"
        return note

    def _what_was_done(
        self, action: str, s: dict[str, float], per: dict[str, np.ndarray], flagged: np.ndarray
    ) -> str:
        cfg = self.config
        if action == "skip":
            how = self.skip_how
            if s["skip_z"]:
                return f"z reached skip_threshold={cfg.skip_threshold:g}, {how}"
            return how
        if action == "none":
            return f"clip={cfg.clip!r}, gradients left as they are"
        if action == "clip_value":
            valued = np.flatnonzero(np.isfinite(per["value_threshold"]))
            if cfg.clip == "auto":
                done = "outlier components (concentration far above normal) in " + ", ".join(
                    f"{self.layer_names[i]!r} clipped by value at "
                    f"{per['value_threshold'][i]:.3g}"
                    for i in valued[:3]
                )
            else:
                done = f"clipped by value at {cfg.clip_value:g}"
            if s["coef"] < 1.0:
                done += f", then the remaining growth clipped by norm (x{s['coef']:.3g})"
            return done
        if cfg.clip == "auto":
            return (
                f"diffuse growth (concentration normal): clipped by norm to "
                f"{s['clipped_norm']:.3g} (x{s['coef']:.3g}), direction preserved"
            )
        return f"clipped by norm to {s['clipped_norm']:.3g} (clip={cfg.clip!r})"

    def _event(
        self,
        step: int,
        kind: str,
        layers: list[str],
        action: str,
        reason: str,
        s: dict[str, float],
    ) -> dict[str, Any]:
        return {
            "step": step,
            "kind": kind,
            "layer": layers[0] if layers else "",
            "layers": ",".join(layers),
            "action": action,
            "reason": reason,
            "z": s["z"],
            "global_norm": s["global_norm"],
            "threshold": s["threshold"],
        }


def _limit(limit: float, configured: float) -> str:
    """An event threshold as quoted in reasons, with its calibration where raised."""
    if limit > configured * (1 + 1e-3):
        return f"{limit:.3g} ({configured:.3g} raised x{limit / configured:.2f} for this run's tail)"
    return f"{configured:.3g}"


def _join(names: list[str], limit: int = 5) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
