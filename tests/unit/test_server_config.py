"""ServerConfig validation and the CLI flags tyro generates from it (no processes)."""

from __future__ import annotations

import dataclasses

import pytest

from corolla.cli.flags import nest_settings, parse_flags
from corolla.server.config import (
    ActivationCacheConfig,
    AnnounceConfig,
    BalanceConfig,
    BatchingConfig,
    LimitsConfig,
    ServerConfig,
    SpanConfig,
)

PEER = "/ip4/1.2.3.4/tcp/1/p2p/QmX"


def _parse(argv):
    return parse_flags(ServerConfig, argv, prog="corolla serve")


def test_flags_build_the_nested_config_with_flat_names():
    cfg = _parse(["m", "--initial-peers", PEER, "/ip4/5.6.7.8/tcp/2/p2p/QmY", "--blocks", "3:7", "--quant", "nf4"])
    assert cfg.model == "m"
    assert cfg.network.initial_peers == (PEER, "/ip4/5.6.7.8/tcp/2/p2p/QmY")
    assert cfg.span.parse_blocks() == (3, 7) and cfg.span.quant == "nf4"
    assert cfg.limits == LimitsConfig() and cfg.balance == BalanceConfig()


def test_every_setting_has_one_flat_flag_and_help():
    """Sections group the settings; no two sections may have a setting of the same name (the flags are flat)."""
    names = [f.name for section in dataclasses.fields(ServerConfig) for f in _fields_of(section)]
    assert len(names) == len(set(names)), names
    assert {"cache_tokens", "initial_peers", "balance_quality", "update_period_s", "num_blocks"} <= set(names)


def _fields_of(f):
    """A section's settings, or the top-level setting itself."""
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.fields(f.default_factory())
    return [f]


def test_yaml_file_flat_or_by_section_with_flag_override(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("new-swarm: true\nnum_blocks: 4\nlimits:\n  cache-tokens: 100\n  max_batch_tokens: 50\n")
    cfg = _parse(["m", "--config", str(path), "--cache-tokens", "200"])
    assert cfg.new_swarm and cfg.span.num_blocks == 4
    assert (cfg.limits.cache_tokens, cfg.limits.max_batch_tokens) == (200, 50)


def test_yaml_file_may_name_the_model_and_leave_settings_to_the_flags(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("model: from-file\ncache_tokens: 0\n")  # invalid alone; the flag fixes it
    cfg = _parse(["--config", str(path), "--new-swarm", "--cache-tokens", "64"])
    assert (cfg.model, cfg.limits.cache_tokens) == ("from-file", 64)
    assert _parse([f"--config={path}", "other", "--new-swarm", "--cache-tokens", "1"]).model == "other"


def test_a_setting_from_the_file_is_still_validated(tmp_path, capsys):
    path = tmp_path / "server.yaml"
    path.write_text("new_swarm: true\ncache_tokens: 0\n")
    with pytest.raises(SystemExit) as exit_:
        _parse(["m", "--config", str(path)])
    assert exit_.value.code == 2 and "cache_tokens must be positive" in capsys.readouterr().err


def test_every_timeout_is_in_seconds_and_the_older_spellings_still_work(tmp_path):
    timed = [
        f.name
        for section in (LimitsConfig, AnnounceConfig, BalanceConfig)
        for f in dataclasses.fields(section)
        if "timeout" in f.name or "period" in f.name or "jitter" in f.name
    ]
    assert len(timed) == 6 and all(name.endswith("_s") for name in timed), timed
    cfg = _parse(["m", "--new-swarm", "--request-timeout", "7", "--session-timeout-s", "8", "--join-jitter", "0"])
    assert (cfg.limits.request_timeout_s, cfg.limits.session_timeout_s, cfg.balance.join_jitter_s) == (7, 8, 0)
    path = tmp_path / "server.yaml"
    path.write_text("new-swarm: true\nupdate_period: 3\nalloc-timeout-s: 2\n")
    cfg = _parse(["m", "--config", str(path)])
    assert (cfg.announce.update_period_s, cfg.limits.alloc_timeout_s) == (3.0, 2.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache_tokenz": 1}, "cache_tokenz"),
        ({"limits": {"cache_tokens": 1, "device": "cpu"}}, "in section limits: unknown settings \\['device'\\]"),
        ({"limits": 5}, "limits is a section"),
    ],
)
def test_yaml_unknown_or_misplaced_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        nest_settings(ServerConfig, settings)


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "expected a mapping"), ("a: [1\n", "not valid YAML"), (None, "cannot read")],
)
def test_a_bad_config_file_ends_in_one_line(tmp_path, text, message, capsys):
    path = tmp_path / "server.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        _parse(["m", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ServerConfig(model="m"), "--initial-peers"),
        (lambda: ServerConfig(model="m", new_swarm=True, network=_peers("x")), "--initial-peers"),
        (lambda: SpanConfig(blocks="5:3"), "START < END"),
        (lambda: SpanConfig(blocks="a:b"), "START:END"),
        (lambda: SpanConfig(blocks="1:2", num_blocks=3), "not both"),
        (lambda: SpanConfig(dtype="float8"), "float8"),
        (lambda: SpanConfig(quant="int3"), "int3"),
        (lambda: LimitsConfig(cache_tokens=0), "cache_tokens"),
        (lambda: LimitsConfig(session_timeout_s=-1.0), "session_timeout_s"),
        (lambda: AnnounceConfig(throughput="fast"), "throughput"),
        (lambda: BalanceConfig(balance_quality=2), "balance_quality"),
        (lambda: BatchingConfig(max_batch_sessions=0), "max_batch_sessions"),
        (lambda: BatchingConfig(batch_wait_ms=-1), "batch_wait_ms"),
    ],
)
def test_bad_settings_name_the_bad_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _peers(*maddrs):
    from corolla.net.peer_config import PeerConfig

    return PeerConfig(initial_peers=maddrs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m", "--new-swarm", "--num-blocks", "x"], "--num-blocks"),
        (["m", "--new-swarm", "--quant", "int3"], "int3"),
        (["m"], "pass either --initial-peers"),
    ],
)
def test_a_bad_flag_is_refused_with_its_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_every_setting_once_with_one_default(capsys):
    from corolla.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    sections = (ServerConfig, SpanConfig, LimitsConfig, AnnounceConfig, BalanceConfig, BatchingConfig)
    for section in (*sections, ActivationCacheConfig):
        for f in dataclasses.fields(section):
            if f.name not in ("model", "network", "span", "limits", "announce", "balance", "batching", "activations"):
                assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--initial-peers", "--identity", "--announce-maddrs", "--config"):
        assert flag in text
    assert "(default: 8192)" in text and "(default: None) (default" not in text
