"""A SWARM trainer: pushes micro-batches through one peer of each stage, many at once, and reports the loss.

For each micro-batch and stage the trainer asks that stage's ``StageWiring`` (``algorithms/stage_wiring.py``)
for the peer expected to finish the call first, given the compute times peers report and the work queued on
them. Calls go trainer -> peer -> trainer (the trainer keeps every stage's inputs, so a backward can go to any
peer of the stage: it recomputes the forward). A call that times out is retried on another peer of the stage
(the slow peer gets no new work for as long as it kept the call waiting); a call that fails otherwise also bans
the peer for ``BAN_S``. A micro-batch whose call fails ``max_retries`` + 1
times at one stage is reported as failed; no micro-batch is sent twice after it succeeded. A call that finds no
callable peer at its stage (all gone or banned for now) waits for one, up to ``wait_for_peers_s``, without spending
its retries.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from corolla.algorithms.stage_wiring import StageWiring, WiringConfig
from corolla.errors import CorollaError, SwarmConnectionError
from corolla.log import get_logger
from corolla.net.dht_records import fetch_stage_peers_async
from corolla.net.streaming import call_maybe_streamed
from corolla.net.tensors import pack, unpack_metadata, unpack_tensors
from corolla.net.transport import P2PTransport
from corolla.protocol.records import PeerState
from corolla.protocol.rpc import STAGE_PEER, RpcStub, Transport
from corolla.protocol.stage_messages import StageBackward, StageForward, StageReply
from corolla.training.config import DataConfig, TrainerConfig

logger = get_logger(__name__)

BAN_S = 30.0

__all__ = ["MicrobatchFailed", "StepReport", "Trainer", "training_batches"]


class MicrobatchFailed(CorollaError):
    """A micro-batch could not be served by any peer of a stage within its retries."""


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float  # mean over the step's micro-batches that finished
    samples: int
    seconds: float
    samples_per_s: float
    failed_microbatches: int
    retried_calls: int
    peers_per_stage: tuple[int, ...] = ()  # ONLINE peers the trainer may call at each stage, as the step ends
    # calls each peer answered since the previous report (id -> count, all stages): where the wiring sent the work
    answered_by: dict[str, int] = field(default_factory=dict)


def training_batches(data: DataConfig, *, tokenizer_folder: str | None = None) -> Iterator[torch.Tensor]:
    """The trainer's micro-batches of token ids ``[micro_batch_size, seq_len]``, an endless deterministic stream
    (the same ``data`` gives the same batches, so a test can train the same batches locally)."""
    rng = np.random.default_rng(data.data_seed)
    if data.data == "markov":
        from corolla.training.data import MarkovSource

        source = MarkovSource(vocab_size=data.markov_vocab_size, seed=data.markov_seed)
        while True:
            yield source.sample(data.micro_batch_size, data.seq_len, generator=rng)
    from transformers import AutoTokenizer

    from corolla.training.data import python_help_text

    if tokenizer_folder is None:
        raise ValueError("python-help data needs the model's tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokens = torch.tensor(tokenizer(python_help_text())["input_ids"], dtype=torch.long)
    if len(tokens) <= data.seq_len:
        raise ValueError(f"the text has only {len(tokens)} tokens, fewer than seq_len={data.seq_len}")
    while True:
        starts = rng.integers(0, len(tokens) - data.seq_len, size=data.micro_batch_size)
        yield torch.stack([tokens[s : s + data.seq_len] for s in starts])


class _Stages:
    """What the trainer knows of each stage: its wiring, the peers it banned, and when each peer was last read ONLINE
    (a peer that one read missed stays for ``missing_grace_s``; one read as not ONLINE goes at once)."""

    def __init__(self, num_stages: int, seed: int, missing_grace_s: float = 30.0):
        self.wirings = [StageWiring(WiringConfig(), rng=random.Random(seed * 1000 + s)) for s in range(num_stages)]
        self.banned: dict[tuple[int, str], float] = {}  # (stage, peer id) -> banned until (monotonic)
        self.missing_grace_s = missing_grace_s
        # (stage, peer id) -> (last read ONLINE at (monotonic), announced throughput, queued samples)
        self.seen: dict[tuple[int, str], tuple[float, float | None, int]] = {}
        self.refreshed = asyncio.Event()

    def update(self, records: list[dict], now: float, micro_batch_size: int) -> None:
        self.banned = {key: until for key, until in self.banned.items() if until > now}
        for index, stage in enumerate(records):
            for p, info in stage.items():
                if info.state == PeerState.ONLINE:
                    queued = info.queue_length * micro_batch_size
                    self.seen[(index, str(p))] = (now, info.throughput_sps or None, queued)
                else:
                    self.seen.pop((index, str(p)), None)
        self.seen = {key: value for key, value in self.seen.items() if now - value[0] <= self.missing_grace_s}
        for index, wiring in enumerate(self.wirings):
            online = {
                peer: (throughput, queued)
                for (stage, peer), (_, throughput, queued) in self.seen.items()
                if stage == index and (index, peer) not in self.banned
            }
            if set(online) != set(wiring.peers):
                logger.info(
                    "Stage %d: %d peer(s) to call (%s)", index, len(online), ", ".join(p[-8:] for p in sorted(online))
                )
            wiring.update_peers(online, now=now)
        self.refreshed.set()

    async def next_refresh(self, timeout_s: float) -> None:
        """Return after the next ``update`` (or after ``timeout_s``)."""
        self.refreshed.clear()
        try:
            await asyncio.wait_for(self.refreshed.wait(), timeout_s)
        except TimeoutError:
            pass

    def ban(self, stage: int, peer: str, now: float, duration_s: float = BAN_S) -> None:
        """No work for ``peer`` at ``stage`` for ``duration_s`` (at other stages it may still serve)."""
        self.banned[(stage, peer)] = max(self.banned.get((stage, peer), 0.0), now + duration_s)
        self.wirings[stage].remove(peer)


class Trainer:
    """``train()`` runs ``config.steps`` steps and returns their reports (``on_step`` sees each as it ends)."""

    def __init__(
        self,
        config: TrainerConfig,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        wrap_transport: Callable[[Transport], Transport] | None = None,
    ):
        """``wrap_transport`` routes every call through ``wrap_transport(the transport)`` (tests pass
        ``corolla.net.faults.FaultyTransport`` to see or break chosen calls)."""
        self.config = config
        self.on_step = on_step
        self._wrap_transport = wrap_transport
        self.reports: list[StepReport] = []
        self._uid = uuid.uuid4().hex[:8]
        self._retried = 0
        self._answered: collections.Counter[str] = collections.Counter()

    def train(self) -> list[StepReport]:
        return asyncio.run(self._main())

    async def _main(self) -> list[StepReport]:
        from corolla.models.checkpoint import resolve_checkpoint
        from corolla.net.dht_process import client_dht

        cfg = self.config
        folder = str(resolve_checkpoint(cfg.run.model).folder) if cfg.data.data == "python-help" else None
        batches = training_batches(cfg.data, tokenizer_folder=folder)
        try:
            dht = await asyncio.to_thread(client_dht, list(cfg.network.initial_peers))
        except Exception as e:
            raise SwarmConnectionError(
                f"Could not join the swarm through --initial-peers {list(cfg.network.initial_peers)} "
                f"({type(e).__name__}: {e}). Check the addresses (copy them from `corolla dht` or a stage peer's "
                f"log) and that those peers are running and reachable."
            ) from e
        try:
            self._transport: Transport = P2PTransport(await dht.replicate_p2p())
            if self._wrap_transport is not None:
                self._transport = self._wrap_transport(self._transport)
            self._stages = _Stages(cfg.run.num_stages, cfg.seed, cfg.missing_peer_grace_s)
            self._dht = dht
            self._done = asyncio.Event()
            refresher = asyncio.create_task(self._refresh_periodically())
            try:
                await self._wait_for_every_stage()
                await self._train(batches)
            finally:
                # the refresher finishes the DHT read it awaits (bounded by its timeout): a read cancelled half way
                # makes hivemind's DHT process log InvalidStateError tracebacks
                self._done.set()
                try:
                    await asyncio.wait_for(asyncio.shield(refresher), 15)
                except Exception:  # TimeoutError included
                    refresher.cancel()
                    await asyncio.gather(refresher, return_exceptions=True)
        finally:
            await asyncio.to_thread(dht.shutdown)
        return self.reports

    # ---- peers ---------------------------------------------------------------------------------------------
    async def _refresh(self) -> None:
        cfg = self.config
        records = await fetch_stage_peers_async(
            self._dht, experiment=cfg.run.experiment, num_stages=cfg.run.num_stages, timeout_s=10
        )
        self._stages.update(records, time.monotonic(), cfg.data.micro_batch_size)

    async def _refresh_periodically(self) -> None:
        while not self._done.is_set():
            try:
                await self._refresh()
            except Exception as e:
                logger.warning("Could not read the stage peers' records: %s", e)
            try:
                await asyncio.wait_for(self._done.wait(), self.config.refresh_period_s)
            except TimeoutError:
                pass

    async def _wait_for_every_stage(self) -> None:
        deadline = time.monotonic() + self.config.wait_for_peers_s
        while True:
            empty = [s for s, wiring in enumerate(self._stages.wirings) if not wiring.peers]
            if not empty:
                return
            if time.monotonic() > deadline:
                raise MicrobatchFailed(
                    f"no ONLINE peer serves stage(s) {empty} of experiment {self.config.run.experiment!r} after "
                    f"{self.config.wait_for_peers_s:.0f} s: start them with `corolla stage MODEL --stage N "
                    f"--experiment {self.config.run.experiment} --initial-peers ...`"
                )
            await self._stages.next_refresh(timeout_s=self.config.refresh_period_s * 2)

    # ---- steps ---------------------------------------------------------------------------------------------
    async def _train(self, batches: Iterator[torch.Tensor]) -> None:
        cfg = self.config
        per_step = cfg.samples_per_step // cfg.data.micro_batch_size
        slots = asyncio.Semaphore(cfg.max_in_flight)

        async def one(step: int, index: int, ids: torch.Tensor):
            async with slots:
                return await self._microbatch(f"{self._uid}:{step}:{index}", ids)

        def launch(step: int) -> list[asyncio.Task]:
            return [asyncio.create_task(one(step, i, next(batches))) for i in range(per_step)]

        # pipelining: without --synchronous the next step's micro-batches are queued while this step's run, and
        # start as slots free up (the semaphore admits them in order); only one step ahead, so memory stays bounded
        queued: dict[int, list[asyncio.Task]] = {}
        started = time.perf_counter()
        for step in range(cfg.steps):
            retried = self._retried
            for ahead in (step,) if cfg.synchronous else (step, step + 1):
                if ahead < cfg.steps and ahead not in queued:
                    queued[ahead] = launch(ahead)
            tasks = queued.pop(step)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            losses = [r for r in results if isinstance(r, float)]
            failures = [r for r in results if isinstance(r, BaseException)]
            for error in failures:
                if not isinstance(error, MicrobatchFailed):
                    for task in (t for later in queued.values() for t in later):
                        task.cancel()
                    raise error
                logger.warning("%s", error)
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            samples = len(losses) * cfg.data.micro_batch_size
            report = StepReport(
                step=step,
                loss=float(np.mean(losses)) if losses else float("nan"),
                samples=samples,
                seconds=seconds,
                samples_per_s=samples / seconds if seconds > 0 else 0.0,
                failed_microbatches=len(failures),
                retried_calls=self._retried - retried,
                peers_per_stage=tuple(len(wiring.peers) for wiring in self._stages.wirings),
                answered_by=dict(self._answered),
            )
            self._answered.clear()
            self.reports.append(report)
            self._log(report)

    def _log(self, report: StepReport) -> None:
        logger.info(
            "step %d: loss %.4f, %.1f samples/s, %d failed micro-batches, %d retried calls, peers per stage %s",
            report.step,
            report.loss,
            report.samples_per_s,
            report.failed_microbatches,
            report.retried_calls,
            "+".join(map(str, report.peers_per_stage)),
        )
        if self.config.loss_log:
            with open(self.config.loss_log, "a") as f:
                f.write(json.dumps(asdict(report)) + "\n")
        if self.on_step is not None:
            self.on_step(report)

    # ---- one micro-batch -----------------------------------------------------------------------------------
    async def _microbatch(self, microbatch_id: str, ids: torch.Tensor) -> float:
        last = self.config.run.num_stages - 1
        activations = [ids]
        for stage in range(last):
            (outputs,), _ = await self._call(stage, "forward", microbatch_id, [activations[-1]])
            activations.append(outputs)
        tensors, reply = await self._call(last, "backward", microbatch_id, [activations[-1], ids])
        loss = reply.loss
        grad = tensors[0] if tensors else None
        for stage in reversed(range(last)):
            tensors, _ = await self._call(stage, "backward", microbatch_id, [activations[stage], grad])
            grad = tensors[0] if tensors else None
        if loss is None:
            raise MicrobatchFailed(f"micro-batch {microbatch_id}: the last stage returned no loss")
        return loss

    async def _call(self, stage: int, rpc: str, microbatch_id: str, tensors: list[torch.Tensor]):
        cfg = self.config
        backward = rpc == "backward"
        schema = StageBackward if backward else StageForward
        meta = schema(
            experiment=cfg.run.experiment,
            stage=stage,
            microbatch_id=microbatch_id,
            output_compression=cfg.wire_compression,
        )
        request = pack(tensors, meta.model_dump(), compression=cfg.wire_compression)
        timeout_s = cfg.backward_timeout_s if backward else cfg.forward_timeout_s
        wiring = self._stages.wirings[stage]
        samples = tensors[0].shape[0]
        tried: set[str] = set()
        errors: list[str] = []
        attempts, waiting_since = 0, None
        while attempts <= cfg.max_retries:
            peer = await self._choose(stage, samples, backward, tried)
            if peer is None:
                # every peer of the stage is gone or banned for now (e.g. the only survivor kept a call waiting
                # while it averaged): wait for one instead of spending the retries, as at the start
                now = time.monotonic()
                waiting_since = now if waiting_since is None else waiting_since
                if now - waiting_since > cfg.wait_for_peers_s:
                    errors.append(f"no peer of the stage was available for {cfg.wait_for_peers_s:g} s")
                    break
                await self._stages.next_refresh(timeout_s=cfg.refresh_period_s * 2)
                continue
            waiting_since = None
            if attempts:
                self._retried += 1
            attempts += 1
            try:
                stub = RpcStub(self._transport, peer, STAGE_PEER)
                response = await call_maybe_streamed(stub, rpc, request, timeout_s=timeout_s)
                reply = StageReply.model_validate(unpack_metadata(response))
                outputs = unpack_tensors(response)
                self._check_outputs(stage, rpc, tensors, outputs)
            except TimeoutError:
                # not a ban (the peer may only be slow), but no new work for as long as it kept this call waiting
                self._stages.ban(stage, peer, time.monotonic(), duration_s=timeout_s)
                tried.add(peer)
                errors.append(f"{peer[-8:]}: no answer in {timeout_s:g} s")
                logger.info("Stage %d %s of %s timed out at %s; retrying", stage, rpc, microbatch_id, peer[-8:])
                continue
            except Exception as e:
                # a peer that moved away (or is joining) answers so: it is not at fault, only elsewhere for now
                moved = "not serving a stage right now" in str(e) or "this peer serves stage" in str(e)
                self._stages.ban(
                    stage, peer, time.monotonic(), duration_s=cfg.refresh_period_s * 2 if moved else BAN_S
                )
                tried.add(peer)
                errors.append(f"{peer[-8:]}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
                logger.info("Stage %d %s of %s failed at %s (%s); banned it", stage, rpc, microbatch_id, peer[-8:], e)
                continue
            wiring.record(peer, samples, reply.compute_s, backward=backward, now=time.monotonic())
            self._answered[peer] += 1
            return outputs, reply
        raise MicrobatchFailed(
            f"micro-batch {microbatch_id}: stage {stage} {rpc} failed {attempts} time(s) ({'; '.join(errors)})"
        )

    async def _choose(self, stage: int, samples: int, backward: bool, tried: set[str]) -> str | None:
        wiring = self._stages.wirings[stage]
        peer = wiring.choose(samples, now=time.monotonic(), backward=backward, exclude=tried)
        if peer is None and tried:  # every known peer was tried: give the ones that only timed out another go
            peer = wiring.choose(samples, now=time.monotonic(), backward=backward)
        return peer

    def _check_outputs(self, stage: int, rpc: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """A peer's answer must have the shape the next step needs, with finite values."""
        if rpc == "forward":
            expected = 1
        else:
            expected = 0 if stage == 0 else 1
        if len(outputs) != expected:
            raise ValueError(f"expected {expected} tensor(s) in the answer, got {len(outputs)}")
        for tensor in outputs:
            if tensor.shape[:2] != inputs[0].shape[:2]:
                raise ValueError(f"an answer of shape {tuple(tensor.shape)} does not fit {tuple(inputs[0].shape)}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError("the answer contains NaN or Inf values")
