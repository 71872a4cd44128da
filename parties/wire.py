"""What the parties exchange outside the protocols: JSON control messages, masked weights and
streamed offline material. Everything is a framed message (no pickle): JSON travels as UTF-8 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch

from permllm.errors import ProtocolError
from protocols.material import MaterialRecord

MAX_JSON_BYTES = 1 << 20
MAX_RECORD_HEADER = 4096
SETUP_TIMEOUT_S = 900.0
"""Receives during set-up wait this long: the other side may be loading a model or dealing."""


def send_json(channel, tag: str, message: dict) -> None:
    channel.send(tag, json.dumps(message, sort_keys=True).encode("utf-8"))


def recv_json(channel, tag: str, *, timeout: float | None = SETUP_TIMEOUT_S) -> dict:
    raw = channel.recv_bytes(tag, max_len=MAX_JSON_BYTES, timeout=timeout)
    try:
        message = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{channel.peer} sent a malformed {tag!r} message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{channel.peer} sent a {tag!r} message that is not a JSON object")
    if "error" in message:
        raise ProtocolError(f"{channel.peer} ended the session: {message['error']}")
    return message


def require(message: dict, key: str, kind: type, sender: str, tag: str):
    """message[key], which must be of `kind` (int excludes bool); ProtocolError naming the sender,
    the message and the field otherwise."""
    value = message.get(key)
    ok = type(value) is int if kind is int else isinstance(value, kind)
    if not ok:
        raise ProtocolError(f"the {sender}'s {tag!r} message has no valid {key!r} field (got {value!r:.60})")
    return value


def send_record(channel, record: MaterialRecord) -> None:
    names = sorted(record.tensors)
    channel.send("mat", f"{record.index}\t{record.kind}\t{record.key}\t{','.join(names)}".encode("ascii"))
    for name in names:
        channel.send("mat.t", record.tensors[name])


def finish_records(channel, count: int) -> None:
    channel.send("mat", f"end\t{count}".encode("ascii"))


def await_receipt(channel, count: int, *, timeout: float = SETUP_TIMEOUT_S) -> None:
    """Wait until the receiver confirms it has all `count` records. The sender must not close before:
    ZeroMQ drops what is still queued when a socket closes, and a receiver busy elsewhere (a user
    taking in 1.3 GB of masked weights over a slow link) may start reading only minutes later."""
    raw = channel.recv_bytes("mat.ok", max_len=32, timeout=timeout)
    if raw != str(count).encode("ascii"):
        raise ProtocolError(f"the {channel.peer} confirmed {raw[:32]!r} material records, {count} were sent")


def abort_records(channel, reason: str) -> None:
    """End a material stream with an error the receiver raises (the helper refusing a session)."""
    channel.send("mat", ("error\t" + reason).encode("utf-8")[:MAX_RECORD_HEADER])


def recv_records(channel, on_record: Callable[[MaterialRecord], None], *, timeout: float = SETUP_TIMEOUT_S) -> int:
    """Receive streamed records until the end marker; returns the count. Checks call order."""
    expected = 0
    while True:
        header = channel.recv_bytes("mat", max_len=MAX_RECORD_HEADER, timeout=timeout)
        if header.startswith(b"error\t"):
            reason = header[6:].decode("utf-8", errors="replace")
            raise ProtocolError(f"the {channel.peer} ended the session: {reason}")
        try:
            fields = header.decode("ascii").split("\t")
            if fields[0] == "end" and len(fields) == 2:
                announced = int(fields[1])
                if announced != expected:
                    raise ProtocolError(f"the helper announced {announced} records but sent {expected}")
                channel.send("mat.ok", str(expected).encode("ascii"))  # the receipt the sender waits for
                return expected
            index_text, kind, key, names = fields
            index = int(index_text)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("the helper sent a malformed material record header") from None
        if index != expected:
            raise ProtocolError(f"the helper sent material for call {index}, expected call {expected}")
        tensors = {}
        for name in filter(None, names.split(",")):
            array = channel.recv("mat.t", dtype=np.int64, timeout=timeout)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        on_record(MaterialRecord(index, kind, key, tensors))
        expected += 1
