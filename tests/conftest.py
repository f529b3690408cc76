"""Shared pytest setup: one torch thread per test process (servers are separate processes on the same cores),
hypothesis without randomness or an example database (the same examples in every run; HYPOTHESIS_PROFILE=explore
draws new ones), and the global random generators seeded before every test, so that randomness a test does not
seed itself (e.g. the initial values of a trainable prompt or a fresh head) is the same in every run and order."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("corolla", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "corolla"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
# every LocalSwarm process is forked from a helper that imported torch & co. once (corolla.warm_spawn): ~3 s of CPU
# less per process, hundreds of processes per run; test_warm_spawn.py checks that a forked one behaves as a fresh one
os.environ.setdefault("COROLLA_WARM_SPAWN", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_random_generators():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_path():
    """The bundled SmolLM2 converted to a sharded HF checkpoint (converted once per cache, then reused)."""
    from corolla.models.bundled import ensure_bundled_checkpoint

    return ensure_bundled_checkpoint("smollm2-135m")
