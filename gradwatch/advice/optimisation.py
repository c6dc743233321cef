"""Advice on the optimisation: a norm that grows steadily (a learning rate too high) and
explosions concentrated in recurrent layers (clip by norm)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import NORM_MODES
from ._common import ALPHA, Advice, _finite_positive, _g, _names, is_recurrent

if TYPE_CHECKING:
    import pandas as pd

# Upward trend of the global norm.
TREND_SKIP = 0.2  # the opening transient: norms commonly rise or fall several-fold there
TREND_MIN_STEPS = 50
TREND_MAX_BINS = 50
# Measured on small MLP classifiers (300 steps, 10 seeds): healthy runs grew up to 2.6x
# over their last 80% while the model grew confident, learning-rate ramps past the
# stability limit 3-7x. At 2x healthy runs would be flagged; a learning rate that is
# too high grows the norm geometrically, well past 3x.
TREND_GROWTH = 3.0
# Explosions in recurrent layers.
RECURRENT_MIN_EVENTS = 5
RECURRENT_SHARE = 0.75
# A looser level than the other rules: with few layers a handful of events cannot
# reach 0.01, and the advice (norm clipping) is the standard remedy for RNNs anyway.
RECURRENT_P = 0.05
DIFFUSE_SHARE = 0.5


def norm_trend(steps: pd.DataFrame) -> Advice | None:
    """A steady upward trend of the log global norm: learning rate too high.

    The first ``TREND_SKIP`` of the steps are left out: while a network leaves its
    initialisation its gradient norm often rises or falls several-fold, and that
    transient says nothing about the learning rate. The rest is binned (medians of
    equal numbers of steps, which also tames the autocorrelation that momentum gives
    consecutive norms) before the Mann-Kendall test and the Theil-Sen slope.
    """
    from scipy import stats

    if steps.empty:
        return None
    step = steps["step"].to_numpy(dtype=float)
    norm = steps["global_norm"].to_numpy(dtype=float)
    ok = _finite_positive(norm)
    step, log_norm = step[ok], np.log(norm[ok])
    start = int(len(step) * TREND_SKIP)
    step, log_norm = step[start:], log_norm[start:]
    if len(step) < TREND_MIN_STEPS:
        return None
    bins = np.array_split(np.arange(len(step)), min(TREND_MAX_BINS, len(step) // 4))
    x = np.array([np.median(step[b]) for b in bins])
    y = np.array([np.median(log_norm[b]) for b in bins])
    tau, p = stats.kendalltau(x, y, alternative="greater")
    fit = stats.theilslopes(y, x)
    span = float(step[-1] - step[0])
    growth = math.exp(fit.slope * span)
    growth_low, growth_high = math.exp(fit.low_slope * span), math.exp(fit.high_slope * span)
    if not (p < ALPHA and growth > TREND_GROWTH):
        return None
    first, last = int(step[0]), int(step[-1])
    return Advice(
        rule="trend",
        title=f"Gradient norm grows steadily ({growth:.3g}x from step {first} to {last}): "
        "the learning rate is likely too high",
        detail=(
            f"From step {first} to {last} (the first {TREND_SKIP:.0%} of the run left out as "
            f"the opening transient) the log global norm trends upward: Mann-Kendall "
            f"tau={tau:+.2f}, p={p:.2g} over {len(bins)} bins of {len(step)} steps, and the "
            f"Theil-Sen slope multiplies the norm by {growth:.3g}x over that span (95% "
            f"interval {growth_low:.3g}-{growth_high:.3g}x). A norm that keeps growing is "
            "what an optimizer past its stability limit does; clipping trims single spikes "
            "but cannot stop it. Lower the (peak) learning rate, lengthen the warm-up, or "
            "decay the learning rate before this point."
        ),
        evidence={
            "kendall_tau": _g(float(tau)),
            "p_value": _g(float(p)),
            "growth": _g(growth),
            "growth_ci_low": _g(growth_low),
            "growth_ci_high": _g(growth_high),
            "first_step": first,
            "last_step": last,
            "bins": len(bins),
        },
    )


def recurrent_explosions(
    meta: dict[str, Any], layers: pd.DataFrame, events: pd.DataFrame
) -> Advice | None:
    """Explosions concentrated in recurrent layers: norm clipping is the right tool."""
    from scipy import stats

    records = meta.get("layers", [])
    recurrent = {str(rec["layer"]) for rec in records if is_recurrent(rec)}
    if not recurrent or events.empty:
        return None
    boom = events[events["kind"] == "explosion"]
    n = len(boom)
    if n < RECURRENT_MIN_EVENTS:
        return None
    top = boom["layer"].astype(str)
    in_rec = top.isin(recurrent).to_numpy()
    k = int(in_rec.sum())
    share = k / n
    base = len(recurrent) / max(len(records), 1)
    p = (
        float(stats.binomtest(k, n, base, alternative="greater").pvalue) if base < 1.0 else 0.0
    )
    # Diffuse: the layer's concentration (max |g| / RMS) was within its normal range,
    # so the whole gradient grew, not a few components.
    conc_limit = float(meta.get("config", {}).get("concentration_z", 3.0))
    keyed = layers.assign(layer=layers["layer"].astype(str)).set_index(["step", "layer"])
    rec_events = boom[in_rec]
    idx = list(zip(rec_events["step"].astype(int), rec_events["layer"].astype(str)))
    conc = keyed["concentration_z"].reindex(idx).to_numpy(dtype=float)
    diffuse = int(np.sum(np.nan_to_num(conc, nan=0.0) <= conc_limit))
    diffuse_share = diffuse / k if k else 0.0
    if share < RECURRENT_SHARE or p >= RECURRENT_P or diffuse_share < DIFFUSE_SHARE:
        return None
    clip_mode = meta.get("config", {}).get("clip")
    norm_clipped = int((rec_events["action"].astype(str) == "clip_norm").sum())
    if clip_mode in NORM_MODES:
        doing = (
            f"This run clips with clip={clip_mode!r}, which rescaled {norm_clipped} of those "
            "steps by norm: keep it."
        )
    else:
        doing = (
            f"This run uses clip={clip_mode!r}: switch to clip='auto' (it clips diffuse "
            "growth by norm) or clip='norm' with a max_norm near the typical norm."
        )
    names = sorted(set(top[in_rec]))
    return Advice(
        rule="recurrent",
        title="Explosions are in the recurrent layers: clip by norm",
        detail=(
            f"{k} of {n} explosions ({share:.0%}) were in recurrent layers ({_names(names)}), "
            f"which are {len(recurrent)} of {len(records)} layers (binomial test p={p:.2g}); "
            f"{diffuse} of these {k} were diffuse, the layer's concentration within "
            f"{conc_limit:g} deviations of normal. Gradients through a recurrence grow as "
            "the product of many Jacobians, all components together (Pascanu et al., 2013): "
            "rescaling the whole gradient by its norm keeps the update direction, while "
            f"value clipping would distort it. {doing}"
        ),
        evidence={
            "explosions": n,
            "in_recurrent_layers": k,
            "share": _g(share),
            "recurrent_layers": len(recurrent),
            "layers": len(records),
            "binomial_p": _g(p),
            "diffuse": diffuse,
            "clipped_by_norm": norm_clipped,
        },
    )
