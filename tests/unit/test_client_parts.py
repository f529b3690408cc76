"""Client-side pieces without a swarm: local parts of the model, weights read, config validation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import corolla.models.checkpoint as checkpoint_module
from corolla.client.config import ClientConfig
from corolla.client.model import _build_local_parts, _load_local_weights
from corolla.models.checkpoint import parse_block_key, resolve_checkpoint
from corolla.models.families import family_for
from tests.fixtures.zoo import FAMILIES, zoo_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_client_reads_only_embeddings_norm_and_head(family, monkeypatch):
    path = zoo_checkpoint(family)
    checkpoint = resolve_checkpoint(str(path))
    config = AutoConfig.from_pretrained(path)
    spec = family_for(config.model_type)
    read: list[str] = []
    original = checkpoint_module.load_tensors

    def spy(ckpt, keys, weight_map):
        keys = list(keys)
        read.extend(keys)
        return original(ckpt, keys, weight_map)

    monkeypatch.setattr(checkpoint_module, "load_tensors", spy)
    model = _build_local_parts(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config, spec, torch.float32)
    _load_local_weights(model, checkpoint, spec)
    assert read and not [k for k in read if parse_block_key(k) is not None]
    assert len(getattr(getattr(model, spec.base_model_attr), spec.layers_attr)) == 0

    reference = AutoModelForCausalLM.from_pretrained(path)
    ours = model.state_dict()
    for name, tensor in reference.state_dict().items():
        if parse_block_key(name) is None:
            torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)


def test_client_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="corolla dht"):
        ClientConfig(initial_peers=())
    with pytest.raises(ValueError, match="unknown compression"):
        ClientConfig(initial_peers=("x",), compression="GZIP")
    with pytest.raises(ValueError, match="UNIFORM_8BIT"):
        ClientConfig(initial_peers=("x",), compression="BLOCKWISE_8BIT")
    with pytest.raises(ValueError, match="step_timeout_s"):
        ClientConfig(initial_peers=("x",), step_timeout_s=0)


def test_speed_is_measured_once_and_cached(tmp_path, monkeypatch):
    from corolla.models.span import load_span
    from corolla.server import throughput

    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), 0, 2)
    calls = []
    original = throughput.measure_speed
    monkeypatch.setattr(throughput, "measure_speed", lambda s: calls.append(1) or original(s))
    first = throughput.get_speed(span, quant="none", cache_root=tmp_path)
    second = throughput.get_speed(span, quant="none", cache_root=tmp_path)
    assert first == second and len(calls) == 1
    assert first.inference_rps > 0 and first.forward_rps > 0 and first.throughput > 0
    throughput.get_speed(span, quant="none", cache_root=tmp_path, force_eval=True)
    assert len(calls) == 2


class _Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _NoNetwork:
    """A transport where every peer is unreachable (pings fail; routing falls back to default delays)."""

    async def call(self, *args, **kwargs):
        raise ConnectionError("no network in unit tests")


class _Records:
    """A record source over fixed server infos (a test may change them); counts its reads."""

    def __init__(self, infos: dict):
        self.infos, self.reads = infos, 0

    def __call__(self) -> list[dict]:  # one dict per block: the servers whose records are under that block's key
        self.reads += 1
        return [{p: i for p, i in self.infos.items() if i.start_block <= block < i.end_block} for block in range(6)]


def _view_with(servers: dict[str, tuple[int, int]], clock=None):
    """A SwarmView over fixed server records through its seams: a record source, a clock, no network."""
    from hivemind.p2p import PeerID

    from corolla.client.swarm import SwarmView
    from corolla.protocol.server_info import ServerInfo, ServerState

    records = _Records(
        {
            PeerID.from_base58(_peer_ids()[name]): ServerInfo(
                state=ServerState.ONLINE, start_block=a, end_block=b, throughput=1.0
            )
            for name, (a, b) in servers.items()
        }
    )
    view = SwarmView(
        config=ClientConfig(initial_peers=("x",)), dht=None, num_blocks=6, model_name="m", dht_prefix="m",
        clock=clock or _Clock(), records=records, transport=_NoNetwork(),
    )  # fmt: skip
    view.refresh()
    view.records = records  # for the test
    return view, {name: _peer_ids()[name] for name in servers}


def _peer_ids() -> dict[str, str]:
    return {
        "a": "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        "b": "QmSoLer265NRgSp2LA3dPaeykiS1J6DifTC88f5uVQKNAd",
        "c": "QmcZf59bWwK5XFi76CZX8cbJ4BhTzzA3gU1ZjYZcYW3dwt",
    }


def test_only_banned_servers_are_used_rather_than_failing():
    view, ids = _view_with({"a": (0, 3), "b": (3, 6), "c": (3, 6)})
    view.ban(ids["b"])
    assert [h.peer_id for h in view.inference_route(0, 6)] == [ids["a"], ids["c"]]
    view.ban(ids["c"])  # every server of 3:6 is banned: use one of them anyway instead of MissingBlocksError
    assert view.inference_route(0, 6)[1].peer_id in {ids["b"], ids["c"]}


def test_a_server_that_answers_is_forgiven():
    view, ids = _view_with({"a": (0, 6)})
    view.ban(ids["a"])
    view.ban(ids["a"])
    assert view.failures(ids["a"]) == 2
    view.forgive(ids["a"])
    assert ids["a"] not in view.banned()
    view.ban(ids["a"])
    assert view.failures(ids["a"]) == 1  # back to the shortest ban


def test_bans_double_with_each_failure_and_expire_on_the_clock():
    clock = _Clock()
    view, ids = _view_with({"a": (0, 6)}, clock=clock)
    ban = view.config.ban_timeout_s
    for failures, duration in ((1, ban), (2, 2 * ban), (3, 4 * ban)):
        view.ban(ids["a"])
        assert view.failures(ids["a"]) == failures
        clock.now += duration - 0.01
        assert ids["a"] in view.banned()
        clock.now += 0.02
        assert ids["a"] not in view.banned()  # expired, but the failures count on until it answers


def test_the_view_refreshes_after_the_update_period_on_its_clock():
    clock = _Clock()
    view, ids = _view_with({"a": (0, 6)}, clock=clock)
    reads = view.records.reads
    view.maybe_refresh()
    assert view.records.reads == reads  # still fresh
    clock.now += view.config.update_period_s + 1
    view.maybe_refresh()
    assert view.records.reads == reads + 1


def test_servers_of_another_protocol_version_are_not_routed_through():
    from corolla.errors import MissingBlocksError

    view, ids = _view_with({"a": (0, 6), "b": (0, 6)})
    infos = view.records.infos
    old = next(peer for peer in infos if peer.to_base58() == ids["a"])
    infos[old] = infos[old].model_copy(update={"protocol_version": 1})
    view.refresh()
    assert [hop.peer_id for hop in view.inference_route(0, 6)] == [ids["b"]]
    del infos[next(peer for peer in infos if peer.to_base58() == ids["b"])]
    view.refresh()
    with pytest.raises(MissingBlocksError):  # only a server of another version is left
        view.inference_route(0, 6)


def test_a_rewind_cuts_the_replay_history_to_the_accepted_tokens():
    """What a span keeps for replay after a rewind: whole steps before the position, the step it falls in cut,
    nothing after; the answers kept for verification are cut alike, and a check that covered dropped steps counts
    only the kept ones."""
    from corolla.algorithms.routing import RouteHop
    from corolla.client.inference_session import _Sent, _SpanState

    def sent(start: int, length: int, with_output: bool) -> _Sent:
        positions = torch.arange(start, start + length)[None]
        hidden = positions[..., None].float().expand(1, length, 4)
        return _Sent(hidden_states=hidden, position_ids=positions, output=-hidden if with_output else None)

    span = _SpanState(hop=RouteHop(peer_id="p", start=0, end=2))
    span.sent = [sent(0, 5, False), sent(5, 4, True), sent(9, 3, True)]  # a prompt, then two speculative steps
    span.checked = 3
    span.keep_tokens(7)
    assert [entry.position_ids.tolist() for entry in span.sent] == [[[0, 1, 2, 3, 4]], [[5, 6]]]
    assert span.sent[1].hidden_states.shape == (1, 2, 4) and torch.equal(
        span.sent[1].output, -span.sent[1].hidden_states
    )
    assert span.checked == 2 and span.tokens(span.sent) == 7
    span.keep_tokens(5)  # at a step boundary
    assert len(span.sent) == 1 and span.tokens(span.sent) == 5
    span.keep_tokens(0)
    assert span.sent == [] and span.checked == 0
