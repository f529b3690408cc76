"""Pure pieces of the network lab: link shapes, their text form, delayer rules and expected RTT / bandwidth.

No root, no processes, no clock: unit-tested in milliseconds.

Model: every lab host has one access link to a switch. A host's :class:`LinkShape` is that link's one-way delay,
jitter, loss and rate, the same in both directions. A packet from host A to host B crosses A's link and B's link,
so its one-way delay is ``delay(A) + delay(B)``, the RTT between them ``2 * (delay(A) + delay(B))``, and a bulk
transfer from A to B runs at ``min(rate(A), rate(B))``. To give every pair of hosts an RTT of R, give every host a
delay of R / 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$", re.IGNORECASE)
_RATE_UNITS = {
    None: 1e-6,
    "bit": 1e-6,
    "kbit": 1e-3,
    "mbit": 1.0,
    "gbit": 1e3,
    "bps": 8e-6,  # tc's meaning: bytes per second
    "kbps": 8e-3,
    "mbps": 8.0,
    "gbps": 8e3,
}


def parse_duration_ms(text: str) -> float:
    """``"20ms"`` -> 20.0, ``"1.5s"`` -> 1500.0, ``"250us"`` -> 0.25; a bare number is milliseconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 20ms, 1.5s, 250us)")
    value, unit = float(match.group(1)), (match.group(2) or "ms").lower()
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def parse_rate_mbit(text: str) -> float:
    """``"100mbit"`` -> 100.0, ``"1gbit"`` -> 1000.0 (tc units: ``mbps`` is megabytes/s); bare numbers are bit/s."""
    match = _RATE.match(str(text))
    if not match:
        raise ValueError(f"not a rate: {text!r} (examples: 100mbit, 1gbit, 512kbit)")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _RATE_UNITS[unit]


def parse_loss(text: str) -> float:
    """``"1%"`` -> 0.01, ``"0.01"`` -> 0.01; must be in [0, 1)."""
    text = str(text).strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value < 1:
        raise ValueError(f"loss must be in [0, 1) (or 0%..100%), got {text!r}")
    return value


@dataclass(frozen=True)
class LinkShape:
    """One host's access link. ``rate_mbit=None``: not limited."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self):
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay_ms} ms, {self.jitter_ms} ms")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"rate must be positive, got {self.rate_mbit} Mbit/s")

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """``"delay=20ms,jitter=2ms,loss=0.5%,rate=100mbit"`` (any subset, any order; ``""`` or ``"none"``: ideal)."""
        text = text.strip()
        if text.lower() in ("", "none"):
            return cls()
        fields: dict[str, float | None] = {}
        seen: set[str] = set()
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ValueError(f"expected key=value in {text!r}, got {item!r}")
            if key in seen:
                raise ValueError(f"{key} given twice in {text!r}")
            seen.add(key)
            if key == "delay":
                fields["delay_ms"] = parse_duration_ms(value)
            elif key == "jitter":
                fields["jitter_ms"] = parse_duration_ms(value)
            elif key == "loss":
                fields["loss"] = parse_loss(value)
            elif key == "rate":
                fields["rate_mbit"] = None if value.strip().lower() in ("none", "inf") else parse_rate_mbit(value)
            else:
                raise ValueError(f"unknown link setting {key!r} in {text!r}; known: delay, jitter, loss, rate")
        return cls(**fields)

    def __str__(self) -> str:
        parts = [f"delay={self.delay_ms:g}ms"]
        if self.jitter_ms:
            parts.append(f"jitter={self.jitter_ms:g}ms")
        if self.loss:
            parts.append(f"loss={self.loss * 100:g}%")
        if self.rate_mbit is not None:
            parts.append(f"rate={self.rate_mbit:g}mbit")
        return ",".join(parts)

    @property
    def needs_delayer(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss)


def one_way_ms(shapes: Mapping[str, LinkShape], src: str, dst: str) -> float:
    """Mean one-way delay (ms) from host ``src`` to host ``dst``, jitter excluded."""
    return 0.0 if src == dst else shapes[src].delay_ms + shapes[dst].delay_ms


def expected_rtt_ms(shapes: Mapping[str, LinkShape], a: str, b: str) -> float:
    """Mean RTT (ms) between two hosts, including the mean of the uniform jitter (half its width per direction)."""
    if a == b:
        return 0.0
    jitter = shapes[a].jitter_ms + shapes[b].jitter_ms
    return one_way_ms(shapes, a, b) + one_way_ms(shapes, b, a) + jitter


def expected_rate_mbit(shapes: Mapping[str, LinkShape], src: str, dst: str) -> float | None:
    """The rate cap (Mbit/s) of a transfer ``src`` -> ``dst``; None when neither link is limited."""
    rates = [r for r in (shapes[src].rate_mbit, shapes[dst].rate_mbit) if r is not None]
    return min(rates) if rates else None


def delayer_rules(shapes: Mapping[str, LinkShape], addresses: Mapping[str, str], dst: str) -> str:
    """The rules file of the delayer that holds ``dst``'s ingress: one line per source host (see delayer.c).

    Loss of the two links combines as independent drops; jitter widths add.
    """
    lines = ["default 0 0 0"]
    for src, address in sorted(addresses.items()):
        if src == dst:
            continue
        delay_us = round(one_way_ms(shapes, src, dst) * 1000)
        jitter_us = round((shapes[src].jitter_ms + shapes[dst].jitter_ms) * 1000)
        keep = (1 - shapes[src].loss) * (1 - shapes[dst].loss)
        loss_ppm = round((1 - keep) * 1_000_000)
        lines.append(f"src {address} {delay_us} {jitter_us} {loss_ppm}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- bounds for a chain of servers (inference)


def chain_delay_push_ms(shapes: Mapping[str, LinkShape], client: str, servers: Sequence[str]) -> float:
    """Network time of one inference step with server-to-server push: client -> s1 -> ... -> sN -> client."""
    hops = [client, *servers, client]
    return sum(one_way_ms(shapes, a, b) for a, b in zip(hops, hops[1:]))


def chain_delay_no_push_ms(shapes: Mapping[str, LinkShape], client: str, servers: Sequence[str]) -> float:
    """Network time of one inference step without push: one client <-> server round trip per server."""
    return sum(one_way_ms(shapes, client, s) + one_way_ms(shapes, s, client) for s in servers)


def step_bound_ms(
    shapes: Mapping[str, LinkShape], client: str, servers: Sequence[str], *, push: bool, base_ms: float
) -> float:
    """Lower bound of one step's time: ``base_ms`` (the step measured with no delay: compute, serialization,
    transfer at the same rate) plus the chain's propagation delay."""
    chain = chain_delay_push_ms if push else chain_delay_no_push_ms
    return base_ms + chain(shapes, client, servers)
