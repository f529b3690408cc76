"""ServerConfig validation and the CLI flags generated from it (no processes)."""

from __future__ import annotations

import argparse

import pytest

from corolla.cli.dataclass_args import add_dataclass_arguments, dataclass_from_args
from corolla.server.config import ServerConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, ServerConfig, positional=("model",))
    return dataclass_from_args(ServerConfig, parser.parse_args(argv))


def test_flags_build_the_config():
    cfg = _parse(
        ["m", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/QmX", "/ip4/5.6.7.8/tcp/2/p2p/QmY", "--blocks", "3:7"]
    )
    assert cfg.model == "m"
    assert cfg.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/QmX", "/ip4/5.6.7.8/tcp/2/p2p/QmY")
    assert cfg.parse_blocks() == (3, 7)
    assert cfg.cache_tokens == ServerConfig.__dataclass_fields__["cache_tokens"].default


def test_yaml_file_with_flag_override(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("new-swarm: true\nnum_blocks: 4\ncache_tokens: 100\n")
    cfg = _parse(["m", "--config", str(path), "--cache-tokens", "200"])
    assert cfg.new_swarm and cfg.num_blocks == 4 and cfg.cache_tokens == 200


def test_every_timeout_is_in_seconds_and_the_older_spellings_still_work(tmp_path):
    timed = [f for f in ServerConfig.__dataclass_fields__ if "timeout" in f or "period" in f or "jitter" in f]
    assert timed and all(name.endswith("_s") for name in timed), timed
    cfg = _parse(["m", "--new-swarm", "--request-timeout", "7", "--session-timeout-s", "8"])
    assert (cfg.request_timeout_s, cfg.session_timeout_s) == (7.0, 8.0)
    path = tmp_path / "server.yaml"
    path.write_text("new-swarm: true\nupdate_period: 3\nalloc-timeout-s: 2\n")
    cfg = _parse(["m", "--config", str(path)])
    assert (cfg.update_period_s, cfg.alloc_timeout_s) == (3.0, 2.0)


def test_yaml_unknown_setting_is_named(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("new_swarm: true\ncache_tokenz: 1\n")
    with pytest.raises(ValueError, match="cache_tokenz"):
        _parse(["m", "--config", str(path)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "--initial-peers"),
        (dict(new_swarm=True, initial_peers=("x",)), "--initial-peers"),
        (dict(new_swarm=True, blocks="5:3"), "START < END"),
        (dict(new_swarm=True, blocks="a:b"), "START:END"),
        (dict(new_swarm=True, blocks="1:2", num_blocks=3), "not both"),
        (dict(new_swarm=True, dtype="float8"), "float8"),
        (dict(new_swarm=True, quant="int3"), "int3"),
        (dict(new_swarm=True, cache_tokens=0), "cache_tokens"),
        (dict(new_swarm=True, session_timeout_s=-1.0), "session_timeout_s"),
        (dict(new_swarm=True, throughput="fast"), "throughput"),
    ],
)
def test_bad_settings_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(model="m", **kwargs)


def test_help_lists_every_setting(capsys):
    from corolla.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--initial-peers",
        "--new-swarm",
        "--num-blocks",
        "--blocks",
        "--quant",
        "--cache-tokens",
        "--max-batch-tokens",
        "--max-session-length",
        "--identity",
        "--dht-prefix",
        "--throughput",
        "--update-period",
        "--request-timeout",
        "--session-timeout",
        "--announce-maddrs",
        "--config",
    ):
        assert flag in text
