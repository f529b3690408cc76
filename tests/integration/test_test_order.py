"""Modules whose tests share one server and one session must pass in any order: here, shuffled.

pytest-randomly is off by default (pyproject.toml's addopts): it would reshuffle and reseed every run, and CI runs
keep the written order. Here it is switched on (`-p randomly`) with a fixed seed, so this check is reproducible.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SHARED_STATE_MODULES = ["tests/integration/test_bad_input.py"]


# shuffled only: a reversed run (which also passed, 32 s) found nothing a shuffle would not, and the suite's time
# is near its budget
@pytest.mark.parametrize("order", [["-p", "randomly", "--randomly-seed=20261127"]], ids=str)
@pytest.mark.parametrize("module", SHARED_STATE_MODULES)
def test_module_passes_in_another_order(module, order):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", module, "-q", "-x", "-p", "no:cacheprovider", *order],
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = result.stdout.strip().splitlines()[-1:] or [result.stderr[-2000:]]
    assert result.returncode == 0, f"{module} {' '.join(order)}: {summary}\n{result.stdout[-4000:]}"
    assert "passed" in summary[0] and "failed" not in summary[0]
