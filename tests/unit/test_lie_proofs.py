"""Signed answers and proofs of lies, with a real server's handler (in process) and real span computations.

The server's ``BlockServicer`` signs its answers; the client's evidence (``SignedCall``, ``SessionLog``) checks them
and turns one into a ``LieProof``; ``ProofChecker`` recomputes it from the checkpoint. A lie is made the way a
hostile server would make it: alter the answer, then sign it with its own answer key.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from corolla.client import answer_evidence
from corolla.client.answer_evidence import SessionLog, SignedCall
from corolla.client.lie_reports import LieReports
from corolla.client.proof_check import ProofChecker
from corolla.errors import UnsignedAnswerError
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import load_span
from corolla.net.tensors import pack, pack_response, unpack_metadata, unpack_tensors
from corolla.protocol.answer_signing import AnswerSigner, Certificate, ForgedAnswer, Receipt
from corolla.protocol.lie_proofs import InvalidProof, LieProof, LieProofRecord
from corolla.protocol.messages import BackwardRequest, InferenceOpen, InferenceStep, SpanRequest
from corolla.server.compute import ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.handler import BlockServicer
from corolla.server.memory_cache import CacheBudget
from tests.fixtures.zoo import zoo_checkpoint

START, END, PREFIX = 1, 4, "tiny-llama"


@pytest.fixture(scope="module")
def checkpoint():
    return resolve_checkpoint(str(zoo_checkpoint("llama")))


@pytest.fixture(scope="module")
def servicer(checkpoint):
    compute = ComputeQueue()
    signer = AnswerSigner(RSAPrivateKey(), dht_prefix=PREFIX, dtype="float32", quant="none")
    span = load_span(checkpoint, START, END)
    config = ServerConfig(model="tiny", new_swarm=True)
    yield BlockServicer(span=span, config=config, budget=CacheBudget(4096), compute=compute, signer=signer)
    compute.shutdown()


@pytest.fixture(scope="module")
def checker(checkpoint):
    return ProofChecker(checkpoint, dht_prefix=PREFIX, num_blocks=6)


def _hidden(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lie(servicer, response, share: float = 0.01):
    """What a hostile server sends: its answer with noise of ``share`` of its norm, signed again by its own key."""
    tensors = unpack_tensors(response)
    tensors[0] = tensors[0] + share * tensors[0].norm(dim=-1, keepdim=True) / tensors[0].shape[-1] ** 0.5
    meta = unpack_metadata(response)
    lied = pack_response(tensors, {})
    receipt = Receipt.from_list(meta["receipt"])
    meta["receipt"] = servicer.signer.sign(receipt.kind, receipt.inputs, lied.tensors, step=receipt.step).to_list()
    lied.metadata = MSGPackSerializer.dumps(meta)
    return lied


def _forward(servicer, seed: int = 0, *, lie: bool = False):
    meta = SpanRequest(start_block=START, end_block=END)
    request = pack([_hidden(2, 5, servicer.span.config.hidden_size, seed=seed)], meta.model_dump())
    response = asyncio.run(servicer.rpc_forward(request, None))
    if lie:
        response = _lie(servicer, response)
    peer_id = servicer.signer.certificate.peer_id
    return SignedCall.checked(peer_id, "forward", meta, request, response, dht_prefix=PREFIX)


# ---- certificates and receipts -------------------------------------------------------------------------------------
def test_a_certificate_binds_the_answer_key_to_the_peer_id_and_format():
    signer = AnswerSigner(RSAPrivateKey(), dht_prefix=PREFIX, dtype="bfloat16", quant="int8")
    certificate = Certificate.from_list(signer.certificate.to_list())
    certificate.check()
    with pytest.raises(ForgedAnswer, match="not signed"):
        dataclasses.replace(certificate, dtype="float32").check()  # a stricter tolerance than the server claimed
    other = AnswerSigner(RSAPrivateKey(), dht_prefix=PREFIX, dtype="bfloat16", quant="int8").certificate
    with pytest.raises(ForgedAnswer, match="belongs to"):
        dataclasses.replace(certificate, peer_id=other.peer_id).check()
    with pytest.raises(ForgedAnswer, match="not signed"):  # someone else's key under this peer's certificate
        dataclasses.replace(certificate, answer_key=other.answer_key).check()


# ---- forward and backward ------------------------------------------------------------------------------------------
def test_a_lie_in_a_forward_answer_is_proven_and_an_honest_answer_is_not(servicer, checker):
    honest = checker.check(LieProof.from_bytes(_forward(servicer).proof().to_bytes()))
    assert honest.checked and not honest.proven and honest.error < 1e-5, honest
    lied = checker.check(_forward(servicer, lie=True).proof())
    assert lied.proven and lied.error > lied.tolerance, lied


def test_a_backward_answer_is_recomputed_through_autograd(servicer, checker):
    hidden_size = servicer.span.config.hidden_size
    meta = BackwardRequest(start_block=START, end_block=END)
    tensors = [_hidden(2, 4, hidden_size, seed=3), _hidden(2, 4, hidden_size, seed=4)]
    request = pack(tensors, meta.model_dump())
    response = asyncio.run(servicer.rpc_backward(request, None))
    peer_id = servicer.signer.certificate.peer_id
    honest = SignedCall.checked(peer_id, "backward", meta, request, response, dht_prefix=PREFIX)
    assert not checker.check(honest.proof()).proven
    lied = SignedCall.checked(peer_id, "backward", meta, request, _lie(servicer, response), dht_prefix=PREFIX)
    assert checker.check(lied.proof()).proven


def test_forged_proofs_are_recognised_as_forged(servicer, checker):
    signed = _forward(servicer, seed=5, lie=True)
    proof = signed.proof()
    assert checker.check(proof).proven
    other = _forward(servicer, seed=6)
    cases = {
        "answer is not the one": dataclasses.replace(proof, outputs=other.proof().outputs),
        "inputs are not the ones": dataclasses.replace(proof, steps=other.proof().steps),
        "not signed by": dataclasses.replace(proof, receipt=dataclasses.replace(proof.receipt, signature=b"x" * 64)),
        "about model": dataclasses.replace(proof, certificate=dataclasses.replace(proof.certificate, dht_prefix="x")),
        "not blocks of this model": dataclasses.replace(proof, start_block=5, end_block=9),
    }
    for reason, forged in cases.items():
        verdict = checker.check(forged)
        assert verdict.checked and not verdict.proven and reason in verdict.reason, (reason, verdict)
    for garbage in (b"", b"\x93\x01\x02", b"x" * 100):
        with pytest.raises(InvalidProof):
            LieProof.from_bytes(garbage)
    record = LieProofRecord.of(proof)
    assert record.parsed() == proof
    with pytest.raises(InvalidProof, match="accuses"):
        record.model_copy(update={"accused": other.certificate.peer_id + "x"}).parsed()


def test_a_client_refuses_answers_whose_signature_does_not_cover_them(servicer):
    meta = SpanRequest(start_block=START, end_block=END)
    request = pack([_hidden(1, 3, servicer.span.config.hidden_size, seed=7)], meta.model_dump())
    response = asyncio.run(servicer.rpc_forward(request, None))
    peer_id = servicer.signer.certificate.peer_id
    tampered = pack_response([unpack_tensors(response)[0] * 1.01], unpack_metadata(response))  # not signed again
    with pytest.raises(UnsignedAnswerError, match="not for these outputs"):
        SignedCall.checked(peer_id, "forward", meta, request, tampered, dht_prefix=PREFIX)
    with pytest.raises(UnsignedAnswerError, match="certificate of"):  # another server's certificate
        SignedCall.checked(peer_id[:-1] + "x", "forward", meta, request, response, dht_prefix=PREFIX)
    other_request = pack([_hidden(1, 3, servicer.span.config.hidden_size, seed=8)], meta.model_dump())
    with pytest.raises(UnsignedAnswerError, match="not for this call"):  # an answer to another request
        SignedCall.checked(peer_id, "forward", meta, other_request, response, dht_prefix=PREFIX)
    unsigned = pack_response(unpack_tensors(response), {})
    with pytest.raises(UnsignedAnswerError):
        SignedCall.checked(peer_id, "forward", meta, request, unsigned, dht_prefix=PREFIX)


# ---- inference sessions --------------------------------------------------------------------------------------------
def _session(servicer, steps: list[tuple[int, int]], *, lie_at: int | None = None, positions=()) -> SessionLog:
    """Run an inference session of ``steps`` (position, new tokens) through the real handler (the steps listed in
    ``positions`` carry explicit position ids); the answer to step ``lie_at`` is altered and signed again (the
    server's later answers are honest). The client's log of it."""
    hidden_size = servicer.span.config.hidden_size
    opened = InferenceOpen(session_id="s" * 16, max_length=64, start_block=START, end_block=END)
    requests = []
    for i, (position, tokens) in enumerate(steps):
        step = InferenceStep(step_id=f"step-{i}", position=position, has_position_ids=i in positions).model_dump()
        tensors = [_hidden(1, tokens, hidden_size, seed=20 + i)]
        if i in positions:
            tensors.append(torch.arange(position, position + tokens).unsqueeze(0))
        requests.append(pack(tensors, (opened.model_dump() if i == 0 else {}) | step))

    async def run():
        async def messages():
            for request in requests:
                yield request

        return [response async for response in servicer.rpc_inference(messages(), None)]

    responses = asyncio.run(run())
    assert len(responses) == len(steps)
    log = SessionLog(peer_id=servicer.signer.certificate.peer_id, session_id=opened.session_id, start_block=START,
                     end_block=END, adapter=None, dht_prefix=PREFIX)  # fmt: skip
    for i, ((position, _), request, response) in enumerate(zip(steps, requests, responses)):
        if i == lie_at:
            response = _lie(servicer, response)
        log.record(position, (False, i in positions, False), request, response, unpack_metadata(response))
    return log


# a prompt, two decoding steps, a speculative step of 3 tokens of which 1 was accepted (the next step rewinds), more
STEPS = [(0, 5), (5, 1), (6, 1), (7, 3), (8, 1), (9, 1)]


def test_an_inference_step_is_replayed_with_the_whole_session_before_it(servicer, checker):
    log = _session(servicer, STEPS, lie_at=3)
    for index in (0, 1, 5):  # the honest answers, before and after the lie (the rewind replayed as the server did)
        verdict = checker.check(log.proof(index))
        assert verdict.checked and not verdict.proven and verdict.error < 1e-5, (index, verdict)
    proof = LieProof.from_bytes(log.proof(3).to_bytes())
    assert len(proof.steps) == 4 and checker.check(proof).proven
    shortened = dataclasses.replace(proof, steps=proof.steps[1:])
    assert "receipt is for step 4, the proof holds 3" in checker.check(shortened).reason
    other_prompt = dataclasses.replace(proof, steps=(log.proof(5).steps[1], *proof.steps[1:]))  # another history
    assert "inputs are not the ones" in checker.check(other_prompt).reason


def test_steps_with_their_own_position_ids_are_replayed_alone(servicer, checker):
    """Plain steps that continue the cache are recomputed as one prefill; a step with position ids runs alone."""
    log = _session(servicer, STEPS, lie_at=5, positions=(1, 4))
    for index in (2, 4):
        verdict = checker.check(log.proof(index))
        assert verdict.checked and not verdict.proven and verdict.error < 1e-5, (index, verdict)
    assert checker.check(log.proof(5)).proven


def test_a_session_answer_that_does_not_continue_the_signed_chain_is_refused(servicer):
    log = _session(servicer, STEPS[:2])
    _, _, tensors = log.steps[0]
    receipt, outputs = log.answers[0]
    request = runtime_pb2.ExpertRequest(tensors=tensors)
    response = runtime_pb2.ExpertResponse(tensors=outputs)
    with pytest.raises(UnsignedAnswerError, match="not for the steps"):  # the first answer again, as the third
        log.record(0, (False, False, False), request, response, {"receipt": receipt.to_list()})


# ---- proofs read from others ---------------------------------------------------------------------------------------
def test_reports_distrust_a_proven_liar_and_ignore_a_false_reporter(servicer, checker):
    distrusted = {}
    reports = LieReports(
        dht=None, dht_prefix=PREFIX, owner=None, checker=checker, distrust=lambda p, why: distrusted.setdefault(p, why)
    )
    lie = LieProofRecord.of(_forward(servicer, seed=11, lie=True).proof())
    honest = LieProofRecord.of(_forward(servicer, seed=12).proof())
    assert reports._check("hostile-client", honest) and reports.stats.false == 1 and not distrusted
    assert not reports._check("hostile-client", lie)  # a false reporter's other proofs are not even checked
    assert reports._check("client", lie) and reports.stats.proven == 1
    assert list(distrusted) == [servicer.signer.certificate.peer_id] and "client" in distrusted[lie.accused]
    assert not reports._check("another-client", lie)  # one proof is checked once, whoever publishes it


def test_what_a_checker_cannot_judge_fairly_is_left_unchecked(servicer, checker):
    meta = SpanRequest(start_block=START, end_block=END, output_compression="UNIFORM_8BIT")
    request = pack([_hidden(1, 4, servicer.span.config.hidden_size, seed=13)], meta.model_dump())
    response = asyncio.run(servicer.rpc_forward(request, None))  # the client asked for a lossy answer
    peer_id = servicer.signer.certificate.peer_id
    coded = SignedCall.checked(peer_id, "forward", meta, request, response, dht_prefix=PREFIX)
    verdict = checker.check(coded.proof())
    assert not verdict.checked and not verdict.refuted and "lossy codec" in verdict.reason
    small = ProofChecker(checker.checkpoint, dht_prefix=PREFIX, num_blocks=6, max_span_bytes=1000)
    verdict = small.check(_forward(servicer, seed=14, lie=True).proof())
    assert not verdict.checked and "GiB here" in verdict.reason


def test_a_certificate_must_state_the_format_the_server_announces(servicer):
    meta = SpanRequest(start_block=START, end_block=END)
    request = pack([_hidden(1, 2, servicer.span.config.hidden_size, seed=15)], meta.model_dump())
    response = asyncio.run(servicer.rpc_forward(request, None))
    peer_id = servicer.signer.certificate.peer_id
    SignedCall.checked(peer_id, "forward", meta, request, response, dht_prefix=PREFIX, announced=("float32", "none"))
    with pytest.raises(UnsignedAnswerError, match="the server announces bfloat16/none"):
        SignedCall.checked(
            peer_id, "forward", meta, request, response, dht_prefix=PREFIX, announced=("bfloat16", "none")
        )


def test_a_session_too_long_to_prove_keeps_only_its_chain(servicer, monkeypatch):
    monkeypatch.setattr(answer_evidence, "MAX_PROOF_BYTES", 2000)  # the prompt alone is 5 tokens x 64 x 4 bytes
    log = _session(servicer, STEPS)
    assert log.too_long and log.proof(len(STEPS) - 1) is None and all(not tensors for *_, tensors in log.steps)
