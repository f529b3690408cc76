"""Catching servers that return plausible but wrong values: the same inputs to a second server, a third to decide.

With ``ClientConfig.verify`` = p, a share p of forward calls, backward calls and inference steps is also computed
by another server that hosts the same blocks, and the two answers are compared (``corolla.algorithms.output_check``:
per token, within the tolerance of the coarser of the two servers' announced dtype and quantization). When they
disagree, a third server computes the same inputs; the server that disagrees with the majority is never used again
(``SwarmView.distrust``) and the majority's value is used, so the computation goes on with correct values.

Inference steps have attention caches, so a check needs the server's whole history. The client keeps it anyway (for
fault tolerance, ``InferenceSession``): a *shadow* session on the checking server receives, at each sampled step,
every input since its last check in one step, and its outputs are compared with what the checked server answered
for those tokens. So one check covers every step since the previous one: a server that lies from its K-th step on,
or only now and then, is caught at the next check after its first lie. Values it returned before that check were
already used (the tokens they led to are out); with ``verify=1`` every step is checked before its value is used.
A session that is verified does not use push (a server could push one value to the next server and return another
to the client; the client checks what it forwards itself).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from corolla.algorithms.output_check import majority, token_error, tolerance
from corolla.algorithms.routing import RouteHop
from corolla.client.failover import describe
from corolla.client.span_calls import SpanCallInputs, call_backward, call_forward
from corolla.errors import RemoteCallError, UnsignedAnswerError
from corolla.log import get_logger

logger = get_logger(__name__)


class WrongValuesError(RemoteCallError):
    """A server's answer disagreed with the majority of the servers that computed the same inputs."""


@dataclass
class VerificationStats:
    """What the checks of one client found (for logs, benchmarks and tests)."""

    checks: int = 0  # answers compared with another server's
    mismatches: int = 0  # comparisons that disagreed
    liars: int = 0  # servers caught (distrusted), each counted once
    undecided: int = 0  # disagreements no majority could settle
    unverifiable: int = 0  # sampled answers with no other server of those blocks to ask
    checked_tokens: int = 0  # token positions (rows x tokens) that checking servers computed again

    def count(self, hidden: torch.Tensor) -> None:
        self.checked_tokens += hidden.shape[0] * hidden.shape[1]


class Verifier:
    """Samples calls to check and settles disagreements for one ``SwarmView``."""

    def __init__(self, swarm, rng: random.Random | None = None):
        self.swarm = swarm
        self.rate = swarm.config.verify
        self.rng = rng or random.Random(None if swarm.config.seed is None else swarm.config.seed + 1)
        self.stats = VerificationStats()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def sample(self) -> bool:
        """Whether to check this call (always with ``verify=1``, never with 0)."""
        return self.rate >= 1 or (self.rate > 0 and self.rng.random() < self.rate)

    def tolerance(self, hop: RouteHop, *peer_ids: str) -> float:
        """The error allowed between the answers of ``peer_ids`` for ``hop``'s blocks."""
        if self.swarm.config.verify_tolerance is not None:
            return self.swarm.config.verify_tolerance
        infos = [self.swarm.info(peer) for peer in peer_ids]
        formats = [(None, None) if info is None else (info.dtype, info.quant) for info in infos]
        return tolerance(formats, hop.end - hop.start)

    def provable_error(self, hop: RouteHop, *peer_ids: str) -> float:
        """The error against the majority past which a liar's answer is published as a proof: twice the tolerance
        of these servers' formats and of float32 (what proof checkers compare with), whatever ``verify_tolerance``
        says, so that a borderline lie is not published as one that checkers would call right."""
        infos = [self.swarm.info(peer) for peer in peer_ids]
        formats = [(None, None) if info is None else (info.dtype, info.quant) for info in infos]
        return 2 * tolerance([*formats, ("float32", "none")], hop.end - hop.start)

    def checker(self, hop: RouteHop, exclude: set[str]) -> RouteHop | None:
        """Another server of ``hop``'s blocks (the fastest not in ``exclude``), or None (counted as unverifiable)."""
        for candidate in self.swarm.servers_of(hop.start, hop.end, exclude=exclude | {hop.peer_id}):
            return candidate
        return None

    def settle(self, hop: RouteHop, peers: list[str], answers: list[torch.Tensor], what: str) -> int:
        """Who of ``peers`` answered ``answers`` for ``hop``'s blocks wrongly: distrusts them; the index of a correct
        answer. Raises WrongValuesError (blaming the first) when no majority agrees."""
        tol = self.tolerance(hop, *peers)
        group = majority(answers, tol)
        errors = [token_error(answers[0], other) for other in answers[1:]]
        if group is None:
            self.stats.undecided += 1
            raise WrongValuesError(
                f"servers {', '.join(peers)} all disagree on {what} (relative errors {_fmt(errors)}, tolerance "
                f"{tol:.1e}); no majority to decide"
            )
        for i, peer in enumerate(peers):
            if i not in group and self.swarm.distrust(peer, f"{what}: disagreed with {len(group)} of {len(peers)}"):
                self.stats.liars += 1
        return group[0]

    # ---- forward and backward -----------------------------------------------------------------------------
    async def forward(self, hop: RouteHop, hidden, extra: SpanCallInputs, output: torch.Tensor, signed=()):
        """``output`` (``hop``'s answer to a forward call, ``signed`` its evidence), or the majority's answer if
        ``hop`` lied."""

        async def compute(other: RouteHop, evidence: list) -> torch.Tensor:
            return await call_forward(self.swarm, other, hidden, extra, evidence=evidence)

        what = f"forward of blocks {hop.start}:{hop.end}"
        return await self._check(hop, hidden, output, list(signed), compute, what)

    async def backward(self, hop, hidden, grad, extra: SpanCallInputs, result: tuple, signed=()):
        """``result`` (``hop``'s (grad input, grad prompts), ``signed`` its evidence), or the majority's if ``hop``
        lied."""

        async def compute(other: RouteHop, evidence: list):
            return await call_backward(self.swarm, other, hidden, grad, extra, evidence=evidence)

        def joined(answer) -> torch.Tensor:  # both gradients compared at once
            grad_input, grad_prompts = answer
            parts = [grad_input.reshape(-1, grad_input.shape[-1])]
            if grad_prompts is not None:
                parts.append(grad_prompts.reshape(-1, grad_prompts.shape[-1]))
            return torch.cat(parts)

        what = f"backward of blocks {hop.start}:{hop.end}"
        return await self._check(hop, hidden, result, list(signed), compute, what, key=joined)

    async def _check(self, hop: RouteHop, hidden, answer, signed: list, compute, what: str, key=lambda x: x):
        if not self.sample():
            return answer
        second = self.checker(hop, exclude=set())
        if second is None:
            self.stats.unverifiable += 1
            return answer
        try:
            other = await compute(second, signed)
        except Exception as e:  # the checker failed: an ordinary failure of that server, the check is skipped
            self.checker_failed(second, e)
            return answer
        self.stats.checks += 1
        self.stats.count(hidden)
        if token_error(key(answer), key(other)) <= self.tolerance(hop, hop.peer_id, second.peer_id):
            return answer
        self.stats.mismatches += 1
        third = self.checker(hop, exclude={second.peer_id})
        if third is None:
            self.stats.undecided += 1
            raise WrongValuesError(
                f"servers {hop.peer_id} and {second.peer_id} disagree on {what} and no third server can decide"
            )
        self.stats.count(hidden)
        try:
            answers = [answer, other, await compute(third, signed)]
        except Exception as e:
            self.checker_failed(third, e)
            self.stats.undecided += 1
            raise WrongValuesError(
                f"servers {hop.peer_id} and {second.peer_id} disagree on {what}; the third server failed"
            ) from e
        winner = self.settle(hop, [hop.peer_id, second.peer_id, third.peer_id], [key(a) for a in answers], what)
        if len(signed) == 3:  # every answer's evidence: publish the proofs against the liars
            provable = self.provable_error(hop, hop.peer_id, second.peer_id, third.peer_id)
            for evidence, value in zip(signed, answers):
                if token_error(key(value), key(answers[winner])) > provable:
                    self.swarm.report_lie(evidence.proof())
        if winner != 0:
            logger.info("Using the majority's %s instead of %s's", what, hop.peer_id)
        return answers[winner]

    def checker_failed(self, hop: RouteHop, error: BaseException) -> None:
        logger.info("Server %s could not check blocks %d:%d (%s)", hop.peer_id, hop.start, hop.end, describe(error))
        if isinstance(error, UnsignedAnswerError):  # not a transient failure: it sent an answer it did not sign
            self.swarm.distrust(hop.peer_id, str(error))
        self.swarm.ban(hop.peer_id)


def _fmt(errors: list[float]) -> str:
    return ", ".join(f"{e:.1e}" for e in errors)
