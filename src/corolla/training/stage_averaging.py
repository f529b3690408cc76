"""In-stage averaging over hivemind: the peers of a stage average their gradients in a butterfly all-reduce
(``DecentralizedAverager``, its prefix the experiment and stage), and a joining peer downloads the stage's state.

The averaged tensors are buffers of their own: a round copies this peer's mean gradient into them, and only a round
that succeeds is used. The averaged parts are written into the buffers as they arrive, so a round that fails half
way leaves them half averaged; the peer's own gradients (in its parameters' ``.grad``) are untouched by that and are
averaged again in the next attempt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.compression.quantization import BlockwiseQuantization
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

from corolla.log import get_logger
from corolla.training.same_result_allreduce import SameResultAllReduce
from corolla.training.stage_worker import TrainingState

logger = get_logger(__name__)

SIZE_ADAPTIVE_THRESHOLD = 2**16 + 1  # elements: smaller tensors go as float16, larger ones 8-bit (as in SWARM)


def averaging_compression(name: str) -> CompressionBase:
    """hivemind's codec for averaged tensors: size_adaptive (float16 below 65,537 elements, 8-bit above), NONE,
    FLOAT16, UNIFORM_8BIT or BLOCKWISE_8BIT."""
    if name == "size_adaptive":
        return SizeAdaptiveCompression(
            threshold=SIZE_ADAPTIVE_THRESHOLD, less=Float16Compression(), greater_equal=Uniform8BitQuantization()
        )
    codecs = {
        "NONE": NoCompression,
        "FLOAT16": Float16Compression,
        "UNIFORM_8BIT": Uniform8BitQuantization,
        "BLOCKWISE_8BIT": BlockwiseQuantization,
    }
    if name not in codecs:
        raise ValueError(f"unknown averaging compression {name!r}; choose size_adaptive or one of {list(codecs)}")
    return codecs[name]()


def averaging_prefix(experiment: str, stage: int) -> str:
    """hivemind's averaging prefix of a stage (it may not contain dots)."""
    return f"{experiment.replace('.', '_')}_stage{stage}"


class PartialRound(AllreduceException):
    """An all-reduce that returned with some parts never averaged (a groupmate's reducer or sender failed)."""


class StageAverager(DecentralizedAverager):
    """hivemind's averager over gradient buffers, sharing this peer's training state with joiners.

    ``current_state`` is called on a background thread of this process when another peer downloads the state.

    hivemind ends an all-reduce in which some parts never arrived as a success, with those parts left at the peer's
    own values and only a warning ("received 74.3% results"); the peers of a stage would then step with different
    gradients. Here such a round fails (``PartialRound``), so the peer keeps its own gradients and catches up. And
    every peer of a round receives the same averaged bits (``SameResultAllReduce``), so the same step keeps their
    parameters bitwise equal.
    """

    def __init__(self, buffers: list[torch.Tensor], *, current_state: Callable[[], TrainingState], **kwargs):
        self._current_state = current_state
        super().__init__(buffers, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Runs in the averager's process: one all-reduce in which every peer receives the same averaged bits
        (``SameResultAllReduce``), copied into the buffers; a round with parts never averaged fails."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = SameResultAllReduce(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)  # hivemind's handler routes the groupmates' parts to it
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("an auxiliary peer received averaged tensors")
            return
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
            self.last_updated = get_dht_time()
            self._state_updated.set()
        parts = runner.tensor_part_container
        if parts.failed_size:
            raise PartialRound(f"only {1 - parts.failed_size / parts.total_size:.1%} of the gradients were averaged")

    def get_current_state(self):
        state = self._current_state()
        metadata = dict(epoch=state.epoch, optimizer_steps=state.optimizer_steps)
        return metadata, state.tensors

    def download_state(self, timeout_s: float) -> TrainingState | None:
        """The state of the most advanced peer of the stage that shares it (None if none answered)."""
        loaded = self.load_state_from_peers(timeout=timeout_s)
        if loaded is None:
            return None
        metadata, tensors = loaded
        if not isinstance(metadata, dict) or "epoch" not in metadata:
            logger.warning("A peer sent a state without an epoch; ignoring it")
            return None
        return TrainingState(
            epoch=int(metadata["epoch"]),
            optimizer_steps=int(metadata.get("optimizer_steps", 0)),
            tensors=[t.float() for t in tensors],
        )
