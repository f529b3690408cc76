"""Reachability pieces (``corolla.net.reachability``): what a dial-back request may name, relay addresses, and the
multiaddr bytes p2pd accepts for ``/p2p/`` parts."""

from __future__ import annotations

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from corolla.net.peer_config import PeerConfig
from corolla.net.reachability import _multiaddr, _parse_request, circuit_addrs, listen_addrs

RELAY = "QmPD7zHrPgdTvT7jqXsi9TfiDFqUtL9uLPgUAKiwSLdWdB"


def request(body) -> runtime_pb2.ExpertInfo:
    return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(body))


def test_a_dial_back_request_names_tcp_addresses_only():
    ok = ["/ip4/10.0.0.2/tcp/31337", f"/ip4/10.77.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit"]
    assert _parse_request(request({"addrs": ok})) == ok
    for bad, why in [
        ({"addrs": []}, "1 to 8"),
        ({"addrs": ["/ip4/1.2.3.4/tcp/1"] * 9}, "1 to 8"),
        ({"nothing": 1}, "1 to 8"),
        ([1, 2], "1 to 8"),
        ({"addrs": ["/ip4/1.2.3.4/udp/1/quic"]}, "TCP"),
        ({"addrs": ["/unix/tmp/x.sock"]}, "TCP"),
        ({"addrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}"]}, "without /p2p"),
        ({"addrs": [7]}, "TCP"),
    ]:
        with pytest.raises(ValueError, match=why):
            _parse_request(request(bad))


def test_p2p_parts_are_raw_multihashes():
    """p2pd reads ``/p2p/<id>`` as the peer id's multihash (the Python package writes a CID, which p2pd refuses)."""
    digest = PeerID.from_base58(RELAY).to_bytes()
    encoded = _multiaddr(f"/ip4/10.77.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit").to_bytes()
    ip_tcp = bytes([0x04, 10, 77, 0, 1, 0x06]) + (4001).to_bytes(2, "big")
    assert encoded == ip_tcp + b"\xa5\x03" + bytes([len(digest)]) + digest + b"\xa2\x02"
    assert _multiaddr("/ip4/10.77.0.1/tcp/4001").to_bytes() == ip_tcp
    with pytest.raises(ValueError, match="p2p-circuit"):
        _multiaddr(f"/ip4/10.77.0.1/tcp/4001/p2p/{RELAY}/tcp/5")


def test_addresses_offered_for_dialing():
    own = [f"/ip4/127.0.0.1/tcp/5/p2p/{RELAY}", f"/ip4/192.168.1.2/tcp/5/p2p/{RELAY}", "/ip4/1.2.3.4/udp/5/quic"]
    assert listen_addrs(own) == ["/ip4/127.0.0.1/tcp/5", "/ip4/192.168.1.2/tcp/5"]
    relays = [f"/ip4/10.77.0.1/tcp/4001/p2p/{RELAY}", "/ip4/10.77.0.9/tcp/4001"]
    assert circuit_addrs(relays) == [f"/ip4/10.77.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit"]


def test_reachability_setting_is_checked():
    assert PeerConfig(reachability="relay").reachability == "relay"
    with pytest.raises(ValueError, match="auto, direct, relay"):
        PeerConfig(reachability="sometimes")
