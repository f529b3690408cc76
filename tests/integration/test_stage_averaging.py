"""In-stage averaging between real hivemind averagers (each its own process and p2pd on loopback): after a round,
every peer holds the same bits, for lossless and lossy codecs alike."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from corolla.net.dht_process import ParentBoundDHT
from corolla.net.identity import swarm_validators
from corolla.training.stage_averaging import SIZE_ADAPTIVE_THRESHOLD, StageAverager, averaging_compression
from corolla.training.stage_worker import TrainingState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _dht(initial_peers=()):
    return ParentBoundDHT(
        initial_peers=list(initial_peers), start=True, record_validators=swarm_validators(RSAPrivateKey())
    )


def _state():
    return TrainingState(epoch=0, optimizer_steps=0, tensors=[])


@pytest.mark.parametrize("codec", ["NONE", "size_adaptive", "UNIFORM_8BIT"])
def test_every_peer_of_a_round_holds_the_same_average(codec):
    """Three peers, one small tensor (float16 under size_adaptive) and one large (8-bit), end the round with
    bitwise-equal buffers, equal to the weighted mean within the codec's error. Uncompressed, the values span 8
    orders of magnitude, so that ``own + (average - own)`` (what hivemind's own all-reduce computes) would round
    differently on each peer; compressed, each peer's difference would be quantized on its own."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300,), (SIZE_ADAPTIVE_THRESHOLD + 1000,)]
    weights = [1.0, 3.0, 2.0]
    scale = [torch.logspace(-6, 2, shape[0]) if codec == "NONE" else torch.ones(shape) for shape in shapes]
    values = [[torch.randn(s.shape, generator=generator) * s for s in scale] for _ in weights]
    first = _dht()
    dhts = [first] + [_dht(first.get_visible_maddrs()) for _ in weights[1:]]
    averagers = [
        StageAverager(
            [t.clone() for t in tensors],
            current_state=_state,
            dht=dht,
            prefix="test_exp_stage0",
            start=True,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            allreduce_timeout=30.0,
            compression=averaging_compression(codec),
            target_group_size=len(weights),
        )
        for dht, tensors in zip(dhts, values)
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
            steps = [
                pool.submit(averager.step, weight=weight, timeout=60, allow_retries=False)
                for averager, weight in zip(averagers, weights)
            ]
            gathered = [step.result(timeout=90) for step in steps]
        assert all(len(g) == len(weights) for g in gathered), "every peer averaged with all others"
        results = []
        for averager in averagers:
            with averager.get_tensors() as tensors:
                results.append([t.clone() for t in tensors])
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
        total = sum(weights)
        for index, averaged in enumerate(results[0]):
            expected = sum(w * v[index] for w, v in zip(weights, values)) / total
            error = ((averaged - expected).norm() / expected.norm()).item()
            if codec == "NONE":
                torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-5)
            else:  # float16 or 8-bit
                assert error < 0.1
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
