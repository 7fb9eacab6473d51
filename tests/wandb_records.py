"""Read an offline W&B run's transaction log (run-ID.wandb): a ':W&B' header, then LevelDB log blocks
whose records are serialized wandb_internal_pb2.Record messages. Test helper only."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # b":W&B", magic 0xBEE1 (2 bytes), version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_files(run_dir: Path) -> list[Path]:
    """The offline W&B runs' transaction logs in a run dir."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def summarize(path: Path) -> dict:
    """run id, config dict, history rows, summary dict, exit code (None: the run was never closed), from one
    run file."""
    result = {"run_id": None, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            result["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            result["history"].append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "exit":
            result["exit_code"] = rec.exit.exit_code
        elif kind == "summary":
            for item in rec.summary.update:
                result["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return result
