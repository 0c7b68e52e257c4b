"""Read back what W&B wrote offline (for the tracking tests): the records of a run's transaction
log, <run dir>/wandb/offline-run-*/run-<id>.wandb, which wandb's core writes in the LevelDB log
format (32 KiB blocks of checksummed chunks) after a ':W&B' header; each record is a protobuf
`Record` of wandb's own schema (wandb.proto)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ':W&B' + magic (2 bytes) + version (1 byte), then chunks of crc (4) + length (2) + type (1)


def _chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", f"not a W&B transaction log: {data[:8]!r}"
    pos, out, partial = HEADER, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        body = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind == 1:  # full
            out.append(body)
        elif kind == 2:  # first
            partial = body
        elif kind == 3:  # middle
            partial += body
        elif kind == 4:  # last
            out.append(partial + body)
            partial = b""
    return out


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row of every offline run under run_dir/wandb, in file order: {key: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for body in _chunks(log.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(body)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def run_ids(run_dir: Path) -> set[str]:
    return {p.stem.removeprefix("run-") for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}
