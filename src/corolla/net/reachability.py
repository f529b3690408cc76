"""Whether a peer can be reached directly or through relays, found out by asking a peer outside to dial it back.

Most volunteers' machines sit behind NAT: they can connect out but nobody can connect in. Such a peer must be
reached through a relay (libp2p's circuit relay v2: it reserves a slot at a public peer, and others dial it through
that peer). It cannot see that from inside, so it asks a bootstrap peer (``corolla dht`` serves the
``DIAL_BACK`` RPC) to open a *fresh* connection to the addresses it listens on, from a throwaway p2pd of its own
(the connection the asking peer made is not reused, so only a real inbound path counts). A peer behind NAT asks
the same about its relay addresses, to know when a relay holds a slot for it.
"""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer

from corolla.log import get_logger

logger = get_logger(__name__)

DIAL_BACK = "corolla.dial_back.v1"
MAX_ADDRS = 8
DIAL_TIMEOUT_S = 5.0


def circuit_addrs(relays) -> list[str]:
    """Where a peer behind NAT can be dialed through each of ``relays`` (multiaddrs ending in ``/p2p/<relay>``)."""
    return [f"{relay}/p2p-circuit" for relay in relays if "/p2p/" in relay and "p2p-circuit" not in relay]


def relay_of(addr: str) -> tuple[PeerID, str] | None:
    """The relay of a circuit address ``.../p2p/RELAY/p2p-circuit`` (or of a relay's own ``.../p2p/RELAY``): its
    peer id and its direct address (without the ``/p2p`` part); None for any other address."""
    head = addr.split("/p2p-circuit", 1)[0]
    if "/p2p/" not in head:
        return None
    direct, relay = head.rsplit("/p2p/", 1)
    try:
        return PeerID.from_base58(relay), direct
    except Exception:
        return None


async def connect_through_relays(p2p: P2P, peer: PeerID, addrs) -> None:
    """Open a connection to ``peer`` at ``addrs`` (direct ones, or relay ones ``.../p2p/RELAY/p2p-circuit``);
    raises if none works."""
    await p2p._client.connect(peer, [_multiaddr(a) for a in addrs])


def _multiaddr(text: str) -> Multiaddr:
    """``text`` as a Multiaddr whose ``/p2p/<id>`` parts hold the raw multihash, as p2pd reads them (the Python
    multiaddr package writes them as CIDs, which p2pd refuses)."""
    if "/p2p/" not in text:
        return Multiaddr(text)
    raw, rest = b"", text
    while "/p2p/" in rest:
        before, rest = rest.split("/p2p/", 1)
        peer, _, rest = rest.partition("/")
        rest = "/" + rest if rest else ""
        digest = PeerID.from_base58(peer).to_bytes()
        raw += (Multiaddr(before).to_bytes() if before else b"") + _varint(421) + _varint(len(digest)) + digest
    for part in filter(None, rest.split("/")):
        if part != "p2p-circuit":
            raise ValueError(f"cannot encode {text!r}: only /p2p-circuit may follow a /p2p part")
        raw += _varint(290)
    return Multiaddr(raw)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def listen_addrs(maddrs) -> list[str]:
    """A peer's own addresses as a dialer needs them: TCP addresses, without the trailing ``/p2p/<id>``."""
    addrs = []
    for maddr in maddrs:
        text = str(maddr).split("/p2p/", 1)[0]
        if "/tcp/" in text and "p2p-circuit" not in text and text not in addrs:
            addrs.append(text)
    return addrs


class DialBackService:
    """Serves ``DIAL_BACK`` on ``p2p``: dials the caller (by its peer id, at the addresses it names) from a throwaway
    p2pd and says whether the connection opened. One dial at a time, each within ``dial_timeout_s``."""

    def __init__(self, p2p: P2P, *, dial_timeout_s: float = DIAL_TIMEOUT_S):
        self.p2p, self.dial_timeout_s = p2p, dial_timeout_s
        self._one_at_a_time = asyncio.Semaphore(1)

    async def start(self) -> None:
        await self.p2p.add_protobuf_handler(DIAL_BACK, self._handle, runtime_pb2.ExpertInfo)

    async def _handle(self, request: runtime_pb2.ExpertInfo, context: P2PContext) -> runtime_pb2.ExpertInfo:
        try:
            addrs = _parse_request(request)
        except ValueError as e:
            return _answer(reachable=False, error=f"bad request: {e}")
        async with self._one_at_a_time:
            reachable, error = await self._dial(context.remote_id, addrs)
        logger.info("Dial-back to %s: %s", context.remote_id, "reachable" if reachable else f"unreachable ({error})")
        return _answer(reachable=reachable, error=error)

    async def _dial(self, peer_id: PeerID, addrs: list[str]) -> tuple[bool, str | None]:
        probe = None
        try:
            probe = await asyncio.wait_for(
                P2P.create(host_maddrs=(), no_listen=True, use_relay=True, auto_nat=False, nat_port_map=False,
                           dht_mode="client"),
                timeout=30,
            )  # fmt: skip
            await asyncio.wait_for(connect_through_relays(probe, peer_id, addrs), self.dial_timeout_s)
            return True, None
        except Exception as e:
            return False, f"{type(e).__name__}: {e}"[:300]
        finally:
            if probe is not None:
                await probe.shutdown()


def _parse_request(request: runtime_pb2.ExpertInfo) -> list[str]:
    body = MSGPackSerializer.loads(request.serialized_info)
    addrs = body.get("addrs") if isinstance(body, dict) else None
    if not isinstance(addrs, list) or not 0 < len(addrs) <= MAX_ADDRS:
        raise ValueError(f"addrs must be a list of 1 to {MAX_ADDRS} multiaddrs")
    for addr in addrs:
        if not isinstance(addr, str) or not addr.startswith(("/ip4/", "/ip6/", "/dns")) or "/tcp/" not in addr:
            raise ValueError(f"not a TCP multiaddr: {addr!r}")
        relayed = addr.endswith("/p2p-circuit") and addr.count("/p2p/") == 1
        if "/p2p" in addr and not relayed:
            raise ValueError("send direct addresses without /p2p parts, relay ones as .../p2p/RELAY/p2p-circuit")
        _multiaddr(addr)  # raises on garbage
    return addrs


def _answer(*, reachable: bool, error: str | None) -> runtime_pb2.ExpertInfo:
    return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps({"reachable": reachable, "error": error}))


async def ask_dial_back(p2p: P2P, helper: PeerID, addrs: list[str], *, timeout_s: float) -> bool:
    """Ask ``helper`` to dial this peer at ``addrs``; True if it could. Raises if the helper does not answer (or
    does not serve ``DIAL_BACK``)."""
    request = runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps({"addrs": addrs[:MAX_ADDRS]}))
    response = await asyncio.wait_for(
        p2p.call_protobuf_handler(helper, DIAL_BACK, request, runtime_pb2.ExpertInfo), timeout_s
    )
    body = MSGPackSerializer.loads(response.serialized_info)
    if not body.get("reachable"):
        logger.info("Peer %s could not dial this peer back: %s", helper, body.get("error"))
    return bool(body.get("reachable"))


async def check_reachable(p2p: P2P, helpers: list[PeerID], addrs: list[str], *, timeout_s: float) -> bool | None:
    """True if a helper could dial this peer at ``addrs``, False if helpers answered that they could not, None if
    no helper answered (reachability unknown)."""
    answered = False
    for helper in helpers:
        try:
            if await ask_dial_back(p2p, helper, addrs, timeout_s=timeout_s):
                return True
            answered = True
        except Exception as e:
            logger.debug("Dial-back check through %s failed: %s", helper, e)
    return False if answered else None
