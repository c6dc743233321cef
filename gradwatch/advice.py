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
* **explosions in recurrent layers**: at least 5 explosions, >= 75% of them in
  recurrent layers (``weight_hh_l0``-style parameters), a binomial test against the
  recurrent share of layers gives p < 0.05, and most are diffuse: clip by norm.
* **non-finite gradients**: NaN/Inf on 2 or more steps: where they came from and the
  fix.
* **AMP overflows**: beyond the loss scale's initial calibration, 3 or more overflows
  that come in streaks of 3 or more, or on more than 1% of the steps: the overflow is
  not the loss scale's doing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import NORM_MODES

if TYPE_CHECKING:
    import pandas as pd

# First layer dominance.
FIRST_LAYER_RATIO = 100.0
FIRST_LAYER_MIN_STEPS = 20
# Frequent value clipping, counted per layer.
VALUE_CLIP_RATE = 0.01
VALUE_CLIP_MIN = 5
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
# Non-finite gradients and AMP overflows.
NONFINITE_MIN = 2
AMP_MIN = 3
AMP_RATE = 0.01
AMP_STREAK = 3
ALPHA = 0.01

CHECKS = (
    f"first layer dominating the others (median norm ratio >= {FIRST_LAYER_RATIO:g}, "
    f"sign test p < {ALPHA:g})",
    f"frequent value clipping in one layer (>= {VALUE_CLIP_RATE:.0%} of steps, at least "
    f"{VALUE_CLIP_MIN} times)",
    f"upward trend of the global norm after the first {TREND_SKIP:.0%} of steps "
    f"(Mann-Kendall p < {ALPHA:g}, Theil-Sen growth > {TREND_GROWTH:g}x)",
    f"explosions concentrated in recurrent layers (>= {RECURRENT_MIN_EVENTS} events, "
    f">= {RECURRENT_SHARE:.0%} recurrent, binomial p < {RECURRENT_P:g})",
    f"repeated non-finite gradients (>= {NONFINITE_MIN} steps)",
    f"repeated AMP overflows beyond the loss scale's calibration (>= {AMP_MIN}, in "
    f"streaks of >= {AMP_STREAK} or on > {AMP_RATE:.0%} of steps)",
)

_RECURRENT_PARAM = re.compile(r"^(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?$")
# "lstm", "encoder_gru", "BiLSTM", "rnn0"; not a word that merely contains the letters.
_RECURRENT_NAME = re.compile(r"(?<![a-z])(bi)?(lstm|gru|rnn)", re.IGNORECASE)


@dataclass(frozen=True)
class Advice:
    """One piece of advice and the numbers behind it.

    Attributes:
        rule: which rule produced it (``first_layer``, ``value_clipping``, ``trend``,
            ``recurrent``, ``nonfinite``, ``amp_overflow``).
        title: one line: what is wrong and what to do.
        detail: why, with the statistics quoted.
        evidence: the statistics, by name (plain Python numbers and strings).
    """

    rule: str
    title: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


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
        recurrent_explosions(meta, layers, events),
        nonfinite_steps(steps, events, meta),
        amp_overflows(steps, events),
    ]
    return [a for a in found if a is not None]


# ---------------------------------------------------------------------- helpers
def layer_names(meta: dict[str, Any]) -> list[str]:
    """Layer names in model order, from the layer table in ``meta``."""
    return [str(rec["layer"]) for rec in meta.get("layers", [])]


def value_clipped(layers: pd.DataFrame) -> np.ndarray:
    """Rows of the layer table where that layer was clipped by value at that step.

    A finite value threshold is the bound in force; it clipped if max |g| exceeded it.
    """
    thr = layers["value_threshold"].to_numpy(dtype=float)
    max_abs = layers["max_abs"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(thr) & (max_abs > thr)


def is_recurrent(rec: dict[str, Any]) -> bool:
    """Whether a layer (a record of ``meta['layers']``) is an RNN/LSTM/GRU layer."""
    params = [str(p).rpartition(".")[2] for p in rec.get("params", [])]
    if any(_RECURRENT_PARAM.match(p) for p in params):
        return True
    return any(_RECURRENT_NAME.search(part) for part in str(rec.get("layer", "")).split("."))


def _finite_positive(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & (values > 0)


def _g(x: float) -> float:
    """A float rounded to 4 significant digits, for evidence that reads well."""
    if not math.isfinite(x) or x == 0:
        return float(x)
    return float(f"{x:.4g}")


def _streaks(steps: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive step numbers, as (first, length)."""
    if len(steps) == 0:
        return []
    steps = np.unique(steps)
    breaks = np.flatnonzero(np.diff(steps) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(steps, breaks)]


def _names(values: list[str], limit: int = 3) -> str:
    quoted = [repr(v) for v in values[:limit]]
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(quoted) + more


# ---------------------------------------------------------------------- rules
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
    norms = layers.pivot_table(
        index="step", columns="layer", values="grad_norm", aggfunc="first", observed=False
    ).reindex(columns=names)
    grid = norms.to_numpy(dtype=float)
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
