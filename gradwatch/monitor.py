"""The gradient monitor: measure every layer, learn its normal, detect, clip.

Call :meth:`GradMonitor.step` once per optimizer step, after the gradients are final
(after accumulation and ``GradScaler.unscale_``) and before ``optimizer.step()``.

The monitor composes parts with one job each, and one step runs through them in order,
all on the device and without reading any value on the host:

1. **measure** (:class:`~gradwatch.measure.GradReader`): one fused pass for the L2
   norm and one for the max |g| of every gradient (fp32 accumulation), reduced to
   per-layer norms, max |g| and concentration (max |g| / RMS of g);
2. **detect** (:class:`~gradwatch.detector.Detector`): z-scores of their logs against
   bias-corrected running means and deviations;
3. **decide** (a :mod:`clipping policy <gradwatch.policies>`): clip by norm or value,
   or nothing, expressed as tensors: a norm coefficient clamped to at most 1,
   per-layer value thresholds (``inf`` for none);
4. **apply** the decision in place, unconditionally, like
   ``torch.nn.utils.clip_grad_norm_``, and arm the skip flag of the
   :class:`~gradwatch.gate.OptimizerGate`;
5. **update** the statistics robustly (values beyond the threshold are fed back
   clipped, non-finite values never enter) and, in ``auto``, how far the model's
   threshold is tightened by frequent crossings;
6. **record** one row into a device buffer. Every ``log_every`` steps the buffer goes
   to the host in one transfer, the only host synchronisation, and on to the
   reporters (:mod:`gradwatch.reporters`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from . import exit_hooks
from . import functional as F
from .config import MonitorConfig
from .context import TrainingContext
from .detector import Detection, Detector
from .events import EventDecoder
from .gate import OptimizerGate, make_gate, skip_description
from .history import StepHistory
from .layers import LayerTable
from .measure import GradReader, Measurement
from .monitor_state import check_monitor_state
from .optimizers import refuse_repeated_closure, step_scales_with_gradient
from .policies import Decision, GradEditor, make_policy
from .reporters import Chunk, ProbeInput, Reporter, ReporterSet, RunInfo
from .result import StepResult
from .rows import CLIP_NORM, CLIP_VALUE, NONE, SKIP, RowLayout, nan_if_inf
from .step_guard import StepGuard
from .transfer import HostTransfer
from .update_ratio import UpdateRatio

# Version 2 keeps the detector's statistics under "detector" (version 1: flat).
STATE_VERSION = 2
# At interpreter exit, how long the exit hook waits for a step running in another
# thread (a daemon training thread) before it leaves the records unclosed: exit must
# never hang on a step that does not finish.
EXIT_WAIT_S = 10.0


class GradMonitor:
    """Watches a model's gradients, learns their normal range, detects and clips.

    Prefer :func:`gradwatch.attach`. Args as there.

    Args:
        model: the module being trained.
        optimizer: its optimizer. With it, a step with non-finite gradients (or one
            beyond ``skip_threshold``) is skipped so parameters and optimizer state
            stay unchanged; without it, such gradients are zeroed instead.
        scaler: the ``torch.amp.GradScaler`` in use, if any. Non-finite steps are then
            recorded as ``amp_overflow`` and left for the scaler to skip.
        config: a :class:`MonitorConfig`.
        reporters: objects following :class:`gradwatch.reporters.Reporter` (the run
            record, W&B) that receive the records every ``log_every`` steps.
        process_group: under ``torch.distributed``, the group across which gradients
            are sharded. ``"auto"`` (default) finds it: FSDP2 ``DTensor`` gradients
            and FSDP1 (``use_orig_params=True``) are reduced across their group; DDP
            and a single process need no communication. ``None`` never communicates.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        config: MonitorConfig | None = None,
        reporters: Sequence[Reporter] = (),
        process_group: Any = "auto",
    ) -> None:
        _check_types(model, optimizer)
        self.config = cfg = config if config is not None else MonitorConfig()
        # One step at a time, and no close while a step runs: held by step(), flush(),
        # the state methods and detach(), which the exit hook may call from the main
        # thread while another thread trains (re-entrant: step -> flush).
        self._lock = threading.RLock()
        self._closed_at_exit = False
        cfg.validate()  # again: a config forced past its frozen fields fails here, not in step()
        self._ddp = model if dist_utils.is_ddp(model) else None
        model = dist_utils.unwrap(model)  # DDP: the same gradients, the model's own names
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.layers = _layer_table(model, cfg)
        # Statistics live on the accelerator if the model has one, so gathering
        # per-tensor results never copies from a device to the host.
        devices = [p.device for p in self.layers.params]
        self.device = next((d for d in devices if d.type != "cpu"), devices[0])
        shards = dist_utils.shard_setup(model, self.layers.params, process_group,
                                        self.device, cfg.clip)
        if shards is not None and shards.param_numel is not None:
            self.layers = dataclasses.replace(self.layers, param_numel=shards.param_numel)
        self._reader = GradReader(self.layers, self.device, shards)
        if optimizer is not None:
            # Before any reporter starts: a refused optimizer leaves nothing behind.
            refuse_repeated_closure(optimizer)
            self._warn_params_outside(optimizer)
        n = self.layers.num_layers
        # auto bounds the step (tightens on frequent crossings) for SGD-type optimizers
        # only: an adaptive one's step barely depends on the gradient's scale.
        self._detector = Detector(n, cfg, self.device,
                                  bounds_step=step_scales_with_gradient(optimizer))
        self.layer_z_threshold = self._detector.layer_z_threshold
        self.layer_clip_z = self._detector.layer_clip_z
        self._policy = make_policy(cfg)
        self._layout = RowLayout(n)
        self._events = EventDecoder(self._layout, self.layers.names, cfg,
                                    self.layer_z_threshold, skip_how="")
        self._history = StepHistory(self._layout, self.layers.names, self._events,
                                    cfg.history_limit)
        self._transfer = HostTransfer(self._layout.width, cfg.log_every, self.device)
        self._step = 0
        self._exit_error: str | None = None
        self._warned_scaled = False
        self._warned_unhandled = False
        # Misuse of step(): the skip flag last armed in the gate (still there: no
        # optimizer.step() since), and the guard that remembers the last gradients.
        self._armed: Tensor | None = None
        self._guard = StepGuard()
        self._amp_flag = torch.full((), float(self.scaler is not None), device=self.device)
        self._context = TrainingContext(self.device)
        self._reporters = ReporterSet()
        self._gate: OptimizerGate | None = None
        self._attached = True
        try:
            for reporter in reporters:
                self.add_reporter(reporter)
        except BaseException:
            # A reporter that cannot start is a configuration error: undo the others
            # (no half-made run left behind), then raise.
            self._reporters.call("close", None)
            exit_hooks.unregister(self)
            raise
        self._gate = make_gate(optimizer, self.scaler, cfg)
        # The update ratio of the optimizer step after the first row of every logging
        # interval, written into that row while it still waits in the device buffer.
        self._updates = None
        if self._gate is not None and cfg.update_ratio and cfg.log_every > 1:
            self._updates = UpdateRatio(self.layers, self.device, self._reader.shards,
                                        self._take_update_ratio)
        self._ratio_step = -1
        # NaN per layer: a value not measured (the update ratio), or of an absent layer.
        self._no_ratio = torch.full((self.layers.num_layers,), math.nan, device=self.device)
        self._events.skip_how = skip_description(optimizer, cfg)
        # CPU: branch on decision flags to skip passes that would change nothing
        # (a host read there is free); accelerators never read on the step.
        self._editor = GradEditor(self._reader, self._gate, {id(p) for p in self.layers.params},
                                  host_branches=self.device.type == "cpu")

    # ------------------------------------------------------------------ setup
    def _warn_params_outside(self, optimizer: torch.optim.Optimizer) -> None:
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        outside = [
            n
            for n, p in zip(self.layers.param_names, self.layers.params)
            if p.requires_grad and id(p) not in in_optimizer
        ]
        if outside:
            warnings.warn(
                f"gradwatch: {len(outside)} trainable parameter(s) of the model are not in "
                f"the optimizer given to attach ({', '.join(outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}): a step gradwatch skips is skipped "
                "for this optimizer only. Attach one monitor per optimizer's submodule, or "
                "use nonfinite='zero'.",
                stacklevel=3,
            )

    @property
    def _handles_nonfinite(self) -> bool:
        """Whether a non-finite step is kept from reaching the parameters."""
        return (
            self.scaler is not None
            or self.config.nonfinite == "zero"
            or self.optimizer is not None
        )

    @property
    def _host_branches(self) -> bool:
        """Whether decision flags are read on the host (the CPU path; tests turn it off
        to run the accelerator path there)."""
        return self._editor.host_branches

    @_host_branches.setter
    def _host_branches(self, value: bool) -> None:
        self._editor.host_branches = value

    # ------------------------------------------------------------------ the step
    def step(self, loss: Tensor | float | None = None) -> StepResult:
        """Measure, update statistics, detect and clip the current gradients in place.

        Call once per optimizer step, after gradients are final (after gradient
        accumulation and ``scaler.unscale_(optimizer)``), before ``optimizer.step()``.
        With a fused optimizer (``fused=True``) the norm-clipping coefficient is applied
        by that ``optimizer.step()`` (its ``grad_scale``) rather than by a pass of its
        own, so ``p.grad`` holds the clipped values once the optimizer has stepped.
        No host synchronisation happens except on every ``log_every``-th step, where
        the buffered records are copied to the host in one transfer.

        A step that finds no gradient (before ``backward()``), the last step's gradients
        unchanged (twice per optimizer step), or gradients accumulated into without an
        ``optimizer.step()`` since the last (once per micro-batch) warns, once; it is
        told from the gradients' objects and version counters, without a device read.
        Steps, flushes and :meth:`detach` are serialised, so the exit hook closes the
        records after a step in flight in another thread.

        Beside the gradients, each step records its training context: ``loss`` (as
        given) and ``lr``, the learning rate of the optimizer's first parameter group
        (NaN without an optimizer). Both go into the step's row on the device, never
        read on the host here, and are stored as fp32 like the rest of the row.

        Args:
            loss: this optimizer step's loss, as the device tensor it is (any shape
                holding one element; it is detached and taken as fp32) or a Python
                number. With gradient accumulation, pass whatever summarises the
                micro-batches (their sum or mean). ``None``: recorded as NaN.

        Returns:
            A :class:`StepResult` (its values stay on the device until read).

        Raises:
            TypeError: ``loss`` is neither a tensor nor a real number.
            ValueError: ``loss`` is a tensor of more than one element.
        """
        with self._lock:
            if not self._attached:
                if self._closed_at_exit:
                    # The interpreter is exiting and the records are closed while another
                    # (daemon) thread still trains: nothing records this step. That thread
                    # ends here, quietly (threading ignores SystemExit): left to train on,
                    # it would be inside torch's C++ code when the interpreter finalises,
                    # and be ended by an abort there.
                    if threading.current_thread() is not threading.main_thread():
                        raise SystemExit
                    return self._unrecorded()
                raise RuntimeError(
                    "this monitor was detached; attach a new one with gradwatch.attach")
            self._check_ready()
            context = self._context.values(loss, self.optimizer)
            unstepped = (self._gate is not None and self._armed is not None
                         and self._gate.still_armed_with(self._armed))
            with torch.no_grad():
                m = self._reader.measure()
                self._guard.check(m, unstepped)
                d = self._detector.score(m)
                self._transfer.run_probes(self._step, lambda: self._probe_input(m))
                decision = self._policy.decide(m, d)
                decision = self._policy.apply_(m, d, decision, self._editor)
                skip_z, skipped = self._skip_(m, d)
                self._detector.update(m, d, self._step)
                result = self._record(m, d, decision, skip_z, skipped, context)
            self._guard.remember(m)  # after this step's own edits (they bump versions)
            return result

    def _unrecorded(self) -> StepResult:
        """The result of a step that measured nothing (NaN values, action "none")."""
        row = torch.full((self._layout.width,), math.nan)
        row[self._layout.step["action"]] = NONE
        return StepResult(self._step, row, self._layout, self.layers.names)

    def _check_ready(self) -> None:
        self._check_scaler_stage()
        if self._ddp is not None and not self._ddp.require_backward_grad_sync:
            raise RuntimeError(
                "monitor.step() ran inside DistributedDataParallel.no_sync(): these "
                "gradients are this rank's own, not yet averaged, so ranks would measure "
                "and decide differently. Call monitor.step() once per optimizer step, after "
                "the backward of the micro-batch that synchronises (outside no_sync())"
            )

    def _check_scaler_stage(self) -> None:
        if self.scaler is None or self.optimizer is None or self._warned_scaled:
            return
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states.get(id(self.optimizer))
        if state is None or state.get("stage") is not OptState.UNSCALED:
            self._warned_scaled = True
            warnings.warn(
                "gradwatch: monitor.step() ran before scaler.unscale_(optimizer); gradients "
                "are still multiplied by the loss scale, so norms and thresholds are off by "
                "that factor. Call scaler.unscale_(optimizer) before monitor.step().",
                stacklevel=4,
            )

    def _probe_input(self, m: Measurement) -> ProbeInput:
        """What reporters' device probes read at this step (pre-clip gradients)."""
        return ProbeInput(
            grads=m.grads,
            grad_layers=tuple(self.layers.param_layer[i] for i in m.plan.positions),
            layer_max_abs=m.layer_max,
            recent_log_norms=self._detector.recent_log_norms(),
        )

    def _skip_(self, m: Measurement, d: Detection) -> tuple[Tensor, Tensor]:
        """Skip: a z-score beyond ``skip_threshold``, or non-finite gradients (unless a
        GradScaler is attached: it skips overflow steps itself). Makes sure a skipped
        step changes nothing, by the cheapest route available.

        Returns:
            ``(skip_z, skipped)``: skipped for its z-score, skipped at all.
        """
        cfg, nonfinite = self.config, m.nonfinite
        skip_z = torch.zeros((), dtype=torch.bool, device=self.device)
        if cfg.skip_threshold is not None:
            skip_z = (d.norm_z >= cfg.skip_threshold).any() & ~nonfinite
        own_nonfinite = self.scaler is None  # with a scaler, overflow is the scaler's job
        if own_nonfinite and cfg.nonfinite == "zero":
            self._editor.zero_where_(m, nonfinite)  # one extra pass, no sync for any optimizer
        own_skip = own_nonfinite and cfg.nonfinite == "skip"
        if self._gate is not None and (own_skip or cfg.skip_threshold is not None):
            # (A gate made only to carry the clipping coefficient arms no flag, so a
            # fused optimizer's first step does not read one on the host.)
            flag = skip_z | nonfinite if own_skip else skip_z
            self._gate.arm(flag)
            # Kept to tell whether optimizer.step() ran before the next monitor step
            # (the gate consumes the flag), except where the optimizer's step may rightly
            # not run: a GradScaler skips it on overflow.
            if self.scaler is None:
                self._armed = flag
        skipped = skip_z | nonfinite if self._handles_nonfinite else skip_z
        return skip_z, skipped

    def _record(self, m: Measurement, d: Detection, decision: Decision, skip_z: Tensor,
                skipped: Tensor, context: dict[str, Tensor]) -> StepResult:
        """Write the step's row into the device buffer; flush every ``log_every``."""
        n, present, nonfinite = self.layers.num_layers, m.present, m.nonfinite
        action = torch.where(
            skipped,
            SKIP,
            torch.where(decision.value_clipped, CLIP_VALUE,
                        torch.where(decision.norm_clipped, CLIP_NORM, NONE)),
        )
        row = self._layout.build(
            {
                "global_norm": m.global_norm,
                "clipped_norm": F.global_norm_of(decision.layer_norm),
                "threshold": nan_if_inf(decision.threshold),
                "action": action,
                "explosion": d.explosion & ~nonfinite,
                "nonfinite": nonfinite,
                "amp": self._amp_flag,
                "z": d.norm_z[0],
                "typical_norm": d.mean[0].exp(),
                "coef": decision.coef,
                "skip_z": skip_z,
                "z_limit": d.event_limit[0],
                "drift": d.drift & ~nonfinite,
                "drift_steps": d.drift_steps,
                "drift_growth": d.drift_growth,
                "bounding": d.bounding,
                **context,  # loss, lr
            },
            {
                "grad_norm": torch.where(present, m.layer_norm, self._no_ratio),
                "clipped_norm": torch.where(present, decision.layer_norm, self._no_ratio),
                "z": d.norm_z[1:],
                "typical_norm": d.mean[1 : n + 1].exp(),
                "norm_threshold": nan_if_inf(d.norm_threshold[1:]),
                "max_abs": torch.where(present, m.layer_max, self._no_ratio),
                "concentration": torch.where(present, m.concentration, self._no_ratio),
                "concentration_z": d.concentration_z,
                "value_threshold": decision.value_threshold,
                "z_limit": d.event_limit[1:],
                "flagged": d.flagged[1:] & ~nonfinite,
                "present": present,
                "update_ratio": self._no_ratio,  # filled in after optimizer.step()
            },
        )
        self._transfer.push(row)
        if self._updates is not None and self._transfer.pending == 1:
            self._ratio_step = self._step
            self._gate.measure_next(self._updates)
        result = StepResult(self._step, row, self._layout, self.layers.names)
        self._step += 1
        if self._transfer.full:
            self.flush()
        return result

    def _take_update_ratio(self, ratio: Tensor) -> None:
        """Write the update ratio of the optimizer step just taken into the row of the
        monitor step before it, if that row still waits in the device buffer."""
        with self._lock:
            pending = self._transfer.pending
            if pending == 0 or self._step - pending != self._ratio_step:
                return
            layer = self._layout.layer
            row = self._transfer.rows[0]
            row[layer["update_ratio"]] = torch.where(row[layer["present"]] > 0, ratio, math.nan)

    # ------------------------------------------------------------------ host side
    def flush(self) -> None:
        """Copy the buffered rows to the host (one transfer; synchronises)."""
        with self._lock:
            if self._transfer.pending == 0:
                return
            first = self._step - self._transfer.pending
            rows_np, host_extras = self._transfer.take()
            steps = np.arange(first, self._step, dtype=np.int64)
            new = self._history.add(steps, rows_np)
            if len(self._reporters):
                self._reporters.call("report", Chunk(steps, rows_np, new, host_extras,
                                                     self._layout, self.layers.names))
            if not self._handles_nonfinite and not self._warned_unhandled:
                bad = [e["step"] for e in new if e["kind"] == "nonfinite"]
                if bad:
                    self._warned_unhandled = True
                    warnings.warn(
                        f"gradwatch: NaN/Inf gradients at step {bad[0]} were left as they are "
                        "because no optimizer was given to skip the step; pass it, "
                        "gradwatch.attach(model, optimizer), or use nonfinite='zero'",
                        stacklevel=4,  # flush <- _record <- step <- the training loop
                    )

    def history(self):
        """Per-layer, per-step records as a long pandas DataFrame.

        Columns: ``step``, ``layer``, ``grad_norm`` (pre-clip), ``clipped_norm``,
        ``z`` (z-score of the log norm; 0 during warm-up), ``typical_norm``,
        ``norm_threshold``, ``max_abs``, ``concentration`` (max |g| / RMS of g),
        ``concentration_z``, ``value_threshold`` (``inf`` when not value-clipped),
        ``flagged``, ``update_ratio`` (``||w_new - w|| / ||w||`` of the optimizer step
        after the first step of each logging interval; NaN elsewhere). A layer
        without gradients at a step has no row for it.
        """
        self.flush()
        return self._history.layer_table()

    def _repr_html_(self) -> str:
        """The run so far, as a notebook displays it: status, steps, clip rate, events
        and the worst layers (flushes first: one host transfer)."""
        from .report.notebook import run_html
        from .run_record import RunData

        meta = {"status": "running" if self._attached else "detached",
                "layers": self.layers.describe(), "config": self.config.to_dict()}
        run = RunData(meta, self.steps(), self.history(), self.events())
        where = f" recording to {self.run_dir}" if self.run_dir is not None else ""
        return run_html(run, title=f"gradwatch monitor{where}")

    def steps(self):
        """Per-step model-level records as a pandas DataFrame (one row per step).

        Columns: ``step``, then the fields of :data:`gradwatch.rows.STEP_FIELDS`,
        ending with the training context: ``loss`` (as passed to :meth:`step`, NaN where
        none was) and ``lr`` (the first parameter group's, NaN without an optimizer),
        both fp32.
        """
        self.flush()
        return self._history.step_table()

    def events(self):
        """Detected events as a pandas DataFrame.

        Columns: ``step``, ``kind`` (``explosion``, ``drift``, ``nonfinite``,
        ``amp_overflow``),
        ``layer`` (the most anomalous layer), ``layers`` (all of them, comma-joined),
        ``action``, ``reason`` (what was seen and done, with the numbers), ``z``,
        ``global_norm``, ``threshold``.
        """
        self.flush()
        return self._history.event_table()

    def recent_quantiles(self, q: float) -> dict[str, float]:
        """The ``q``-quantile (0-1) of each layer's recent gradient norms (synchronises)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q!r} must be in [0, 1]")
        values = self._detector.quantile(q).cpu().tolist()
        return dict(zip(("(model)",) + self.layers.names, values))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to make the same decisions (versioned)."""
        with self._lock:
            self.flush()
            return {
                "version": STATE_VERSION,
                "step": self._step,
                "layers": list(self.layers.names),
                "layer_numel": [rec["numel"] for rec in self.layers.describe()],
                "config": self.config.to_dict(),
                "detector": self._detector.state_dict(),
                "events": [dict(e) for e in self._history.events],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the model must have the same layers.

        Everything is checked before anything changes: a refused state leaves the
        monitor exactly as it was (and warns of nothing).

        Raises:
            ValueError: naming what is wrong: not a monitor's state, an unsupported
                version, a missing key or a malformed value, another model's layers or
                shapes, another window size.
        """
        with self._lock:
            detector = check_monitor_state(state, self.layers, STATE_VERSION)
            self._detector.check_state(detector)
            self.flush()  # rows already measured belong to the steps before the restore
            self._detector.load_state_dict(detector)
            self._step = int(state["step"])
            self._history.events = [dict(e) for e in state.get("events", [])]
            self._guard.forget()  # a restore is not a repeated step
            self._reporters.call("resumed", self._step)
            differing = sorted(k for k, v in state.get("config", {}).items()
                               if self.config.to_dict().get(k) != v)
            if differing:
                warnings.warn(
                    f"gradwatch: resuming with a different config ({', '.join(differing)}); "
                    "decisions after resume may differ from the original run",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ reporters
    def add_reporter(self, reporter: Reporter) -> None:
        """Report this monitor's records to ``reporter`` from now on.

        Its ``start`` runs now (an exception there propagates: a reporter that cannot
        start is a configuration error); later failures only warn.
        """
        reporter.start(self._run_info())
        every = getattr(reporter, "probe_every", None)
        if every is not None:
            if not isinstance(every, int) or isinstance(every, bool) or every < 1:
                raise ValueError(f"{type(reporter).__name__}.probe_every={every!r} must be "
                                 "an integer >= 1 or None")
            self._transfer.add_probe(reporter, every)
        self._reporters.reporters.append(reporter)
        exit_hooks.register(self, self._close_at_exit)

    def _run_info(self) -> RunInfo:
        return RunInfo(
            layer_names=self.layers.names,
            layers=self.layers.describe(),
            config=self.config,
            layer_z_threshold=self.layer_z_threshold,
            layer_clip_z=self.layer_clip_z,
            first_step=self._step,
        )

    def _close_at_exit(self, error: str | None) -> None:
        # A step may be running in another thread (a daemon training thread goes on
        # while the exit hooks run): close after it, so the record ends with its rows
        # and says how the program ended; a later step is then a no-op. Waiting is
        # bounded: a step that does not finish leaves the record unclosed, never a hang.
        if not self._lock.acquire(timeout=EXIT_WAIT_S):
            warnings.warn(
                f"gradwatch: a monitor step in another thread did not finish within "
                f"{EXIT_WAIT_S:g} s of interpreter exit; its records are left unclosed",
                stacklevel=2,
            )
            return
        try:
            self._exit_error = error
            self._closed_at_exit = True
            self.detach()
        finally:
            self._lock.release()

    def detach(self, error: str | None = None) -> None:
        """Flush records, close the reporters and release the optimizer and the model.

        ``step()`` may not be called after. A monitor with reporters (the run record,
        W&B) is otherwise kept alive until interpreter exit, where it is flushed (after
        a step in flight in another thread; a step there after that records nothing).

        Args:
            error: the type name of an exception that ended training and was caught
                (a framework's exception hook, a notebook cell): the reporters close the
                run as crashed with it. By default a run is recorded as crashed only at
                interpreter exit after an uncaught exception.
        """
        with self._lock:  # after a step in flight in another thread, never within it
            if not self._attached:
                return
            self.flush()
            self._reporters.call("close", error if error is not None else self._exit_error)
            if self._gate is not None:
                self._gate.remove()
                self._gate = None
            self._attached = False
            exit_hooks.unregister(self)

    @property
    def exit_error(self) -> str | None:
        """At interpreter exit after an uncaught exception: its type's name (the
        reporters closing then record a crash); otherwise ``None``."""
        return self._exit_error

    @property
    def run_dir(self) -> str | None:
        """The directory of this monitor's run record, if it keeps one."""
        return self._reporters.run_dir()

    @property
    def memory_bytes(self) -> int:
        """Device memory the monitor holds: its statistics and the row buffer."""
        state = self._detector.state_dict()
        tensors = [*state["stats"].values(), *state["window"].values(), self._transfer.rows]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_steps(self) -> int:
        """How many times :meth:`step` has run (including before a resume)."""
        return self._step

    def __repr__(self) -> str:
        return (
            f"GradMonitor(layers={self.layers.num_layers}, clip={self.config.clip!r}, "
            f"step={self._step})"
        )


def _check_types(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model={type(model).__name__} is not a torch.nn.Module; pass the module "
            "being trained"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer; pass "
            "the optimizer you call step() on, or None"
        )


def _layer_table(model: nn.Module, config: MonitorConfig) -> LayerTable:
    layers = LayerTable.from_model(model, config)
    complex_params = [n for n, p in zip(layers.param_names, layers.params) if p.is_complex()]
    if complex_params:
        raise ValueError(
            f"model has complex parameters ({', '.join(complex_params[:3])}): gradwatch "
            "monitors real-valued gradients; view them as real pairs "
            "(torch.view_as_real) or attach to a submodule without them"
        )
    return layers
