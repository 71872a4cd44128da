"""Network profiles: round-trip time and bandwidth of a simulated link."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Profile:
    """A link model. rtt_s: round-trip time in seconds (>= 0); bandwidth_bps: bit/s (> 0, inf = no limit)."""

    name: str
    rtt_s: float
    bandwidth_bps: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"profile {self.name!r}: rtt must be a finite number of seconds >= 0, got {self.rtt_s!r}")
        if math.isnan(self.bandwidth_bps) or not self.bandwidth_bps > 0:
            raise ValueError(
                f"profile {self.name!r}: bandwidth must be > 0 bit/s (inf for unlimited), got {self.bandwidth_bps!r}"
            )

    def transmit_ns(self, nbytes: int) -> int:
        """Time to put `nbytes` on the wire at this bandwidth, in ns."""
        if math.isinf(self.bandwidth_bps):
            return 0
        return round(nbytes * 8 * 1e9 / self.bandwidth_bps)

    @property
    def one_way_ns(self) -> int:
        """Propagation delay of one direction: rtt / 2, in ns."""
        return round(self.rtt_s * 1e9 / 2)


PROFILES = MappingProxyType(
    {
        "none": Profile("none", 0.0, math.inf),
        "lan": Profile("lan", 0.2e-3, 10e9),
        "wan": Profile("wan", 10e-3, 1e9),
        "wan-slow": Profile("wan-slow", 50e-3, 100e6),
    }
)


def parse_profile(spec: str | Profile) -> Profile:
    """Turn a profile name ("none", "lan", "wan", "wan-slow") or "RTT_ms,Mbit_s" (e.g. "10,1000";
    1 Mbit/s = 10^6 bit/s) into a Profile. A Profile is returned unchanged.

    Raises ValueError naming the accepted forms on anything else.
    """
    if isinstance(spec, Profile):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"network profile must be a str, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in PROFILES:
        return PROFILES[text]
    usage = f"expected one of {', '.join(PROFILES)} or 'RTT_ms,Mbit_s' such as '10,1000'"
    fields = text.split(",")
    if len(fields) != 2:
        raise ValueError(f"unknown network profile {spec!r}: {usage}")
    try:
        rtt_ms, mbit_s = (float(field) for field in fields)
    except ValueError:
        raise ValueError(f"cannot parse network profile {spec!r}: {usage}") from None
    if not (math.isfinite(rtt_ms) and rtt_ms >= 0) or math.isnan(mbit_s) or not mbit_s > 0:
        raise ValueError(f"network profile {spec!r}: need RTT_ms >= 0 (finite) and Mbit_s > 0: {usage}")
    return Profile(f"{rtt_ms:g}ms,{mbit_s:g}Mbit/s", rtt_ms / 1e3, mbit_s * 1e6)
