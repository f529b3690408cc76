"""The network lab: emulate the Internet (delay, jitter, loss, bandwidth) between local processes.

See :mod:`benchmarks.netlab.lab` and ``python -m benchmarks.netlab --help``.
"""

from .lab import Lab, LabError, LabUnavailable, enter_netns, teardown, unavailable_reason
from .shaping import LinkShape

__all__ = ["Lab", "LabError", "LabUnavailable", "LinkShape", "enter_netns", "teardown", "unavailable_reason"]
