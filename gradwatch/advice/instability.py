"""Advice on instability: sustained rises of the norm that the drift test flagged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import Advice, _g

if TYPE_CHECKING:
    import pandas as pd

# A drift alarm counts when its rise lasted: over the DRIFT_AFTER steps after the alarm
# the median norm is at least DRIFT_TOTAL_GROWTH times the typical norm where the rise
# began (a blow-up keeps rising or stays up; a network's opening rise, or a stretch of
# hard batches, falls back) ...
DRIFT_AFTER = 40
DRIFT_TOTAL_GROWTH = 3.0
# ... and grew at least this much a step when flagged (slower rises are the trend rule's).
DRIFT_STEP_GROWTH = 1.02


def drifts(steps: pd.DataFrame) -> Advice | None:
    """Sustained rises of the model norm, as the drift test measured them: learning
    rate too high or growing, or an instability building up."""
    if steps.empty or "drift" not in steps:
        return None
    alarms = steps[steps["drift"].astype(bool)]
    if alarms.empty:
        return None
    growth = alarms["drift_growth"].to_numpy(dtype=float)
    total = _lasting_growth(steps, alarms)
    real = (growth >= DRIFT_STEP_GROWTH) & (total >= DRIFT_TOTAL_GROWTH)
    if not real.any():
        return None
    rows = alarms[real]
    i = int(np.argmax(growth[real]))
    at = int(rows["step"].iloc[i])
    since = at - int(round(float(rows["drift_steps"].iloc[i])))
    rate = float(growth[real][i])
    at_steps = ", ".join(str(int(s)) for s in rows["step"].iloc[:5])
    bounded = ""
    if "bounding" in steps and bool(steps.loc[steps["step"] >= at, "bounding"].any()):
        bounded = (
            " gradwatch bounded the steps after it (an SGD-type optimizer, whose step "
            "shrinks with the gradient): the typical level held and each step clipped to "
            "at most a small multiple of it, so the run went on at about its earlier "
            "step size."
        )
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return Advice(
        rule="drift",
        title=f"Gradient norm rising x{rate:.3g} per step since step {since}: learning "
        "rate too high, or an instability",
        detail=(
            f"The drift test (a CUSUM of the model norm's z-scores) flagged {len(rows)} "
            f"sustained rise(s), at step(s) {at_steps}{more}; the fastest grew the norm "
            f"x{rate:.3g} per step from step {since} to {at}, and over the "
            f"{DRIFT_AFTER} steps after it the norm's median stayed "
            f"x{float(total[real][i]):.3g} the typical norm where it began. A norm that grows step after step is "
            "what an optimizer past its stability limit does (a learning rate too high, "
            "or a schedule still raising it); clipping trims each step but cannot stop "
            f"it.{bounded} Lower the (peak) learning rate or lengthen its warm-up; if "
            "the rise began at a change you made (unfreezing layers, a new data "
            "source), look there first."
        ),
        evidence={
            "drift_events": int(len(rows)),
            "fastest_growth_per_step": _g(rate),
            "rise_began": since,
            "flagged_at": at,
            "total_growth": _g(float(total[real][i])),
        },
    )


def _lasting_growth(steps: pd.DataFrame, alarms: pd.DataFrame) -> np.ndarray:
    """For each alarm: the median norm over the next ``DRIFT_AFTER`` steps over the
    typical norm where its rise began (``inf`` where the norm became non-finite)."""
    step = steps["step"].to_numpy()
    norm = steps["global_norm"].to_numpy(dtype=float)
    typical = steps["typical_norm"].to_numpy(dtype=float)
    out = []
    for at, back in zip(alarms["step"].to_numpy(), alarms["drift_steps"].to_numpy(dtype=float)):
        begin = typical[step == at - int(round(back))]
        after = norm[(step > at) & (step <= at + DRIFT_AFTER)]
        after = np.where(np.isnan(after), np.inf, after)  # NaN: the run blew up
        if len(begin) == 0 or not begin[0] > 0 or len(after) == 0:
            out.append(np.nan)
            continue
        out.append(float(np.median(after)) / float(begin[0]))
    return np.array(out, dtype=float)
