"""Reading back what W&B wrote offline: a run's `.wandb` file is a LevelDB-style log of protobuf `Record`s (W&B's
own transaction log, what `wandb sync` uploads). The wandb package ships the message types but, since its Go
core, no Python reader, so the tests read the log format here (32 KiB blocks; each chunk: crc32, length, type)."""
from __future__ import annotations

import json
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, out, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(recs) -> list[dict]:
    """Each history record as {key: value} (with `_step`)."""
    rows = []
    for rec in recs:
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def of_type(recs, kind: str) -> list:
    return [getattr(rec, kind) for rec in recs if rec.WhichOneof("record_type") == kind]
