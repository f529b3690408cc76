"""BTARD-SGD between real processes over hivemind's DHT and libp2p (``corolla btard``): 8 peers, 3 of them
Byzantine, 300 steps on scikit-learn's digits."""

from __future__ import annotations

import json

import pytest

from corolla.local_swarm import LocalSwarm, wait_for

pytestmark = pytest.mark.integration

HONEST = ["h0", "h1", "h2", "h3", "h4"]
ATTACKERS = {
    "poisoner": "sign_flip@10",  # caught by a validator that recomputes its gradient
    "liar": "forge@5,wrong_aggregate@40",  # a forged message (refused), then a wrong aggregate (the check fails)
    "mute": "silent@80",  # goes silent after its commitment of step 80
}


def test_eight_peers_three_byzantine_train_and_ban_the_attackers(tmp_path):
    """Attackers banned (the silent one eliminated with exactly one honest reporter), no honest peer banned, every
    honest peer that is still active ends with the same parameters and a test accuracy of at least 0.93, the forged
    message was refused by the peers it reached, and no peer's view of the bans diverged."""
    steps = 300
    with LocalSwarm(model="none", log_dir=tmp_path / "logs", start_timeout_s=60) as swarm:
        for name in [*HONEST, *ATTACKERS]:
            args = ["--peers", "8", "--steps", str(steps), "--phase-timeout-s", "5", "--run", "digits"]
            args += ["--attack", ATTACKERS.get(name, "none"), "--result", str(tmp_path / f"{name}.json")]
            swarm.start_btard_peer(name, args)
        results = {}

        def finished() -> bool:
            for name, process in swarm.processes.items():
                if name == "bootstrap" or name in results:
                    continue
                if process.poll() is not None:
                    log = (tmp_path / "logs" / f"{name}.log").read_text()[-3000:]
                    assert process.returncode == 0 or name == "mute", f"{name} exited {process.returncode}:\n{log}"
                    path = tmp_path / f"{name}.json"
                    results[name] = json.loads(path.read_text()) if path.exists() else None
            return len(results) == 8

        wait_for(finished, timeout_s=400, what="the 8 BTARD peers to finish", poll_s=0.5)

    ids = {name: swarm.peer_ids[name] for name in [*HONEST, *ATTACKERS]}
    honest_ids = {ids[n] for n in HONEST}
    survivors = [results[n] for n in HONEST if results[n]["removed_at"] is None]
    assert len(survivors) == len(HONEST) - 1, "the silent peer takes exactly one honest reporter with it"
    for result in survivors:
        assert result["steps"] == steps
        assert set(result["banned"]) == {ids["poisoner"], ids["liar"]}, result["banned"]
        assert not honest_ids & set(result["banned"])
        eliminated = set(result["eliminated"])
        assert ids["mute"] in eliminated and len(eliminated) == 2 and len(eliminated & honest_ids) == 1
        assert result["accuracy"] >= 0.93, result
        assert result["accuracy"] == survivors[0]["accuracy"]  # the same parameters everywhere
        assert not result["diverged_from"]
        assert "wrong_aggregate at step 40" in result["banned"][ids["liar"]]
    # the forged commitment went to everyone but the forger and the peer it impersonated
    assert sum(results[n]["refused"] for n in HONEST) >= len(HONEST) - 1
