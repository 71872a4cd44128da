"""Message transport between parties: one `Channel` interface, in-memory and ZeroMQ implementations.

Frames are a fixed little-endian header plus the raw payload bytes (see `frames`); nothing is pickled.
"""

from permllm.transport.channel import (
    DEFAULT_TIMEOUT_S,
    Channel,
    ChannelStats,
    FlightClock,
    Received,
    to_wire_array,
)
from permllm.transport.frames import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Header,
    check_payload,
    decode_header,
    encode_header,
)
from permllm.transport.memory import MemoryChannel
from permllm.transport.wrapper import WrappingChannel
from permllm.transport.zmq_channel import ZmqChannel

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DEFAULT_TIMEOUT_S",
    "Channel",
    "ChannelStats",
    "FlightClock",
    "Header",
    "MemoryChannel",
    "Received",
    "WrappingChannel",
    "ZmqChannel",
    "check_payload",
    "decode_header",
    "encode_header",
    "to_wire_array",
]
