"""Advice read off a recorded run: what the gradient statistics say to change.

Every rule is a pure function over the tables of a run record
(:func:`gradwatch.run_record.load_run`) that returns an :class:`Advice` only when its
statistic crosses a stated threshold, and quotes that statistic in ``evidence``. A
healthy run gets no advice. scipy is imported inside the rules, so importing this
module stays light.

The rules and their thresholds (``CHECKS`` holds the same list as text):

* **first layer dominates**: the first layer's gradient norm over the median of the
  other layers' at the same step has a median >= 100 over the run, and a sign test
  says the ratio exceeds 100 on most steps (p < 0.01): inputs on a large scale.
* **frequent value clipping in a layer**: one layer, by itself, is clipped by value
  on >= 1% of the steps (and at least 5 times): outliers in the data.
* **growing norm**: after the first 20% of the run, a Mann-Kendall test on binned
  medians of the log global norm finds an upward trend (p < 0.01) and the Theil-Sen
  slope grows the norm more than 3x over that span: learning rate too high.
* **drift**: a drift event (the monitor's CUSUM on the model norm's z-scores) that saw
  the norm grow at least 1.02x a step, after which it stayed up (the median of the next
  40 steps at least 3x the typical norm where the rise began): learning rate too high
  or still rising, or an instability building up.
* **explosions in recurrent layers**: at least 5 explosions, >= 75% of them in
  recurrent layers (``weight_hh_l0``-style parameters), a binomial test against the
  recurrent share of layers gives p < 0.05, and most are diffuse: clip by norm.
* **non-finite gradients**: NaN/Inf on 2 or more steps: where they came from and the
  fix.
* **update ratio too high**: a layer's median update-to-weight ratio (measured once
  per logging interval, after the first 20% of the run, at least 3 times) >= 1e-2,
  and either 10 times the median over the layers or >= 0.1: learning rate too high
  for that layer.
* **a layer that does not learn**: a layer with gradients whose median update ratio
  is <= 1e-6 while other layers move: not in the optimizer, a learning rate of 0,
  vanishing gradients, or updates below the weights' (bf16) precision.
* **AMP overflows**: beyond the loss scale's initial calibration, 3 or more overflows
  that come in streaks of 3 or more, or on more than 1% of the steps: the overflow is
  not the loss scale's doing.

The rules live by subject: ``data`` (first layer, value clipping), ``optimisation``
(trend, recurrent explosions), ``updates`` (update ratios), ``instability`` (drift)
and ``numerics`` (non-finite gradients, AMP overflows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._common import ALPHA, Advice, is_recurrent, layer_names, value_clipped
from .data import (
    FIRST_LAYER_RATIO,
    VALUE_CLIP_MIN,
    VALUE_CLIP_RATE,
    first_layer_dominance,
    value_clipping,
)
from .instability import DRIFT_AFTER, DRIFT_STEP_GROWTH, DRIFT_TOTAL_GROWTH, drifts
from .numerics import (
    AMP_MIN,
    AMP_RATE,
    AMP_STREAK,
    NONFINITE_MIN,
    amp_overflows,
    nonfinite_steps,
)
from .optimisation import (
    RECURRENT_MIN_EVENTS,
    RECURRENT_P,
    RECURRENT_SHARE,
    TREND_GROWTH,
    TREND_SKIP,
    norm_trend,
    recurrent_explosions,
)
from .updates import (
    UPDATE_DEAD,
    UPDATE_EXTREME,
    UPDATE_HIGH,
    UPDATE_MIN_MEASURED,
    UPDATE_OUTLIER,
    update_ratios,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CHECKS", "Advice", "advise", "amp_overflows", "drifts",
    "first_layer_dominance", "is_recurrent", "layer_names", "nonfinite_steps",
    "norm_trend", "recurrent_explosions", "update_ratios", "value_clipped",
    "value_clipping",
]

CHECKS = (
    f"first layer dominating the others (median norm ratio >= {FIRST_LAYER_RATIO:g}, "
    f"sign test p < {ALPHA:g})",
    f"frequent value clipping in one layer (>= {VALUE_CLIP_RATE:.0%} of steps, at least "
    f"{VALUE_CLIP_MIN} times)",
    f"upward trend of the global norm after the first {TREND_SKIP:.0%} of steps "
    f"(Mann-Kendall p < {ALPHA:g}, Theil-Sen growth > {TREND_GROWTH:g}x)",
    f"sustained rises flagged by the drift test (>= {DRIFT_STEP_GROWTH:g}x a step, and "
    f">= {DRIFT_TOTAL_GROWTH:g}x the typical norm over the {DRIFT_AFTER} steps after)",
    f"explosions concentrated in recurrent layers (>= {RECURRENT_MIN_EVENTS} events, "
    f">= {RECURRENT_SHARE:.0%} recurrent, binomial p < {RECURRENT_P:g})",
    f"update-to-weight ratio of a layer far above 1e-3 (median >= {UPDATE_HIGH:g} and "
    f"{UPDATE_OUTLIER:g}x the layers' median, or >= {UPDATE_EXTREME:g}; at least "
    f"{UPDATE_MIN_MEASURED} measurements) or near zero (<= {UPDATE_DEAD:g}) while "
    "others move",
    f"repeated non-finite gradients (>= {NONFINITE_MIN} steps)",
    f"repeated AMP overflows beyond the loss scale's calibration (>= {AMP_MIN}, in "
    f"streaks of >= {AMP_STREAK} or on > {AMP_RATE:.0%} of steps)",
)


def advise(
    meta: dict[str, Any], steps: pd.DataFrame, layers: pd.DataFrame, events: pd.DataFrame
) -> list[Advice]:
    """Every piece of advice the record supports (empty for a healthy run).

    Args:
        meta: the run's ``meta.json``.
        steps, layers, events: the tables of :func:`gradwatch.run_record.load_run`.

    Returns:
        :class:`Advice` items, most fundamental first (data before optimisation).
    """
    found = [
        first_layer_dominance(meta, layers),
        value_clipping(steps, layers, meta),
        norm_trend(steps),
        drifts(steps),
        recurrent_explosions(meta, layers, events),
        *update_ratios(layers),
        nonfinite_steps(steps, events, meta),
        amp_overflows(steps, events),
    ]
    return [a for a in found if a is not None]
