"""The network lab's pure pieces: link shapes, delayer rules, expected RTT/bandwidth and inference-chain bounds."""

from __future__ import annotations

import pytest
from benchmarks.netlab.shaping import (
    LinkShape,
    chain_delay_no_push_ms,
    chain_delay_push_ms,
    delayer_rules,
    expected_rate_mbit,
    expected_rtt_ms,
    one_way_ms,
    parse_duration_ms,
    parse_loss,
    parse_rate_mbit,
    step_bound_ms,
)


def test_parse_units():
    assert parse_duration_ms("20ms") == 20
    assert parse_duration_ms("1.5s") == 1500
    assert parse_duration_ms("250us") == pytest.approx(0.25)
    assert parse_duration_ms("7") == 7
    assert parse_rate_mbit("100mbit") == 100
    assert parse_rate_mbit("1gbit") == 1000
    assert parse_rate_mbit("512kbit") == pytest.approx(0.512)
    assert parse_rate_mbit("1mbps") == 8  # tc's bytes per second
    assert parse_loss("1%") == pytest.approx(0.01)
    assert parse_loss("0.02") == pytest.approx(0.02)
    for bad in ("fast", "-1ms", "10 parsecs"):
        with pytest.raises(ValueError):
            parse_duration_ms(bad)
    with pytest.raises(ValueError):
        parse_rate_mbit("10 furlongs")
    with pytest.raises(ValueError):
        parse_loss("100%")


def test_link_shape_parse_and_str_round_trip():
    shape = LinkShape.parse("delay=20ms, jitter=2ms,loss=0.5%,rate=100mbit")
    assert shape == LinkShape(delay_ms=20, jitter_ms=2, loss=0.005, rate_mbit=100)
    assert LinkShape.parse(str(shape)) == shape
    assert LinkShape.parse("none") == LinkShape() == LinkShape.parse("")
    assert LinkShape.parse("rate=none").rate_mbit is None
    assert not LinkShape.parse("rate=10mbit").needs_delayer
    assert LinkShape.parse("loss=1%").needs_delayer
    for bad in ("delay", "speed=1", "delay=1ms,delay=2ms", "rate=0mbit"):
        with pytest.raises(ValueError):
            LinkShape.parse(bad)
    with pytest.raises(ValueError):
        LinkShape(delay_ms=-1)


def test_pairwise_model():
    shapes = {"a": LinkShape(delay_ms=5, jitter_ms=1, rate_mbit=100), "b": LinkShape(delay_ms=20, rate_mbit=20)}
    assert one_way_ms(shapes, "a", "b") == one_way_ms(shapes, "b", "a") == 25
    assert one_way_ms(shapes, "a", "a") == 0
    assert expected_rtt_ms(shapes, "a", "b") == 51  # 2 x 25 + mean jitter (half of 1 ms, each way)
    assert expected_rate_mbit(shapes, "a", "b") == 20
    assert expected_rate_mbit({"x": LinkShape(), "y": LinkShape()}, "x", "y") is None


def test_delayer_rules_hold_each_source_for_both_links():
    shapes = {"a": LinkShape(delay_ms=5, loss=0.1), "b": LinkShape(delay_ms=20, jitter_ms=2), "c": LinkShape()}
    addresses = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}
    rules = delayer_rules(shapes, addresses, "b").splitlines()
    assert rules[0] == "default 0 0 0"
    assert "src 10.77.0.1 25000 2000 100000" in rules  # 5 + 20 ms, jitter 0 + 2 ms, loss 10%
    assert "src 10.77.0.3 20000 2000 0" in rules
    assert not any("10.77.0.2" in r for r in rules)  # not its own address
    both_lossy = {"a": LinkShape(loss=0.1), "b": LinkShape(loss=0.1)}
    assert delayer_rules(both_lossy, {"a": "1.1.1.1", "b": "2.2.2.2"}, "b").splitlines()[1].endswith(" 190000")


def test_chain_bounds():
    uniform = {h: LinkShape(delay_ms=25) for h in ("client", "s1", "s2", "s3")}  # RTT 100 ms between any two
    servers = ["s1", "s2", "s3"]
    assert chain_delay_push_ms(uniform, "client", servers) == 200  # 4 one-way hops = 2 RTT
    assert chain_delay_no_push_ms(uniform, "client", servers) == 300  # 3 round trips
    assert step_bound_ms(uniform, "client", servers, push=True, base_ms=30) == 230
    # a far client and servers close together: push saves almost everything but one round trip
    far = {"client": LinkShape(delay_ms=50), **{s: LinkShape() for s in servers}}
    assert chain_delay_push_ms(far, "client", servers) == 100
    assert chain_delay_no_push_ms(far, "client", servers) == 300


def test_probe_plan_measures_every_pair_with_hosts_behind_nat_as_clients():
    """A host behind NAT cannot be connected to: it probes the others; two such hosts meet only through a relay."""
    from benchmarks.netlab import Lab

    lab = Lab(hosts=["a", "n1", "b", "n2"], nat_hosts=["n1", "n2"])
    plan = lab._probe_plan()
    pairs = [(client, server) for client, servers in plan for server in servers]
    assert sorted(pairs) == sorted([("a", "b"), ("n1", "a"), ("n1", "b"), ("n2", "a"), ("n2", "b")])
    assert lab.private_address("n1") == "192.168.2.2" and lab.address("n1") == "10.77.0.2"
    with pytest.raises(KeyError):
        lab.private_address("a")
    with pytest.raises(ValueError, match="not hosts"):
        Lab(hosts=["a"], nat_hosts=["z"])
