"""Advice on numerics: repeated non-finite gradients, and AMP overflows beyond the loss
scale's own calibration."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._common import Advice, _g, _names, _streaks, layer_names

if TYPE_CHECKING:
    import pandas as pd

# Non-finite gradients and AMP overflows.
NONFINITE_MIN = 2
AMP_MIN = 3
AMP_RATE = 0.01
AMP_STREAK = 3


def nonfinite_steps(
    steps: pd.DataFrame, events: pd.DataFrame, meta: dict[str, Any]
) -> Advice | None:
    """Repeated NaN/Inf gradients (without a GradScaler): where from, and the fix."""
    if events.empty:
        return None
    bad = events[events["kind"] == "nonfinite"]
    n = len(bad)
    if n < NONFINITE_MIN:
        return None
    n_steps = max(int(steps["step"].nunique()), n) if len(steps) else n
    names = layer_names(meta)
    per_event = [
        [s for s in str(v).split(",") if s] for v in bad["layers"].fillna("").astype(str)
    ]
    everywhere = sum(len(set(ls)) >= len(names) for ls in per_event)
    counts: dict[str, int] = {}
    for ls in per_event:
        for name in ls:
            counts[name] = counts.get(name, 0) + 1
    named = sorted(counts, key=lambda k: -counts[k])
    streak = max(length for _, length in _streaks(bad["step"].to_numpy()))
    # Was the norm already far above typical just before? Then the run was diverging.
    s = steps[["step", "global_norm", "typical_norm"]].dropna()
    s = s[np.isfinite(s["global_norm"].to_numpy(dtype=float))]
    before = []
    for step in bad["step"].astype(int):
        prev = s[(s["step"] < step) & (s["step"] >= step - 5)]
        if len(prev):
            before.append(float((prev["global_norm"] / prev["typical_norm"]).max()))
    rising = float(np.median(before)) if before else float("nan")
    fixes = []
    if everywhere >= n / 2:
        fixes.append(
            f"On {everywhere} of {n} steps every layer went non-finite at once, so the NaN/Inf "
            "most likely entered in the forward pass or the loss, not in one layer's "
            "backward: check the batches of those steps (torch.isfinite(x).all()) and guard "
            "log, division and sqrt in the loss with a small epsilon."
        )
    else:
        fixes.append(
            f"The NaN/Inf appeared in {_names(named)} (not in every layer): look at the "
            "operations of those modules (division, log, sqrt, exp, an fp16 overflow); one "
            "run under torch.autograd.set_detect_anomaly(True) names the operation."
        )
    if math.isfinite(rising) and rising >= 10.0:
        fixes.append(
            f"In the 5 steps before, the norm was a median {rising:.3g}x its typical value: "
            "the run was diverging. Lower the learning rate, or set max_norm as a hard "
            "ceiling that also holds during warm-up."
        )
    handled = meta.get("config", {}).get("nonfinite", "skip")
    return Advice(
        rule="nonfinite",
        title=f"NaN/Inf gradients on {n} steps: find where they come from",
        detail=(
            f"{n} of {n_steps} steps had non-finite gradients (longest streak {streak}, "
            f"first at step {int(bad['step'].min())}); gradwatch kept them out of the "
            f"statistics and handled them (nonfinite={handled!r}), but each such step is a "
            f"lost update. {' '.join(fixes)}"
        ),
        evidence={
            "nonfinite_steps": n,
            "steps": n_steps,
            "first_step": int(bad["step"].min()),
            "longest_streak": streak,
            "all_layers_at_once": everywhere,
            "layers": named[:5],
            "norm_ratio_before": _g(rising),
        },
    )


def amp_overflows(steps: pd.DataFrame, events: pd.DataFrame) -> Advice | None:
    """Repeated loss-scale overflows that the GradScaler's back-off does not explain.

    A GradScaler starts at a large scale and halves it on each overflow, so a streak
    of overflows at the very start of a run is its calibration and is left out. After
    that a default scaler overflows about once per ``growth_interval`` (2000) steps.
    Overflows in streaks (the halved scale still overflows) or on more than 1% of
    the steps do not come from the scale.
    """
    from scipy import stats

    if events.empty:
        return None
    over = events[events["kind"] == "amp_overflow"]
    if over.empty:
        return None
    first_step = int(steps["step"].min()) if len(steps) else int(over["step"].min())
    runs = _streaks(over["step"].to_numpy())
    calibration = runs[0][1] if runs and runs[0][0] == first_step else 0
    runs = runs[1:] if calibration else runs
    n = sum(length for _, length in runs)
    if n < AMP_MIN:
        return None
    n_steps = max(int(steps["step"].nunique()) - calibration, n) if len(steps) else n
    rate = n / n_steps
    streak = max(length for _, length in runs)
    if streak < AMP_STREAK and rate <= AMP_RATE:
        return None
    ci = stats.binomtest(n, n_steps).proportion_ci(confidence_level=0.95)
    kept = over[~over["step"].isin(range(first_step, first_step + calibration))]
    counts = (
        kept["layers"].fillna("").astype(str).str.split(",").explode().replace("", np.nan)
        .dropna().value_counts()
    )
    named = [str(x) for x in counts.index]
    where = f" in {_names(named)}" if named else ""
    if streak >= AMP_STREAK:
        why = (
            f"The scaler halves its scale on every overflow, yet {streak} steps in a row "
            "overflowed: the Inf/NaN does not come from the loss scale but from the forward "
            "pass (an fp16 activation above 65504, or a NaN in the data)."
        )
    else:
        why = (
            "Isolated overflows this frequent are more than the scaler's periodic probing "
            "(about one per growth_interval steps): some batches overflow fp16 in the "
            "forward pass."
        )
    return Advice(
        rule="amp_overflow",
        title=f"Repeated AMP overflows ({n} steps{where}): not the loss scale",
        detail=(
            f"After the scaler's calibration ({calibration} step(s) at the start, left out), "
            f"{n} of {n_steps} steps overflowed ({rate:.2%}, 95% interval "
            f"{ci.low:.2%}-{ci.high:.2%}), the longest streak {streak} steps. {why} Fix: "
            "autocast to bfloat16 (torch.autocast(device_type, dtype=torch.bfloat16)), which "
            "has float32's range and needs no GradScaler; or run the overflowing modules"
            f"{where} in float32 (wrap them in torch.autocast(device_type, enabled=False)); "
            "and check those batches for NaN/Inf inputs."
        ),
        evidence={
            "overflows": n,
            "steps": n_steps,
            "rate": _g(rate),
            "rate_ci_low": _g(float(ci.low)),
            "rate_ci_high": _g(float(ci.high)),
            "longest_streak": streak,
            "calibration_steps": calibration,
            "layers": named[:5],
        },
    )
