"""A user's mistake at the command line prints one line that says what to do and exits non-zero; the traceback
appears only with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BOGUS_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmWrongPeerIdWrongPeerIdWrongPeerIdWrongPeerId12"


def _corolla(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}  # a name that is not local fails at once, without a network lookup
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "no-such-model", "--new-swarm"], "corolla serve: error: Model 'no-such-model' is not a local"),
        (["serve", "{zoo}", "--initial-peers", BOGUS_PEER], "corolla serve: error: Could not start this server's DHT"),
        (["generate", "{zoo}", "--initial-peers", BOGUS_PEER, "--prompt", "hi"], "Check the addresses"),
        (["dht", "--initial-peers", BOGUS_PEER], "corolla dht: error: Could not start this bootstrap peer's DHT"),
        (["stage", "no-such-model", "--new-swarm"], "corolla stage: error: Model 'no-such-model' is not a local"),
        (["stage", "{zoo}", "--initial-peers", BOGUS_PEER], "corolla stage: error: Could not start this stage peer's"),
        (["train", "{zoo}", "--initial-peers", BOGUS_PEER], "corolla train: error: Could not join the swarm"),
        (["api", "--initial-peers", BOGUS_PEER, "--port", "0"], "corolla api: error: Could not join the swarm"),
        (["monitor", "--initial-peers", BOGUS_PEER, "--port", "0"], "corolla monitor: error: Could not join the"),
    ],
    ids=[
        "serve-unknown-model",
        "serve-unreachable-peers",
        "generate-unreachable-peers",
        "dht-unreachable-peers",
        "stage-unknown-model",
        "stage-unreachable-peers",
        "train-unreachable-peers",
        "api-unreachable-peers",
        "monitor-unreachable-peers",
    ],
)
def test_user_mistakes_print_one_line_and_the_traceback_only_when_verbose(args, message, request):
    args = [a.replace("{zoo}", str(zoo_checkpoint("llama"))) for a in args]
    quiet = _corolla(*args)
    assert quiet.returncode == 2, quiet.stderr
    assert "Traceback" not in quiet.stderr
    last = quiet.stderr.strip().splitlines()[-1]
    assert message in last, quiet.stderr
    # --verbose goes through the same handler for every command: checked on the mistakes that fail fast and on one
    # unreachable peer (each unreachable case waits ~5-10 s for the DHT to give up)
    if "unreachable" not in request.node.callspec.id or request.node.callspec.id == "dht-unreachable-peers":
        verbose = _corolla(*args, "--verbose")
        assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "m", "--initial-peers", BOGUS_PEER, "--prompt", "hi", "--max-new-tokens", "0"],
            "max_new_tokens must be positive, got 0",
        ),
        (
            [
                "generate",
                "m",
                "--initial-peers",
                BOGUS_PEER,
                "--prompt",
                "hi",
                "--prompt-lookup-tokens",
                "3",
                "--draft-model",
                "m",
            ],
            "use either --prompt-lookup-tokens or --draft-model",
        ),  # fmt: skip
        (["dht", "--join-timeout-s", "0"], "join_timeout_s must be positive seconds, got 0.0"),
        (["serve", "m"], "pass either --initial-peers"),
        (["serve", "m", "--new-swarm", "--cache-tokens", "lots"], "--cache-tokens"),
        (["serve", "m", "--new-swarm", "--config", "/no/such/file.yaml"], "cannot read the config file"),
        (["api", "--initial-peers", BOGUS_PEER, "--port", "70000"], "port must be between 0 and 65535"),
    ],
    ids=[
        "generate",
        "generate-two-drafters",
        "dht",
        "serve-neither-peers-nor-new-swarm",
        "serve-not-a-number",
        "serve-missing-config",
        "api",
    ],
)
def test_bad_flag_values_are_refused_before_anything_starts(args, message):
    """The flags of every command come from its config dataclass, which checks them before anything starts: the
    message names the bad value and points to --help, without a traceback, exit status 2."""
    result = _corolla(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
