"""Signed answers and proofs of lies: what signing costs a server and checking costs a client, how large a proof
grows with a session, and how long checking one takes.

SmolLM2, blocks 0:10, served in this process by the real server handler (``BlockServicer``, which signs every
answer); the client side is the real evidence code (``SignedCall``, ``SessionLog``) and ``ProofChecker``.

- **Per-answer cost**: for a one-token decode step and a 128-token prefill, the time the server spends signing
  (digest of the request's tensors, digest of the answer's tensors, one Ed25519 signature) and the time a verifying
  client spends checking the receipt, against the span computation of the same call, rounds interleaved.
- **Proofs of inference steps**: sessions of a 16-token prompt and N decoding steps through the handler; the size of
  the proof of the last step (it holds every step of the session) and the time to check it (the first check includes
  loading the blocks). The DHT takes proofs up to 1 MiB.

    python benchmarks/bench_answer_signing.py --preset smoke    # to a temp folder
    python benchmarks/bench_answer_signing.py --preset full     # -> docs/results/answer_signing.{json,png}
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

PRESETS = {
    "smoke": dict(rounds=3, calls=5, session_steps=[4, 16]),
    "full": dict(rounds=7, calls=40, session_steps=[16, 64, 256, 440]),
}
START, END, PROMPT = 0, 10, 16


def _servicer(model: str):
    from hivemind.utils.crypto import RSAPrivateKey

    from corolla.models.checkpoint import resolve_checkpoint
    from corolla.models.span import load_span
    from corolla.protocol.answer_signing import AnswerSigner
    from corolla.server.compute import ComputeQueue
    from corolla.server.config import ServerConfig
    from corolla.server.handler import BlockServicer
    from corolla.server.memory_cache import CacheBudget

    checkpoint = resolve_checkpoint(model)
    span = load_span(checkpoint, START, END)
    signer = AnswerSigner(RSAPrivateKey(), dht_prefix=model, dtype="float32", quant="none")
    compute = ComputeQueue()
    config = ServerConfig(model=model, new_swarm=True)
    return checkpoint, compute, BlockServicer(span=span, config=config, budget=CacheBudget(8192), compute=compute,
                                              signer=signer)  # fmt: skip


def per_answer_cost(servicer, model: str, preset: dict) -> list[dict]:
    """Signing and checking one answer, against the span computation of the same call (µs), for two call sizes."""
    from corolla.client.answer_evidence import SignedCall
    from corolla.models.span import SpanInputs
    from corolla.net.tensors import pack, pack_response
    from corolla.protocol.answer_signing import call_digest, span_fields
    from corolla.protocol.messages import SpanRequest

    peer_id = servicer.signer.certificate.peer_id
    meta = SpanRequest(start_block=START, end_block=END)
    rows = []
    for tokens in (1, 128):
        hidden = torch.randn(1, tokens, servicer.span.config.hidden_size)
        request = pack([hidden], meta.model_dump())
        response = asyncio.run(servicer.rpc_forward(request, None))
        sign, check, compute = [], [], []
        for _ in range(preset["rounds"]):
            start = time.perf_counter()
            for _ in range(preset["calls"]):
                with torch.inference_mode():
                    output = servicer.span(SpanInputs(hidden_states=hidden))
            compute.append((time.perf_counter() - start) / preset["calls"])
            answer = pack_response([output], {})  # the server packs its answer anyway
            start = time.perf_counter()
            for _ in range(preset["calls"]):
                inputs = call_digest("forward", span_fields(START, END, None, (False, False, False)), request.tensors)
                servicer.signer.sign("forward", inputs, answer.tensors)
            sign.append((time.perf_counter() - start) / preset["calls"])
            start = time.perf_counter()
            for _ in range(preset["calls"]):
                SignedCall.checked(peer_id, "forward", meta, request, response, dht_prefix=model)
            check.append((time.perf_counter() - start) / preset["calls"])
        rows.append(
            dict(
                tokens=tokens,
                compute_us=1e6 * statistics.median(compute),
                sign_us=1e6 * statistics.median(sign),
                check_us=1e6 * statistics.median(check),
                sign_share=statistics.median(s / c for s, c in zip(sign, compute)),
                check_share=statistics.median(k / c for k, c in zip(check, compute)),
            )
        )
    return rows


def _session_log(servicer, model: str, steps: int):
    """A session of a PROMPT-token prefill and ``steps`` decoding steps through the handler; the client's log."""
    from corolla.client.answer_evidence import SessionLog
    from corolla.net.tensors import pack, unpack_metadata
    from corolla.protocol.messages import InferenceOpen, InferenceStep

    hidden_size = servicer.span.config.hidden_size
    opened = InferenceOpen(session_id=f"bench-{steps}", max_length=PROMPT + steps, start_block=START, end_block=END)
    shape = [(0, PROMPT)] + [(PROMPT + i, 1) for i in range(steps)]
    requests = []
    for i, (position, tokens) in enumerate(shape):
        step = InferenceStep(step_id=f"s{i}", position=position).model_dump()
        first = opened.model_dump() if i == 0 else {}
        requests.append(pack([0.1 * torch.randn(1, tokens, hidden_size)], first | step))

    async def run():
        async def messages():
            for request in requests:
                yield request

        return [response async for response in servicer.rpc_inference(messages(), None)]

    log = SessionLog(peer_id=servicer.signer.certificate.peer_id, session_id=opened.session_id, start_block=START,
                     end_block=END, adapter=None, dht_prefix=model)  # fmt: skip
    for (position, _), request, response in zip(shape, requests, asyncio.run(run())):
        log.record(position, (False, False, False), request, response, unpack_metadata(response))
    return log


def proofs(servicer, checkpoint, model: str, preset: dict) -> list[dict]:
    from corolla.client import answer_evidence
    from corolla.client.proof_check import ProofChecker
    from corolla.protocol.lie_proofs import MAX_PROOF_BYTES

    answer_evidence.MAX_PROOF_BYTES = 64 * 2**20  # keep every step here, to size proofs past what the DHT takes
    rows = []
    for steps in preset["session_steps"]:
        log = _session_log(servicer, model, steps)
        proof = log.proof(len(log.steps) - 1)
        checker = ProofChecker(checkpoint, dht_prefix=model, num_blocks=30)
        start = time.perf_counter()
        verdict = checker.check(proof)  # loads the blocks, then replays
        first = time.perf_counter() - start
        start = time.perf_counter()
        checker.check(proof)
        again = time.perf_counter() - start
        assert verdict.checked and not verdict.proven, verdict  # an honest answer: the "proof" is false
        size = len(proof.to_bytes())
        rows.append(dict(session_tokens=PROMPT + steps, steps=steps + 1, proof_bytes=size,
                         fits_dht=size <= MAX_PROOF_BYTES, check_s=again, check_with_loading_s=first,
                         error=verdict.error))  # fmt: skip
    return rows


def table(results: dict) -> str:
    lines = [
        "| call | span compute | server: sign | share | client: check receipt | share |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["per_answer"]:
        what = "decode step (1 token)" if row["tokens"] == 1 else f"prefill ({row['tokens']} tokens)"
        lines.append(
            f"| {what} | {row['compute_us'] / 1000:.2f} ms | {row['sign_us']:.0f} µs | "
            f"{100 * row['sign_share']:.2f} % | {row['check_us']:.0f} µs | {100 * row['check_share']:.2f} % |"
        )
    lines += [
        "",
        "| session (tokens) | steps in proof | proof size | fits the DHT (1 MiB) | check | with loading the blocks |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["proofs"]:
        lines.append(
            f"| {row['session_tokens']} | {row['steps']} | {row['proof_bytes'] / 1024:.0f} KiB | "
            f"{'yes' if row['fits_dht'] else 'no'} | {row['check_s']:.2f} s | {row['check_with_loading_s']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["proofs"]
    fig, left = plt.subplots(figsize=(6, 3.5))
    tokens = [r["session_tokens"] for r in rows]
    left.plot(tokens, [r["proof_bytes"] / 1024 for r in rows], "o-", label="proof size (KiB)")
    left.axhline(1024, color="gray", linestyle="--", linewidth=1, label="DHT limit (1 MiB)")
    left.set_xlabel("session length (tokens)")
    left.set_ylabel("KiB")
    right = left.twinx()
    right.plot(tokens, [r["check_s"] for r in rows], "s-", color="tab:orange", label="check (s)")
    right.set_ylabel("seconds")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("answer_signing", args)
    torch.set_num_threads(1)
    checkpoint, compute, servicer = _servicer(args.model)
    try:
        results = {
            "per_answer": per_answer_cost(servicer, args.model, preset),
            "proofs": proofs(servicer, checkpoint, args.model, preset),
        }
    finally:
        compute.shutdown()
    title = f"{args.model}, blocks {START}:{END}, float32, one thread, CPU, preset {args.preset}"
    print(f"\n## Signed answers and proofs, {title}\n")
    print(table(results))
    params = dict(preset, model=args.model, blocks=f"{START}:{END}", prompt_tokens=PROMPT)
    run.save(params=params, results=results)
    plot(results, run.path(".png"), title)


if __name__ == "__main__":
    main()
