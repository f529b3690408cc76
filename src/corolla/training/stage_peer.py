"""A SWARM stage peer: serves one stage of a model being trained, averages with the other peers of its stage, and
moves to the stage that needs it most.

Lifecycle of one stage (``_serve_stage``): cut the stage out of the model, announce JOINING, download the stage's
parameters and optimizer state from a peer of the stage (if it has any), announce ONLINE, then serve forward and
backward until stopped or moved. A peer that may move (no ``--stage``, or ``--rebalance``) re-evaluates the swarm every
``rebalance_period_s`` (random jitter) and moves when ``algorithms.stage_balance.choose_move`` names it.

Epochs (``_coordinate``, every ``PROGRESS_PERIOD_S``): each peer publishes the samples it accumulated in its epoch;
when the peers of a stage in the same epoch together hold the target batch, they average their gradients (hivemind
butterfly all-reduce) and step. A round that fails changes nothing (the peer keeps its gradients and tries again);
a peer that finds others of its stage an epoch ahead (it missed their round) downloads their state and keeps its
accumulated gradients for the new epoch. A peer alone in its stage steps on its own.

Backups (``training.stage_backup``): each peer keeps a copy of the next stage's state, so that a peer refilling a
stage whose every peer is gone restores it from the newest copy rather than from the initial weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import torch
from hivemind.utils import get_dht_time

from corolla import __version__
from corolla.algorithms.stage_balance import StagePeer as BalancePeer
from corolla.algorithms.stage_balance import choose_move, choose_stage_for_joiner
from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.net.announcer import Announcer
from corolla.net.dht_records import (
    declare_stage_peer,
    declare_stage_progress,
    fetch_stage_peers_async,
    fetch_stage_progress,
)
from corolla.net.peer import Peer
from corolla.net.transport import P2PTransport, serve, unserve
from corolla.protocol.records import PeerState, StagePeerInfo, StageProgress
from corolla.protocol.rpc import STAGE_PEER
from corolla.protocol.stage_messages import StagePeerStatus
from corolla.training.config import StagePeerConfig
from corolla.training.stage_backup import BackupKeeper
from corolla.training.stage_handler import StageHandler
from corolla.training.stage_worker import TrainingState

logger = get_logger(__name__)

PROGRESS_PERIOD_S = 0.25  # how often a peer reads its stage's progress (and publishes its own if it changed)
PROGRESS_REPUBLISH_S = 1.0  # republished at least this often
PROGRESS_EXPIRATION_S = 5.0  # a dead peer's progress stops counting after this
STATE_DOWNLOAD_TIMEOUT_S = 60.0
ROUND_RESULT_GRACE_S = 10.0  # an averaging round's result is awaited this long past hivemind's bounds
MIN_STAY_PERIODS = 3  # a peer moves for a gain only after serving its stage this many rebalancing periods


def cooling_stages(records: list[list], *, now: float, period_s: float) -> set[int]:
    """Stages that gave a peer less than a rebalancing period ago (their movers' records say so): they give no
    other peer now, so that a stage loses at most one peer per period (unless a stage is empty)."""
    return {
        info.moved_from
        for found in records
        for _, info in found
        if info.moved_from is not None and info.moved_at is not None and now - info.moved_at < period_s
    }


class StagePeer:
    """Owns one stage peer's lifetime on a ``Peer``; ``run()`` blocks until SIGINT/SIGTERM or ``stop()``."""

    def __init__(self, config: StagePeerConfig, *, before_averaging=None):
        """``before_averaging(epoch)`` runs on the compute thread before each averaging round with other peers
        (tests make a round fail by raising there; everything else about such a peer is real)."""
        self.config = config
        self.before_averaging = before_averaging
        self._peer: Peer | None = None
        self._stop_requested = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-stage")
        self._worker = None
        self._averager = None
        self._stage: int | None = None
        self._alone = True
        self._averaging = False
        self._failed_rounds = 0
        self._shared_in_epoch: int | None = None  # an epoch whose round failed after this peer's gradients went out
        self._round_lock = threading.Lock()
        self._round = None  # the averaging round in flight (hivemind's StepControl), on the compute thread
        self._rounds_closed = False  # leaving the stage: no new round starts, the one in flight is cancelled
        self._move_to: asyncio.Future | None = None
        self._moved: tuple[int, float] | None = None  # (stage left, DHT time) of this peer's last move
        self._serving_since = 0.0  # monotonic time since which this peer serves its current stage
        self._backups: BackupKeeper | None = None

    def run(self) -> None:
        asyncio.run(self._main())
        # the interpreter's exit then joins the compute thread: a call it still runs (bounded by its timeouts)
        logger.info("Stopped")

    def stop(self) -> None:
        self._stop_requested = True
        if self._peer is not None:
            self._peer.stop()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def _main(self) -> None:
        cfg = self.config
        torch.set_num_threads(cfg.swarm.num_threads)
        logger.info("Starting with %s", cfg)
        from corolla.models.checkpoint import resolve_checkpoint

        resolve_checkpoint(cfg.run.model)  # a wrong name fails before anything starts
        async with Peer(cfg.network, role="stage peer") as peer:
            self._peer = peer
            if self._stop_requested:
                peer.stop()
            from corolla.models.stages import StageLayout, load_training_model

            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(
                None,
                lambda: load_training_model(cfg.run.model, random_init=cfg.run.random_init, seed=cfg.run.init_seed),
            )
            self._layout = StageLayout.even(model.config.num_hidden_layers, cfg.run.num_stages)
            self._model, model = model, None  # only self._model keeps it (dropped once no other stage is needed)
            await peer.joined()
            self._handler = StageHandler(
                experiment=cfg.run.experiment,
                current=lambda: self._worker,
                executor=self._executor,
                max_request_samples=cfg.swarm.max_request_samples,
                max_request_bytes=int(cfg.swarm.max_request_mb * 2**20),
                status=self.status,
                after_backward=self._step_if_alone_and_full,
                state_of=self._state_of,
            )
            p2p = await peer.p2p()
            self._backups = BackupKeeper(
                P2PTransport(p2p),
                experiment=cfg.run.experiment,
                num_stages=cfg.run.num_stages,
                timeout_s=STATE_DOWNLOAD_TIMEOUT_S,
            )
            await serve(p2p, STAGE_PEER, self._handler)
            peer.on_shutdown("stop serving", lambda: unserve(p2p, STAGE_PEER))
            peer.on_shutdown("stop the compute thread", lambda: self._executor.shutdown(wait=False))
            stage = cfg.swarm.stage if cfg.swarm.stage is not None else await self._choose_stage()
            stopped = asyncio.create_task(peer.wait_until_stopped())
            while True:
                stage = await self._serve_stage(peer, stage, stopped)
                if stage is None:
                    break

    async def _choose_stage(self) -> int:
        records = await self._stage_records()
        peers = [BalancePeer(str(p), s, info.throughput_sps) for s, stage in enumerate(records) for p, info in stage]
        stage = choose_stage_for_joiner(peers, self.config.run.num_stages)
        logger.info("Chose stage %d (the pipeline's bottleneck)", stage)
        return stage

    async def _stage_records(self) -> list[list]:
        cfg = self.config
        found = await fetch_stage_peers_async(
            self._peer.dht, experiment=cfg.run.experiment, num_stages=cfg.run.num_stages
        )
        return [
            [(p, info) for p, info in stage.items() if info.state != PeerState.OFFLINE and p != self._peer.peer_id]
            for stage in found
        ]

    async def _serve_stage(self, peer: Peer, stage: int, stopped: asyncio.Task) -> int | None:
        """Serve ``stage`` until stopped (None) or moved (the new stage)."""
        from corolla.models.stages import split_stage
        from corolla.training.stage_averaging import StageAverager, averaging_compression, averaging_prefix
        from corolla.training.stage_worker import StageWorker

        cfg, loop = self.config, asyncio.get_running_loop()
        self._stage = stage
        worker = StageWorker(
            split_stage(self._model, stage, self._layout), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
        if not cfg.swarm.movable:  # it never builds another stage: the whole model's other blocks are dead weight
            self._model = None
        await loop.run_in_executor(self._executor, self._measure_speed, worker)
        buffers = [torch.zeros_like(p) for p in worker.params]
        averager = StageAverager(
            buffers,
            current_state=worker.state,
            dht=peer.dht,
            prefix=averaging_prefix(cfg.run.experiment, stage),
            start=True,
            min_matchmaking_time=cfg.optimizer.matchmaking_time_s,
            request_timeout=min(1.0, cfg.optimizer.matchmaking_time_s / 2),
            allreduce_timeout=cfg.optimizer.averaging_timeout_s,
            next_chunk_timeout=cfg.optimizer.averaging_timeout_s / 2,
            compression=averaging_compression(cfg.optimizer.averaging_compression),
            allow_state_sharing=False,
        )
        self._buffers = buffers
        with self._round_lock:
            self._rounds_closed = False
        announcer = Announcer(
            name=f"stage {stage} record",
            store=lambda info, expiration_s: declare_stage_peer(
                peer.dht, info, owner=peer.owner, expiration_s=expiration_s
            ),
            make_record=lambda state: self._record(worker, stage, state),
            period_s=cfg.swarm.update_period_s,
        )
        leaving_since = None
        try:
            await announcer.set_state(PeerState.JOINING)
            records = await self._stage_records()
            others = records[stage]
            if others:
                await self._download_state(worker, averager, why="joining")
            else:
                await self._restore_backup(worker, records, stage)
            self._worker, self._averager, self._alone = worker, averager, not others
            averager.allow_state_sharing = True
            averager.state_sharing_priority = worker.epoch
            self._serving_since = time.monotonic()
            await announcer.set_state(PeerState.ONLINE)
            announcer.start()
            logger.info(
                "Serving stage %d of %s (blocks %d:%d)", stage, cfg.run.experiment, *self._layout.blocks(stage)
            )
            self._move_to = loop.create_future()
            self._leaving = asyncio.Event()
            tasks = [
                asyncio.create_task(self._publish_periodically(peer, worker, stage)),
                asyncio.create_task(self._coordinate(peer, worker, averager, stage)),
            ]
            if cfg.swarm.movable:
                tasks.append(asyncio.create_task(self._rebalance_periodically(peer, stage)))
            if cfg.swarm.backup_period_s > 0 and cfg.run.num_stages > 1:
                tasks.append(asyncio.create_task(self._back_up_periodically(stage)))
            await asyncio.wait([stopped, self._move_to, *tasks], return_when=asyncio.FIRST_COMPLETED)
            leaving_since = time.monotonic()
            if stopped.done():
                logger.info("Stopping: leaving stage %d", stage)
            # the loops finish what they await (DHT calls, bounded by their timeouts) and return: a DHT call
            # cancelled half way makes hivemind's DHT process log errors about the cancelled future
            self._leaving.set()
            self._cancel_averaging_round()
            done, running = await asyncio.wait(tasks, timeout=10)
            for task in running:
                logger.warning("Stopping: %s did not finish within 10 s; cancelling it", task.get_coro().__name__)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            new_stage = self._move_to.result() if self._move_to.done() else None
        finally:
            self._worker = None
            averager.allow_state_sharing = False  # a peer that leaves must not hand out its state any more
            await announcer.stop()
            if cfg.swarm.save_dir:
                await loop.run_in_executor(self._executor, self._save, worker, stage)
            await self._leave(peer, worker, stage, announcer)
            await loop.run_in_executor(None, averager.shutdown)
            if leaving_since is not None:
                logger.info("Left stage %d in %.1f s", stage, time.monotonic() - leaving_since)
        return new_stage

    async def _leave(self, peer: Peer, worker, stage: int, announcer: Announcer) -> None:
        try:
            await announcer.set_state(PeerState.OFFLINE, timeout_s=5)
            await self._publish_progress(peer, worker, stage, online=False)
        except Exception as e:  # leaving anyway: the records expire
            logger.warning("Could not announce leaving stage %d: %s", stage, e)

    def _save(self, worker, stage: int) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(self.config.swarm.save_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.config.run.experiment}-stage{stage}-{str(self._peer.peer_id)[-8:]}.safetensors"
        tensors = {name: p.detach().contiguous() for name, p in worker.stage.named_parameters() if p.requires_grad}
        save_file(tensors, str(path), metadata={"epoch": str(worker.epoch), "stage": str(stage)})
        logger.info("Saved stage %d (epoch %d) to %s", stage, worker.epoch, path)

    def _measure_speed(self, worker) -> None:
        """A first throughput for the record: forward passes of a small dummy micro-batch."""
        config = worker.stage.config
        if worker.stage.is_first:
            inputs = torch.zeros(1, 32, dtype=torch.long)
        else:
            inputs = torch.zeros(1, 32, config.hidden_size)
        for _ in range(2):
            if worker.stage.is_last:
                started = time.perf_counter()
                with torch.no_grad():
                    worker.stage(inputs, labels=torch.zeros(1, 32, dtype=torch.long))
                worker.speed.update(time.perf_counter() - started, 1)
            else:
                worker.forward(inputs)

    def _record(self, worker, stage: int, state: PeerState) -> StagePeerInfo:
        return StagePeerInfo(
            experiment=self.config.run.experiment,
            stage=stage,
            state=state,
            throughput_sps=worker.speed.samples_per_second or 0.0,
            queue_length=self._handler.queue_length,
            movable=self.config.swarm.movable,
            moved_from=self._moved[0] if self._moved else None,
            moved_at=self._moved[1] if self._moved else None,
            backup_of=self._backups.stage if self._backups.state is not None else None,
            backup_epoch=self._backups.epoch,
        )

    def status(self) -> StagePeerStatus:
        worker = self._worker
        if worker is None:
            raise RuntimeError("this peer is not serving a stage right now")
        return StagePeerStatus(
            experiment=self.config.run.experiment,
            stage=worker.stage.stage,
            epoch=worker.epoch,
            samples_accumulated=worker.samples,
            queue_length=self._handler.queue_length,
            throughput_sps=worker.speed.samples_per_second or 0.0,
            parameters_digest=worker.parameters_digest(),
            version=__version__,
        )

    # ---- epochs --------------------------------------------------------------------------------------------
    def _step_if_alone_and_full(self) -> None:
        """On the compute thread, right after a backward: a peer alone in its stage steps as soon as it holds the
        target batch (so that a trainer's next micro-batch already sees the new parameters)."""
        worker = self._worker
        if worker is not None and self._alone and worker.samples >= self.config.optimizer.target_batch_size:
            self._step_alone(worker)

    def _step_alone(self, worker) -> None:
        samples = worker.samples
        worker.apply_step(worker.mean_gradients())
        self._after_step(worker, samples, group_size=1)

    def _after_step(self, worker, samples: int, group_size: int) -> None:
        self._shared_in_epoch = None
        if self._averager is not None:
            self._averager.state_sharing_priority = worker.epoch
        logger.info(
            "Stage %d: epoch %d done (%d samples here, %d peer(s) averaged)",
            worker.stage.stage,
            worker.epoch,
            samples,
            group_size,
        )

    async def _publish_periodically(self, peer: Peer, worker, stage: int) -> None:
        """This peer's progress, as soon as it changes and at least every ``PROGRESS_REPUBLISH_S`` (also while an
        averaging round keeps the compute thread busy: others must not take this peer for gone)."""
        published, last_publish = None, 0.0
        while not self._leaving.is_set():
            state = (worker.epoch, worker.samples, self._averaging)
            if state != published or time.monotonic() - last_publish > PROGRESS_REPUBLISH_S:
                try:
                    await self._publish_progress(peer, worker, stage)
                    published, last_publish = state, time.monotonic()
                except Exception as e:
                    logger.warning("Could not publish stage %d's progress: %s", stage, e)
            await self._pause(PROGRESS_PERIOD_S / 2)

    async def _coordinate(self, peer: Peer, worker, averager, stage: int) -> None:
        """Read the other peers' progress, and average (or catch up) when it is time."""
        target = self.config.optimizer.target_batch_size
        loop = asyncio.get_running_loop()
        download_failed_at = -float("inf")
        while not self._leaving.is_set():
            try:
                others = await fetch_stage_progress(
                    peer.dht, experiment=self.config.run.experiment, stage=stage, timeout_s=5
                )
                others = {p: r for p, r in others.items() if p != peer.peer_id and r.online}
                same = [r for r in others.values() if r.epoch == worker.epoch]
                self._alone = not others
                if any(r.epoch > worker.epoch for r in others.values()):
                    # the peers ahead may be gone (their progress outlives them by PROGRESS_EXPIRATION_S)
                    if time.monotonic() - download_failed_at > PROGRESS_EXPIRATION_S:
                        if not await self._download_state(worker, averager, why="missed an averaging round"):
                            download_failed_at = time.monotonic()
                elif worker.samples + sum(r.samples for r in same) >= target or (
                    any(r.averaging for r in same) and worker.samples + sum(r.samples for r in same) > 0
                ):
                    if not others:
                        await loop.run_in_executor(self._executor, self._step_if_alone_and_full)
                    else:
                        self._averaging = True
                        try:
                            await self._publish_progress(peer, worker, stage)
                            ok = await loop.run_in_executor(self._executor, self._average_and_step, worker, averager)
                        finally:
                            self._averaging = False
                        if not ok:
                            await self._pause(self.config.optimizer.retry_averaging_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a background loop logs and keeps going
                logger.warning("Stage %d coordination failed: %s", stage, e, exc_info=logger.isEnabledFor(10))
            await self._pause(PROGRESS_PERIOD_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or return early when this peer leaves its stage."""
        try:
            await asyncio.wait_for(self._leaving.wait(), seconds)
        except TimeoutError:
            pass

    def _average_and_step(self, worker, averager) -> bool:
        """One averaging round with the stage's other peers (on the compute thread: no backward runs meanwhile).
        False if it failed: nothing changed, the gradients stay accumulated for the next try."""
        cfg = self.config.optimizer
        epoch, samples = worker.epoch, worker.samples
        try:
            if self.before_averaging is not None:
                self.before_averaging(epoch)
            mean = worker.mean_gradients()
            with averager.get_tensors() as buffers:
                for buffer, gradient in zip(buffers, mean):
                    buffer.copy_(gradient)
            # no retries inside hivemind: a retry would average the buffers a failed all-reduce left half averaged
            control = averager.step(
                weight=float(samples), timeout=cfg.averaging_timeout_s, allow_retries=False, wait=False
            )
            with self._round_lock:
                self._round, closed = control, self._rounds_closed
            if closed:  # the peer began leaving while this round started
                control.cancel()
            try:
                # bounded even if the averager process is gone before it finishes the round (it is shut down
                # when the peer leaves): hivemind ends a round by then (matchmaking by the step's deadline, the
                # all-reduce within allreduce_timeout, both averaging_timeout_s), a dead process never does
                gathered = control.result(timeout=2 * cfg.averaging_timeout_s + ROUND_RESULT_GRACE_S)
            finally:
                with self._round_lock:
                    self._round = None
            if gathered is None:
                raise RuntimeError("no group was found")
        except concurrent.futures.CancelledError:
            logger.info(
                "Stage %d: averaging round of epoch %d cancelled: leaving the stage (%d accumulated samples)",
                worker.stage.stage,
                epoch,
                samples,
            )
            return False
        except Exception as e:
            self._failed_rounds += 1
            if "Unable to run All-Reduce" in str(e):  # the group formed: groupmates may have used our gradients
                self._shared_in_epoch = epoch
            logger.warning(
                "Stage %d: averaging round of epoch %d failed (%s: %s); keeping the %d accumulated samples and "
                "trying again (%d failed rounds so far)",
                worker.stage.stage,
                epoch,
                type(e).__name__,
                e,
                samples,
                self._failed_rounds,
            )
            return False
        with averager.get_tensors() as buffers:
            averaged = [b.clone() for b in buffers]
        if not all(torch.isfinite(t).all() for t in averaged):  # e.g. a group whose every weight was 0 (0/0)
            self._failed_rounds += 1
            logger.warning(
                "Stage %d: the averaged gradients of epoch %d are not finite; not stepping", worker.stage.stage, epoch
            )
            return False
        worker.apply_step(averaged)
        self._after_step(worker, samples, group_size=len(gathered))
        return True

    def _cancel_averaging_round(self) -> None:
        """Leaving the stage: no new averaging round starts, and one still looking for its group is cancelled
        (its groupmates are leaving too, or go on without this peer). Without this, the compute thread would wait
        for a round until its deadline, and forever if the averager process was shut down meanwhile: the
        interpreter's exit joins that thread, so the stopped peer would never exit. A round whose all-reduce began
        finishes (bounded by its timeout): cancelling it would fail it for the groupmates."""
        with self._round_lock:
            self._rounds_closed = True
            control = self._round
        if control is not None and not control.began_allreduce:
            control.cancel()

    async def _download_state(self, worker, averager, *, why: str) -> bool:
        """Take the state of the stage's most advanced peer; False if none could be downloaded."""
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, averager.download_state, STATE_DOWNLOAD_TIMEOUT_S)
        if state is None:
            logger.warning("Stage %d: no peer shared its state (%s); keeping this peer's", worker.stage.stage, why)
            return False
        if state.epoch < worker.epoch:
            logger.info(
                "Stage %d: the downloaded state (epoch %d) is older than ours", worker.stage.stage, state.epoch
            )
            return True
        missed_epoch = worker.epoch
        try:
            await loop.run_in_executor(self._executor, worker.load_state, state)
        except ValueError as e:  # hivemind takes a stream that ended early (the donor left) for a whole state
            logger.warning(
                "Stage %d: the downloaded state is unusable (%s, %s); keeping this peer's", worker.stage.stage, e, why
            )
            return False
        if self._shared_in_epoch == missed_epoch:
            # this peer's gradients went into the round it then failed: the others' step holds them already
            dropped = await loop.run_in_executor(self._executor, worker.discard_gradients)
            logger.info("Stage %d: dropped %d samples' gradients the others' step holds", worker.stage.stage, dropped)
        self._shared_in_epoch = None
        logger.info(
            "Stage %d: downloaded the stage's state at epoch %d (%s); %d accumulated samples kept",
            worker.stage.stage,
            state.epoch,
            why,
            worker.samples,
        )
        return True

    async def _publish_progress(self, peer: Peer, worker, stage: int, *, online: bool = True) -> None:
        progress = StageProgress(
            experiment=self.config.run.experiment,
            stage=stage,
            epoch=worker.epoch,
            samples=worker.samples,
            averaging=self._averaging,
            online=online,
        )
        future = declare_stage_progress(peer.dht, progress, owner=peer.owner, expiration_s=PROGRESS_EXPIRATION_S)
        await asyncio.wait_for(asyncio.wrap_future(future), 5)

    # ---- backups of the next stage --------------------------------------------------------------------------
    async def _state_of(self, stage: int) -> tuple[TrainingState, bool]:
        """The ``state`` RPC: this peer's stage (taken between steps), or its copy of another stage."""
        worker = self._worker
        if worker is not None and worker.stage.stage == stage:
            return await asyncio.get_running_loop().run_in_executor(None, worker.state), False
        copy = self._backups.copy_of(stage) if self._backups is not None else None
        if copy is None:
            raise InvalidRequestError(f"this peer neither serves stage {stage} nor keeps a copy of its state")
        return copy, True

    async def _back_up_periodically(self, stage: int) -> None:
        period = self.config.swarm.backup_period_s
        await self._pause(period * random.uniform(0.1, 0.5))  # a first copy soon after joining
        while not self._leaving.is_set():
            try:
                records = await self._stage_records()
                if await self._backups.refresh(records, stage, random):
                    logger.debug("Copied the state of stage %d at epoch %d", self._backups.stage, self._backups.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("Could not copy the next stage's state: %s", e)
            await self._pause(period * random.uniform(0.5, 1.5))

    async def _restore_backup(self, worker, records: list[list], stage: int) -> None:
        """Refill an emptied stage from the newest copy any peer keeps of it (else from the initial weights)."""

        def failed(holder, error) -> None:
            logger.warning("Could not download the copy of stage %d kept by %s: %s", stage, holder, error)

        restored = await self._backups.restore(records, stage, failed) if self._backups is not None else None
        if restored is not None:
            state, source = restored
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, worker.load_state, state)
            except ValueError as e:
                logger.warning("The copy of stage %d from %s does not fit (%s)", stage, source, e)
            else:
                logger.info(
                    "No other peer serves stage %d: restored its state at epoch %d from %s",
                    stage,
                    state.epoch,
                    source,
                )
                return
        logger.warning(
            "No other peer serves stage %d and nobody keeps a copy of it: starting from the model's initial weights "
            "(that stage's training is lost)",
            stage,
        )

    # ---- rebalancing ---------------------------------------------------------------------------------------
    async def _rebalance_periodically(self, peer: Peer, stage: int) -> None:
        period = self.config.swarm.rebalance_period_s
        while not self._leaving.is_set():
            await self._pause(period * random.uniform(0.5, 1.5))
            if self._leaving.is_set():
                return
            try:
                records = await self._stage_records()
            except Exception as e:
                logger.warning("Could not read the stages' records to rebalance: %s", e)
                continue
            me = str(peer.peer_id)
            worker = self._worker
            peers = [
                BalancePeer(str(p), s, info.throughput_sps, movable=info.movable)
                for s, found in enumerate(records)
                for p, info in found
            ]
            if worker is not None:
                peers.append(BalancePeer(me, stage, worker.speed.samples_per_second or 0.0))
            empty = sorted(set(range(self.config.run.num_stages)) - {p.stage for p in peers})
            if empty:
                logger.info("Rebalancing check: stage(s) %s have no peer", ", ".join(map(str, empty)))
            moving = {
                str(p): s for s, found in enumerate(records) for p, info in found if info.state == PeerState.JOINING
            }
            move = choose_move(
                peers,
                self.config.run.num_stages,
                min_gain=self.config.swarm.rebalance_min_gain,
                moving=moving,
                cooling=cooling_stages(records, now=get_dht_time(), period_s=period),
            )
            logger.debug("Rebalancing: peers %s, moving %s: %s", peers, moving, move)
            settling = time.monotonic() - self._serving_since < MIN_STAY_PERIODS * period
            if move is not None and move.peer_id == me and settling and move.throughput_before > 0:
                logger.debug("Not moving yet: serving stage %d for less than %d periods", stage, MIN_STAY_PERIODS)
                move = None
            if move is not None and move.peer_id == me:
                logger.info(
                    "Moving from stage %d to stage %d (pipeline %.2f -> %.2f samples/s estimated)",
                    move.from_stage,
                    move.to_stage,
                    move.throughput_before,
                    move.throughput_after,
                )
                self._moved = (move.from_stage, get_dht_time())
                self._move_to.set_result(move.to_stage)
                return
