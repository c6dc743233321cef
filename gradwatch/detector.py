"""Detection: what is normal for every layer, and how far this step is from it.

:class:`Detector` owns the running statistics of every channel (the model's log norm,
each layer's log norm, log max |g| and log concentration): bias-corrected EMAs of
mean and variance, a window of recent log norms for quantiles, and in ``auto`` how
far the model's clipping threshold is tightened by frequent crossings. Each step it
:meth:`~Detector.score`\\ s a :class:`~gradwatch.measure.Measurement` against the
state before the step (a :class:`Detection`), and after the clipping decision it
:meth:`~Detector.update`\\ s itself robustly: values beyond the boundary are fed back
clipped, and non-finite values never enter. Everything stays on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from .config import MonitorConfig
from .measure import Measurement
from .stats import EmaStats, RecentWindow

STATE_VERSION = 1

# Below this many updates a channel is fed raw values; from then on values are
# winsorised at the detection threshold, so one early spike cannot inflate the
# variance for hundreds of steps.
_ROBUST_AFTER = 5
# How far one crossing of the model's boundary tightens its clipping threshold towards
# the typical norm (a share of the way; see MonitorConfig.crossing_rate).
_TIGHTEN_STEP = 0.15


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
        clip_z: the clipping boundary in deviations, per channel.
        armed: channels whose boundary applies.
        anomalous: norms beyond their boundary (``1 + L``).
        norm_threshold: the norm threshold of the model and of every layer
            (``inf`` where none is armed); the model's may be tightened in ``auto``.
        concentration_z: the layers' concentration z-scores (``L``).
        concentrated: layers beyond their boundary whose concentration is far above
            normal: outliers in a few components (``L``).
        window: the recent log norms (read by the percentile rule).
    """

    mean: Tensor
    std: Tensor
    z: Tensor
    flagged: Tensor
    explosion: Tensor
    bound: Tensor
    clip_z: Tensor
    armed: Tensor
    anomalous: Tensor
    norm_threshold: Tensor
    concentration_z: Tensor
    concentrated: Tensor
    window: RecentWindow

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
            (SGD-type optimizers); only then is the model's level held while its norm
            is beyond the boundary, and does ``auto`` tighten the model's threshold on
            frequent crossings.
    """

    def __init__(self, num_layers: int, config: MonitorConfig, device: torch.device,
                 bounds_step: bool = True) -> None:
        n = num_layers
        self.num_layers = n
        self.config = config
        self.stats = EmaStats(1 + 3 * n, config.ema_decay, device)
        self.window = RecentWindow(1 + n, config.window, device)
        # auto: where the model's clipping threshold sits between its boundary (0) and
        # the typical norm (1), driven by how often norms cross the boundary.
        self.tightness = torch.zeros((), dtype=torch.float32, device=device)
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
        # Two levels: beyond z_threshold a step is an explosion (an event); beyond
        # clip_z (usually lower) the adaptive modes clip it back to that boundary.
        # Layer thresholds are raised for the number of layers (see family_z), so the
        # chance that a normal step is flagged does not grow with depth.
        flagged = norm_z > self._z_event
        # How far above its typical (log) value a norm may go before it is clipped, and
        # how far a value fed to the statistics may be from it: clip_z deviations, but
        # at most max_ratio times the typical norm, so a heavy-tailed or steadily rising
        # norm cannot drag its own threshold up.
        bound = self._z_clip * std
        # Channels whose boundary applies: warmed up; with max_ratio, the model's from
        # its second step on. Until its deviation is known, the model's boundary is
        # max_ratio times its running typical norm: a run that blows up in its first
        # steps (a learning rate far too high) is held to the scale of those steps
        # instead of going unclipped until the statistics are warm.
        armed = warm
        if cfg.max_ratio is not None:
            log_r = math.log(cfg.max_ratio)
            model_bound = torch.where(warm[:1], bound[:1].clamp(max=log_r), log_r)
            bound = torch.cat([model_bound, bound[1:]])
            armed = torch.cat([count[:1] > 0, warm[1:]])
        # Beyond that boundary a norm is anomalous (and clipped back to it).
        anomalous = (
            (armed & valid & ~nonfinite)[: n + 1] & (x[: n + 1] > mean[: n + 1] + bound[: n + 1])
        )
        clip_bound = bound
        if self.tightens:
            # Frequent crossings: the model's threshold comes down towards the typical
            # norm (never below), bounding each step at a typical one.
            clip_bound = torch.cat([bound[:1] * (1 - self.tightness), bound[1 : n + 1]])
        norm_threshold = torch.where(
            armed[: n + 1], (mean[: n + 1] + clip_bound[: n + 1]).exp(), math.inf
        )
        conc_z = z[2 * n + 1 :]
        return Detection(
            mean=mean, std=std, z=z, flagged=flagged, explosion=flagged.any(), bound=bound,
            clip_z=self._z_clip, armed=armed, anomalous=anomalous,
            norm_threshold=norm_threshold, concentration_z=conc_z,
            concentrated=anomalous[1:] & (conc_z > cfg.concentration_z), window=self.window,
        )

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
        level = fed
        if self.holds:
            # A model norm beyond its boundary is not evidence of where its typical
            # level is (it still widens the spread): the level learns from the steps
            # within the boundary only. So when most steps are beyond it (a learning
            # rate too high for the run), the boundary holds at the scale of the normal
            # steps instead of being walked up by the clipped ones: with an SGD-type
            # optimizer, clipping becomes a bounded step. An adaptive optimizer's step
            # is not bounded that way, and a held level would only go stale when its
            # norms rise for good (they often do): there the level follows every step.
            level = torch.cat([torch.where(d.anomalous[:1], mean[:1], fed[:1]), fed[1:]])
        update = m.valid & ~m.nonfinite
        self.stats.update(level, update, spread=fed)
        if self.tightens:
            # A crossing tightens, a step within the boundary relaxes: at equilibrium
            # norms cross it at crossing_rate, or the threshold rests at either end.
            crossed = d.anomalous[0].float()
            tightened = self.tightness + _TIGHTEN_STEP * (crossed - cfg.crossing_rate)
            self.tightness.copy_(
                torch.where(armed[0] & update[0], tightened.clamp(0.0, 1.0), self.tightness)
            )
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
            raise ValueError(
                f"detector state version {version!r} is not supported by this gradwatch "
                f"(which reads versions 1..{STATE_VERSION}); upgrade gradwatch to load it"
            )
        device = self.tightness.device
        self.stats.load_state_dict({k: v.to(device) for k, v in state["stats"].items()})
        self.window.load_state_dict({k: v.to(device) for k, v in state["window"].items()})
        self.tightness.copy_(torch.as_tensor(state.get("tightness", 0.0)).to(device))
