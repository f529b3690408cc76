"""BTARD messages between two real hivemind P2P daemons on loopback: a small message goes as one unary call, a large
one (a part or aggregate of megabytes, even over the daemon's 4 MiB unary limit) as a stream of chunks, and the
receiver refuses a stream over its limit with a reason while it keeps taking the sender's other messages."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P, P2PHandlerError

from corolla.net.transport import P2PTransport, serve
from corolla.protocol.rpc import BTARD_PEER
from corolla.secure import btard_peer
from corolla.secure.btard_peer import Mailroom, envelope_sender
from corolla.secure.envelope import Signer
from corolla.secure.mailbox import Mailbox
from corolla.secure.protocol import BtardProtocol, ProtocolConfig

RUN = "delivery"


class _Task:
    params = None

    def gradient(self, step, peer, *, wrong_labels=False):  # never called: no step runs here
        raise AssertionError("no step runs in this test")


def _with_pair(scenario) -> None:
    asyncio.run(asyncio.wait_for(_pair(scenario), 120))


async def _pair(scenario):
    receiver = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sender = await P2P.create(
        initial_peers=[str(a) for a in await receiver.get_visible_maddrs()], host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    try:
        signers = {str(receiver.peer_id): Signer(), str(sender.peer_id): Signer()}
        keys = {p: s.public_key for p, s in signers.items()}
        me = str(receiver.peer_id)
        protocol = BtardProtocol(me=me, signer=signers[me], keys=keys, config=ProtocolConfig(run=RUN), task=_Task(),
                                 send=None, mailbox=Mailbox())  # fmt: skip
        mailroom = Mailroom(chunk_timeout_s=5.0)
        await serve(receiver, BTARD_PEER, mailroom)
        await mailroom.start(protocol)
        send = envelope_sender(P2PTransport(sender), timeout_s=30.0)
        await scenario(protocol, signers[str(sender.peer_id)], str(sender.peer_id), send)
    finally:
        await sender.shutdown()
        await receiver.shutdown()


async def _sent(protocol, signer, sender_id, send, *, kind, slot, data: bytes):
    envelope = signer.seal(run=RUN, sender=sender_id, kind=kind, step=0, slot=slot, body={"data": data})
    await send(str(protocol.me), envelope)
    return envelope


def test_small_and_large_messages_arrive_whole():
    _with_pair(_small_and_large)


async def _small_and_large(protocol, signer, sender_id, send):
    small = await _sent(protocol, signer, sender_id, send, kind="part", slot=0, data=b"\x01" * 1000)
    assert len(small.to_wire()) <= btard_peer.STREAM_OVER_BYTES  # a unary call
    large = await _sent(protocol, signer, sender_id, send, kind="aggregate", slot=1, data=bytes(range(256)) * 24_000)
    assert len(large.to_wire()) > 4 * 2**20  # over what one unary message of the daemon may carry
    assert protocol.mailbox.get(0, "part", sender_id, 0) == small
    assert protocol.mailbox.get(0, "aggregate", sender_id, 1) == large
    assert protocol.refused == 0


def test_a_stream_over_the_limit_is_refused_and_the_sender_still_delivers(monkeypatch):
    monkeypatch.setattr(btard_peer, "MAX_MESSAGE_BYTES", 2**20)
    _with_pair(_over_the_limit)


async def _over_the_limit(protocol, signer, sender_id, send):
    with pytest.raises(P2PHandlerError, match="more than any protocol message holds"):
        await _sent(protocol, signer, sender_id, send, kind="aggregate", slot=1, data=b"\x00" * (3 * 2**20))
    assert protocol.mailbox.get(0, "aggregate", sender_id, 1) is None
    # far past the limit the receiver stops reading (after 4x the limit): the sender sees the reason or a reset
    with pytest.raises((P2PHandlerError, ConnectionError)):
        await _sent(protocol, signer, sender_id, send, kind="aggregate", slot=1, data=b"\x00" * (12 * 2**20))
    assert protocol.mailbox.get(0, "aggregate", sender_id, 1) is None
    after = await _sent(protocol, signer, sender_id, send, kind="part", slot=0, data=b"\x02" * 500_000)
    assert protocol.mailbox.get(0, "part", sender_id, 0) == after


def test_a_forged_streamed_message_is_refused_with_the_reason():
    _with_pair(_forged)


def test_a_strangers_stream_is_refused_from_its_first_chunk():
    _with_pair(_stranger)


async def _stranger(protocol, _, sender_id, send):
    envelope = Signer().seal(run=RUN, sender="mallory", kind="part", step=0, slot=0, body={"data": bytes(8 * 2**20)})
    with pytest.raises(P2PHandlerError, match="not a peer of run"):
        await asyncio.wait_for(send(str(protocol.me), envelope), 30)
    assert protocol.refused == 1 and protocol.mailbox.get(0, "part", "mallory", 0) is None


async def _forged(protocol, _, sender_id, send):
    impostor = Signer()  # not the key the run knows for sender_id
    envelope = impostor.seal(run=RUN, sender=sender_id, kind="part", step=0, slot=0, body={"data": b"\x03" * 2**20})
    with pytest.raises(P2PHandlerError, match="not signed by"):
        await asyncio.wait_for(send(str(protocol.me), envelope), 30)
    assert protocol.mailbox.get(0, "part", sender_id, 0) is None
    assert protocol.refused == 1
