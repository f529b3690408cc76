"""A server's first start on hardware it has no speed for: it serves at once with a provisional speed, measures the
real one in the background, announces it and caches it for the next start (a real server process)."""

from __future__ import annotations

import os

import pytest

from corolla.local_swarm import LocalSwarm, wait_for
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_first_start_serves_with_a_provisional_speed_then_announces_and_caches_the_measured_one(tmp_path):
    from corolla.net.dht_process import client_dht

    path = str(zoo_checkpoint("llama"))
    cache = tmp_path / "cache"
    env = dict(os.environ, COROLLA_CACHE=str(cache))
    args = ["--throughput", "auto", "--update-period", "1"]
    with LocalSwarm(model=path, spans=["0:6"], server_args=args, log_dir=tmp_path / "logs", env=env) as swarm:
        swarm.wait_until_served()
        log = tmp_path / "logs" / "server0.log"
        wait_for(lambda: list(cache.glob("throughput/*.json")), timeout_s=60, what="the measured speed to be cached")
        text = log.read_text()
        provisional, serving, measured = (
            text.index(s) for s in ("Provisional speed", "Serving blocks", "Measured speed")
        )
        assert provisional < serving < measured, text  # it served before the full measurement

        dht = client_dht(swarm.initial_peers)
        try:
            infos = lambda: list(swarm._online_servers(dht, 6).values())  # noqa: E731
            # the full measurement includes batched forwards: its forward speed is no longer the provisional one,
            # which equals the inference speed
            wait_for(lambda: [i.forward_rps != i.inference_rps for i in infos()] == [True], timeout_s=30,
                     what="the measured speed to be announced", poll_s=0.25)  # fmt: skip
        finally:
            dht.shutdown()
