"""Network simulator: wraps any permllm Channel and delays its frames by a link profile.

from netsim import NetSim, parse_profile
channel = NetSim(ZmqChannel.connect(addr, peer="owner"), parse_profile("wan"))
"""

from netsim.clock import Clock, FakeClock, RealClock
from netsim.link import Link, NetSim
from netsim.profiles import PROFILES, Profile, parse_profile

__all__ = ["PROFILES", "Clock", "FakeClock", "Link", "NetSim", "Profile", "RealClock", "parse_profile"]
