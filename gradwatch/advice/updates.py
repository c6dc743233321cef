"""Advice on how far each optimizer step moves the weights: the update-to-weight ratio
``||w_new - w|| / ||w||`` the monitor measures once per logging interval (column
``update_ratio`` of the layer table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import Advice, _g, _names

if TYPE_CHECKING:
    import pandas as pd

# The rule of thumb for a healthy run is about 1e-3 per step, but small networks
# trained with SGD move more and train well (1e-3 to 1.4e-2 per step on the test
# suite's MLPs and on the digits MLP at lr 0.05; 1e-2 at lr 0.3, where it needs
# clipping). So a layer is named when its median is at least UPDATE_HIGH and either
# UPDATE_OUTLIER times the median over the layers (the learning rate too high for that
# layer, not for the model) or at least UPDATE_EXTREME (a tenth of its size a step).
UPDATE_HIGH = 1e-2
UPDATE_OUTLIER = 10.0
UPDATE_EXTREME = 0.1
# A layer whose weights move less than a millionth of their size per step does not
# learn: not in the optimizer, a learning rate of 0, gradients that are all but zero, or
# updates below the weights' precision (bf16 resolves about 4e-3 of a value).
UPDATE_DEAD = 1e-6
UPDATE_SKIP = 0.2  # the opening steps, where updates are commonly far larger
UPDATE_MIN_MEASURED = 3


def _medians(layers: pd.DataFrame) -> tuple[dict[str, float], dict[str, int]]:
    """Per layer, the median update ratio after the opening ``UPDATE_SKIP`` of the run,
    and how many measurements it rests on (only layers with enough of them)."""
    if layers.empty or "update_ratio" not in layers:
        return {}, {}
    ratio = layers["update_ratio"].to_numpy(dtype=float)
    step = layers["step"].to_numpy()
    after = step >= UPDATE_SKIP * (step.max() + 1)
    ok = np.isfinite(ratio) & (ratio >= 0) & after
    if not ok.any():
        return {}, {}
    frame = layers.loc[ok, ["layer", "update_ratio"]].astype({"layer": str})
    grouped = frame.groupby("layer", sort=False)["update_ratio"]
    counts = grouped.size()
    keep = counts[counts >= UPDATE_MIN_MEASURED].index
    medians = grouped.median()
    return ({k: float(medians[k]) for k in keep}, {k: int(counts[k]) for k in keep})


def update_ratios(layers: pd.DataFrame) -> list[Advice]:
    """Layers whose weights move far more than the rule of thumb per step (learning
    rate too high for them), and layers whose weights do not move at all while the
    others do (a layer that does not learn)."""
    medians, counts = _medians(layers)
    if not medians:
        return []
    found = []
    typical = float(np.median(list(medians.values())))
    high = sorted((name for name, m in medians.items()
                   if m >= UPDATE_HIGH and (m >= UPDATE_OUTLIER * typical or m >= UPDATE_EXTREME)),
                  key=lambda name: -medians[name])
    if high:
        worst = high[0]
        found.append(Advice(
            rule="update_ratio_high",
            title=(f"Weights move {medians[worst]:.2g} of their size per step in "
                   f"{_names(high)}: the learning rate is likely too high there"),
            detail=(
                f"The median update-to-weight ratio ||w_new - w|| / ||w|| of "
                f"{len(high)} of {len(medians)} layers is at least {UPDATE_HIGH:g} and "
                f"{UPDATE_OUTLIER:g} times the median over all layers ({typical:.2g}), or "
                f"at least {UPDATE_EXTREME:g} (measured once per logging interval after "
                f"the first {UPDATE_SKIP:.0%} of the run; {counts[worst]} measurements for "
                f"{worst!r}). About 1e-3 is the usual mark of healthy training; a layer "
                "that moves a tenth of its size a step, or far more than the layers "
                "around it, is rewritten within a few dozen steps, and such a run is "
                "noisy or unstable even where clipping holds it. Lower the learning "
                "rate (for these layers, through a parameter group of their own), or "
                "add warm-up and decay."
            ),
            evidence={"threshold": UPDATE_HIGH, "layers_median": _g(typical),
                      "median_update_ratio": {n: _g(medians[n]) for n in high},
                      "measurements": {n: counts[n] for n in high}},
        ))
    moving = [m for m in medians.values() if m > UPDATE_DEAD]
    dead = [name for name, m in medians.items() if m <= UPDATE_DEAD]
    if dead and moving:
        found.append(Advice(
            rule="update_ratio_dead",
            title=f"Layer(s) {_names(dead)} do not learn: their weights do not move",
            detail=(
                f"The median update-to-weight ratio of {len(dead)} of {len(medians)} "
                f"layers is at most {UPDATE_DEAD:g} per step while the others' median is "
                f"{float(np.median(moving)):.2g}, although these layers have gradients. "
                "Check that their parameters are in the optimizer with a non-zero "
                "learning rate; otherwise their gradients are all but zero (dead ReLU "
                "units feeding them, a saturated activation) or their updates are below "
                "the weights' precision (bf16 weights round away updates under about "
                "4e-3 of a value: keep fp32 master weights)."
            ),
            evidence={"threshold": UPDATE_DEAD,
                      "median_update_ratio": {n: _g(medians[n]) for n in dead},
                      "others_median": _g(float(np.median(moving)))},
        ))
    return found
