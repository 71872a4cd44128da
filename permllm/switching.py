"""A Waksman-style switching network for any n, its routing for a permutation, and its evaluation.

Network of size k (wires in, wires out; a switch with bit 0 passes (in0, in1) -> (out0, out1), with
bit 1 it crosses them)::

    k = 1: a wire;  k = 2: one switch
    k >= 3, h = k // 2: input switches on the pairs (2i, 2i + 1), i < h, out0 to the upper subnetwork
    (size h), out1 to the lower one (size k - h; for odd k input k - 1 goes to it directly);
    output switches (upper_i, lower_i) -> outputs (2i, 2i + 1) for i < h (odd k; output k - 1 is the
    lower's last) or i < h - 1 (even k: outputs k - 2, k - 1 are the subnetworks' last, no switch).

Switch count S(k) = 2 floor(k/2) - [k even] + S(floor(k/2)) + S(ceil(k/2)): Waksman's
k log2 k - k + 1 for a power of two (17 for 8, 20,481 for 2048); 14,849 for 1536, 4,737 for 576.
Switches are numbered in creation order (input switches, upper, lower, output switches), a
topological order: a single pass over them evaluates the network.

Routing (the looping algorithm) colours the inputs upper/lower so that both inputs of an input switch
and both sources of an output switch differ in colour; for even k the last output's source is
coloured lower (the omitted switch). It runs in numba over the subnetworks in preorder.

Permutations are gathers: output j carries input perm[j].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numba
import numpy as np

from permllm.errors import ConfigError
from permllm.kernels import is_permutation

__all__ = ["MAX_SIZE", "Network", "apply", "chooser_pass", "network", "route", "sender_pass", "switch_count"]

MAX_SIZE = 1 << 18
"""Largest network size n."""


@cache
def switch_count(k: int) -> int:
    """Number of switches of the size-k network."""
    if k <= 1:
        return 0
    if k == 2:
        return 1
    h = k // 2
    return 2 * h - (1 - k % 2) + switch_count(h) + switch_count(k - h)


@dataclass(frozen=True)
class Network:
    """The wiring of one network: switch s reads wires (in0[s], in1[s]) and writes (out0[s], out1[s]);
    wires 0..n-1 are the inputs, ``outputs[j]`` the wire of output j."""

    n: int
    switches: int
    wires: int
    in0: np.ndarray
    in1: np.ndarray
    out0: np.ndarray
    out1: np.ndarray
    outputs: np.ndarray
    node_size: np.ndarray  # the subnetworks in preorder, with their first input / output switch,
    node_in: np.ndarray  # their upper and lower children and the offset of their local
    node_out: np.ndarray  # permutation in the routing scratch buffer
    node_upper: np.ndarray
    node_lower: np.ndarray
    node_offset: np.ndarray
    scratch: int


class _Builder:
    def __init__(self, n: int) -> None:
        self.wires = n
        self.switches = 0
        self.ins0, self.ins1, self.outs0, self.outs1 = [], [], [], []
        self.nodes: list[list[int]] = []
        self.scratch = 0

    def _switches(self, in0: np.ndarray, in1: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        count = in0.shape[0]
        first = self.switches
        out = np.arange(self.wires, self.wires + 2 * count, dtype=np.int64)
        self.wires += 2 * count
        self.switches += count
        self.ins0.append(in0)
        self.ins1.append(in1)
        self.outs0.append(out[0::2])
        self.outs1.append(out[1::2])
        return first, out[0::2], out[1::2]

    def build(self, wires: np.ndarray) -> np.ndarray:
        k = wires.shape[0]
        node = [k, -1, -1, -1, -1, self.scratch]
        self.nodes.append(node)
        self.scratch += k
        if k == 1:
            return wires
        if k == 2:
            node[1], o0, o1 = self._switches(wires[:1], wires[1:])
            return np.concatenate([o0, o1])
        h, odd = k // 2, k % 2
        node[1], upper_in, lower_in = self._switches(wires[0 : 2 * h : 2], wires[1 : 2 * h : 2])
        if odd:
            lower_in = np.concatenate([lower_in, wires[k - 1 :]])
        node[3] = len(self.nodes)
        upper_out = self.build(upper_in)
        node[4] = len(self.nodes)
        lower_out = self.build(lower_in)
        n_out = h if odd else h - 1
        node[2], o0, o1 = self._switches(upper_out[:n_out], lower_out[:n_out])
        out = np.empty(k, dtype=np.int64)
        out[0 : 2 * n_out : 2], out[1 : 2 * n_out : 2] = o0, o1
        if odd:
            out[k - 1] = lower_out[h]
        else:
            out[k - 2], out[k - 1] = upper_out[h - 1], lower_out[h - 1]
        return out


@lru_cache(maxsize=32)
def network(n: int) -> Network:
    """The size-n network (cached per n)."""
    if not isinstance(n, int) or not 1 <= n <= MAX_SIZE:
        raise ConfigError(f"switching network size must be an int in [1, {MAX_SIZE}], got {n!r}")
    b = _Builder(n)
    outputs = b.build(np.arange(n, dtype=np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    nodes = np.array(b.nodes, dtype=np.int64).reshape(-1, 6)
    return Network(
        n, b.switches, b.wires, cat(b.ins0), cat(b.ins1), cat(b.outs0), cat(b.outs1), outputs,
        *(np.ascontiguousarray(nodes[:, i]) for i in range(6)), b.scratch,
    )  # fmt: skip


@numba.njit(cache=True)
def _chain(x, col, p, inv, color, k, odd):
    """Colour the path/cycle through input x, starting with colour col at x."""
    while True:
        color[x] = col
        o = inv[x]
        if odd and o == k - 1:
            return
        y = p[o ^ 1]
        if color[y] >= 0:
            return
        color[y] = 1 - col
        if odd and y == k - 1:
            return
        x = y ^ 1
        if color[x] >= 0:
            return


@numba.njit(cache=True)
def _route(perm, size, first_in, first_out, upper, lower, offset, scratch, bits):
    n = perm.shape[0]
    inv = np.empty(n, dtype=np.int64)
    color = np.empty(n, dtype=np.int64)
    scratch[offset[0] : offset[0] + n] = perm
    for node in range(size.shape[0]):
        k = size[node]
        p = scratch[offset[node] : offset[node] + k]
        if k == 1:
            continue
        if k == 2:
            bits[first_in[node]] = 1 if p[0] == 1 else 0
            continue
        h = k // 2
        odd = k % 2 == 1
        for j in range(k):
            inv[p[j]] = j
            color[j] = -1
        _chain(k - 1 if odd else p[k - 1], 1, p, inv, color, k, odd)
        for x in range(k):
            if color[x] < 0:
                _chain(x, 0, p, inv, color, k, odd)
        for i in range(h):
            bits[first_in[node] + i] = color[2 * i]
        pu = scratch[offset[upper[node]] : offset[upper[node]] + h]
        pl = scratch[offset[lower[node]] : offset[lower[node]] + k - h]
        n_out = h if odd else h - 1
        for i in range(n_out):
            b = color[p[2 * i]]
            bits[first_out[node] + i] = b
            pu[i] = p[2 * i + b] // 2
            pl[i] = p[2 * i + 1 - b] // 2
        if odd:
            pl[h] = p[k - 1] // 2
        else:
            pu[h - 1] = p[k - 2] // 2
            pl[h - 1] = p[k - 1] // 2


def route(net: Network, perm) -> np.ndarray:
    """Switch bits (uint8, one per switch) that make ``net`` compute the gather ``perm``."""
    perm = np.ascontiguousarray(perm, dtype=np.int64)
    if perm.shape != (net.n,) or not is_permutation(perm):
        raise ConfigError(f"perm must be a permutation of range({net.n})")
    bits = np.zeros(net.switches, dtype=np.int64)
    scratch = np.empty(net.scratch, dtype=np.int64)
    _route(
        perm, net.node_size, net.node_in, net.node_out, net.node_upper, net.node_lower, net.node_offset, scratch, bits
    )
    return bits.astype(np.uint8)


@numba.njit(cache=True)
def _apply(in0, in1, out0, out1, bits, values, wires):
    w = np.empty((wires, values.shape[1]), dtype=values.dtype)
    w[: values.shape[0]] = values
    for s in range(in0.shape[0]):
        a, b = (in1[s], in0[s]) if bits[s] else (in0[s], in1[s])
        w[out0[s]] = w[a]
        w[out1[s]] = w[b]
    return w


def apply(net: Network, bits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The network on plain values (n, c): the output rows (for tests of the routing)."""
    return _apply(net.in0, net.in1, net.out0, net.out1, bits, np.ascontiguousarray(values), net.wires)[net.outputs]


@numba.njit(cache=True)
def sender_pass(in0, in1, out0, out1, outputs, rho, wires, pad0, pad1):
    """User: wire masks r (inputs r = rho; a switch sets r_out0 = r_in0 - p0, r_out1 = r_in1 + p0) and
    the message y = delta + p0 - p1, delta = r_in1 - r_in0. pads (S, c) uint64. Returns (r at the
    outputs, y (S, c))."""
    c = rho.shape[1]
    r = np.empty((wires, c), dtype=np.uint64)
    r[: rho.shape[0]] = rho
    y = np.empty_like(pad0)
    for s in range(in0.shape[0]):
        for ch in range(c):
            y[s, ch] = r[in1[s], ch] - r[in0[s], ch] + pad0[s, ch] - pad1[s, ch]
            r[out0[s], ch] = r[in0[s], ch] - pad0[s, ch]
            r[out1[s], ch] = r[in1[s], ch] + pad0[s, ch]
    out = np.empty((outputs.shape[0], c), dtype=np.uint64)
    for j in range(outputs.shape[0]):
        out[j] = r[outputs[j]]
    return out, y


@numba.njit(cache=True)
def chooser_pass(in0, in1, out0, out1, outputs, z_in, wires, bits, pad, y):
    """Owner: wire values z (inputs z_in); a switch with bit e adds x = e (z_in1 - z_in0) + X_e to
    z_in0 and subtracts it from z_in1, X_0 = p0, X_1 = y + p1 (its pad p_e). Returns z at the outputs."""
    c = z_in.shape[1]
    z = np.empty((wires, c), dtype=np.uint64)
    z[: z_in.shape[0]] = z_in
    for s in range(in0.shape[0]):
        for ch in range(c):
            x = pad[s, ch]
            if bits[s]:
                x += z[in1[s], ch] - z[in0[s], ch] + y[s, ch]
            z[out0[s], ch] = z[in0[s], ch] + x
            z[out1[s], ch] = z[in1[s], ch] - x
    out = np.empty((outputs.shape[0], c), dtype=np.uint64)
    for j in range(outputs.shape[0]):
        out[j] = z[outputs[j]]
    return out
