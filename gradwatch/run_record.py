"""The durable run record: a directory a report can be built from, during or after a run.

Layout of a run directory::

    meta.json                    format, versions, config, layer table, sessions, status
                                 (running, finished, or crashed with the exception's type)
    steps/part-<session>-<first step>.parquet    one row per step
    layers/part-<session>-<first step>.parquet   one row per (step, layer)
    events/part-<session>-<first step>.parquet   one row per event

``meta.json`` is written when recording starts into a new directory, so the layer table
and config are on disk before the first step. Parts are written every ``flush_every``
steps and on exit, each to a temporary name first and then renamed: a process killed at
any moment (SIGKILL included) leaves every part either complete or absent, never
truncated.

A resumed run (a monitor restored with ``load_state_dict``) recording into the same
directory adds a session; steps it records again replace the earlier ones on load. A
directory that already holds a record is written to only by such a run: whether the
monitor resumes is known once a state is loaded or its first records arrive, and until
then nothing is written there. A fresh run is refused (:class:`RunDirError`).

Each part holds exactly the columns the recorder writes; :func:`load_run` refuses any
other file named like a part. The steps parts of runs recorded before the training
context (``loss``, ``lr``) was kept lack exactly those two columns: they load with NaN
there.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .history import event_frame, layer_frame, step_frame
from .reporters import Chunk, Reporter, ReporterRefusal, RunInfo
from .version import __version__

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "gradwatch-run"
FORMAT_VERSION = 1
TABLES = ("steps", "layers", "events")


class RunDirError(ValueError):
    """A run directory is missing, truncated, or not a gradwatch run."""


class RunDirConflict(RunDirError, ReporterRefusal):
    """A fresh run was told to record into another run's directory: raised from the
    run's first records (``monitor.step()``), which write nothing there."""


def default_run_dir(root: str | os.PathLike[str] = "gradwatch_runs") -> Path:
    """Create a new, empty ``<root>/run-<date>-<time>[-<n>]`` and return it.

    The name is claimed by ``os.mkdir``, which fails if the directory exists: processes
    starting in the same second each get their own directory (checking ``exists()``
    first and creating later would give several the same one).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _timestamp()
    n = 1
    while True:
        path = root / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            n += 1
            continue
        return path


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunRecorder(Reporter):
    """Writes a monitor's records into a run directory as Parquet parts.

    Args:
        run_dir: the directory (created if missing). One that already holds a record
            is continued only by a resumed run (see the module's docstring).
        flush_every: write a part once this many steps are buffered. The monitor
            hands records over every ``log_every`` steps, so parts hold a multiple of
            that.

    A write that fails (disk full, directory gone) keeps its records for the next try,
    but at most ``BACKLOG_PARTS`` parts' worth: beyond that the oldest are dropped,
    with one warning, so a run whose disk stays full does not grow in memory. How
    many steps were dropped is kept in ``meta.json`` (``dropped_steps``) once a write
    succeeds again.
    """

    BACKLOG_PARTS = 5

    def __init__(self, run_dir: str | os.PathLike[str], flush_every: int = 200) -> None:
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r} must be an integer >= 1")
        # Absolute: the process may change directory before the last write at exit.
        self.run_dir = Path(run_dir).absolute()
        self.flush_every = flush_every
        self.session = f"{time.time_ns():020d}"
        self._chunks: list[Chunk] = []
        self._buffered = 0
        self._meta: dict[str, Any] = {}
        self._config: dict[str, Any] = {}
        # The directory holds a record and this run has not said yet whether it resumes
        # it: nothing is written until it does (resumed) or its records arrive (refused).
        self._undecided = False
        self._refused: str | None = None
        self._dropped = 0

    # ------------------------------------------------------------------ Reporter
    def start(self, run: RunInfo) -> None:
        self._config = run.config.to_dict()
        if (self.run_dir / "meta.json").exists():
            meta = read_meta(self.run_dir)
            if [rec["layer"] for rec in meta["layers"]] != [rec["layer"] for rec in run.layers]:
                raise RunDirError(
                    f"{self.run_dir} holds the record of a model with other layers; record "
                    "into a new directory (run_dir=...)"
                )
            # The state is loaded after attach: a resume is known only later.
            self._undecided = True
            return
        self._open({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gradwatch_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self._config,
            "layers": run.layers,
            "layer_z_threshold": run.layer_z_threshold,
            "layer_clip_z": run.layer_clip_z,
            "sessions": [],
        }, run.first_step)

    def _open(self, meta: dict[str, Any], first_step: int) -> None:
        """Add this session to ``meta`` and write it: from here on the run records."""
        for table in TABLES:
            (self.run_dir / table).mkdir(parents=True, exist_ok=True)
        meta["sessions"].append({"id": self.session, "first_step": first_step,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "config": self._config})
        meta["status"] = "running"
        meta.pop("error", None)  # a crash of an earlier session
        meta["last_step"] = first_step - 1
        self._meta = meta
        _write_json_atomic(self.run_dir / "meta.json", meta)

    def resumed(self, step: int) -> None:
        """The monitor was restored from a checkpoint: this session starts at its step,
        and on load its records replace anything recorded from that step on."""
        if self._refused is not None:
            return
        if self._undecided:  # continue the record already there
            self._undecided = False
            self._open(read_meta(self.run_dir), step)
            return
        self._meta["sessions"][-1]["first_step"] = step
        self._meta["last_step"] = step - 1
        _write_json_atomic(self.run_dir / "meta.json", self._meta)

    def _refuse(self) -> None:
        self._undecided = False
        self._refused = (
            f"{self.run_dir} already holds the record of another run, and this run did not "
            "resume it (no monitor.load_state_dict before its first step), so nothing of "
            "this run is recorded there; record into a new directory (run_dir=<a new "
            "path>) or let gradwatch make one (run_dir=True)"
        )

    def report(self, chunk: Chunk) -> None:
        if self._undecided:  # records, and no state was loaded: a fresh run
            self._refuse()
        if self._refused is not None:
            raise RunDirConflict(self._refused)
        self._chunks.append(chunk)
        self._buffered += len(chunk.steps)
        if self._buffered >= self.flush_every:
            try:
                self._write()
            except Exception:
                self._shed()
                raise

    def _shed(self) -> None:
        """Drop the oldest records beyond the backlog a failing disk may hold."""
        limit = self.BACKLOG_PARTS * self.flush_every
        dropped = 0
        while self._buffered > limit and len(self._chunks) > 1:
            chunk = self._chunks.pop(0)
            self._buffered -= len(chunk.steps)
            dropped += len(chunk.steps)
        if dropped and not self._dropped:
            warnings.warn(
                f"gradwatch: the run record in {self.run_dir} cannot be written, and more "
                f"than {limit} steps are waiting in memory; the oldest are dropped from "
                "now on (meta.json's dropped_steps counts them once writing works "
                "again). Free the disk or fix the directory to keep the rest.",
                stacklevel=4,
            )
        self._dropped += dropped

    def close(self, error: str | None) -> None:
        if self._undecided or self._refused is not None:
            return  # nothing of this run was written: leave the other run's record as it is
        self._write()
        self._meta["status"] = "crashed" if error else "finished"
        if error:
            self._meta["error"] = error
        _write_json_atomic(self.run_dir / "meta.json", self._meta)

    # ------------------------------------------------------------------ writing
    def _write(self) -> None:
        if not self._chunks:
            return
        chunks = self._chunks
        steps = np.concatenate([c.steps for c in chunks])
        rows = np.concatenate([c.rows for c in chunks])
        events = [e for c in chunks for e in c.events]
        layout, names = chunks[0].layout, chunks[0].layer_names
        name = f"part-{self.session}-{int(steps[0]):012d}.parquet"
        frames = {
            "events": event_frame(events),
            "layers": layer_frame(layout, names, steps, rows),
            "steps": step_frame(layout, steps, rows),  # last: marks the part complete
        }
        for table, frame in frames.items():
            path = self.run_dir / table / name
            tmp = path.with_name(path.name + ".tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        # Only now: a write that failed (disk full) keeps its records for the next try.
        self._chunks, self._buffered = [], 0
        self._meta["last_step"] = int(steps[-1])
        if self._dropped:
            self._meta["dropped_steps"] = self._dropped
        _write_json_atomic(self.run_dir / "meta.json", self._meta)


# ---------------------------------------------------------------------- reading
@dataclass
class RunData:
    """A run directory read back: its metadata and three tables."""

    meta: dict[str, Any]
    steps: pd.DataFrame
    layers: pd.DataFrame
    events: pd.DataFrame


def read_meta(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``meta.json``; raise :class:`RunDirError` with one line if bad."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    path = run_dir / "meta.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a gradwatch run directory (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        detail = getattr(err, "msg", type(err).__name__)
        raise RunDirError(f"{path}: truncated or not JSON ({detail})") from None
    except OSError as err:
        raise RunDirError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunDirError(f"{path}: not a gradwatch run (format is not {FORMAT!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise RunDirError(
            f"{path}: run format version {meta.get('format_version')!r} is newer than this "
            f"gradwatch reads ({FORMAT_VERSION}); upgrade gradwatch"
        )
    for key, kind in (("layers", list), ("config", dict), ("sessions", list)):
        if not isinstance(meta.get(key), kind):
            raise RunDirError(f"{path}: incomplete metadata ({key!r} missing or malformed)")
    if not all(isinstance(rec, dict) and "layer" in rec for rec in meta["layers"]):
        raise RunDirError(f"{path}: incomplete metadata ('layers' malformed)")
    return meta


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory (complete, still running, or left by a crash).

    Returns:
        :class:`RunData` with ``steps`` (one row per step), ``layers`` (one row per
        step and layer), ``events``, and ``meta``.

    Raises:
        RunDirError: the directory is missing, not a gradwatch run, or a part is
            truncated or foreign (the message is one line naming the file).
    """
    import pandas as pd

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    # A part is complete once its steps file exists (it is written last).
    complete = {p.name for p in (run_dir / "steps").glob("part-*.parquet")}
    firsts = _session_first_steps(meta, complete)
    keys = {"steps": ["step"], "layers": ["step", "layer"], "events": ["step", "kind"]}
    names = [rec["layer"] for rec in meta["layers"]]
    tables = {}
    for table in TABLES:
        parts = sorted(
            (p for p in (run_dir / table).glob("part-*.parquet") if p.name in complete),
            key=_part_key,
        )
        frames = []
        for part in parts:
            frame = _read_part(part, table, names)
            # A later session (a resume from a checkpoint) re-records from its first
            # step: this session's rows from there on are superseded.
            cutoff = min((f for sid, f in firsts.items() if sid > _part_key(part)[0]),
                         default=None)
            if cutoff is not None:
                frame = frame[frame["step"] < cutoff]
            frames.append(frame)
        frames = [f for f in frames if len(f)]
        if frames:
            df = pd.concat(frames, ignore_index=True)
            # One session's parts hold each step once, in order (a part's rows by step,
            # then by layer in model order): sorting and deduplicating millions of layer
            # rows would change nothing. Sessions (resumes) may overlap; events are
            # few, and ordered by kind within a step.
            if (table == "events" or len(firsts) > 1
                    or not df["step"].is_monotonic_increasing):
                df = df.drop_duplicates(subset=keys[table], keep="last")
                df = df.sort_values(keys[table], kind="stable").reset_index(drop=True)
        else:
            df = _empty(table)
        if table == "layers":
            # Recoded to this run's layers in model order: no string per row.
            layer = df["layer"]
            if not isinstance(layer.dtype, pd.CategoricalDtype):
                layer = layer.astype(str)
            df["layer"] = pd.Categorical(layer, categories=names)
        tables[table] = df
    return RunData(meta=meta, steps=tables["steps"], layers=tables["layers"],
                   events=tables["events"])


def _session_first_steps(meta: dict[str, Any], parts: set[str]) -> dict[str, int]:
    """First step of every session: from meta.json, else from its earliest part."""
    firsts: dict[str, int] = {}
    for name in parts:
        sid, first = _part_key(Path(name))
        firsts[sid] = min(first, firsts.get(sid, first))
    for session in meta["sessions"]:
        if isinstance(session, dict) and isinstance(session.get("first_step"), int):
            firsts[str(session.get("id"))] = session["first_step"]
    return firsts


def _part_key(path: Path) -> tuple[str, int]:
    """(session id, first step) from ``part-<session>-<first>.parquet``; session ids are
    zero-padded nanosecond clocks, so they sort in the order the sessions started."""
    parts = path.stem.split("-")
    try:
        return parts[1], int(parts[2])
    except (IndexError, ValueError):
        raise RunDirError(f"{path}: not a gradwatch part (unexpected file name)") from None


def _read_part(path: Path, table: str, layer_names: list[str]):
    """Read one part and check it is what the recorder writes into ``table``: exactly
    its columns, an integer step, numbers where it writes numbers, and actions and
    layers of this run. Anything else (a foreign file named like a part, a directory)
    raises :class:`RunDirError` naming the file."""
    import pandas as pd

    if not path.is_file():
        raise RunDirError(f"{path}: not a gradwatch part (not a file)")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise RunDirError(
            f"{path}: truncated or not a Parquet file ({type(err).__name__})"
        ) from None
    expected = _columns(table)
    if list(frame.columns) in _earlier_columns(table):
        # Written before the newer optional columns existed: NaN there ("not recorded").
        frame = frame.reindex(columns=expected)
    if list(frame.columns) != expected:
        missing = [c for c in expected if c not in frame.columns]
        extra = [str(c) for c in frame.columns if c not in expected]
        what = "; ".join(
            f"{label} {_some(cols)}"
            for label, cols in (("lacks", missing), ("has unexpected", extra)) if cols
        ) or "columns in another order"
        raise RunDirError(f"{path}: not a gradwatch {table} part ({what})")
    if len(frame) == 0:
        return frame  # an empty table has no types to check (events of a calm stretch)
    problem = _malformed(frame, table, layer_names)
    if problem:
        raise RunDirError(f"{path}: not a gradwatch {table} part ({problem})")
    return frame


def _malformed(frame, table: str, layer_names: list[str]) -> str | None:
    """What is wrong with a part's values, if anything."""
    import pandas as pd
    from pandas.api.types import is_integer_dtype, is_numeric_dtype

    from .rows import ACTIONS

    if not is_integer_dtype(frame["step"]):
        return f"column 'step' is {frame['step'].dtype}, not integers"
    if (frame["step"] < 0).any():
        return "column 'step' holds negative steps"
    allowed = {"action": ACTIONS, "layer": layer_names} if table != "events" else {}
    text = ("kind", "layer", "layers", "action", "reason") if table == "events" else ()
    for col in frame.columns[1:]:
        values = frame[col]
        if col in allowed:
            # As written, a categorical: its categories say it all, without a pass
            # over the rows.
            present = (values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype)
                       else values.dropna().unique())
            unknown = set(present) - set(allowed[col])
            if unknown or values.isna().any():
                shown = _some(sorted(map(str, unknown))) if unknown else "a missing value"
                return f"column {col!r} holds {shown}, not one of this run's"
        elif col in text:
            if not all(isinstance(v, str) for v in values):
                return f"column {col!r} is not text"
        elif not is_numeric_dtype(values):
            return f"column {col!r} is {values.dtype}, not numbers"
    return None


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _columns(table: str) -> list[str]:
    """The columns the recorder writes into ``table``, in order."""
    from .events import EVENT_COLUMNS
    from .rows import LAYER_FIELDS, STEP_FIELDS

    if table == "steps":
        return ["step", *STEP_FIELDS]
    if table == "layers":
        return ["step", "layer", *[f for f in LAYER_FIELDS if f != "present"]]
    return list(EVENT_COLUMNS)


def _earlier_columns(table: str) -> list[list[str]]:
    """The columns earlier recorders wrote into ``table`` that still load (the newer
    ones filled with NaN): the steps before ``loss`` and ``lr`` were recorded, the
    layers before ``update_ratio`` was."""
    from .rows import LATER_LAYER_FIELDS, LATER_STEP_FIELDS

    later = {"steps": LATER_STEP_FIELDS, "layers": LATER_LAYER_FIELDS}.get(table)
    if later is None:
        return []
    return [[c for c in _columns(table) if c not in later]]


def _empty(table: str):
    import pandas as pd

    return pd.DataFrame(columns=_columns(table))
