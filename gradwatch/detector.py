"""Detection: what is normal for every layer, and how far this step is from it.

:class:`Detector` owns the running statistics of every channel (the model's log norm,
each layer's log norm, log max |g| and log concentration): bias-corrected EMAs of the
level and the spread, the running median and 95th percentile of every norm's z-scores
(its tail, to which thresholds are calibrated), a CUSUM on the model's z for sustained rises (drift),
how many steps ago the last alarm was (evidence of instability), a window of recent
log norms for quantiles, and in ``auto`` how far the model's clipping threshold is
tightened by frequent crossings. Each step it :meth:`~Detector.score`\\ s a
:class:`~gradwatch.measure.Measurement` against the state before the step (a
:class:`Detection`), and after the clipping decision it :meth:`~Detector.update`\\ s
itself robustly: values beyond the boundary are fed back clipped, and non-finite
values never enter. Everything stays on the device.

Why these estimators (measured in ``benchmarks/efficacy``, experiment 5):

* **Level.** A winsorised EMA of the log norm with a short memory (``level_decay``):
  it follows a steep fall (a conv net under Adam, whose norm falls 300-fold early on)
  within about 20 steps, where a decay of 0.98 stayed several times above the actual
  norm for hundreds of steps; winsorising both sides at the boundary keeps a spike from
  dragging it (winsorising only the upper side biased it low on heavy-tailed runs).
* **Tail.** Winsorised Gaussian z-scores under-state a heavy tail, so a fixed
  ``z_threshold`` flags healthy heavy-tailed runs often (tens per 1,000 steps on the
  digits MLP). Thresholds are raised by the ratio of the running 95th percentile of z
  to a Gaussian's: a quantile that is estimated well within a few hundred steps.
* **Drift.** A per-step z waits for one step to stand out; Page's CUSUM adds up
  moderate excesses, so a norm growing 5-10 % a step is flagged within about 10 steps.
* **Bounding the step** (holding the level and ``auto``'s tightening, with an SGD-type
  optimizer only) only on evidence of instability: an explosion in the last 100 steps,
  or crossings of the ``max_ratio`` boundary. A healthy run is then clipped only at its
  anomalies. Once a run converges (its level fallen to 1/20 of its peak, as a
  classifier's does while its loss goes to zero) crossings are its heavy tail, not
  instability: they no longer count, its boundary is the calibrated one, and a drift
  bounds the step instead. With an adaptive optimizer the ``max_ratio`` cap applies
  after an explosion or a drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from .config import UNSTABLE_FOR, MonitorConfig
from .measure import Measurement
from .stats import Cusum, EmaStats, RecentWindow, RunningQuantile, check_tensor

STATE_VERSION = 3
# The keys every state of a version holds (version 2 added the tail, the drift test and
# the alarm clock, "drift" None where the test is off; version 3 the model's peak level).
_STATE_KEYS = {1: ("stats", "window"),
               2: ("stats", "window", "tightness", "tail", "drift", "since_alarm"),
               3: ("stats", "window", "tightness", "tail", "drift", "since_alarm", "peak")}

# Below this many updates a channel is fed raw values; from then on values are
# winsorised at the detection threshold, so one early spike cannot inflate the
# variance for hundreds of steps.
_ROBUST_AFTER = 5
# How far one crossing of the model's boundary tightens its clipping threshold towards
# the typical norm (a share of the way; see MonitorConfig.crossing_rate).
_TIGHTEN_STEP = 0.15
# A run whose typical model norm has fallen to this fraction of its highest level since
# warm-up is converging: its crossings of the max_ratio boundary are the heavy tail of
# a loss near zero, not a learning rate too high for it (see Detector.update).
CONVERGED_FALL = 1 / 20
# The tail: a running quantile of each norm's z-scores against a Gaussian's.
_TAIL_Q = 0.95
_GAUSS_TAIL = NormalDist().inv_cdf(_TAIL_Q)
_TAIL_RATE = 0.02
# The drift test: each step adds min(z, cap) - slack deviations.
DRIFT_SLACK = 0.75
DRIFT_CAP = 3.0


def family_z(z: float, num_tests: int) -> float:
    """The z threshold that keeps ``num_tests`` one-sided Gaussian tests at the
    false-alarm rate of a single test at ``z`` (Bonferroni).

    With 100 layers a per-layer z of 4.0 becomes 4.98 and 2.5 becomes 3.84, so a deep
    model is not flagged more often than a shallow one.
    """
    if num_tests <= 1:
        return z
    nd = NormalDist()
    tail = (1.0 - nd.cdf(z)) / num_tests
    if tail <= 0.0:  # z beyond double precision's tail: already as strict as it gets
        return z
    return max(z, nd.inv_cdf(1.0 - tail))


@dataclass
class Detection:
    """How one step compares with the statistics before it. Channels as in
    :class:`~gradwatch.measure.Measurement`; ``norm_*`` fields cover the model and the
    layers' norms only (``1 + L`` values).

    Attributes:
        mean, std: the running mean and deviation of every channel's log.
        z: z-scores (0 where a channel is not scored: warming up, invalid or
            non-finite).
        flagged: norms beyond the event threshold (``1 + L``).
        explosion: any of them (0-dim).
        bound: how far above its mean a channel's log may go before it is clipped.
        clip_z: the clipping boundary in deviations, per channel (calibrated).
        event_limit: the event threshold of the model's and every layer's z-score,
            calibrated to its tail (``1 + L``).
        scored: channels whose z-score counts (warm, valid and finite).
        armed: channels whose boundary applies.
        anomalous: norms beyond their boundary (``1 + L``).
        norm_threshold: the norm threshold of the model and of every layer
            (``inf`` where none is armed); the model's may be tightened in ``auto``.
        concentration_z: the layers' concentration z-scores (``L``).
        concentrated: layers beyond their boundary whose concentration is far above
            normal: outliers in a few components (``L``).
        window: the recent log norms (read by the percentile rule).
        drift: this step raised the drift test's alarm (0-dim).
        drift_steps: how many steps ago the rise began (0-dim).
        drift_growth: the model norm's estimated growth per step since then (0-dim).
        alarm: an alarm at this step (0-dim): an explosion, or with an adaptive
            optimizer also a drift.
        bounding: the step is bounded at this step: an SGD-type optimizer and an
            explosion in the last ``UNSTABLE_FOR`` steps, or recent crossings (0-dim).
        converging: the model's typical norm has fallen to ``CONVERGED_FALL`` of its
            peak since warm-up (0-dim).
    """

    mean: Tensor
    std: Tensor
    z: Tensor
    flagged: Tensor
    explosion: Tensor
    bound: Tensor
    clip_z: Tensor
    event_limit: Tensor
    scored: Tensor
    armed: Tensor
    anomalous: Tensor
    norm_threshold: Tensor
    concentration_z: Tensor
    concentrated: Tensor
    window: RecentWindow
    drift: Tensor
    drift_steps: Tensor
    drift_growth: Tensor
    drift_sum: Tensor
    drift_tested: Tensor
    alarm: Tensor
    bounding: Tensor
    converging: Tensor

    @property
    def norm_z(self) -> Tensor:
        """z-scores of the model's and the layers' log norms (``1 + L``)."""
        return self.z[: self.flagged.shape[0]]


class Detector:
    """Running statistics of a model's gradients and the z-score rules on them.

    Args:
        num_layers: layers monitored (``L``).
        config: thresholds, decay, warm-up and the ``auto`` tightening.
        device: where the state lives.
        bounds_step: whether a smaller gradient makes a smaller optimizer step
            (SGD-type optimizers); only then, and only on evidence of instability, is
            the model's level held while its norm is beyond the boundary, and does
            ``auto`` tighten the model's threshold on frequent crossings.
    """

    def __init__(self, num_layers: int, config: MonitorConfig, device: torch.device,
                 bounds_step: bool = True) -> None:
        n = num_layers
        self.num_layers = n
        self.config = config
        self.stats = EmaStats(1 + 3 * n, config.ema_decay, device,
                              mean_decay=config.level_decay)
        self.window = RecentWindow(1 + n, config.window, device)
        # The centre and the upper tail of every norm's z-scores: the running median and
        # 95th percentile. A level held by step bounding, or lagging, shifts them both;
        # the tail's width (their gap) is the shape the thresholds are calibrated to.
        self.tail = RunningQuantile(1 + n, (0.5, _TAIL_Q), (0.0, _GAUSS_TAIL), _TAIL_RATE,
                                    device)
        self.drift = (None if config.drift_threshold is None
                      else Cusum(DRIFT_SLACK, DRIFT_CAP, config.drift_threshold, device))
        # Steps since the last explosion or drift (inf: none yet).
        self.since_alarm = torch.full((), math.inf, dtype=torch.float32, device=device)
        # auto: where the model's clipping threshold sits between its boundary (0) and
        # the typical norm (1), driven by how often norms cross the boundary.
        self.tightness = torch.zeros((), dtype=torch.float32, device=device)
        # The highest typical (log) model norm since warm-up: a run whose level has
        # fallen far below it is converging (see update).
        self.peak = torch.full((), -math.inf, dtype=torch.float32, device=device)
        self._log_fall = math.log(CONVERGED_FALL)
        # Bounding the step (holding the model's level, and in auto tightening its
        # threshold on frequent crossings) only where a smaller gradient makes a smaller
        # step.
        self.holds = config.max_ratio is not None and bounds_step
        self.tightens = (config.clip == "auto" and self.holds
                         and config.crossing_rate is not None)
        # Per-channel z thresholds: the model's channel uses the configured values, the
        # layer channels the family-corrected ones.
        self.layer_z_threshold = family_z(config.z_threshold, n)
        self.layer_clip_z = family_z(config.clip_z, n)
        self._z_event = torch.tensor([config.z_threshold] + [self.layer_z_threshold] * n,
                                     device=device)
        self._z_clip = torch.tensor([config.clip_z] + [self.layer_clip_z] * (3 * n),
                                    device=device)
        self._ones = torch.ones(2 * n, device=device)
        self._ones_norm = torch.ones(1 + n, device=device)
        self._zeros = torch.zeros(1 + n, device=device)
        self._level_decay = torch.full((3 * n,), config.level_decay, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._log_ratio = (math.log(config.max_ratio) if config.max_ratio is not None
                           else math.inf)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)

    def score(self, m: Measurement) -> Detection:
        """Compare ``m`` with the statistics as they are before this step."""
        cfg, n = self.config, self.num_layers
        x, valid, nonfinite = m.x, m.valid, m.nonfinite
        mean, var = self.stats.moments()
        std = var.sqrt().clamp_min(cfg.min_std)
        count = self.stats.count
        warm = count >= cfg.warmup_steps
        scored = valid & warm & ~nonfinite
        z = torch.where(scored, (x - mean) / std, 0.0)
        norm_z = z[: n + 1]  # model, then layers
        # Thresholds calibrated to each norm's own tail: raised (never lowered) by how
        # much wider than a Gaussian's the gap between its z-scores' median and 95th
        # percentile is. Events are scored from that median: where the level is held
        # (step bounding) or lags, z-scores shift, and a step must stand out from the
        # steps of its time to be an explosion.
        if cfg.calibrate:
            center, upper = self.tail.value
            calibration = ((upper - center) / _GAUSS_TAIL).clamp_min(1.0)
        else:
            center, calibration = self._zeros, self._ones_norm
        # Two levels: beyond the event limit a step is an explosion (an event); beyond
        # clip_z (usually lower) the adaptive modes clip it back to that boundary.
        # Layer thresholds are raised for the number of layers (see family_z), so the
        # chance that a normal step is flagged does not grow with depth.
        event_limit = center + self._z_event * calibration
        flagged = norm_z > event_limit
        # Steps flagged as explosions are left out of the drift test: a spike is an
        # event of its own, and repeated spikes are not a rise of the level. The test
        # starts after twice the warm-up: as a network leaves its initialisation its
        # norm often rises for a few dozen steps, and that says nothing of stability.
        tested = scored[0] & ~flagged.any() & (count[0] >= 2 * cfg.warmup_steps)
        drift, drift_sum, drift_steps, drift_growth = self._drift_test(
            (norm_z[0] - center[0]) / calibration[0], tested, x[0])
        # Evidence of instability: an alarm now or in the last UNSTABLE_FOR steps. With
        # an SGD-type optimizer the alarms are explosions only, and crossings of the
        # max_ratio boundary count too (in auto, until the tightness they raised has
        # relaxed: about 50 steps after a single one). A drift does not hold an SGD
        # run's level: a norm rising as the model learns (an SGD MLP's rises fourfold)
        # would keep every later step beyond a held level, and clipped; if the rise
        # outruns the level, its crossings engage bounding. Bounding must start with
        # the first crossings: where the learning rate is too high for the run, a level
        # left to follow the first few dozen of them runs away (digits, normalised
        # inputs: 0.85 accuracy instead of 0.92).
        #
        # Once the run converges (its level fallen to CONVERGED_FALL of its peak), a
        # sustained rise is no longer a network learning: a drift then engages bounding
        # with SGD too.
        converging = mean[0] < self.peak + self._log_fall
        alarm = flagged.any() | (drift & converging) if self.holds else flagged.any() | drift
        unstable = alarm | (self.since_alarm < UNSTABLE_FOR)
        if self.tightens:
            unstable = unstable | (self.tightness > 0)
        clip_z = self._z_clip * torch.cat([calibration, self._ones])
        bound, armed = self._boundary(clip_z * std, count, warm, unstable, converging)
        # Beyond that boundary a norm is anomalous (and clipped back to it).
        anomalous = (
            (armed & valid & ~nonfinite)[: n + 1] & (x[: n + 1] > mean[: n + 1] + bound[: n + 1])
        )
        bounding = unstable if self.holds else self._false
        clip_bound = bound
        if self.tightens:
            # Frequent crossings while the step is bounded: the model's threshold comes
            # down towards the typical norm (never below), bounding each step at a
            # typical one.
            tight = torch.where(bounding, self.tightness, self._zero)
            clip_bound = torch.cat([bound[:1] * (1 - tight), bound[1 : n + 1]])
        norm_threshold = torch.where(
            armed[: n + 1], (mean[: n + 1] + clip_bound[: n + 1]).exp(), math.inf
        )
        conc_z = z[2 * n + 1 :]
        return Detection(
            mean=mean, std=std, z=z, flagged=flagged, explosion=flagged.any(), bound=bound,
            clip_z=clip_z, event_limit=event_limit, scored=scored, armed=armed,
            anomalous=anomalous, norm_threshold=norm_threshold, concentration_z=conc_z,
            concentrated=anomalous[1:] & (conc_z > cfg.concentration_z), window=self.window,
            drift=drift, drift_steps=drift_steps, drift_growth=drift_growth,
            drift_sum=drift_sum, drift_tested=tested, alarm=alarm, bounding=bounding,
            converging=converging,
        )

    def _drift_test(self, z: Tensor, scored: Tensor, log_norm: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The CUSUM on the model's calibrated z: ``(alarm, sum, steps since the rise
        began, growth per step since then)``."""
        if self.drift is None:
            return self._false, self._zero, self._zero, self._zero
        total, alarm = self.drift.peek(z, scored)
        steps = self.drift.length
        growth = ((log_norm - self.drift.base) / (steps + 1)).exp()
        return alarm, total, steps, growth

    def _boundary(self, bound: Tensor, count: Tensor, warm: Tensor, unstable: Tensor,
                  converging: Tensor) -> tuple[Tensor, Tensor]:
        """How far above its typical (log) value each channel may go, and which
        boundaries apply (``armed``).

        ``clip_z`` calibrated deviations; with ``max_ratio``, the model's at most
        ``log(max_ratio)`` while its deviation is unknown (warm-up, from its second
        step on: a run that blows up in its first steps is held to their scale), with
        an SGD-type optimizer always (its crossings are what tighten the threshold)
        until the run converges, and otherwise while the run is unstable (a rising norm
        cannot drag its own threshold up then). A converging run's heavy tail is
        clipped at its calibrated boundary, as with an adaptive optimizer.
        """
        cfg = self.config
        armed = warm
        if cfg.max_ratio is not None:
            log_r = math.log(cfg.max_ratio)
            cap = unstable if not self.holds else unstable | ~converging
            capped = torch.where(cap, bound[:1].clamp(max=log_r), bound[:1])
            model_bound = torch.where(warm[:1], capped, log_r)
            bound = torch.cat([model_bound, bound[1:]])
            armed = torch.cat([count[:1] > 0, warm[1:]])
        return bound, armed

    def update(self, m: Measurement, d: Detection, step: int) -> None:
        """Fold this step into the statistics, robustly: winsorised at the clipping
        boundary, so a spike is fed back as the clipped value and cannot drag the
        statistics along; non-finite values never enter."""
        cfg, n = self.config, self.num_layers
        x, mean, bound, armed = m.x, d.mean, d.bound, d.armed
        robust = self.stats.count >= min(_ROBUST_AFTER, cfg.warmup_steps)
        fed = torch.where(robust, torch.clamp(x, mean - bound, mean + bound), x)
        # Armed during warm-up: only the upper side, so the typical norm still follows
        # the fast fall of the first steps' norms.
        fed = torch.where(armed & ~robust, torch.minimum(fed, mean + bound), fed)
        level, decay = fed, None
        if self.holds:
            # While the step is bounded, a model norm beyond its boundary is not
            # evidence of where its typical level is (it still widens the spread): the
            # level learns from the steps within the boundary only. So when most steps
            # are beyond it (a learning rate too high for the run), the boundary holds
            # at the scale of the normal steps instead of being walked up by the
            # clipped ones: with an SGD-type optimizer, clipping becomes a bounded step.
            # While bounded the model's level also learns at the spread's slower rate,
            # so an unstable stretch does not carry it along.
            held = d.anomalous[:1] & d.bounding
            level = torch.cat([torch.where(held, mean[:1], fed[:1]), fed[1:]])
            decay = torch.cat([torch.where(d.bounding, cfg.ema_decay, cfg.level_decay).reshape(1),
                               self._level_decay])
        update = m.valid & ~m.nonfinite
        self.stats.update(level, update, spread=fed, mean_decay=decay, mean_prev=mean)
        if self.tightens:
            # A crossing of max_ratio times the typical norm tightens, a step within it
            # relaxes: at equilibrium norms cross it at crossing_rate, or the threshold
            # rests at either end. Excesses beyond the clip_z boundary alone do not
            # count: a healthy SGD MLP's norm rising fourfold as it learns crossed it
            # for dozens of steps, bounding then held its level below the norm for
            # hundreds of steps and clipped 42 % of them (experiment 5); a learning
            # rate too high for the run crosses max_ratio from its first steps.
            #
            # Nor do crossings of a run whose typical norm has fallen to CONVERGED_FALL
            # of its peak: a classifier driving its loss towards zero (a memorising
            # MLP on digits, its norm down 35-fold) has a heavy tail, a few hard
            # examples dominating a batch's gradient, and 7-9 % of its steps beyond
            # twice the typical norm; they tightened the threshold to the typical
            # norm and clipped a quarter of the steps of healthy training. A learning
            # rate too high for the run keeps the norm near its early scale (1/10 to
            # 1 of its peak when digits crossed at lr 0.3, or raw inputs at 0.05).
            crossed = (d.anomalous[0] & (x[0] > mean[0] + self._log_ratio)
                       & ~d.converging).float()
            tightened = self.tightness + _TIGHTEN_STEP * (crossed - cfg.crossing_rate)
            tightened = torch.where(d.converging, self._zero, tightened)  # and what they raised lifts
            self.tightness.copy_(
                torch.where(armed[0] & update[0], tightened.clamp(0.0, 1.0), self.tightness)
            )
        self.peak.copy_(torch.where(d.scored[0], torch.maximum(self.peak, mean[0]), self.peak))
        if cfg.calibrate:
            self.tail.update(d.norm_z, d.scored[: n + 1])
        if self.drift is not None:
            self.drift.update(d.drift_sum, d.drift, d.drift_tested, mean[0])
        self.since_alarm.copy_(torch.where(d.alarm, self._zero, self.since_alarm + 1))
        # The window keeps the raw log norms: quantiles are robust to a few spikes.
        self.window.push(x[: n + 1], update[: n + 1], step)

    # ------------------------------------------------------------------ reading
    def recent_log_norms(self) -> Tensor:
        """The layers' recent natural-log norms, ``(L, window)``, NaN where absent."""
        return self.window.values[1:]

    def quantile(self, q: float) -> Tensor:
        """The ``q``-quantile (0-1) of the model's and every layer's recent norms."""
        return self.window.quantile(q).exp()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "stats": self.stats.state_dict(),
            "window": self.window.state_dict(),
            "tightness": self.tightness.clone(),
            "tail": self.tail.state_dict(),
            "drift": None if self.drift is None else self.drift.state_dict(),
            "since_alarm": self.since_alarm.clone(),
            "peak": self.peak.clone(),
        }

    def check_state(self, state: Any) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` would assign, checked against this
        detector's own state (keys, shapes) and converted to its device; nothing is
        changed.

        Raises:
            ValueError: naming what is wrong: not a dict, an unsupported version, a
                missing key, a value that is not a tensor or has another shape.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"detector state is a {type(state).__name__}, expected the dict from "
                "Detector.state_dict()"
            )
        version = state.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
            raise ValueError(
                f"detector state version {version!r} is not supported by this gradwatch "
                f"(which reads versions 1..{STATE_VERSION}); upgrade gradwatch to load it"
            )
        # Version 1 had no tail, drift test or alarm clock (and tightness only in auto).
        required = _STATE_KEYS[version]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(
                f"detector state (version {version}) lacks {', '.join(map(repr, missing))}: "
                "it was not written by gradwatch's state_dict(), or was damaged"
            )
        checked: dict[str, Any] = {
            "stats": self.stats.check_state(state["stats"]),
            "window": self.window.check_state(state["window"]),
        }
        if "tightness" in state:
            checked["tightness"] = check_tensor(state["tightness"], self.tightness,
                                                "detector 'tightness'")
        if state.get("tail") is not None:
            checked["tail"] = self.tail.check_state(state["tail"])
        if state.get("drift") is not None and self.drift is not None:
            checked["drift"] = self.drift.check_state(state["drift"])
        if "since_alarm" in state:
            checked["since_alarm"] = check_tensor(state["since_alarm"], self.since_alarm,
                                                  "detector 'since_alarm'")
        if "peak" in state:
            checked["peak"] = check_tensor(state["peak"], self.peak, "detector 'peak'")
        return checked

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Everything is checked before anything is
        assigned: a refused state leaves the detector as it was.

        Raises:
            ValueError: as :meth:`check_state`.
        """
        checked = self.check_state(state)
        self.stats.load_state_dict(checked["stats"])
        self.window.load_state_dict(checked["window"])
        # What a version 1 state lacks starts afresh.
        if "tightness" in checked:
            self.tightness.copy_(checked["tightness"])
        else:
            self.tightness.zero_()
        if "tail" in checked:
            self.tail.load_state_dict(checked["tail"])
        if "drift" in checked:
            self.drift.load_state_dict(checked["drift"])
        if "since_alarm" in checked:
            self.since_alarm.copy_(checked["since_alarm"])
        if "peak" in checked:
            self.peak.copy_(checked["peak"])
        else:
            self.peak.fill_(-math.inf)
