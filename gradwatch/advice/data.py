"""Advice on the data: a first layer that dominates (inputs on a large scale) and one
layer clipped by value again and again (outliers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._common import (
    ALPHA,
    Advice,
    _finite_positive,
    _g,
    _names,
    layer_grid,
    layer_names,
    value_clipped,
)

if TYPE_CHECKING:
    import pandas as pd

# First layer dominance.
FIRST_LAYER_RATIO = 100.0
FIRST_LAYER_MIN_STEPS = 20
# Frequent value clipping, counted per layer.
VALUE_CLIP_RATE = 0.01
VALUE_CLIP_MIN = 5


def first_layer_dominance(meta: dict[str, Any], layers: pd.DataFrame) -> Advice | None:
    """The first layer's gradient norm dwarfs the others': inputs on a large scale.

    The first layer's weight gradient is the backpropagated error times the inputs,
    so it carries their scale. Under the default module granularity a pure rescaling
    of the inputs also rescales every later layer of a ReLU/Linear network by the same
    factor, so the ratio shows best with ``granularity="parameter"`` (the first
    weight against the biases and later weights).
    """
    from scipy import stats

    names = layer_names(meta)
    if len(names) < 2 or layers.empty:
        return None
    grid, _ = layer_grid(layers, names, "grad_norm")
    first, others = grid[:, 0], grid[:, 1:]
    others = np.where(_finite_positive(others), others, np.nan)
    with np.errstate(all="ignore"):
        reference = np.nanmedian(others, axis=1) if others.size else np.full(len(first), np.nan)
        ratio = first / reference
    ratio = ratio[_finite_positive(ratio)]
    n = len(ratio)
    if n < FIRST_LAYER_MIN_STEPS:
        return None
    median = float(np.median(ratio))
    above = int((ratio >= FIRST_LAYER_RATIO).sum())
    p = float(stats.binomtest(above, n, 0.5, alternative="greater").pvalue)
    if median < FIRST_LAYER_RATIO or p >= ALPHA:
        return None
    q25, q75 = np.percentile(ratio, [25, 75])
    return Advice(
        rule="first_layer",
        title=f"Inputs look unnormalized: normalize them before relying on clipping "
        f"(first layer {names[0]!r} gets {median:.3g}x the others' gradient)",
        detail=(
            f"Over {n} steps the gradient norm of the first layer {names[0]!r} was a median "
            f"{median:.3g}x (interquartile {q25:.3g}-{q75:.3g}x) the median norm of the other "
            f"{len(names) - 1} layers, and at least {FIRST_LAYER_RATIO:g}x on {above} of "
            f"{n} steps (sign test p={p:.2g}). The first layer's gradient is the error times "
            "the inputs, so inputs on a large scale inflate it. A norm threshold is then set "
            "by that one layer and every other layer's update is scaled down with it. "
            "Standardize the inputs (per feature: subtract the mean, divide by the standard "
            "deviation) and the clipping statistics will describe the whole model."
        ),
        evidence={
            "layer": names[0],
            "median_ratio": _g(median),
            "ratio_q25": _g(float(q25)),
            "ratio_q75": _g(float(q75)),
            "steps_ratio_ge_threshold": above,
            "steps": n,
            "threshold": FIRST_LAYER_RATIO,
            "sign_test_p": _g(p),
        },
    )


def value_clipping(
    steps: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any]
) -> Advice | None:
    """Frequent value clipping in a layer: outlier gradient components.

    The threshold is per layer: one layer must be value-clipped on at least
    ``VALUE_CLIP_RATE`` of the steps by itself, so clips spread thinly over many
    layers do not add up to advice. In ``clip="auto"`` a layer is clipped by value only
    when its norm is beyond its boundary *and* its concentration (max |g| / RMS) is far
    above normal, which a healthy run almost never shows.
    """
    from scipy import stats

    names = layer_names(meta)
    n_steps = int(steps["step"].nunique()) if len(steps) else 0
    if n_steps == 0 or layers.empty or not names:
        return None
    clipped = layers.loc[value_clipped(layers), ["step", "layer", "max_abs"]]
    total = len(clipped)
    if total == 0:
        return None
    clipped = clipped.assign(layer=clipped["layer"].astype(str))
    counts = clipped["layer"].value_counts()
    frequent = [str(k) for k, v in counts.items()
                if v >= VALUE_CLIP_MIN and v / n_steps >= VALUE_CLIP_RATE]
    if not frequent:
        return None
    # Outliers enter through the earliest layer they reach: list in model order.
    order = {name: i for i, name in enumerate(names)}
    frequent.sort(key=lambda k: order.get(k, len(order)))
    top = str(counts.index[0])
    count = int(counts.iloc[0])
    rate = count / n_steps
    ci = stats.binomtest(count, n_steps).proportion_ci(confidence_level=0.95)
    at = np.unique(clipped.loc[clipped["layer"].isin(frequent), "step"].to_numpy())
    per_layer = ", ".join(f"{k!r} {int(counts[k])} ({counts[k] / n_steps:.1%})" for k in frequent)
    clip_mode = meta.get("config", {}).get("clip")
    extra = ""
    if clip_mode == "value":
        rows = layers[layers["layer"].astype(str) == top]
        typical_max = float(np.nanmedian(rows["max_abs"].to_numpy(dtype=float)))
        extra = (
            f" With clip='value' the bound is fixed at {meta['config'].get('clip_value')}; "
            f"{top!r} has a typical max |g| of {typical_max:.3g}: if that is above the bound, "
            "it is the bound, not the data, that needs changing."
        )
    steps_text = ", ".join(str(int(s)) for s in at[:8]) + (" ..." if len(at) > 8 else "")
    return Advice(
        rule="value_clipping",
        title=f"Frequent value clipping in {_names(frequent)}: outlier gradient components; "
        "inspect the data",
        detail=(
            f"Clipped by value on at least {VALUE_CLIP_RATE:.0%} of the {n_steps} steps: "
            f"{per_layer}; {top!r} alone on {rate:.1%} of the steps (95% interval "
            f"{ci.low:.1%}-{ci.high:.1%}) and {count / total:.0%} of the run's {total} value "
            "clips. Value clipping fires when a few components of a layer's gradient are far "
            "above normal while the rest are not: the mark of a few samples with outlier "
            "features or labels, not of an unstable optimizer. Clipping hides them; look at "
            f"the batches of steps {steps_text} for outliers, wrong labels or unscaled "
            f"features.{extra}"
        ),
        evidence={
            "layer": top,
            "value_clips": count,
            "steps": n_steps,
            "rate": _g(rate),
            "rate_ci_low": _g(float(ci.low)),
            "rate_ci_high": _g(float(ci.high)),
            "share_of_value_clips": _g(count / total),
            "frequent_layers": frequent,
            "first_steps": [int(s) for s in at[:8]],
        },
    )
