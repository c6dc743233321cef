"""Configuration of a :class:`~gradwatch.GradMonitor`.

Every field is validated when the config is built, so a bad value fails before
training starts, with a message that names the field, the value and the fix. The
config is frozen: a changed copy (``dataclasses.replace``, or options passed to
``gradwatch.attach``) is built, and so validated, again.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Any

CLIP_MODES = ("auto", "norm", "value", "agc", "zscore", "percentile", "none")
# The modes that scale all gradients by one norm-clipping coefficient (which a fused
# optimizer can apply through its grad_scale): declared here, once.
NORM_MODES = frozenset(("auto", "norm", "zscore", "percentile"))
NONFINITE_MODES = ("skip", "zero")
GRANULARITIES = ("module", "parameter")
# Upper bounds of the fields that size a buffer on the device (see their docstrings).
MAX_WINDOW = 100_000
MAX_LOG_EVERY = 10_000
# After an explosion or a drift event, the step is bounded (see Detector.bounding) for
# this many steps. (Here, where nothing imports torch, so the event texts that quote it
# are read without it.)
UNSTABLE_FOR = 100
# Fields that one clip mode alone reads: changed from their default under another
# mode they do nothing, which is worth a warning (the user expected an effect).
MODE_ONLY_FIELDS = {
    "percentile": "percentile",
    "clip_factor": "agc",
    "agc_eps": "agc",
    "concentration_z": "auto",
    "crossing_rate": "auto",
}


class UnknownFieldError(ValueError, TypeError):
    """An option that is not a field of :class:`MonitorConfig`.

    A ``ValueError`` like every other invalid option, and a ``TypeError`` like any
    unexpected keyword argument, so code that catches either keeps working.
    """


def _strict_fields(cls: type) -> type:
    """Give a frozen dataclass messages with a fix: an unknown keyword gets a "did you
    mean", an assignment after construction says how to build a changed copy."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if key not in names:
                raise UnknownFieldError(
                    f"{key}={value!r} is not a {cls.__name__} field{_suggest(key, names)}; "
                    f"valid fields are {', '.join(names)}"
                )
        dataclass_init(self, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in names:
            raise dataclasses.FrozenInstanceError(
                f"{name}={value!r}: {cls.__name__} has no field {name!r}"
                f"{_suggest(name, names)} and is frozen"
            )
        raise dataclasses.FrozenInstanceError(
            f"{name}={value!r}: a {cls.__name__} is frozen (it was validated when built); "
            f"build a changed copy with dataclasses.replace(config, {name}={value!r}), or "
            f"pass {name}={value!r} to gradwatch.attach"
        )

    # A frozen dataclass may not define these in its body; they replace the generated
    # ones here, keeping the generated signature (functools.wraps) for help() and IDEs.
    cls.__init__ = __init__
    cls.__setattr__ = __setattr__
    return cls


@_strict_fields
@dataclass(kw_only=True, frozen=True)
class MonitorConfig:
    """What the monitor measures, how it detects explosions and how it clips.

    Read the README's "Clipping modes" section for when each ``clip`` mode is the
    right one. Numbers may be any real (or, for counts, integral) type, numpy scalars
    included; they are stored as Python ``float`` and ``int``. The config is frozen:
    ``dataclasses.replace(config, field=value)`` builds a changed, validated copy.

    Raises:
        ValueError: a field is invalid, or contradicts another (the message names it,
            its value and the fix); :class:`UnknownFieldError` for an unknown field.
    """

    clip: str = "auto"
    """How to clip: ``"auto"``, ``"norm"``, ``"value"``, ``"agc"``, ``"zscore"``,
    ``"percentile"`` or ``"none"`` (monitor and detect only)."""

    max_norm: float | None = None
    """Fixed norm threshold. Required by ``clip="norm"``; in the adaptive modes
    (``auto``, ``zscore``, ``percentile``) an optional hard ceiling that also holds
    during warm-up."""

    clip_value: float | None = None
    """Fixed element threshold, required by ``clip="value"`` and refused by the other
    modes (``auto`` derives its own value thresholds)."""

    clip_factor: float = 0.01
    """``clip="agc"``: a unit's gradient norm may be at most this fraction of the
    unit's weight norm (Brock et al., 2021)."""

    agc_eps: float = 1e-3
    """``clip="agc"``: floor on the weight norm, so zero-initialised units can move."""

    percentile: float = 90.0
    """``clip="percentile"``: the norm threshold is this percentile (0-100] of the
    recent global norms."""

    z_threshold: float = 4.0
    """The model's log gradient norm this many standard deviations above its running
    mean is an explosion. For layers the threshold is raised so that, over all layers
    together, a normal step is flagged no more often than by this single test
    (Bonferroni: 4.0 becomes 4.98 for 100 layers). With ``calibrate`` it is also
    raised where the run's own tail is heavier than a Gaussian's."""

    clip_z: float = 2.5
    """Adaptive modes (``auto``, ``zscore``) clip a norm whose z-score exceeds this back
    to ``exp(mean + clip_z * std)`` of its log; values are fed to the statistics
    clipped at the same boundary. Usually lower than ``z_threshold``: a mild excess is
    trimmed quietly, a large one is also reported as an explosion. Like
    ``z_threshold``, it is raised for layers by the number of layers (Bonferroni)."""

    max_ratio: float | None = 2.0
    """Adaptive modes: a cap on the model's clipping threshold, as a multiple of the
    typical norm (the running geometric mean); values fed to the statistics are
    winsorised at the same boundary. It applies during warm-up (from the second step
    on, before a deviation is known, so a run that blows up in its first steps is
    held to their scale), and afterwards on evidence of instability (an explosion or
    a drift event in the last 100 steps), where a steadily rising norm would otherwise
    drag its own threshold up. With an SGD-type optimizer (SGD, ASGD: a step
    proportional to the gradient) it applies throughout, and while the run is unstable
    (an explosion in the last 100 steps, or crossings of this boundary) the step is
    *bounded*: a model norm beyond the boundary does not move the typical level, which
    learns from the steps within it only, and at the spread's slower rate; so when
    most steps are beyond it (a learning rate too high for the run) the threshold holds
    at the scale of the normal steps. An adaptive optimizer's step is not bounded that
    way, and its level follows every step. The flip side, with SGD: a legitimate jump
    of the model norm to more than this multiple (a large part of the model unfrozen at
    once), or norms heavy-tailed enough to cross it often, are clipped to the old
    scale (in ``auto``, tightened towards the typical norm) until enough steps fall
    within the boundary; pass ``crossing_rate=None`` or ``max_ratio=None``. ``None``:
    thresholds from ``clip_z`` alone, none during warm-up."""

    crossing_rate: float | None = 0.02
    """``auto`` with ``max_ratio`` and an SGD-type optimizer (SGD, ASGD: a step
    proportional to the gradient; not Adam, AdamW, Adagrad, RMSprop, Adafactor and the
    like, whose step barely depends on the gradient's scale, nor a monitor attached
    without its optimizer): how often the model norm may cross ``max_ratio`` times
    the typical norm before the clipping threshold tightens. Only such crossings
    count: a norm beyond the statistical boundary (``clip_z``) but within
    ``max_ratio`` is clipped as an anomaly, but a run of them is what a norm rising
    as the network learns looks like (an SGD MLP's often rises severalfold in its
    first hundred steps), not evidence of a learning rate too high. While crossings are more frequent than this
    (a learning rate too high for the run, or norms heavy-tailed enough that steps far
    beyond the typical one are routine), the model's threshold comes down from the
    boundary towards the typical norm itself, never below it, so a step's size is held
    at the scale of a typical step; as crossings become rare it rises back. One
    crossing tightens it by about a seventh of the way; at 0.02 it relaxes fully in
    about 330 steps without one. A crossing also counts as evidence of instability
    until the tightening it caused has relaxed (see ``max_ratio``). The tightening
    applies while the run is unstable; events (``z_threshold``) are not affected.
    The price: on SGD runs with heavy-tailed norms (small batches, a loss near zero)
    many normal steps are clipped at about the typical norm. ``None``: the threshold
    stays at the boundary, and only alarms count as evidence of instability."""

    concentration_z: float = 3.0
    """``clip="auto"``: a layer whose concentration (max |g| / RMS of g) is this many
    standard deviations above its normal is treated as an outlier in a few
    components and clipped by value; otherwise the step is clipped by norm."""

    skip_threshold: float | None = None
    """If set, a z-score at or above it is catastrophic: the optimizer step is
    skipped instead of clipped. Must be above ``z_threshold``."""

    ema_decay: float = 0.98
    """Decay of the running variance of each log norm (0-1): the spread is estimated
    over about ``1 / (1 - ema_decay)`` steps."""

    level_decay: float = 0.95
    """Decay of the running mean of each log norm (0-1): the typical level. It follows
    the run in both directions within about ``1 / (1 - level_decay)`` steps (20 at
    0.95), so when norms fall steeply (Adam finding its footing) the level keeps up and
    a spike is still measured against the norms of its time. Values fed to it are
    winsorised at the clipping boundary, so a spike does not drag it."""

    calibrate: bool = True
    """Calibrate every norm's event threshold and clipping boundary to its own tail:
    a running 95th percentile of its z-scores is compared with a Gaussian's (1.645),
    and where the tail is heavier, ``z_threshold`` and ``clip_z`` are raised by the
    same factor (never lowered). A healthy heavy-tailed run (small batches, a loss
    near zero) then raises about as few events and clips as few steps as a Gaussian
    one. ``False``: the thresholds as configured."""

    drift_threshold: float | None = 5.0
    """A one-sided CUSUM on the model's (calibrated) log-norm z-score: each step adds
    ``min(z, 3) - 0.75``, a step below that drains it, and when the sum exceeds this
    value the monitor raises a ``drift`` event: a sustained rise (a learning rate too
    high or growing, an instability building up), once per episode, with the step
    where the rise began and its growth per step. It also counts as evidence of
    instability for an adaptive optimizer's ``max_ratio`` cap (see ``max_ratio``).
    ``None``: no drift test."""

    warmup_steps: int = 25
    """Steps of statistics a layer needs before it can be flagged or clipped by the
    adaptive modes."""

    min_std: float = 0.1
    """Floor on the standard deviation of a log norm (natural log), so a very steady
    layer is not flagged for a ten percent wobble."""

    window: int = 128
    """Number of recent steps kept per layer for quantiles. At most 100,000, far more
    than a quantile of recent steps needs: the window is ``window`` float32 values per
    layer on the device (400 KB per layer at the bound), and ``clip="percentile"``
    sorts the model's row every step."""

    nonfinite: str = "skip"
    """What to do with a step whose gradients hold NaN or Inf. ``"skip"``: the
    optimizer step is skipped (parameters and optimizer state stay unchanged; needs
    ``optimizer``, otherwise the gradients are zeroed). ``"zero"``: the gradients of
    that step are zeroed, with no host synchronisation for any optimizer."""

    granularity: str = "module"
    """``"module"``: a layer is a module that directly owns parameters.
    ``"parameter"``: every parameter is its own layer."""

    group_depth: int | None = None
    """Group layers by the first ``group_depth`` components of their name
    (``encoder.layers.3.attn.q`` with depth 3 is ``encoder.layers.3``)."""

    group_prefixes: tuple[str, ...] | None = None
    """Group every parameter under the longest of these name prefixes that it
    starts with; others keep their own layer."""

    group_pattern: str | None = None
    """Regular expression matched against parameter names; the layer is its first
    group (or the whole match). Parameters that do not match keep their own layer."""

    log_every: int = 50
    """Per-step values are buffered on the device and copied to the host in one
    transfer every ``log_every`` steps. At most 10,000: the buffer holds ``log_every``
    rows of about 12 float32 values per layer on the device (480 KB per layer at the
    bound), and events reach the reporters up to ``log_every`` steps late."""

    flush_every: int = 200
    """The run record (``attach(run_dir=...)``) writes a Parquet part to disk once this
    many steps are buffered, and on exit."""

    update_ratio: bool = True
    """Measure each layer's update-to-weight ratio ``||w_new - w|| / ||w||`` of the
    optimizer step that follows one monitor step in every ``log_every`` (column
    ``update_ratio`` of ``history()``; needs the optimizer and ``log_every >= 2``).
    It costs a copy of the monitored weights on those steps (of this rank's shards
    under FSDP); set ``False`` where that memory is not there to spare."""

    history_limit: int | None = None
    """Keep at most this many steps of per-layer history in memory (oldest dropped),
    and the events of those steps only (at most this many; one warning when the first
    are dropped). The run record and the reporters still get everything. ``None``
    keeps everything."""

    def __post_init__(self) -> None:
        prefixes = self.group_prefixes
        if isinstance(prefixes, str):
            object.__setattr__(self, "group_prefixes", (prefixes,))
        elif isinstance(prefixes, (list, set, frozenset)):
            # A set's order varies between processes; the longest prefix wins anyway.
            if isinstance(prefixes, (set, frozenset)):
                prefixes = sorted(prefixes, key=str)
            object.__setattr__(self, "group_prefixes", tuple(prefixes))
        # Validated as given, so a message echoes the value the user passed.
        self.validate()
        self._store_plain_types()
        self._warn_unused()

    def _store_plain_types(self) -> None:
        """Numpy (or other) numbers become ``float``/``int``, ``str`` subclasses ``str``,
        so nothing downstream (the device code, ``to_dict``, W&B) sees another type."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool):
                continue
            kind = f.type.split(" ")[0]  # the annotation as written: "float | None"
            if kind == "float":
                object.__setattr__(self, f.name, float(value))
            elif kind == "int":
                object.__setattr__(self, f.name, int(value))
            elif kind == "str":
                object.__setattr__(self, f.name, str(value))
            elif f.name == "group_prefixes":
                object.__setattr__(self, f.name, tuple(str(p) for p in value))

    def _warn_unused(self) -> None:
        """Warn about a field changed from its default that this clip mode never reads."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, mode in MODE_ONLY_FIELDS.items():
            value = getattr(self, name)
            if self.clip != mode and value != defaults[name]:
                # stacklevel 5: the caller of MonitorConfig(...), past this method,
                # __post_init__, the dataclass __init__ and its checking wrapper.
                warnings.warn(
                    f"gradwatch: {name}={value!r} has no effect with clip={self.clip!r}: "
                    f"only clip={mode!r} reads it; pass clip={mode!r}, or leave {name} "
                    f"at its default ({defaults[name]!r})",
                    UserWarning,
                    stacklevel=5,
                )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and the fix."""
        self._validate_clipping()
        self._validate_statistics()
        self._validate_grouping()

    def _validate_clipping(self) -> None:
        _choice("clip", self.clip, CLIP_MODES)
        _choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        _choice("granularity", self.granularity, GRANULARITIES)
        if self.max_norm is not None:
            _positive("max_norm", self.max_norm)
        if self.clip_value is not None:
            _positive("clip_value", self.clip_value)
        if self.clip == "norm" and self.max_norm is None:
            raise ValueError(
                "max_norm=None: clip='norm' needs a fixed threshold; pass max_norm=<float > 0> "
                "(for example 1.0), or use clip='zscore' for an adaptive one"
            )
        if self.clip == "value" and self.clip_value is None:
            raise ValueError(
                "clip_value=None: clip='value' needs a fixed threshold; pass "
                "clip_value=<float > 0> (for example 1.0)"
            )
        _positive("clip_factor", self.clip_factor)
        _positive("agc_eps", self.agc_eps)
        _in_range("percentile", self.percentile, 0.0, 100.0, low_open=True)
        _positive("z_threshold", self.z_threshold)
        _positive("clip_z", self.clip_z)
        _positive("concentration_z", self.concentration_z)
        if self.max_ratio is not None and (
            not _is_real(self.max_ratio) or not math.isfinite(self.max_ratio)
            or self.max_ratio <= 1
        ):
            raise ValueError(
                f"max_ratio={self.max_ratio!r} must be a finite number > 1 (a multiple of "
                "the typical norm), or None to set thresholds from clip_z alone"
            )
        if self.crossing_rate is not None and not (
            _is_real(self.crossing_rate) and 0 < self.crossing_rate < 1
        ):
            raise ValueError(
                f"crossing_rate={self.crossing_rate!r} must be in (0, 1), a share of steps "
                "(for example 0.02), or None to keep the clipping threshold at its boundary"
            )
        if self.skip_threshold is not None:
            _positive("skip_threshold", self.skip_threshold)
            if self.skip_threshold <= self.z_threshold:
                raise ValueError(
                    f"skip_threshold={self.skip_threshold!r} must be greater than "
                    f"z_threshold={self.z_threshold!r}: steps are clipped above z_threshold "
                    "and skipped only above skip_threshold; raise it or pass None"
                )

    def _validate_statistics(self) -> None:
        _in_range("ema_decay", self.ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        _in_range("level_decay", self.level_decay, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate={self.calibrate!r} must be True or False")
        if not isinstance(self.update_ratio, bool):
            raise ValueError(f"update_ratio={self.update_ratio!r} must be True or False")
        if self.drift_threshold is not None and not (
            _is_real(self.drift_threshold) and math.isfinite(self.drift_threshold)
            and self.drift_threshold > 0
        ):
            raise ValueError(
                f"drift_threshold={self.drift_threshold!r} must be a finite number > 0 (in "
                "deviations; 5.0 by default), or None to switch the drift test off"
            )
        _integer("warmup_steps", self.warmup_steps, minimum=1)
        _positive("min_std", self.min_std)
        _integer("window", self.window, minimum=2, maximum=MAX_WINDOW,
                 why="the window keeps that many float32 values per layer on the device",
                 default=128)
        _integer("log_every", self.log_every, minimum=1, maximum=MAX_LOG_EVERY,
                 why="the monitor buffers that many rows (about 12 float32 values per "
                     "layer each) on the device", default=50)
        _integer("flush_every", self.flush_every, minimum=1)
        if self.history_limit is not None:
            _integer("history_limit", self.history_limit, minimum=1)

        if self.clip == "percentile" and self.window < self.warmup_steps:
            raise ValueError(
                f"window={self.window!r} is shorter than warmup_steps={self.warmup_steps!r}: "
                "clip='percentile' waits for warmup_steps norms in the window before it "
                "clips; raise window or lower warmup_steps"
            )
        if self.max_norm is not None and self.clip in ("value", "agc", "none"):
            raise ValueError(
                f"max_norm={self.max_norm!r} has no effect with clip={self.clip!r}; use "
                "clip='norm' for a fixed norm threshold (or 'auto', 'zscore', 'percentile' "
                "with max_norm as a ceiling), or leave max_norm=None"
            )
        if self.clip_value is not None and self.clip != "value":
            raise ValueError(
                f"clip_value={self.clip_value!r} has no effect with clip={self.clip!r}: only "
                "clip='value' clips by a fixed element threshold ('auto' derives its own per "
                "layer); use clip='value', or leave clip_value=None"
            )

    def _validate_grouping(self) -> None:
        groupings = [
            name
            for name in ("group_depth", "group_prefixes", "group_pattern")
            if getattr(self, name) is not None
        ]
        if len(groupings) > 1:
            raise ValueError(
                f"{groupings[0]} and {groupings[1]} are both set: layers can be grouped "
                "one way only; keep one of group_depth, group_prefixes, group_pattern"
            )
        if groupings and self.granularity != "module":
            raise ValueError(
                f"granularity={self.granularity!r} with {groupings[0]}: grouping merges "
                "module layers; use granularity='module' (the default) with a grouping"
            )
        if self.group_depth is not None:
            _integer("group_depth", self.group_depth, minimum=1)
        if self.group_prefixes is not None:
            prefixes = self.group_prefixes
            if not isinstance(prefixes, (tuple, list)) or not prefixes or not all(
                isinstance(p, str) and p for p in prefixes
            ):
                raise ValueError(
                    f"group_prefixes={self.group_prefixes!r} must be a non-empty sequence "
                    "of non-empty module-name prefixes, for example ('encoder', 'decoder')"
                )
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except (re.error, TypeError) as err:
                raise ValueError(
                    f"group_pattern={self.group_pattern!r} is not a valid regular "
                    f"expression ({err}); pass a pattern such as r'layers\\.\\d+'"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view of the config, for ``wandb.config`` and reports."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MonitorConfig:
        """Build a config from :meth:`to_dict` output (unknown keys raise)."""
        names = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(names))
        if unknown:
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            pairs = [f"{c[0]!r} for {k!r}" for k, c in close.items() if c]
            hints = f" (did you mean {', '.join(pairs)}?)" if pairs else ""
            raise UnknownFieldError(
                f"unknown MonitorConfig field(s) {unknown}{hints}; valid fields are {names}"
            )
        return cls(**values)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_real(value: Any) -> bool:
    # numbers.Real covers numpy's floats and ints; bool (and numpy's bool_) are not
    # numbers here.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def _in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} must be in {lo}{low:g}, {high:g}{hi}")


def _integer(
    name: str,
    value: Any,
    *,
    minimum: int,
    maximum: int | None = None,
    why: str = "",
    default: int | None = None,
) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name}={value!r} is too large: {why}; pass an integer in [{minimum}, "
            f"{maximum}] ({default} by default)"
        )


def resolve_config(config: MonitorConfig | None, overrides: dict[str, Any]) -> MonitorConfig:
    """``config`` (default ``MonitorConfig()``) with ``overrides`` applied and validated.

    Raises:
        TypeError: ``config`` is not a :class:`MonitorConfig`.
        ValueError: an override is not a field (with a suggestion) or its value is invalid.
    """
    if config is not None and not isinstance(config, MonitorConfig):
        raise TypeError(
            f"config={type(config).__name__} is not a gradwatch.MonitorConfig; build one "
            "with gradwatch.MonitorConfig(...) or pass options as keywords"
        )
    if not overrides:
        return config or MonitorConfig()
    fields = sorted(f.name for f in dataclasses.fields(MonitorConfig))
    for key in overrides:
        if key not in fields:
            raise UnknownFieldError(
                f"{key}={overrides[key]!r} is not a gradwatch option{_suggest(key, fields)}; "
                f"valid options are the fields of MonitorConfig: {', '.join(fields)}"
            )
    return dataclasses.replace(config or MonitorConfig(), **overrides)
