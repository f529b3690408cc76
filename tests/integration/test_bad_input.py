"""Malformed and hostile requests against a real server.

Every bad request must fail alone, with an error that says what was wrong (hivemind hands the server's message to
the caller as P2PHandlerError), or end with a clean close. Meanwhile a healthy inference session, opened before
the first bad request and stepped after each one, keeps producing exactly what transformers computes, and every
bad session gives its attention-cache tokens back. On top of the hand-written cases, hypothesis fuzzes forward
requests and inference sessions (shapes, dtypes, lengths, positions, metadata): each is refused with one of the
server's own validation errors or computed exactly.

The module shares one server and one healthy session, so its tests must not depend on their order: the healthy
session reopens itself when it is closed or full, and tests/integration/test_test_order.py runs this module
reversed and shuffled.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid

import pytest
import torch
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm, wait_for
from corolla.net.loop import background_loop, run_sync
from corolla.net.tensors import pack, unpack_metadata, unpack_tensors
from corolla.protocol.messages import (
    BackwardRequest,
    InferenceOpen,
    InferenceStep,
    PushedStep,
    ServerStatus,
    SpanRequest,
)
from corolla.protocol.rpc import BLOCK_SERVER, RpcStub
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NUM_BLOCKS = 6
HIDDEN = 64
CACHE_TOKENS = 512
MAX_BATCH_TOKENS = 256
MAX_SESSION_LENGTH = 128
SESSION_TIMEOUT = 5
ALLOC_TIMEOUT = 1
SERVER_ARGS = [
    "--cache-tokens", str(CACHE_TOKENS),
    "--max-batch-tokens", str(MAX_BATCH_TOKENS),
    "--max-session-length", str(MAX_SESSION_LENGTH),
    "--session-timeout", str(SESSION_TIMEOUT),
    "--alloc-timeout", str(ALLOC_TIMEOUT),
    "--throughput", "100",
]  # fmt: skip

HEALTHY_LENGTH = 128  # the healthy session's max_length: its reservation while the bad requests run
HEALTHY_PREFIX = 4


# ---- the swarm, a client, a local reference ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint():
    return zoo_checkpoint("llama")


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(
        model=str(checkpoint),
        spans=[f"0:{NUM_BLOCKS}"],
        server_args=SERVER_ARGS,
        log_dir=tmp_path_factory.mktemp("bad-input-logs"),
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(swarm, checkpoint):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint), initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


class Reference:
    """The local transformers model: what the server's blocks should output (before the final norm)."""

    def __init__(self, path):
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    @torch.no_grad()
    def span(self, hidden, start: int, end: int, mask=None, positions=None) -> torch.Tensor:
        """Blocks ``start:end`` of transformers' own model on ``hidden`` (no final norm), as a server runs them."""
        base = self.model.model
        layers, norm = base.layers, base.norm
        base.layers, base.norm = torch.nn.ModuleList(layers[start:end]), torch.nn.Identity()
        try:
            out = base(inputs_embeds=hidden, attention_mask=mask, position_ids=positions, use_cache=False)
        finally:
            base.layers, base.norm = layers, norm
        return out.last_hidden_state

    @torch.no_grad()
    def blocks(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the last decoder layer for every token of ``ids`` (the final norm is not applied)."""
        captured = {}
        hook = self.model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(out=o))
        try:
            self.model(ids, attention_mask=attention_mask)
        finally:
            hook.remove()
        out = captured["out"]
        return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Reference(checkpoint)


class Server:
    """Raw RPCs to the one server, the way a (possibly hostile) client would send them."""

    def __init__(self, client):
        self.view = client.remote_blocks.swarm
        wait_for(lambda: self.view.refresh() or len(self.view.servers) == 1, timeout_s=30, what="the server record")
        (self.peer_id,) = self.view.servers

    async def stub(self):
        return RpcStub(await self.view.transport(), self.peer_id.to_base58(), BLOCK_SERVER)

    def status(self) -> ServerStatus:
        async def call():
            return await (await self.stub()).call("info", runtime_pb2.ExpertUID(uid="info"), timeout_s=10)

        info = run_sync(call(), timeout_s=15)
        return ServerStatus.model_validate(MSGPackSerializer.loads(info.serialized_info))

    def forward(self, request: runtime_pb2.ExpertRequest) -> list[torch.Tensor]:
        async def call():
            return await (await self.stub()).call("forward", request, timeout_s=20)

        return unpack_tensors(run_sync(call(), timeout_s=30))

    def backward(self, request: runtime_pb2.ExpertRequest) -> list[torch.Tensor]:
        async def call():
            return await (await self.stub()).call("backward", request, timeout_s=20)

        return unpack_tensors(run_sync(call(), timeout_s=30))

    def forward_stream(self, messages: list[runtime_pb2.ExpertRequest]) -> list[runtime_pb2.ExpertResponse]:
        """The server's replies; a stream that ends with no reply and no error is sent again, once.

        Such a stream was reset by the transport before the server could answer (seen once in a full-suite run, in the
        healthy request near the module's start; 12 runs of it alone passed); the real client fails over for it too
        (``span_calls._streamed`` raises ConnectionError). A server that answers nothing twice still fails the test.
        """

        async def call():
            return [r async for r in await (await self.stub()).iterate("forward_stream", _aiter(messages))]

        return run_sync(call(), timeout_s=30) or run_sync(call(), timeout_s=30)

    async def inference_async(self, messages, *, hold: asyncio.Event | None = None):
        """Send ``messages`` on one inference stream and return the answers (P2PHandlerError if the server fails it).

        Like a real client, this ends the stream only once every step (a message with tensors) is answered: ending it
        while the server fails the session can reset the stream and lose the server's error. Without steps, it waits
        for the server to end the stream. With ``hold``, the stream stays open until ``hold`` is set instead.
        """
        steps = sum(1 for m in messages if len(m.tensors))
        answered = hold if hold is not None else asyncio.Event()

        async def requests():
            for message in messages:
                yield message
            await answered.wait()

        responses = []
        async for response in await (await self.stub()).iterate("inference", requests()):
            responses.append(response)
            if hold is None and 0 < steps <= len(responses):
                answered.set()
        return responses

    def inference(self, messages, timeout_s: float = 30) -> list[runtime_pb2.ExpertResponse]:
        return run_sync(self.inference_async(messages), timeout_s=timeout_s)


def _aiter(items):
    async def gen():
        for item in items:
            yield item

    return gen()


@pytest.fixture(scope="module")
def server(client) -> Server:
    return Server(client)


class HealthySession:
    """A well-behaved session through the distributed client, checked against the reference at every step.

    It holds HEALTHY_LENGTH cache tokens while open. When it is full, or a test closed it, the next step opens a
    new one (from position 0), so any test may run first, last or alone.
    """

    def __init__(self, client, reference: Reference):
        generator = torch.Generator().manual_seed(0)
        self.client = client
        self.ids = torch.randint(10, 400, (1, HEALTHY_LENGTH), generator=generator)
        self.expected = reference.blocks(self.ids)
        self.embeddings = reference.embed(self.ids)
        self.session = None
        self.position = 0
        self.sessions_opened = 0

    @property
    def is_open(self) -> bool:
        return self.session is not None

    def ensure_open(self) -> None:
        if self.session is None:
            self.session = self.client.remote_blocks.inference_session(max_length=HEALTHY_LENGTH)
            self.position = 0
            self.sessions_opened += 1
            self.step(HEALTHY_PREFIX)

    def step(self, tokens: int = 1) -> None:
        assert tokens <= HEALTHY_LENGTH - HEALTHY_PREFIX
        if self.session is not None and self.position + tokens > HEALTHY_LENGTH:
            self.close()  # full: start over in a new session
        self.ensure_open()
        start, end = self.position, self.position + tokens
        output = self.session.step(self.embeddings[:, start:end])
        torch.testing.assert_close(output, self.expected[:, start:end], atol=1e-4, rtol=1e-4)
        self.position = end

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


@pytest.fixture(scope="module")
def healthy_session(client, reference, server):
    session = HealthySession(client, reference)
    yield session
    session.close()


@pytest.fixture
def healthy(healthy_session):
    """The module's healthy session, open (reopened if an earlier test closed it)."""
    healthy_session.ensure_open()
    return healthy_session


@pytest.fixture
def check_after(healthy, server):
    """After the test's bad request: the healthy session still matches, and no cache or session has leaked."""
    yield
    healthy.step()
    expect_idle(server, healthy_open=True)


def expect_idle(server: Server, *, healthy_open: bool, timeout_s: float = 4.0) -> None:
    """Only the healthy session (if open) holds cache; everything a bad request reserved was given back."""
    tokens_left = CACHE_TOKENS - HEALTHY_LENGTH if healthy_open else CACHE_TOKENS
    sessions = 1 if healthy_open else 0
    last: list[ServerStatus] = []

    def idle() -> bool:
        last[:] = [server.status()]
        return last[0].cache_tokens_left == tokens_left and last[0].active_sessions == sessions

    try:
        wait_for(idle, timeout_s=timeout_s, what="the server to free bad sessions", poll_s=0.05)
    except TimeoutError:
        pytest.fail(f"server did not return to idle ({tokens_left} tokens, {sessions} sessions): {last[0]}")


# ---- building requests ------------------------------------------------------------------------------------------

DROP = object()  # an override value that removes the field from the metadata


def _apply(meta: dict, overrides: dict) -> dict:
    meta = dict(meta)
    for key, value in overrides.items():
        if value is DROP:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


VALUES = torch.Generator().manual_seed(12345)  # hidden states of bad requests: seeded, never the global RNG


def hidden(batch: int = 1, tokens: int = 3, size: int = HIDDEN, fill: float | None = None) -> torch.Tensor:
    values = torch.randn(batch, tokens, size, generator=VALUES)
    return values if fill is None else values.fill_(fill)


def ints(*shape: int, dtype=torch.int64) -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype)


def span_meta(**overrides) -> dict:
    return _apply(SpanRequest(start_block=0, end_block=NUM_BLOCKS).model_dump(), overrides)


def open_meta(*, with_step: bool = True, **overrides) -> dict:
    meta = InferenceOpen(session_id=uuid.uuid4().hex, max_length=16, start_block=0, end_block=NUM_BLOCKS).model_dump()
    if with_step:
        meta |= step_meta()
    return _apply(meta, overrides)


def step_meta(**overrides) -> dict:
    return _apply(InferenceStep(step_id=uuid.uuid4().hex, position=0).model_dump(), overrides)


def message(tensors: list, meta: dict | bytes) -> runtime_pb2.ExpertRequest:
    """A request with ``meta`` as msgpack (or raw bytes as given) and tensors, serialized or already protobuf."""
    serialized = [t if isinstance(t, runtime_pb2.Tensor) else pack([t], {}).tensors[0] for t in tensors]
    metadata = meta if isinstance(meta, bytes) else MSGPackSerializer.dumps(meta)
    return runtime_pb2.ExpertRequest(tensors=serialized, metadata=metadata)


def fwd(*tensors, raw: bytes | None = None, **overrides) -> runtime_pb2.ExpertRequest:
    """A forward request: ``tensors`` (default: valid hidden states) with SpanRequest metadata or ``raw`` bytes."""
    return message(list(tensors) or [hidden()], raw if raw is not None else span_meta(**overrides))


def bwd(*tensors, **overrides) -> runtime_pb2.ExpertRequest:
    """A backward request: ``tensors`` (default: valid hidden states and grad_outputs) with BackwardRequest
    metadata."""
    return message(
        list(tensors) or [hidden(), hidden()], _apply(BackwardRequest(**span_meta()).model_dump(), overrides)
    )


def opening(*tensors, raw: bytes | None = None, **overrides) -> runtime_pb2.ExpertRequest:
    """The first message of a session: InferenceOpen metadata, plus a step at position 0 if it has tensors."""
    return message(list(tensors), raw if raw is not None else open_meta(with_step=bool(tensors), **overrides))


def step(position: int, *tensors, **overrides) -> runtime_pb2.ExpertRequest:
    return message(list(tensors) or [hidden()], step_meta(position=position, **overrides))


def chunked(request: runtime_pb2.ExpertRequest, chunk_bytes: int = 2**16) -> list[runtime_pb2.ExpertRequest]:
    """A request as rpc_forward_stream takes it: the metadata first, then the tensors in chunks."""
    parts = [chunk for tensor in request.tensors for chunk in split_for_streaming(tensor, chunk_bytes)]
    return [runtime_pb2.ExpertRequest(metadata=request.metadata)] + [
        runtime_pb2.ExpertRequest(tensors=[p]) for p in parts
    ]


def nan_at(tokens: int, index: int, value: float = float("nan")) -> torch.Tensor:
    values = hidden(tokens=tokens)
    values[:, index] = value
    return values


GARBAGE_TENSOR = runtime_pb2.Tensor(buffer=b"\x01\x02\x03", size=[1, 3, HIDDEN], dtype="float32")
OBJECT_TENSOR = runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="object")
HUGE_SHAPE_TENSOR = runtime_pb2.Tensor(buffer=b"\x00" * 16, size=[10**6, 10**6, HIDDEN], dtype="float32")
INT_GRAD_TENSOR = runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1, 1, 1], dtype="int64", requires_grad=True)
NOT_MSGPACK = b"\xc1\xc1 this is not msgpack \xff"
HOSTS = f"this server hosts blocks 0:{NUM_BLOCKS}"
LIMIT = f"tokens exceed this server's limit of {MAX_BATCH_TOKENS}"
SHAPE = r"shape \[batch, tokens, hidden\]"
POSITIONS_RANGE = rf"position ids must be in \[0, {MAX_SESSION_LENGTH}\)"

# ---- the healthy session and well-formed raw requests are right -------------------------------------------------


def test_healthy_session_and_raw_requests_match_reference(server, healthy, reference, check_after):
    """Sanity of the harness: well-formed raw requests (unary, streamed, inference) give the reference outputs."""
    ids = torch.randint(10, 400, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    expected = reference.blocks(ids, attention_mask=mask)[mask.bool()]
    embeddings = reference.embed(ids)
    flags = dict(has_attention_mask=True, has_position_ids=True)

    (output,) = server.forward(fwd(embeddings, mask, positions, **flags))
    torch.testing.assert_close(output[mask.bool()], expected, atol=1e-4, rtol=1e-4)

    responses = server.forward_stream(chunked(fwd(embeddings, mask, positions, **flags), 256))
    (streamed,) = unpack_tensors(runtime_pb2.ExpertResponse(tensors=[t for r in responses for t in r.tensors]))
    torch.testing.assert_close(streamed, output)

    first = opening(embeddings[:, :3], mask[:, :3], positions[:, :3], batch_size=2, **flags)
    second = step(3, embeddings[:, 3:], mask, positions[:, 3:], step_id="repeated", **flags)
    again = step(3, embeddings[:, 3:], mask, positions[:, 3:], step_id="repeated", **flags)
    responses = server.inference([first, second, again])
    outputs = torch.cat([unpack_tensors(r)[0] for r in responses[:2]], dim=1)
    torch.testing.assert_close(outputs[mask.bool()], expected, atol=1e-4, rtol=1e-4)
    assert unpack_metadata(responses[1])["position"] == 5
    assert responses[2] == responses[1], "a repeated step must be answered with the same result"
    assert 0 < unpack_metadata(responses[0])["cache_tokens_left"] < CACHE_TOKENS


# ---- bad unary forward requests ---------------------------------------------------------------------------------

FORWARD_CASES = {  # name: (request, what the error must say)
    "int hidden states": (fwd(ints(1, 3, HIDDEN)), "must be floating point, got torch.int64"),
    "bool hidden states": (fwd(ints(1, 3, HIDDEN, dtype=torch.bool)), "must be floating point, got torch.bool"),
    "wrong hidden size": (fwd(hidden(size=32)), f"hidden size must be {HIDDEN}, got 32"),
    "rank 2": (fwd(torch.randn(3, HIDDEN, generator=VALUES)), SHAPE + r", got \[3, 64\]"),
    "rank 4": (fwd(torch.randn(1, 1, 3, HIDDEN, generator=VALUES)), SHAPE + r", got \[1, 1, 3, 64\]"),
    "scalar": (fwd(torch.tensor(1.0)), SHAPE + r", got \[\]"),
    "nan": (fwd(nan_at(3, 1)), "NaN or Inf"),
    "inf": (fwd(nan_at(3, 0, float("-inf"))), "NaN or Inf"),
    "no tokens": (fwd(hidden(tokens=0)), r"empty: shape \[1, 0, 64\]"),
    "no rows": (fwd(hidden(batch=0)), r"empty: shape \[0, 3, 64\]"),
    "over max_batch_tokens": (fwd(hidden(tokens=MAX_BATCH_TOKENS + 1)), f"1x257=257 {LIMIT}"),
    "over max_batch_tokens by rows": (fwd(hidden(batch=5, tokens=60)), f"5x60=300 {LIMIT}"),
    "blocks past the end": (fwd(start_block=5, end_block=9), f"blocks 5:9 are not hosted here; {HOSTS}"),
    "unhosted blocks": (fwd(start_block=7, end_block=8), f"blocks 7:8 are not hosted here; {HOSTS}"),
    "empty block range": (fwd(start_block=3, end_block=3), "block range 3:3 is empty"),
    "reversed block range": (fwd(start_block=4, end_block=2), "block range 4:2 is empty"),
    "negative start block": (fwd(start_block=-1), "start_block.*greater than or equal to 0"),
    "zero end block": (fwd(end_block=0), "end_block.*greater than 0"),
    "start block not a number": (fwd(start_block="zero"), "start_block.*integer"),
    "fractional block": (fwd(end_block=2.5), "end_block.*integer"),
    "not msgpack": (fwd(raw=NOT_MSGPACK), "metadata is not valid msgpack"),
    "msgpack list": (fwd(raw=MSGPackSerializer.dumps([0, 6])), "metadata must be a dict, got list"),
    "no metadata": (fwd(raw=b""), "malformed SpanRequest.*start_block.*Field required"),
    "missing end block": (fwd(end_block=DROP), "end_block.*Field required"),
    "no tensors": (message([], span_meta()), "expected 1 tensors.*got 0"),
    "extra tensor": (fwd(hidden(), hidden()), "expected 1 tensors.*got 2"),
    "mask announced but missing": (fwd(has_attention_mask=True), "expected 2 tensors.*got 1"),
    "undecodable tensor": (fwd(GARBAGE_TENSOR), "could not be decoded"),
    "object dtype tensor": (fwd(OBJECT_TENSOR), "could not be decoded"),
    "huge declared shape": (fwd(HUGE_SHAPE_TENSOR), "could not be decoded"),
    "int tensor requiring grad": (fwd(INT_GRAD_TENSOR), "could not be decoded"),
    "mask with 2": (fwd(hidden(), torch.tensor([[1, 2, 1]]), has_attention_mask=True), "only 0 and 1"),
    "mask with nan": (fwd(hidden(), torch.tensor([[1, float("nan"), 1]]), has_attention_mask=True), "mask.*NaN"),
    "mask of wrong length": (
        fwd(hidden(), ints(1, 4), has_attention_mask=True),
        r"attention mask must have shape \[1, 3\], got \[1, 4\]",
    ),
    "positions of wrong shape": (
        fwd(hidden(), torch.arange(4)[None], has_position_ids=True),
        r"position ids must have shape \[1, 3\], got \[1, 4\]",
    ),
    "flat positions": (
        fwd(hidden(), torch.arange(3), has_position_ids=True),
        r"position ids must have shape \[1, 3\], got \[3\]",
    ),
    "float positions": (
        fwd(hidden(), torch.zeros(1, 3), has_position_ids=True),
        "must be integers, got torch.float32",
    ),
    "negative positions": (fwd(hidden(), torch.tensor([[-1, 0, 1]]), has_position_ids=True), POSITIONS_RANGE),
    "huge positions": (fwd(hidden(), torch.tensor([[0, 1, 10**9]]), has_position_ids=True), POSITIONS_RANGE),
    "unknown output compression": (fwd(output_compression="ZSTD"), "unknown compression 'ZSTD'"),
    "another protocol version": (fwd(protocol_version=1), "speaks corolla protocol 1, this server speaks"),
    "prompts announced but missing": (fwd(has_prompts=True), "expected 2 tensors.*got 1"),
    "prompts for too few blocks": (
        fwd(hidden(), torch.randn(2, 1, 1, HIDDEN, generator=VALUES), has_prompts=True),
        rf"prompts must have shape \[{NUM_BLOCKS} blocks, 1 or 1, prefix <= 3, {HIDDEN}\], got \[2, 1, 1, 64\]",
    ),
    "prompts longer than the input": (
        fwd(hidden(), torch.randn(NUM_BLOCKS, 1, 4, HIDDEN, generator=VALUES), has_prompts=True),
        r"prefix <= 3",
    ),
    "prompts for other rows": (
        fwd(hidden(), torch.randn(NUM_BLOCKS, 2, 1, HIDDEN, generator=VALUES), has_prompts=True),
        "prompts must",
    ),
    "int prompts": (fwd(hidden(), ints(NUM_BLOCKS, 1, 1, HIDDEN), has_prompts=True), "prompts must be floating"),
    "nan prompts": (
        fwd(hidden(), torch.full((NUM_BLOCKS, 1, 1, HIDDEN), float("nan")), has_prompts=True),
        "prompts contain NaN",
    ),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_bad_forward(server, check_after, case):
    request, expected = FORWARD_CASES[case]
    with pytest.raises(P2PHandlerError, match=expected):
        server.forward(request)


# ---- bad backward requests --------------------------------------------------------------------------------------

BACKWARD_CASES = {  # name: (request, what the error must say)
    "no grad_outputs": (message([hidden()], BackwardRequest(**span_meta()).model_dump()), "needs hidden states and"),
    "grad of another shape": (bwd(hidden(), hidden(tokens=2)), r"shape of the hidden states \[1, 3, 64\]"),
    "int grad": (bwd(hidden(), ints(1, 3, HIDDEN)), "grad_outputs must be floating point"),
    "nan grad": (bwd(hidden(), nan_at(3, 2)), "grad_outputs contain NaN or Inf"),
    "nan hidden states": (bwd(nan_at(3, 0), hidden()), "hidden states contain NaN"),
    "over max_batch_tokens": (
        bwd(hidden(batch=5, tokens=60), hidden(batch=5, tokens=60)),
        f"5x60=300 {LIMIT}",
    ),
    "unhosted blocks": (bwd(start_block=5, end_block=9), f"blocks 5:9 are not hosted here; {HOSTS}"),
    "extra tensor": (bwd(hidden(), hidden(), hidden()), "expected 1 tensors.*got 2"),
    "bad prompts": (
        bwd(hidden(), hidden(), torch.randn(1, 1, 1, HIDDEN, generator=VALUES), has_prompts=True),
        "prompts must",
    ),
    "not msgpack": (message([hidden(), hidden()], NOT_MSGPACK), "metadata is not valid msgpack"),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_bad_backward(server, check_after, case):
    request, expected = BACKWARD_CASES[case]
    with pytest.raises(P2PHandlerError, match=expected):
        server.backward(request)


def test_backward_leaves_the_weights_alone(server, reference, check_after):
    """A valid backward gives the input gradient of the reference blocks; repeated hostile-sized gradients change
    nothing on the server (the healthy session checked after this test still matches the reference)."""
    ids = torch.randint(10, 400, (1, 4), generator=torch.Generator().manual_seed(9))
    embeddings = reference.embed(ids).requires_grad_(True)
    grad = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(10))
    with torch.enable_grad():
        captured = {}
        hook = reference.model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(out=o))
        try:
            reference.model(inputs_embeds=embeddings)
        finally:
            hook.remove()
        out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
        (expected,) = torch.autograd.grad(out, embeddings, grad)
    (got,) = server.backward(bwd(embeddings.detach(), grad))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for _ in range(3):
        server.backward(bwd(embeddings.detach(), grad * 1e6))


# ---- bad streamed forward requests ------------------------------------------------------------------------------

STREAM_CASES = {  # name: (messages, what the error must say)
    "larger than the limit": (chunked(fwd(hidden(tokens=5000))), "larger than this server's max_batch_tokens allow"),
    "not msgpack": (chunked(fwd(raw=NOT_MSGPACK)), "metadata is not valid msgpack"),
    "no metadata": (chunked(fwd(raw=b"")), "malformed SpanRequest.*Field required"),
    "nothing at all": ([], "malformed SpanRequest.*Field required"),
    "truncated chunks": (chunked(fwd(hidden(tokens=200)), 4096)[:-1], "could not be decoded"),
    "unhosted blocks": (chunked(fwd(start_block=5, end_block=9)), "blocks 5:9 are not hosted here"),
    "nan": (chunked(fwd(hidden(fill=float("nan")))), "NaN or Inf"),
}


@pytest.mark.parametrize("case", STREAM_CASES)
def test_bad_forward_stream(server, check_after, case):
    messages, expected = STREAM_CASES[case]
    with pytest.raises(P2PHandlerError, match=expected):
        server.forward_stream(messages)


# ---- bad inference sessions -------------------------------------------------------------------------------------

INFERENCE_CASES = {  # name: (messages of one session, what the error must say)
    # opening
    "huge max_length": (
        [opening(max_length=10**9)],
        f"max_length=1000000000 exceeds this server's --max-session-length {MAX_SESSION_LENGTH}",
    ),
    "huge batch_size": ([opening(batch_size=10**9)], f"batch_size=1000000000 exceeds {MAX_BATCH_TOKENS}"),
    "more cache than the server has": (
        [opening(batch_size=8, max_length=MAX_SESSION_LENGTH)],
        f"needs 1024 cache tokens but this server's whole budget is {CACHE_TOKENS}",
    ),
    "zero max_length": ([opening(max_length=0)], "max_length.*greater than 0"),
    "negative batch_size": ([opening(batch_size=-4)], "batch_size.*greater than 0"),
    "blocks past the end": (
        [opening(hidden(), start_block=5, end_block=9)],
        f"blocks 5:9 are not hosted here; {HOSTS}",
    ),
    "unhosted blocks": ([opening(hidden(), start_block=7, end_block=8)], "blocks 7:8 are not hosted here"),
    "negative start block": ([opening(hidden(), start_block=-2)], "start_block.*greater than or equal to 0"),
    "missing session_id": (
        [opening(hidden(), session_id=DROP)],
        "malformed InferenceOpen.*session_id.*Field required",
    ),
    "empty session_id": ([opening(hidden(), session_id="")], "session_id.*at least 1 character"),
    "overlong session_id": ([opening(hidden(), session_id="x" * 10_000)], "session_id.*at most 128 characters"),
    "not msgpack": ([opening(hidden(), raw=NOT_MSGPACK)], "metadata is not valid msgpack"),
    "msgpack list": ([opening(hidden(), raw=MSGPackSerializer.dumps(["open", 0, 6]))], "must be a dict, got list"),
    "msgpack string": ([opening(hidden(), raw=MSGPackSerializer.dumps("open"))], "must be a dict, got str"),
    "no metadata": ([opening(hidden(), raw=b"")], "malformed InferenceOpen.*Field required"),
    "first step without step_id": (
        [opening(hidden(), step_id=DROP)],
        "malformed InferenceStep.*step_id.*Field required",
    ),
    "unknown output compression": ([opening(hidden(), output_compression="ZSTD")], "unknown compression 'ZSTD'"),
    # positions in the session
    "negative position": ([opening(hidden(), position=-1)], "position.*greater than or equal to 0"),
    "first step skips positions": (
        [opening(hidden(), position=3)],
        "step at position 3 would skip positions: the session holds 0 tokens",
    ),
    "later step skips positions": (
        [opening(hidden()), step(7)],
        "step at position 7 would skip positions: the session holds 3 tokens",
    ),
    "step past max_length": (
        [opening(hidden(), max_length=4), step(3, hidden(tokens=2))],
        "step would reach 5 tokens, over the session's max_length 4",
    ),
    "first step past max_length": (
        [opening(hidden(tokens=5), max_length=4)],
        "step would reach 5 tokens, over the session's max_length 4",
    ),
    # the tensors of a step
    "int hidden states": ([opening(ints(1, 3, HIDDEN, dtype=torch.int32))], "must be floating point, got torch.int32"),
    "wrong hidden size": ([opening(hidden()), step(3, hidden(size=65))], f"hidden size must be {HIDDEN}, got 65"),
    "rank 2": ([opening(torch.randn(3, HIDDEN, generator=VALUES))], SHAPE),
    "nan": ([opening(hidden()), step(3, hidden(fill=float("nan")))], "NaN or Inf"),
    "inf": ([opening(hidden(fill=float("inf")))], "NaN or Inf"),
    "empty step": ([opening(hidden()), step(3, hidden(tokens=0))], "hidden states are empty"),
    "batch differs from the opened one": (
        [opening(hidden(batch=2), batch_size=1)],
        "the session was opened for batch size 1, got 2",
    ),
    "over max_batch_tokens": (
        [opening(hidden(batch=3, tokens=90), batch_size=3, max_length=100)],
        f"3x90=270 {LIMIT}",
    ),
    "wrong number of tensors": ([opening(hidden(), has_position_ids=True)], "expected 2 tensors.*got 1"),
    "too many tensors": ([opening(hidden(), hidden(), hidden())], "expected 1 tensors.*got 3"),
    "undecodable tensor": ([opening(hidden()), step(3, GARBAGE_TENSOR)], "could not be decoded"),
    "mask with 2": ([opening(hidden(), torch.tensor([[1, 2, 1]]), has_attention_mask=True)], "only 0 and 1"),
    "mask not covering the past": (
        [opening(hidden()), step(3, hidden(tokens=1), ints(1, 1), has_attention_mask=True)],
        r"attention mask must have shape \[1, 4\], got \[1, 1\]",
    ),
    "positions of wrong shape": (
        [opening(hidden(), torch.arange(2)[None], has_position_ids=True)],
        r"position ids must have shape \[1, 3\], got \[1, 2\]",
    ),
    "huge positions": ([opening(hidden(), torch.tensor([[0, 1, 2**40]]), has_position_ids=True)], POSITIONS_RANGE),
}


@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_bad_inference(server, check_after, case):
    messages, expected = INFERENCE_CASES[case]
    with pytest.raises(P2PHandlerError, match=expected):
        server.inference(messages)


def test_steps_without_tensors_are_ignored(server, check_after):
    """Messages without tensors after the first are keep-alives, not errors; the session ends cleanly."""
    responses = server.inference([opening(), message([], step_meta()), step(0)])
    assert len(responses) == 1 and unpack_metadata(responses[0])["position"] == 3


def test_duplicate_session_id_is_refused_and_leaks_nothing(server, healthy, check_after):
    """A second session under an id already open is refused, the first keeps its session, and the refused open
    holds no session or cache afterwards (check_after: it used to leave ``active_sessions`` one too high)."""
    session_id = uuid.uuid4().hex

    async def scenario():
        hold = asyncio.Event()
        first = asyncio.create_task(
            server.inference_async([opening(hidden(), max_length=8, session_id=session_id)], hold=hold)
        )
        await _until(lambda: server.status().active_sessions == 2, "the first session to open")
        with pytest.raises(P2PHandlerError, match=f"session id '{session_id}' is already in use"):
            await server.inference_async([opening(hidden(), max_length=8, session_id=session_id)])
        assert (await asyncio.to_thread(server.status)).active_sessions == 2  # status() blocks: off the loop
        hold.set()
        assert len(await first) == 1  # the first session answered its step and ended cleanly

    run_sync(scenario(), timeout_s=30)


def test_pushes_are_taken_only_from_the_server_the_client_named(server, check_after):
    """Anyone who learns a session id could push steps into it: the server takes a push only from the peer the
    client named as its previous server (``pusher``), here this test's own peer; others are refused."""

    async def scenario():
        me = (await server.view.p2p()).peer_id.to_base58()
        answers = {}
        for pusher in ("QmSomeOtherServerThatTheClientNamedInsteadOfThisOne", me):
            session_id, hold = uuid.uuid4().hex, asyncio.Event()
            first = opening(hidden(), max_length=8, session_id=session_id, pusher=pusher)
            session = asyncio.create_task(server.inference_async([first], hold=hold))
            await _until(lambda: server.status().active_sessions == 2, "the session to open")
            pushes = (await asyncio.to_thread(server.status)).steps_from_pushes
            meta = PushedStep(session_id=session_id, step_id=uuid.uuid4().hex, position=3).model_dump()
            try:
                await (await server.stub()).call("push", message([hidden()], meta), timeout_s=10)
            except P2PHandlerError as e:
                answers[pusher] = str(e)
            else:
                await _until(lambda n=pushes + 1: server.status().steps_from_pushes == n, "the push to be computed")
                answers[pusher] = "computed"
            hold.set()
            await session
        return answers

    answers = run_sync(scenario(), timeout_s=60)
    refused, accepted = answers.values()
    assert "may not push into session" in refused and "did not name it as the previous server" in refused
    assert accepted == "computed"


def test_a_push_stream_drops_bad_pushes_alone_and_takes_only_the_named_servers(server, check_after):
    """Servers push over one long-lived stream per session. On it, a malformed message and a push into a session
    whose client named another peer are dropped alone (nothing answers on a push stream): the stream stays open,
    and the push that follows them, into a session that named this peer, is computed (and only that one)."""

    async def scenario():
        me = (await server.view.p2p()).peer_id.to_base58()
        ids, holds, sessions = {}, [], []
        for pusher in ("QmSomeOtherServerThatTheClientNamedInsteadOfThisOne", me):
            ids[pusher], hold = uuid.uuid4().hex, asyncio.Event()
            first = opening(hidden(), max_length=8, session_id=ids[pusher], pusher=pusher)
            holds.append(hold)
            sessions.append(asyncio.create_task(server.inference_async([first], hold=hold)))
        await _until(lambda: server.status().active_sessions == 3, "the sessions to open")
        pushes = (await asyncio.to_thread(server.status)).steps_from_pushes
        stream = await (await server.view.transport()).open_stream(
            server.peer_id.to_base58(), BLOCK_SERVER.handle("push_stream"), timeout_s=10
        )
        await stream.send(message([hidden()], b"not msgpack"))
        for session_id in ids.values():  # in order: the refused push is handled before the accepted one
            meta = PushedStep(session_id=session_id, step_id=uuid.uuid4().hex, position=3).model_dump()
            await stream.send(message([hidden()], meta))
        await _until(lambda n=pushes + 1: server.status().steps_from_pushes >= n, "the accepted push")
        computed = (await asyncio.to_thread(server.status)).steps_from_pushes - pushes
        await stream.close()
        for hold in holds:
            hold.set()
        await asyncio.gather(*sessions)
        return computed

    assert run_sync(scenario(), timeout_s=60) == 1


# ---- sessions that go idle or vanish ----------------------------------------------------------------------------


def _held(server: Server, sessions: int, what: str) -> None:
    wait_for(lambda: server.status().active_sessions == sessions, timeout_s=10, what=what, poll_s=0.05)


async def _until(predicate, what: str, timeout_s: float = 10) -> None:
    """wait_for off the event loop (the predicate makes RPCs through it)."""
    await asyncio.to_thread(wait_for, predicate, timeout_s=timeout_s, what=what, poll_s=0.05)


def test_idle_sessions_are_closed_after_session_timeout(server, healthy):
    """A stream that sends nothing, one that only opens, and one that stops after a step are all closed with the
    server's timeout error and their cache is freed, while a session that sends keep-alives the whole time (and
    the healthy session, stepped the whole time) stays open."""
    holds: list[asyncio.Event] = []
    beats: asyncio.Queue = asyncio.Queue()
    loop = background_loop()

    async def idle(messages):
        hold = asyncio.Event()
        holds.append(hold)
        try:
            await server.inference_async(messages, hold=hold)
        except P2PHandlerError as e:
            return str(e)
        return "the stream ended without an error"

    async def all_idle():
        return await asyncio.gather(
            idle([]),
            idle([opening(max_length=16)]),
            idle([opening(hidden(), max_length=32)]),
        )

    async def kept_alive():
        async def requests():
            yield opening(max_length=8)
            while (beat := await beats.get()) is not None:
                yield beat

        return [r async for r in await (await server.stub()).iterate("inference", requests())]

    def beat() -> bool:
        healthy.step()
        loop.call_soon_threadsafe(beats.put_nowait, message([], step_meta()))
        return False

    idle_sessions = asyncio.run_coroutine_threadsafe(all_idle(), loop)
    alive = asyncio.run_coroutine_threadsafe(kept_alive(), loop)
    wait_for(
        lambda: server.status().cache_tokens_left == CACHE_TOKENS - HEALTHY_LENGTH - 48 - 8,
        timeout_s=10,
        what="the idle sessions to reserve their cache",
    )
    assert server.status().active_sessions == 4  # the stream that sends nothing opens no session
    # the healthy and the kept-alive sessions send a message every 0.5 s meanwhile, so they never time out
    wait_for(lambda: idle_sessions.done() or beat(), timeout_s=6 * SESSION_TIMEOUT, what="the idle sessions to end")
    for error in idle_sessions.result(timeout=1):
        assert f"no message within {SESSION_TIMEOUT:.1f} s; closing the stream" in error
    wait_for(
        lambda: server.status().cache_tokens_left == CACHE_TOKENS - HEALTHY_LENGTH - 8,
        timeout_s=4,
        what="the idle sessions' cache back",
    )
    assert server.status().active_sessions == 2 and not alive.done(), "the kept-alive session was closed"
    loop.call_soon_threadsafe(beats.put_nowait, None)
    assert alive.result(timeout=10) == []  # ended cleanly by its client
    expect_idle(server, healthy_open=True)
    healthy.step()


async def _open_stream(server: Server, *messages):
    """An inference stream that sends ``messages`` and then stays open without ever ending."""

    async def requests():
        for item in messages:
            yield item
        await asyncio.Event().wait()

    return await (await server.stub()).iterate("inference", requests())


async def _drop(responses, after_s: float) -> None:
    """Stop waiting for an answer that never comes (a client timeout, or Ctrl+C): hivemind closes the connection."""
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(responses), after_s)


async def _vanish_after_answer(server: Server, sessions: int):
    """Open, step, read the answer, then drop the connection without ending the stream."""
    responses = await _open_stream(server, opening(hidden()))
    await anext(responses)
    await responses.aclose()  # closes the connection; the request stream was never ended


async def _vanish_while_waiting(server: Server, sessions: int):
    """Open, step, read the answer, then give up waiting for the next one (none comes: no second step was sent)."""
    responses = await _open_stream(server, opening(hidden()))
    await anext(responses)
    await _drop(responses, 0.2)


async def _vanish_without_reading_the_answer(server: Server, sessions: int):
    """Send a long step; once the server holds the session, drop the connection without using its answer (the
    read is cancelled, or the answer that came is thrown away)."""
    responses = await _open_stream(server, opening(hidden(tokens=100), max_length=100))
    reading = asyncio.create_task(anext(responses))  # a started read: closing it closes the connection
    await _until(lambda: server.status().active_sessions == sessions, "the session to open")
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await responses.aclose()


async def _vanish_right_after_open(server: Server, sessions: int):
    """Open without a step; once the server holds the session, drop the connection."""
    responses = await _open_stream(server, opening())
    await _until(lambda: server.status().active_sessions == sessions, "the session to open")
    await _drop(responses, 0.01)


WITNESS_LENGTH = 8


@pytest.mark.parametrize(
    "vanish",
    [_vanish_after_answer, _vanish_while_waiting, _vanish_without_reading_the_answer, _vanish_right_after_open],
)
def test_vanished_client_frees_its_session(server, healthy, vanish):
    """A client that disappears mid-session is noticed at once, not at its session timeout: its cache comes back
    while a witness session, idle since *before* the vanished one's last message, has not timed out yet (the
    witness would time out first)."""

    async def scenario():
        hold = asyncio.Event()
        witness = asyncio.create_task(server.inference_async([opening(max_length=WITNESS_LENGTH)], hold=hold))
        await _until(lambda: server.status().active_sessions == 2, "the witness session to open")
        await vanish(server, sessions=3)

        def freed() -> bool:
            if witness.done():
                raise AssertionError(f"the witness session ended before the vanished one was freed: {witness!r}")
            status = server.status()
            return status.active_sessions == 2 and status.cache_tokens_left == (
                CACHE_TOKENS - HEALTHY_LENGTH - WITNESS_LENGTH
            )

        await _until(freed, "the vanished session to be freed", timeout_s=2 * SESSION_TIMEOUT)
        hold.set()
        assert await witness == []  # the witness ends cleanly: it never timed out

    run_sync(scenario(), timeout_s=4 * SESSION_TIMEOUT)
    expect_idle(server, healthy_open=True)
    healthy.step()


# ---- cache budget -----------------------------------------------------------------------------------------------


def test_busy_server_refuses_after_alloc_timeout(server, healthy, check_after):
    """When the cache is full, a new session waits --alloc-timeout and fails with a clear 'busy' error; once the
    cache is free again, the same request is served."""
    holder_tokens = 2 * MAX_SESSION_LENGTH
    free_after = CACHE_TOKENS - HEALTHY_LENGTH - holder_tokens
    request = [opening(hidden(batch=2), batch_size=2, max_length=100)]

    async def scenario():
        hold = asyncio.Event()
        holder = asyncio.create_task(
            server.inference_async([opening(batch_size=2, max_length=MAX_SESSION_LENGTH)], hold=hold)
        )
        await _until(lambda: server.status().cache_tokens_left == free_after, "the holder to reserve its cache")
        try:
            await server.inference_async(request)
        except P2PHandlerError as e:
            error = str(e)
        else:
            error = "no error"
        hold.set()
        assert await holder == []  # ended cleanly by its client
        return error

    error = run_sync(scenario(), timeout_s=4 * SESSION_TIMEOUT)
    assert (
        f"server busy: no room for 200 cache tokens within {ALLOC_TIMEOUT:.1f} s ({free_after} of {CACHE_TOKENS} free)"
        in error
    )
    expect_idle(server, healthy_open=True)
    request[0].metadata = MSGPackSerializer.dumps(open_meta(batch_size=2, max_length=100))  # a fresh session id
    (answer,) = server.inference(request)
    assert unpack_tensors(answer)[0].shape == (2, 3, HIDDEN)


# ---- fuzzing: random requests are refused clearly or computed exactly ---------------------------------------------

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAR_ERROR = re.compile(r"\b(InvalidRequestError|ServerBusyError)\b")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OTHER_DTYPES = (torch.int64, torch.bool, torch.uint8)


class ServerLog:
    """The exceptions the server logged since the last call: every refusal must be one of its own errors."""

    def __init__(self, path):
        self.path, self.offset = path, path.stat().st_size

    def new_exceptions(self) -> list[str]:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        self.offset += len(text.encode(errors="replace"))
        return re.findall(r"^((?:\w+\.)*\w*(?:Error|Exception)\b.*)$", text, flags=re.MULTILINE)

    def expect_only_clear_errors(self) -> None:
        unclear = [line for line in self.new_exceptions() if not line.startswith("corolla.errors.")]
        assert not unclear, f"the server failed with something else than its own validation errors: {unclear}"


@pytest.fixture(scope="module")
def server_log(swarm):
    return ServerLog(swarm.log_dir / "server0.log")


def often(draw, good, bad: st.SearchStrategy):
    """``good`` nine times in ten, else something drawn from ``bad``: most requests are wrong in one or two ways
    only, so valid ones get computed too (and later steps of a session reached) and each check is reached alone."""
    return draw(bad) if draw(st.integers(0, 9)) == 9 else good  # hypothesis favours small draws: 0 is good


@st.composite
def tensors_of(draw, batch: int, tokens: int):
    """Hidden states: mostly valid float32, else another float or non-float dtype, hidden size, or NaN/Inf."""
    size = often(draw, HIDDEN, st.sampled_from([HIDDEN - 1, 2 * HIDDEN, 1]))
    seed = draw(st.integers(0, 2**16))
    values = torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(seed))
    dtype = often(draw, torch.float32, st.sampled_from(FLOAT_DTYPES[1:] * 2 + OTHER_DTYPES))
    values = values.to(dtype) if dtype.is_floating_point else (values > 0).to(dtype)
    if values.is_floating_point() and values.numel() and not often(draw, True, st.just(False)):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    return values


JUNK_VALUES = st.one_of(st.none(), st.lists(st.integers(), min_size=1, max_size=2), st.just({"x": 1}))
JUNK_FIELDS = ("start_block", "has_position_ids", "output_compression")


@st.composite
def forward_requests(draw):
    """(request, what it asks for): random blocks, shape, dtype, mask, positions and junk metadata fields."""
    start = often(draw, draw(st.integers(0, NUM_BLOCKS - 1)), st.sampled_from([-1, NUM_BLOCKS]))
    end = often(draw, draw(st.integers(min(start + 1, NUM_BLOCKS), NUM_BLOCKS)), st.integers(-1, NUM_BLOCKS + 2))
    batch = often(draw, draw(st.integers(1, 3)), st.just(0))
    tokens = often(draw, draw(st.integers(1, 6)), st.sampled_from([0, MAX_BATCH_TOKENS // batch + 1 if batch else 0]))
    hidden_states = draw(tensors_of(batch, tokens))
    tensors, meta = [hidden_states], span_meta(start_block=start, end_block=end)
    mask = positions = None
    if draw(st.booleans()):
        length = often(draw, tokens, st.sampled_from([max(0, tokens - 1), tokens + 1]))
        bits = often(draw, st.sampled_from([1, 1, 1, 0]), st.just(st.sampled_from([1, 1, 0, 2])))
        mask = torch.tensor(draw(st.lists(bits, min_size=batch * length, max_size=batch * length)), dtype=torch.int64)
        mask = mask.reshape(batch, length)
        tensors.append(mask)
        meta["has_attention_mask"] = True
    if draw(st.booleans()):
        values = often(draw, st.integers(0, 2 * tokens), st.just(st.integers(-2, MAX_SESSION_LENGTH + 1)))
        positions = torch.tensor(draw(st.lists(values, min_size=batch * tokens, max_size=batch * tokens)))
        positions = positions.reshape(batch, tokens)
        tensors.append(positions)
        meta["has_position_ids"] = True
    junk = often(draw, {}, st.dictionaries(st.sampled_from(JUNK_FIELDS), JUNK_VALUES, min_size=1, max_size=2))
    if draw(st.booleans()):
        junk["an_unknown_field"] = draw(st.integers(-(2**31), 2**31))
    meta |= junk
    asked = dict(start=start, end=end, hidden=hidden_states, mask=mask, positions=positions, junk=junk)
    return message(tensors, meta), asked


def _expect_computed(output, asked, reference):
    """A request the server computed: it was a valid one, and the output is what transformers computes."""
    hidden_states, mask = asked["hidden"], asked["mask"]
    assert hidden_states.is_floating_point() and 0 <= asked["start"] < asked["end"] <= NUM_BLOCKS, asked
    assert not set(asked["junk"]) & set(JUNK_FIELDS), asked["junk"]
    expected = reference.span(hidden_states.float(), asked["start"], asked["end"], mask, asked["positions"])
    keep = torch.ones(expected.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(output.float()[keep], expected[keep], atol=1e-4, rtol=1e-4)


@FUZZ
@given(case=forward_requests())
def test_fuzzed_forward_is_refused_clearly_or_computed_exactly(server, healthy_session, reference, server_log, case):
    request, asked = case
    try:
        (output,) = server.forward(request)
    except P2PHandlerError as e:
        assert CLEAR_ERROR.search(str(e)), f"unclear error for {asked}: {e}"
        event("refused")
    else:
        _expect_computed(output, asked, reference)
        event("computed")
    server_log.expect_only_clear_errors()
    healthy_session.step()


@st.composite
def inference_sessions(draw):
    """(messages, steps): an opening with random batch size, length and blocks, then 1-3 steps whose positions,
    lengths, shapes and dtypes are right or a little wrong."""
    batch_size = often(draw, draw(st.integers(1, 2)), st.sampled_from([0, MAX_BATCH_TOKENS + 1]))
    max_length = often(draw, draw(st.integers(4, 16)), st.sampled_from([0, 1, MAX_SESSION_LENGTH + 1]))
    start, end = often(draw, draw(st.sampled_from([(0, NUM_BLOCKS), (0, 2), (3, NUM_BLOCKS)])), st.just((2, 9)))
    open_fields = dict(batch_size=batch_size, max_length=max_length, start_block=start, end_block=end)
    messages, steps, position = [], [], 0
    for index in range(draw(st.integers(1, 3))):
        tokens = often(draw, draw(st.integers(1, 4)), st.sampled_from([0, 9]))
        rows = often(draw, batch_size, st.integers(1, 3))
        hidden_states = draw(tensors_of(min(rows, 4), tokens))
        at = often(draw, position, st.sampled_from([position + 1, max(0, position - 1)]))
        tensors, fields = [hidden_states], {"position": at}
        if draw(st.booleans()):
            good = torch.arange(at, at + tokens).expand(hidden_states.shape[0], tokens)
            tensors.append(often(draw, good, st.just(good + MAX_SESSION_LENGTH)))
            fields["has_position_ids"] = True
        meta = open_meta(**open_fields, **fields) if index == 0 else step_meta(**fields)
        messages.append(message(tensors, meta))
        steps.append(dict(hidden=hidden_states, position=at, fields=fields, open=open_fields))
        position = at + tokens
    return messages, steps


async def _answers_then_error(server: Server, messages) -> tuple[list, str | None]:
    """The answers a session got before the server failed it (and the error), or all its answers."""
    answers = []
    finished = asyncio.Event()
    answered: asyncio.Queue = asyncio.Queue()

    async def requests():
        # in lockstep, as a client steps: a step written after the server refused the previous one and closed the
        # stream fails the write with BrokenPipeError, and the server's error is never read (a fresh-clone run saw it)
        for index, item in enumerate(messages):
            if index:
                await answered.get()
            yield item
        await finished.wait()

    try:
        async for response in await (await server.stub()).iterate("inference", requests()):
            answers.append(response)
            answered.put_nowait(None)
            if len(answers) == len(messages):
                finished.set()
    except P2PHandlerError as e:
        return answers, str(e)
    return answers, None


@FUZZ
@given(case=inference_sessions())
def test_fuzzed_inference_is_refused_clearly_or_computed_exactly(server, healthy_session, reference, server_log, case):
    messages, steps = case
    answers, error = run_sync(_answers_then_error(server, messages), timeout_s=30)
    assert len(answers) == len(steps) or error is not None, "the server ended a session without answering a step"
    history, done = None, 0  # the inputs the session's cache holds, and how many tokens
    for answer, asked in zip(answers, steps):
        opened, hidden_states, at = asked["open"], asked["hidden"], asked["position"]
        assert hidden_states.is_floating_point() and hidden_states.shape[0] == opened["batch_size"], asked
        # a step may rewind (a position before the cache's end drops the later tokens), never skip positions
        assert at <= done and at + hidden_states.shape[1] <= opened["max_length"], asked
        kept = [] if history is None else [history[:, :at]]
        history = torch.cat([*kept, hidden_states.float()], dim=1)
        expected = reference.span(history, opened["start_block"], opened["end_block"])
        tokens = hidden_states.shape[1]
        (output,) = unpack_tensors(answer)
        torch.testing.assert_close(output.float(), expected[:, at : at + tokens], atol=1e-4, rtol=1e-4)
        done = at + tokens
    event(f"{len(answers)} of {len(steps)} steps computed" + (", then refused" if error else ""))
    if error is not None:
        assert error.strip(), "an empty error"
    server_log.expect_only_clear_errors()
    healthy_session.step()
    expect_idle(server, healthy_open=healthy_session.is_open)


# ---- after all of it --------------------------------------------------------------------------------------------


def test_server_survives_and_frees_all_cache(swarm, server, healthy, reference):
    """The healthy session finishes correctly; afterwards all cache is free and the server still serves (the next
    test that needs the healthy session opens a new one)."""
    healthy.step(2)
    healthy.close()
    expect_idle(server, healthy_open=False, timeout_s=10)
    status = server.status()
    assert status.cache_tokens_left == status.cache_tokens_total == CACHE_TOKENS
    assert swarm.processes["server0"].poll() is None, "the server process died"

    ids = torch.randint(10, 400, (1, 6), generator=torch.Generator().manual_seed(2))
    (output,) = server.forward(fwd(reference.embed(ids)))
    torch.testing.assert_close(output, reference.blocks(ids), atol=1e-4, rtol=1e-4)
