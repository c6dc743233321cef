"""Weights & Biases reporting: metrics, histograms, alerts and a summary.

``WandbReporter`` reuses the active run (``wandb.run``, e.g. one started by Lightning's
``WandbLogger`` or the Hugging Face Trainer) and calls ``wandb.init`` only when there
is none; ``WANDB_MODE`` is respected. Its metrics live under ``gradwatch/`` with their
own step metric (``gradwatch/step``) and are logged without ``step=``: W&B silently
drops a row whose ``step`` is below the run's current one, so passing ours would lose
rows whenever the host logs too.

Every key is bound to ``gradwatch/step`` by its exact name, declared with
``define_metric`` the first time it is logged (per-layer keys appear over time). A glob
is not enough: Lightning's ``WandbLogger`` declares ``"*"`` (step ``trainer/global_step``)
and the Hugging Face Trainer ``"*"`` (step ``train/global_step``); both match our keys as
well as our ``gradwatch/*``, and W&B settles such a tie per key in no fixed order, so a
chart's step axis was random. An exact name wins over every glob. Norms and z-scores
are summarised by their maximum (``summary="max"``); since W&B's maximum stays NaN for
good after a single NaN, their non-finite values are left out of the row (charts do
not draw them either; the row's ``nonfinite`` flag says what happened).

Everything it sends was computed by the monitor and reached the host in the monitor's
one transfer every ``log_every`` steps. Histograms are computed on the device at the
steps they are due (no synchronisation) and travel in that same transfer: every
``hist_every`` steps, at the step warm-up ends (so they reach W&B at the first flush
after warm-up, however short the run), and, for the gradient norms, once more when the
run closes (one device-to-host copy then).

What is clear before the run starts is a configuration error and stops ``attach``: a
bad option of the reporter, wandb not installed, ``init_kwargs`` that ``wandb.init``
rejects (``TypeError``, ``ValueError``). A failure of W&B itself at start-up (network,
authentication, an install that fails on import) is not: it warns once and the reporter
stays silent, so training and the other reporters (the run record) go on, as they do
when a W&B call fails later.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .reporters import Chunk, ProbeInput, Reporter, RunInfo
from .totals import EVENT_KINDS, RunTotals

INSTALL = 'pip install "gradwatch[wandb]"'
ALERT_KINDS = EVENT_KINDS
_clock = time.monotonic  # alert rate limiting; a module attribute so tests can drive it


def require_installed() -> None:
    """Raise ImportError with the install command if wandb is not installed (without
    importing it: an install that fails on import is a runtime failure, see start)."""
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(f"gradwatch's W&B reporting needs the wandb package: {INSTALL}")


def require_wandb():
    """Import wandb, or raise ImportError with the install command."""
    require_installed()
    import wandb

    return wandb


class WandbReporter(Reporter):
    """Reports a monitor to Weights & Biases.

    Args:
        run: a W&B run to log into. Default: ``wandb.run`` if one is active, else a new
            one from ``wandb.init(**init_kwargs)``.
        init_kwargs: arguments for ``wandb.init`` when a run has to be started.
        prefix: namespace of every key (``gradwatch/global_norm``, ...).
        layer_norms: log every layer's norm (``<prefix>/grad_norm/<layer>``) at every
            step. Off for very deep models if the dashboard gets crowded.
        hist_every: every this many steps, log each layer's distribution of recent
            gradient norms (from the monitor's window) and value histograms of
            ``value_hist_layers``; also at the end of warm-up, and (norms only) when
            the run closes. ``None`` for no histograms.
        value_hist_layers: layers whose gradient values are histogrammed.
        bins: histogram bins (W&B accepts at most 512).
        alert_every: seconds between two alerts of the same kind; events in between
            are counted into the next alert, and those still held back when the run
            closes into one last alert (and ``<prefix>/alerts_held_back`` in the
            summary). W&B applies no client-side limit itself.
        amp_overflow_alerts: alert on AMP overflows only when this many happened within
            the last 100 steps (an occasional overflow is how GradScaler works).
    """

    def __init__(
        self,
        *,
        run: Any = None,
        init_kwargs: dict[str, Any] | None = None,
        prefix: str = "gradwatch",
        layer_norms: bool = True,
        hist_every: int | None = 500,
        value_hist_layers: Sequence[str] = (),
        bins: int = 64,
        alert_every: float = 300.0,
        amp_overflow_alerts: int = 5,
    ) -> None:
        if hist_every is not None and (not isinstance(hist_every, int) or hist_every < 1):
            raise ValueError(f"hist_every={hist_every!r} must be an integer >= 1 or None")
        if not isinstance(bins, int) or not 2 <= bins <= 512:
            raise ValueError(f"bins={bins!r} must be an integer in [2, 512] (W&B's limit)")
        if not alert_every >= 0:
            raise ValueError(f"alert_every={alert_every!r} must be >= 0 seconds")
        require_installed()
        self._run = run
        self._init_kwargs = dict(init_kwargs or {})
        self.prefix = prefix
        self.layer_norms = layer_norms
        self.hist_every = hist_every
        self.value_hist_layers = tuple(value_hist_layers)
        self.bins = bins
        self.alert_every = alert_every
        self.amp_overflow_alerts = amp_overflow_alerts
        self.run: Any = None
        self._owns_run = False
        self._last_alert: dict[str, float] = {}
        self._suppressed: dict[str, int] = dict.fromkeys(ALERT_KINDS, 0)
        self._suppressed_last: dict[str, int] = {}  # the step of the last one held back
        self._held_back = 0
        self._declared: set[str] = set()
        self._next_probe_step = 0  # the step of the monitor's next probe call
        self._warmup_step: int | None = None  # the step whose histograms end warm-up
        self._window: Tensor | None = None  # the monitor's recent log norms (a view)
        self._last_step = -1  # the last step reported
        self._last_hist_step = -1  # the last step histograms were logged at
        self._overflow_steps: deque[int] = deque()
        self._totals = RunTotals()
        self._alerts_sent = 0
        self._layer_names: tuple[str, ...] = ()
        self._start_failed = False

    @property
    def probe_every(self) -> int | None:
        """The probe is called at every step (never after W&B failed to start: nobody
        would read its values): it counts the steps, and computes histograms only at
        the steps they are due (every ``hist_every`` steps and the end of warm-up),
        returning nothing at the others. A call that returns nothing costs a Python
        call and the monitor's tuple of layer indices (~10 us for 200 tensors)."""
        if self._start_failed or self.hist_every is None:
            return None
        return 1

    # ------------------------------------------------------------------ Reporter
    def start(self, run: RunInfo) -> None:
        """Open the W&B run (or reuse the active one) and declare the step metric.

        Raises:
            ValueError: ``value_hist_layers`` names a layer the monitor does not have,
                or ``wandb.init`` rejects a value of ``init_kwargs``.
            TypeError: ``wandb.init`` does not take a key of ``init_kwargs``.
        """
        names = run.layer_names
        unknown = [n for n in self.value_hist_layers if n not in names]
        if unknown:  # before any run is started, so a bad option leaves nothing open
            raise ValueError(
                f"value_hist_layers={list(self.value_hist_layers)!r}: no layer named "
                f"{unknown[0]!r}; the monitor's layers are {list(names)[:8]}"
            )
        self._layer_names = names
        self._next_probe_step = run.first_step
        self._last_step = run.first_step - 1
        self._warmup_step = max(run.first_step, run.config.warmup_steps)
        try:
            import wandb  # installed (checked at construction), but may fail to load
        except Exception as err:  # noqa: BLE001 - a broken install must not stop training
            self._give_up("importing wandb", err)
            return
        wandb_run = self._run if self._run is not None else wandb.run
        if wandb_run is None:
            try:
                wandb_run = wandb.init(**self._init_kwargs)
            except (TypeError, ValueError):
                raise  # init_kwargs that wandb rejects: the user's to fix before a run
            except Exception as err:  # noqa: BLE001 - network, authentication, ...
                self._give_up("wandb.init", err)
                return
            self._owns_run = True
        p = self.prefix
        try:
            wandb_run.define_metric(f"{p}/step")
            # A fallback only: on a run shared with Lightning or HF, their "*" ties with
            # this glob; each key is bound by its exact name when first logged (_log).
            wandb_run.define_metric(f"{p}/*", step_metric=f"{p}/step")
            wandb_run.config.update({p: run.config.to_dict()}, allow_val_change=True)
        except Exception as err:  # noqa: BLE001 - a run that W&B cannot use
            if self._owns_run:
                with contextlib.suppress(Exception):
                    wandb_run.finish()
            self._give_up("setting up the W&B run", err)
            return
        self.run = wandb_run

    def _give_up(self, doing: str, err: Exception) -> None:
        """W&B failed at start-up: warn once; report nothing from now on."""
        self._start_failed = True
        self._owns_run = False
        cause = (str(err).strip().splitlines() or [""])[0]
        warnings.warn(
            f"gradwatch: W&B could not start ({doing} raised {type(err).__name__}: "
            f"{cause}); this run is not reported to W&B. Training continues, and so do "
            "the run record on disk and the other reporters.",
            UserWarning,
            stacklevel=3,
        )

    def resumed(self, step: int) -> None:
        """The monitor continues at ``step``: count the probe's steps from there, and
        log histograms at the first step after the restore if warm-up has not had its
        histograms yet."""
        self._next_probe_step = step
        self._window = None  # the restore may have replaced the monitor's window
        if self._warmup_step is not None:
            self._warmup_step = max(step, self._warmup_step)

    def report(self, chunk: Chunk) -> None:
        if self.run is None:  # W&B failed to start (warned once then)
            return
        p = self.prefix
        counts = dict(self._totals.actions)
        for step, metrics in zip(chunk.steps, chunk.metrics(layer_norms=self.layer_norms)):
            counts[metrics["action"]] += 1
            data: dict[str, Any] = {f"{p}/step": int(step)}
            for k, v in metrics.items():
                if k == "action" or (_summarised_by_max(k) and not math.isfinite(v)):
                    continue  # a NaN would stay W&B's maximum for good
                data[f"{p}/{k}"] = v
            data.update((f"{p}/actions/{a}", c) for a, c in counts.items())
            self._log(data)
            hist = chunk.extras.get(int(step))
            if hist:
                self._log_histograms(int(step), hist)
        if len(chunk.steps):
            self._last_step = int(chunk.steps[-1])
        self._totals.add_rows(chunk.layout, chunk.layer_names, chunk.rows, chunk.events)
        for event in chunk.events:
            self._maybe_alert(event)
        self.run.summary.update(self._summary())

    def close(self, error: str | None) -> None:
        # At interpreter exit W&B's own atexit hook may have finished the run already.
        if self.run is None or getattr(self.run, "_is_finished", False):
            return
        try:
            self._log_final_histograms()
        finally:
            self._alert_held_back()
            self.run.summary.update(self._summary())
            if self._owns_run:
                self.run.finish()

    def _log(self, data: dict[str, Any], parts: tuple[str, ...] = ()) -> None:
        """Log a row, first binding each key new to this run to our step metric by its
        exact name (which wins over any framework's glob). ``parts``: the fields of a
        nested value (a histogram); W&B matches each as ``<key>.<field>``, so each is
        bound too, or the framework's ``"*"`` claims the row (measured, wandb 0.31)."""
        p = self.prefix
        for key in data.keys() - self._declared:
            if key != f"{p}/step":
                summary = "max" if _summarised_by_max(key[len(p) + 1 :]) else None
                self.run.define_metric(key, step_metric=f"{p}/step", summary=summary)
                for part in parts:
                    self.run.define_metric(f"{key}.{part}", step_metric=f"{p}/step")
            self._declared.add(key)
        self.run.log(data)

    # ------------------------------------------------------------------ summary
    def _summary(self) -> dict[str, Any]:
        p, t = self.prefix, self._totals
        out: dict[str, Any] = {
            f"{p}/total_steps": t.steps,
            f"{p}/clip_rate": t.clip_rate,
            f"{p}/skip_count": t.actions["skip"],
            f"{p}/max_global_norm": t.max_global_norm,
            f"{p}/worst_layer": t.worst_layer,
            f"{p}/worst_z": t.worst_z if math.isfinite(t.worst_z) else 0.0,
            f"{p}/alerts_sent": self._alerts_sent,
            f"{p}/alerts_held_back": self._held_back,
        }
        for kind, count in t.events.items():
            out[f"{p}/events/{kind}"] = count
        for action, count in t.actions.items():
            out[f"{p}/actions_total/{action}"] = count
        return out

    # ------------------------------------------------------------------ alerts
    def _maybe_alert(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "amp_overflow":
            self._overflow_steps.append(event["step"])
            while self._overflow_steps and self._overflow_steps[0] <= event["step"] - 100:
                self._overflow_steps.popleft()
            if len(self._overflow_steps) < self.amp_overflow_alerts:
                return
        now = _clock()
        last = self._last_alert.get(kind)
        if last is not None and now - last < self.alert_every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            self._suppressed_last[kind] = int(event["step"])
            self._held_back += 1
            return
        wandb = require_wandb()
        layer = event["layer"] or "(model)"
        # The step goes in the text: W&B groups (and throttles) alerts by their title.
        title = f"gradwatch: {_TITLES.get(kind, kind)}"[:63]
        text = (
            f"Step {event['step']}, layer {layer}, action {event['action']}.\n{event['reason']}"
        )
        missed = self._suppressed.get(kind, 0)
        if missed:
            text += f"\n({missed} more {kind} event(s) since the last alert were not alerted.)"
        level = wandb.AlertLevel.ERROR if kind == "nonfinite" else wandb.AlertLevel.WARN
        self.run.alert(title=title, text=text, level=level)
        self._last_alert[kind] = now
        self._suppressed[kind] = 0
        self._alerts_sent += 1

    def _alert_held_back(self) -> None:
        """At the end of the run, one alert for the events the rate limit held back
        since the last alert of their kind (nobody would hear of them otherwise)."""
        held = {k: n for k, n in self._suppressed.items() if n}
        if not held:
            return
        wandb = require_wandb()
        parts = [
            f"{n} {_TITLES.get(k, k)} event(s), the last at step {self._suppressed_last[k]}"
            for k, n in held.items()
        ]
        text = (
            f"The run ended with alerts held back by the rate limit (one alert per kind "
            f"every {self.alert_every:g} s): {'; '.join(parts)}. The run summary counts "
            f"every event ({self.prefix}/events/...), and the run record lists them."
        )
        level = wandb.AlertLevel.ERROR if "nonfinite" in held else wandb.AlertLevel.WARN
        self.run.alert(title="gradwatch: alerts held back", text=text, level=level)
        self._suppressed = dict.fromkeys(self._suppressed, 0)
        self._alerts_sent += 1

    # ------------------------------------------------------------------ histograms
    def probe(self, inputs: ProbeInput) -> dict[str, Tensor]:
        """On the device, without synchronising, at the steps histograms are due:
        per-layer histograms of the recent log norms (the monitor's window), and value
        histograms of selected layers. Nothing at the other steps."""
        step = self._next_probe_step
        self._next_probe_step += 1
        self._window = inputs.recent_log_norms  # updated in place: read again at close
        due = self.hist_every is not None and step % self.hist_every == 0
        if not (due or step == self._warmup_step):
            return {}
        b = self.bins
        out = self._norm_histograms(inputs.recent_log_norms)
        layer_max = inputs.layer_max_abs
        for name in self.value_hist_layers:
            li = self._layer_names.index(name)
            m = layer_max[li]
            hist = torch.zeros(b, device=layer_max.device)
            for g, gl in zip(inputs.grads, inputs.grad_layers):
                if gl != li:
                    continue
                # Scale to [-1, 1] by the layer's max |g| (a device value): histc's range
                # is then fixed, so it needs no host round trip. Non-finite values are
                # pushed out of the range and dropped (W&B rejects them).
                scaled = (g.detach().float() / m).nan_to_num(2.0, 2.0, 2.0)
                hist += torch.histc(scaled, bins=b, min=-1.0, max=1.0).to(hist.device)
            out[f"values/{name}"] = hist
            out[f"values_max/{name}"] = m.reshape(1)
        return out

    def _norm_histograms(self, window: Tensor) -> dict[str, Tensor]:
        """Per-layer counts of ``window`` (``(L, W)`` natural-log norms, NaN where
        absent) in ``bins`` equal bins between each layer's finite min and max."""
        b = self.bins
        finite = torch.isfinite(window)
        lo = torch.where(finite, window, math.inf).amin(dim=1)
        hi = torch.where(finite, window, -math.inf).amax(dim=1)
        width = torch.where(hi > lo, hi - lo, 1.0)
        idx = ((window - lo[:, None]) / width[:, None] * b).floor().clamp(0, b - 1)
        idx = torch.where(finite, idx, 0.0).long()
        counts = torch.zeros(window.shape[0], b, device=window.device)
        counts.scatter_add_(1, idx, finite.to(counts.dtype))
        return {"norm_counts": counts, "norm_lo": lo, "norm_hi": hi}

    def _log_final_histograms(self) -> None:
        """At close: the norm histograms of the monitor's window as the run ends,
        labelled with the last step (one device-to-host copy; the run is over)."""
        if self._window is None or self._last_step <= self._last_hist_step:
            return
        with torch.no_grad():
            hist = {k: v.cpu().numpy() for k, v in self._norm_histograms(self._window).items()}
        self._log_histograms(self._last_step, hist)

    def _log_histograms(self, step: int, hist: dict[str, np.ndarray]) -> None:
        wandb = require_wandb()
        p = self.prefix
        data: dict[str, Any] = {f"{p}/step": step}
        counts, lo, hi = hist["norm_counts"], hist["norm_lo"], hist["norm_hi"]
        for j, name in enumerate(self._layer_names):
            if counts[j].sum() == 0 or not (math.isfinite(lo[j]) and math.isfinite(hi[j])):
                continue
            top = hi[j] if hi[j] > lo[j] else lo[j] + 1.0
            edges = np.linspace(lo[j], top, self.bins + 1) / math.log(10)  # log10 norm
            data[f"{p}/norm_hist/{name}"] = wandb.Histogram(
                np_histogram=(counts[j].astype(np.int64), edges)
            )
        for name in self.value_hist_layers:
            if f"values/{name}" not in hist:  # the histograms at close are norms only
                continue
            m = float(hist[f"values_max/{name}"][0])
            values = hist[f"values/{name}"]
            if not math.isfinite(m) or m <= 0 or values.sum() == 0:
                continue
            edges = np.linspace(-m, m, self.bins + 1)
            data[f"{p}/value_hist/{name}"] = wandb.Histogram(
                np_histogram=(values.astype(np.int64), edges)
            )
        if len(data) > 1:
            self._log(data, parts=("_type", "values", "bins"))
            self._last_hist_step = max(self._last_hist_step, step)


_TITLES = {
    "explosion": "gradient explosion",
    "drift": "gradient norm rising",
    "nonfinite": "NaN/Inf gradients",
    "amp_overflow": "repeated AMP overflow",
}


def _summarised_by_max(key: str) -> bool:
    """Keys (without the prefix) whose W&B summary is their maximum: the norms and
    z-scores. The typical norm and the counters keep their last value."""
    return key in ("global_norm", "clipped_norm", "z") or key.startswith(
        ("grad_norm/", "flagged_z/"))
