"""Read an offline W&B run's transaction log (``run-<id>.wandb``) back into Python.

The file is a 7-byte header (``:W&B``, ``0xBEE1`` little-endian, version 0) followed by
LevelDB-log records in 32 KiB blocks: ``<crc32 u32, length u16, type u8>`` then the
payload, types FULL=1, FIRST=2, MIDDLE=3, LAST=4. Each reassembled payload is a
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    records, pending = [], b""
    pos = HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        records.append(rec)
        pending = b""
    return records


@dataclass
class OfflineRun:
    """What an offline run logged: history rows, alerts, summary, config."""

    history: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    exited: bool = False


def _key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def parse_run(path: str) -> OfflineRun:
    run = OfflineRun()
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "alert":
            a = rec.alert
            run.alerts.append({"title": a.title, "text": a.text, "level": a.level})
        elif kind == "summary":
            for i in rec.summary.update:
                run.summary[_key(i)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                run.config[_key(i)] = json.loads(i.value_json)
        elif kind == "metric":
            run.metrics.append(rec.metric)
        elif kind == "exit":
            run.exited = True
    return run


def find_run_file(wandb_dir: str) -> str:
    files = glob.glob(os.path.join(wandb_dir, "offline-run-*", "run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline run under {wandb_dir}, found {files}")
    return files[0]


def wait_for_exit(path: str, timeout: float = 30.0) -> OfflineRun:
    """Parse the run once its exit record is written (run.finish() can return first)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            run = parse_run(path)
        except DecodeError:
            # Read while wandb-core was writing a record: read again, unless time is up.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if run.exited or time.monotonic() > deadline:
            return run
        time.sleep(0.2)
