"""What the parties exchange outside the protocols: JSON control messages, masked weights and
streamed offline material. Everything is a framed message (no pickle): JSON travels as UTF-8 bytes.

What a peer sends here is bounded before it is used: control messages by size, nesting depth and
integer length (`parse_json`), material streams by record count, tensors per record and header size
(`recv_records`); every violation is a ProtocolError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import torch

from permllm.errors import ProtocolError
from protocols.material import MaterialRecord

MAX_JSON_BYTES = 64 << 10
"""Largest control message accepted (hello, plans, welcome: a few hundred bytes to a few KiB)."""
CONTROL_RECEIVE_BYTES = MAX_JSON_BYTES
"""The receive cap (`max_receive_bytes`, ZMQ_MAXMSGSIZE) of a channel whose peer sends only control
messages: the helper's channels, which carry plans, seeds and receipts in and bulk material out."""
MAX_JSON_DEPTH = 16
MAX_JSON_INT_DIGITS = 40
MAX_RECORD_HEADER = 4096
MAX_RECORDS = 1 << 24
"""Most material records one stream may carry unless the caller states a tighter bound."""
MAX_RECORD_TENSORS = 64
SETUP_TIMEOUT_S = 900.0
"""Receives during set-up wait this long: the other side may be loading a model or dealing."""

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DIGITS = re.compile(r"[0-9]{1,20}")


def send_json(channel, tag: str, message: dict) -> None:
    channel.send(tag, json.dumps(message, sort_keys=True).encode("utf-8"))


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in JSON text, strings skipped (no recursion, about
    eight bytes of scratch memory per byte of text)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    steps = (skeleton == ord("[")).view(np.int8) + (skeleton == ord("{")).view(np.int8)
    steps -= (skeleton == ord("]")).view(np.int8) + (skeleton == ord("}")).view(np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits, at most {MAX_JSON_INT_DIGITS}")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, sender: str, tag: str) -> dict:
    """Parse a control message: a JSON object of at most MAX_JSON_BYTES bytes, MAX_JSON_DEPTH levels
    and MAX_JSON_INT_DIGITS-digit integers (no NaN/Infinity). Every failure is a ProtocolError."""
    if len(raw) > MAX_JSON_BYTES:
        raise ProtocolError(f"{sender} sent a {tag!r} message of {len(raw)} bytes, at most {MAX_JSON_BYTES}")
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{sender} sent a {tag!r} message nested {depth} deep, at most {MAX_JSON_DEPTH}")
    try:
        message = json.loads(raw.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError) as exc:
        raise ProtocolError(f"{sender} sent a malformed {tag!r} message: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{sender} sent a {tag!r} message that is not a JSON object")
    return message


def recv_json(channel, tag: str, *, timeout: float | None = SETUP_TIMEOUT_S) -> dict:
    """Receive a control message (see `parse_json`); a message carrying "error" raises ProtocolError."""
    raw = channel.recv_bytes(tag, max_len=MAX_JSON_BYTES, timeout=timeout)
    message = parse_json(raw, channel.peer, tag)
    if "error" in message:
        raise ProtocolError(f"{channel.peer} ended the session: {str(message['error'])[:1000]}")
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


def send_stream_seed(channel, seed: bytes | None) -> None:
    """helper -> party, first on its material stream: b"live" (the records are dealt now from the seed
    the party sent) or b"pool" + the 16-byte seed the helper dealt them from ahead of time (its pool)."""
    channel.send("mat", b"live" if seed is None else b"pool" + seed)


def recv_stream_seed(channel, own_seed: bytes, *, timeout: float = SETUP_TIMEOUT_S) -> tuple[bytes, bool]:
    """The seed this party's material stream was dealt from: (its own seed, False) for a live session,
    (the helper's seed, True) for one served from the helper's pool; ProtocolError for a refusal or a
    malformed message."""
    header = channel.recv_bytes("mat", max_len=MAX_RECORD_HEADER, timeout=timeout)
    if header.startswith(b"error\t"):
        reason = header[6:].decode("utf-8", errors="replace")
        raise ProtocolError(f"the {channel.peer} ended the session: {reason}")
    if header == b"live":
        return own_seed, False
    if header.startswith(b"pool") and len(header) == 4 + len(own_seed):
        return header[4:], True
    raise ProtocolError(f"the {channel.peer} began its material stream with a malformed seed message")


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


def _count(text: str) -> int:
    """A record index or count: 1..20 ASCII digits (no sign, space or underscore)."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"not a record count: {text[:40]!r}")
    return int(text)


def recv_records(
    channel,
    on_record: Callable[[MaterialRecord], None],
    *,
    timeout: float = SETUP_TIMEOUT_S,
    max_records: int = MAX_RECORDS,
) -> int:
    """Receive streamed records until the end marker; returns the count. Checks call order, and that
    the stream holds at most `max_records` records of at most MAX_RECORD_TENSORS tensors each
    (ProtocolError as soon as a record header goes over)."""
    expected = 0
    while True:
        header = channel.recv_bytes("mat", max_len=MAX_RECORD_HEADER, timeout=timeout)
        if header.startswith(b"error\t"):
            reason = header[6:].decode("utf-8", errors="replace")
            raise ProtocolError(f"the {channel.peer} ended the session: {reason}")
        try:
            fields = header.decode("ascii").split("\t")
            if fields[0] == "end" and len(fields) == 2:
                announced = _count(fields[1])
                if announced != expected:
                    raise ProtocolError(f"the helper announced {announced} records but sent {expected}")
                channel.send("mat.ok", str(expected).encode("ascii"))  # the receipt the sender waits for
                return expected
            index_text, kind, key, names = fields
            index = _count(index_text)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("the helper sent a malformed material record header") from None
        if index != expected:
            raise ProtocolError(f"the helper sent material for call {index}, expected call {expected}")
        if expected >= max_records:
            raise ProtocolError(f"the helper sent more than the {max_records} material records this session allows")
        names = [name for name in names.split(",") if name]
        if len(names) > MAX_RECORD_TENSORS or len(set(names)) != len(names):
            raise ProtocolError(
                f"material record {index} names {len(names)} tensors (distinct, at most {MAX_RECORD_TENSORS})"
            )
        tensors = {}
        for name in names:
            array = channel.recv("mat.t", dtype=np.int64, timeout=timeout)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        on_record(MaterialRecord(index, kind, key, tensors))
        expected += 1
