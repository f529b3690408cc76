"""``corolla btard``: one peer of a BTARD-SGD run between processes, over hivemind's DHT and libp2p.

The peer starts its DHT node, serves the BTARD mailbox RPC (``protocol.rpc.BTARD_PEER``), and announces a record
with its Ed25519 message key under the run's DHT key (signed by its libp2p identity, so the key is bound to its
peer id). Once ``--peers`` peers have announced themselves, the group is the sorted list of their peer ids, and
every peer runs ``secure.protocol.BtardProtocol`` steps with SGD with momentum on the step's verified update. Messages
that arrive before the protocol starts are kept and handed to it. A peer that is banned or eliminated stops.
At the end an honest peer measures its test accuracy; the summary goes to the log and to ``--result``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from hivemind.p2p import P2PDaemonError
from hivemind.proto import runtime_pb2

from corolla.log import get_logger
from corolla.net.announcer import Announcer
from corolla.net.dht_records import declare_btard_peer, fetch_btard_peers_async
from corolla.net.peer import Peer
from corolla.net.streaming import timed
from corolla.net.tensors import STREAM_CHUNK_BYTES
from corolla.net.transport import P2PTransport, serve, unserve
from corolla.protocol.records import BtardPeerInfo, PeerState
from corolla.protocol.rpc import BTARD_PEER, RpcStub, Transport
from corolla.secure.behaviour import Behaviour
from corolla.secure.config import BtardPeerConfig
from corolla.secure.digits import DigitsModel, DigitsTask, digits_split
from corolla.secure.envelope import MAX_BODY_BYTES, Envelope, Signer
from corolla.secure.mailbox import Mailbox
from corolla.secure.protocol import BtardProtocol, ProtocolConfig

logger = get_logger(__name__)

EARLY_MESSAGES = 4096  # kept while the group is not known yet (no key to check them against)
EARLY_BYTES = 256 * 2**20  # and at most this many bytes of them
# a message over this goes as a stream of chunks: through the libp2p daemons a stream carries megabytes about three
# times faster than one unary message (measured on loopback: 2 MiB in 9 ms vs 27 ms), and without the daemon's 4 MiB
# limit on unary messages; a small one goes as one unary call (no stream to open)
STREAM_OVER_BYTES = 256 * 2**10
MAX_MESSAGE_BYTES = MAX_BODY_BYTES + 2**16  # a body and its signed header
ANNOUNCE_PERIOD_S = 10.0


class Mailroom:
    """The RPC servicer: hands each message to the protocol (which refuses bad ones with a reason)."""

    def __init__(self, *, chunk_timeout_s: float = 30.0):
        self.protocol: BtardProtocol | None = None
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.chunk_timeout_s = chunk_timeout_s

    async def rpc_deliver(self, request: runtime_pb2.ExpertInfo, context) -> runtime_pb2.ExpertInfo:
        await self._deliver(request.serialized_info)
        return runtime_pb2.ExpertInfo(serialized_info=b"")

    async def rpc_deliver_stream(self, requests, context):
        """One message in chunks. Its signed header, at the start, is screened as soon as it is in: a message that
        is not from a peer of the run is refused before its body is held. Refused too: a message past
        ``MAX_MESSAGE_BYTES``, or one whose next chunk is ``chunk_timeout_s`` late. After a refusal the rest is read
        and dropped (up to 4x the limit): closing while the sender still writes resets the stream, and it would then
        see a broken stream instead of the reason."""
        chunks, size, refusal, screened, next_try = [], 0, None, False, 256
        async for request in timed(requests, self.chunk_timeout_s):
            size += len(request.serialized_info)
            if refusal is None and size > MAX_MESSAGE_BYTES:
                refusal = ValueError(
                    f"a message over {MAX_MESSAGE_BYTES} bytes is more than any protocol message holds"
                )
            if refusal is not None:
                chunks = []
                if size > 4 * MAX_MESSAGE_BYTES:
                    break
                continue
            chunks.append(request.serialized_info)
            if not screened and self.protocol is not None and size >= next_try:
                next_try = 2 * size  # tiny chunks: parse again only when the bytes have doubled
                try:
                    head = Envelope.signed_prefix(b"".join(chunks) if len(chunks) > 1 else chunks[0])
                    if head is not None:
                        self.protocol.screen(head)
                        screened = True
                except ValueError as e:
                    refusal = e
                    chunks = []
        if refusal is not None:
            raise refusal
        await self._deliver(b"".join(chunks))
        yield runtime_pb2.ExpertInfo(serialized_info=b"")

    async def _deliver(self, data: bytes) -> None:
        if self.protocol is None:
            if len(self.early) >= EARLY_MESSAGES or self.early_bytes + len(data) > EARLY_BYTES:
                raise ValueError("this peer has not started its run yet and holds too many early messages")
            self.early.append(data)
            self.early_bytes += len(data)
        else:
            await self.protocol.receive(data)  # ValueError tells the sender what was wrong

    async def start(self, protocol: BtardProtocol) -> None:
        self.protocol = protocol
        early, self.early, self.early_bytes = self.early, [], 0
        for data in early:
            try:
                await protocol.receive(data)
            except ValueError:
                pass  # counted and logged by receive


async def join_run(
    peer: Peer, signer: Signer, *, run: str, peers: int, wait_s: float, timeout_s: float
) -> tuple[Mailroom, dict[str, bytes], Callable[[str, Envelope], Awaitable[None]]]:
    """Serve the mailbox RPC, announce this peer's signing key under ``run`` and wait until ``peers`` peers have:
    the mailroom (give it the protocol with ``start``), the group's keys by peer id, and a ``send`` function."""
    p2p = await peer.p2p()
    mailroom = Mailroom()
    await serve(p2p, BTARD_PEER, mailroom)
    peer.on_shutdown("stop serving", lambda: unserve(p2p, BTARD_PEER))
    announcer = Announcer(
        name="BTARD record",
        store=lambda info, expiration_s: declare_btard_peer(
            peer.dht, info, owner=peer.owner, expiration_s=expiration_s
        ),
        make_record=lambda state: BtardPeerInfo(run=run, signing_key=signer.public_key.hex(), state=state),
        period_s=ANNOUNCE_PERIOD_S,
        state=PeerState.ONLINE,
    )
    await announcer.announce_now()
    announcer.start()
    peer.on_shutdown("stop announcing", announcer.stop)
    keys = await wait_for_group(peer, run=run, peers=peers, wait_s=wait_s)
    return mailroom, keys, envelope_sender(P2PTransport(p2p), timeout_s=timeout_s)


def envelope_sender(transport: Transport, *, timeout_s: float) -> Callable[[str, Envelope], Awaitable[None]]:
    """``send(peer_id, envelope)`` over the BTARD mailbox RPC: one unary call for a small message, a stream of
    chunks for a large one, each within ``timeout_s``."""

    async def send(to: str, envelope: Envelope) -> None:
        """Deliver, dialling again while the daemon cannot reach ``to`` yet (right after the group forms, libp2p
        may not have found its address: "failed to dial"); the protocol bounds the whole by its phase timeout. A
        refusal (the receiver's reason comes back as a P2PHandlerError) is not retried."""
        wire = envelope.to_wire()
        stub = RpcStub(transport, to, BTARD_PEER)
        pause = 0.2
        while True:
            try:
                if len(wire) <= STREAM_OVER_BYTES:
                    await stub.call("deliver", runtime_pb2.ExpertInfo(serialized_info=wire), timeout_s=timeout_s)
                else:
                    await asyncio.wait_for(_deliver_streamed(stub, wire), timeout_s)
                return
            except P2PDaemonError as e:
                if "dial" not in str(e):
                    raise  # e.g. a message over the daemon's size limit: trying again would not help
                logger.debug("Could not reach %s yet (%s); dialling again in %.1f s", to[-8:], e, pause)
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)

    return send


async def _deliver_streamed(stub: RpcStub, wire: bytes) -> None:
    async def chunks():
        for start in range(0, len(wire), STREAM_CHUNK_BYTES):
            yield runtime_pb2.ExpertInfo(serialized_info=wire[start : start + STREAM_CHUNK_BYTES])

    acks = [ack async for ack in await stub.iterate("deliver_stream", chunks())]
    if not acks:  # the stream was closed or reset before the receiver took the message
        raise ConnectionError("the deliver_stream stream ended without an acknowledgement")


async def wait_for_group(peer: Peer, *, run: str, peers: int, wait_s: float) -> dict[str, bytes]:
    """The signing keys of the ``peers`` peers announced ONLINE under ``run``, by peer id, once there are that many
    (RuntimeError if there are more, TimeoutError after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = await fetch_btard_peers_async(peer.dht, run=run)
        online = {
            str(p): bytes.fromhex(info.signing_key) for p, info in found.items() if info.state == PeerState.ONLINE
        }
        if len(online) >= peers:
            if len(online) > peers:
                raise RuntimeError(
                    f"run {run!r} has {len(online)} peers announced, more than --peers {peers}: give each run its "
                    f"own --run name"
                )
            logger.info("The group of run %s: %s", run, ", ".join(p[-8:] for p in sorted(online)))
            return online
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(online)} of --peers {peers} peers of run {run!r} announced themselves in {wait_s:.0f} s: "
                f"start the others with the same --run and --initial-peers"
            )
        await asyncio.sleep(0.2)


class BtardPeer:
    def __init__(self, config: BtardPeerConfig):
        self.config = config
        self.behaviour = Behaviour.parse(config.attack)

    def run(self) -> dict:
        return asyncio.run(self._main())

    async def _main(self) -> dict:
        cfg = self.config
        torch.set_num_threads(1)  # gradients must be recomputable bit for bit by any validator
        logger.info("Starting with %s", cfg)
        x_train, y_train, x_test, y_test = digits_split(cfg.init_seed)
        model = DigitsModel(x_train, y_train, hidden=cfg.hidden, batch_size=cfg.batch_size, seed=cfg.init_seed)
        signer = Signer()
        async with Peer(cfg.network, role="BTARD peer") as peer:
            await peer.joined()
            mailroom, keys, send = await join_run(
                peer, signer, run=cfg.run, peers=cfg.peers, wait_s=cfg.wait_for_peers_s, timeout_s=cfg.phase_timeout_s
            )
            me = str(peer.peer_id)
            protocol = BtardProtocol(
                me=me,
                signer=signer,
                keys=keys,
                config=ProtocolConfig(
                    run=cfg.run, tau=cfg.tau, validators=cfg.validators, phase_timeout_s=cfg.phase_timeout_s
                ),
                task=DigitsTask(model),
                send=send,
                mailbox=Mailbox(),
                behaviour=self.behaviour,
            )
            await mailroom.start(protocol)
            summary = await self._train(protocol, model, me)
            summary["accuracy"] = model.accuracy(x_test, y_test)
            summary["refused"] = protocol.refused
            logger.info("Done: %s", json.dumps({k: v for k, v in summary.items() if k != "phase_seconds"}))
            if cfg.result:
                Path(cfg.result).write_text(json.dumps(summary, indent=1))
            return summary

    async def _train(self, protocol: BtardProtocol, model: DigitsModel, me: str) -> dict:
        cfg = self.config
        velocity = torch.zeros_like(model.flat)
        void, seconds, phases = 0, [], Counter()
        diverged: set[str] = set()
        removed_at = None
        started = time.perf_counter()
        for step in range(cfg.steps):
            if me not in protocol.state.active:
                removed_at = step
                logger.info("This peer is %s: stopping at step %d", protocol.state.status(me), step)
                break
            t0 = time.perf_counter()
            outcome = await protocol.step(step)
            seconds.append(time.perf_counter() - t0)
            phases.update(outcome.seconds)
            diverged.update(outcome.diverged_from)
            if outcome.update is None:
                void += 1
            else:
                velocity = cfg.momentum * velocity + outcome.update
                model.flat = model.flat - cfg.lr * velocity
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                logger.info(
                    "step %d: %.3f s/step (median), %d void, %d active, banned %s",
                    step + 1, statistics.median(seconds), void, len(outcome.state.active),
                    sorted(p[-8:] for p in outcome.state.banned),
                )  # fmt: skip
        state = protocol.state
        return {
            "peer": me,
            "behaviour": cfg.attack,
            "steps": len(seconds),
            "removed_at": removed_at,
            "void_steps": void,
            "banned": dict(state.banned),
            "eliminated": sorted(state.eliminated),
            "active": sorted(state.active),
            "diverged_from": sorted(diverged),
            "seconds": time.perf_counter() - started,
            "median_step_s": statistics.median(seconds) if seconds else None,
            "phase_seconds": {k: v / max(1, len(seconds)) for k, v in phases.items()},
        }
