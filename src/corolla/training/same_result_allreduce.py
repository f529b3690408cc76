"""hivemind's butterfly all-reduce, changed so that every peer of a group ends a round with the same bits.

hivemind's reducer of a part sends each sender the *difference* between the average and that sender's own part,
compressed, and the sender adds it to its part. In floating point ``own + (average - own)`` is not ``average``, and
with a lossy codec the difference is rounded per sender, so after a round the peers of a stage hold slightly
different gradients; AdamW divides by the gradients' running scale, which turns last-bit differences in tiny
gradients into visible differences in the parameters (seen in CI: 2.5e-6 after 16 steps).

Here the reducer sends the averaged part itself, compressed once with the codec the sender used, and takes its own
averaged part through the same codec; the sender *replaces* its part with what it received. Every peer then holds
exactly the decoded average, and the same AdamW step keeps their parameters bitwise equal. The price is that a
lossy codec's error is in the average itself rather than in its difference from one's own part.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import amap_in_executor


def _decode(message: averaging_pb2.AveragingData):
    return deserialize_torch_tensor(message.tensor_part), message.weight, message.tensor_part.compression


class SameResultAllReduce(AllReduceRunner):
    """An ``AllReduceRunner`` that yields the averaged tensors (not their differences from the local ones): the
    caller copies them into its buffers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a part whose reducer failed is left at this peer's own values (the round then fails as a partial one)
        self.tensor_part_container.return_deltas = False

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        # this peer reduces its own share: the result goes through the codec the other senders receive it with
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        infos = [info for _, info in container._input_parts_by_peer[peer_index]]
        loop = asyncio.get_running_loop()
        for part_index, part in enumerate(self.parts_for_local_averaging):
            averaged = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, part, weight=self.weight
            )
            wire = await loop.run_in_executor(None, container.compression.compress, averaged, infos[part_index])
            container.register_processed_part(peer_index, part_index, deserialize_torch_tensor(wire))

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Reduce a sender's parts as they arrive and send back each averaged part in the sender's codec."""
        loop = asyncio.get_running_loop()
        reduced = 0
        try:
            decoded = amap_in_executor(_decode, stream, max_prefetch=self.tensor_part_container.prefetch)
            async for part, weight, codec in decoded:
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(
                        sender_index, reduced, part, weight=weight
                    )
                except BannedException:
                    break  # the sender was banned meanwhile: nobody waits for its parts
                reduced += 1
                wire = await loop.run_in_executor(None, serialize_torch_tensor, averaged, codec)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=wire)
        finally:
            if reduced != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
