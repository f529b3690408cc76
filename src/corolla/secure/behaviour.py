"""How a BTARD peer behaves: honestly, or with attacks on the gradients it sends and on the protocol itself.

``Behaviour.parse("sign_flip@20,wrong_aggregate@40")``: each attack with the first step it is used at. Gradient
attacks (one at most; ``secure.attacks``): sign_flip, random_direction, label_flip, delayed, ipm, alie. Protocol
attacks (any number):

* ``wrong_aggregate``: as an aggregator, send the CenteredClip result plus a perturbation (1 % of its norm);
* ``bad_part``: send an aggregator a part that differs from the one committed to;
* ``false_accusation``: accuse an honest peer of a gradient it did send (the evidence shows it did not lie);
* ``silent``: from that step on, send nothing after the step's commitment (a peer that went silent mid-step);
* ``changed_reveal``: reveal a value other than the one committed to in the commit–reveal round;
* ``forge``: send a commitment under another peer's identity, signed with one's own key (receivers refuse it);
* ``equivocate``: send different peers different projection reports in the same step;
* ``empty_check``: send an empty projection report (as if an aggregate were missing) while nothing was missing,
  which would leave every partition unchecked, with itself named as the missing peer for an excuse;
* ``withhold_accusations``: send everything but its accuse message (which would void the step);
* ``malformed_aggregate``: as an aggregator, send a result of the wrong length;
* ``malformed_report``: send a projection report with one value too many for its own partition (a report that
  would otherwise fail every check of its partition, its own wrong aggregate's included, without proving a lie);
* ``nonfinite_part``: commit to and send parts with a NaN (which would stop an aggregator's CenteredClip);
* ``nonfinite_aggregate``: as an aggregator, send a result with an infinity;
* ``cancel_own_report``: as an aggregator, report for its own part whatever makes its partition's sums vanish
  (it holds every part of its partition, so it knows the others' reports): with ``wrong_aggregate``, a forged
  result that the sums alone would not catch;
* ``huge_report``: report projections near float64's largest value (two such peers overflow the sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corolla.secure.attacks import ATTACKS, AttackConfig

__all__ = ["PROTOCOL_ATTACKS", "Behaviour"]

PROTOCOL_ATTACKS = (
    "wrong_aggregate",
    "bad_part",
    "false_accusation",
    "silent",
    "changed_reveal",
    "forge",
    "equivocate",
    "empty_check",
    "withhold_accusations",
    "malformed_aggregate",
    "malformed_report",
    "nonfinite_part",
    "nonfinite_aggregate",
    "cancel_own_report",
    "huge_report",
)


@dataclass(frozen=True)
class Behaviour:
    gradient: AttackConfig = field(default_factory=AttackConfig)
    protocol: tuple[tuple[str, int], ...] = ()  # (attack, first step)

    def __post_init__(self):
        for name, start in self.protocol:
            if name not in PROTOCOL_ATTACKS:
                raise ValueError(f"unknown protocol attack {name!r}: choose from {', '.join(PROTOCOL_ATTACKS)}")
            if start < 0:
                raise ValueError(f"attack {name} starts at a negative step ({start})")

    @property
    def honest(self) -> bool:
        return self.gradient.kind == "none" and not self.protocol

    def does(self, attack: str, step: int) -> bool:
        return any(name == attack and step >= start for name, start in self.protocol)

    def starts(self, attack: str, step: int) -> bool:
        """``attack`` is used exactly at ``step`` (one-off attacks such as a false accusation)."""
        return any(name == attack and step == start for name, start in self.protocol)

    @classmethod
    def parse(cls, spec: str) -> Behaviour:
        """``"none"`` or a comma-separated list of ``attack@step`` (``@step`` omitted: from step 0)."""
        spec = spec.strip()
        if spec in ("", "none", "honest"):
            return cls()
        gradient, protocol = AttackConfig(), []
        for item in spec.split(","):
            name, _, start_text = item.strip().partition("@")
            try:
                start = int(start_text) if start_text else 0
            except ValueError:
                raise ValueError(f"{item!r}: the step after @ must be an integer") from None
            if name in ATTACKS and name != "none":
                if gradient.kind != "none":
                    raise ValueError(f"{spec!r}: at most one gradient attack ({gradient.kind} and {name})")
                gradient = AttackConfig(kind=name, start_step=start)
            elif name in PROTOCOL_ATTACKS:
                protocol.append((name, start))
            else:
                known = ", ".join([*ATTACKS[1:], *PROTOCOL_ATTACKS])
                raise ValueError(f"unknown attack {name!r}: choose from {known}")
        return cls(gradient=gradient, protocol=tuple(protocol))
