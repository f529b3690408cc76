"""SWARM training between real processes: stage peers (``corolla stage``) on loopback and a trainer."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from corolla.local_swarm import LocalSwarm, wait_for
from corolla.models.stages import StageLayout
from corolla.training.trainer import Trainer
from tests.fixtures.swarm_training import reference_name, saved_stages, stage_args, train_locally, trainer_config
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FAILING_AVERAGING = str(Path(__file__).parents[1] / "fixtures" / "failing_averaging.py")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_swarm_training_equals_training_in_one_process(family, tmp_path):
    """One trainer, one peer per stage, no compression, synchronous steps: the same losses at every step and the
    same parameters after 4 AdamW steps as transformers' model trained whole on the same batches."""
    model, stages = str(zoo_checkpoint(family)), 3
    save_dir = tmp_path / "saved"
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for stage in range(stages):
            args = stage_args("exact", stages, "--stage", str(stage), "--save-dir", str(save_dir))
            swarm.start_stage_peer(f"stage{stage}", [*args, "--averaging-compression", "NONE"])
        swarm.wait_until_stages("exact", stages, peers=[f"stage{s}" for s in range(stages)])
        config = trainer_config(model, swarm, "exact", stages, synchronous=True)
        reports = Trainer(config).train()
        swarm.stop()  # SIGTERM: each peer saves its stage
    expected_losses, reference = train_locally(config)
    assert [r.failed_microbatches for r in reports] == [0] * config.steps
    assert [r.loss for r in reports] == pytest.approx(expected_losses, rel=1e-5)
    saved = saved_stages(save_dir)
    assert len(saved) == stages
    layout = StageLayout.even(reference.config.num_hidden_layers, stages)
    local = dict(reference.named_parameters())
    compared = set()
    for (name, tensors), stage in zip(sorted(saved.items()), range(stages)):
        assert f"stage{stage}" in name
        for param_name, value in tensors.items():
            full = reference_name(family, stage, layout, param_name)
            torch.testing.assert_close(value, local[full].detach(), rtol=1e-4, atol=1e-6)
            compared.add(full)
    assert compared == set(local)  # every parameter of the model was trained by some stage
    assert expected_losses[-1] < expected_losses[0]


def _statuses(swarm: LocalSwarm, names):
    from corolla.training.status import stage_peer_statuses

    answers = stage_peer_statuses(swarm.initial_peers, [swarm.peer_ids[n] for n in names])
    return {n: answers[swarm.peer_ids[n]] for n in names}


def _settled(swarm: LocalSwarm, names, *, target: int, min_epochs: int):
    """Statuses once the named peers of one stage are at the same epoch (>= ``min_epochs``) and hold fewer than
    ``target`` samples together (no averaging round is due)."""
    from corolla.local_swarm import wait_for

    found = {}

    def done() -> bool:
        found.update(_statuses(swarm, names))
        if any(isinstance(s, Exception) for s in found.values()):
            return False
        epochs = {s.epoch for s in found.values()}
        return (
            len(epochs) == 1
            and min(epochs) >= min_epochs
            and sum(s.samples_accumulated for s in found.values()) < target
        )

    wait_for(done, timeout_s=60, what=f"peers {list(names)} to settle at one epoch", poll_s=0.5)
    return found


def test_peers_of_a_stage_average_into_the_same_parameters_and_a_joiner_downloads_them(tmp_path):
    """Two peers of stage 0 split the trainer's micro-batches, average their gradients every 8 samples and hold
    the same parameters after each round; a's first round fails (injected) and training goes on, nothing lost
    and no peer stepping alone (b waits for a's retry within its matchmaking); a peer that joins later downloads
    the stage's parameters and optimizer state and matches them."""
    model = str(zoo_checkpoint("llama"))
    fast = ["--matchmaking-time-s", "1", "--averaging-timeout-s", "10", "--averaging-compression", "NONE"]
    fast += ["--save-dir", str(tmp_path / "saved")]
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for name, stage in [("a", 0), ("b", 0), ("c", 1)]:
            entry = [FAILING_AVERAGING] if name == "a" else []
            swarm.start_stage_peer(name, [*stage_args("avg", 2, "--stage", str(stage), target=8), *fast], entry)
        swarm.wait_until_stages("avg", 2, peers=["a", "b", "c"])
        swarm_ids = swarm.peer_ids
        config = trainer_config(model, swarm, "avg", 2, steps=16, samples_per_step=8, max_in_flight=4)
        reports = Trainer(config).train()
        assert sum(r.failed_microbatches for r in reports) == 0
        statuses = _settled(swarm, ["a", "b"], target=8, min_epochs=2)
        epoch = statuses["a"].epoch
        for name in ("a", "b"):
            log = (tmp_path / "logs" / f"{name}.log").read_text()
            # every epoch ended in a round of both peers (or, after a round hivemind finished only in part on this
            # peer, by taking the other's state): never a step alone
            lines = log.splitlines()
            caught_up = sum("downloaded the stage's state" in x and "missed an averaging round" in x for x in lines)
            assert log.count("2 peer(s) averaged") + caught_up == epoch and "1 peer(s) averaged" not in log, name
        failed = (tmp_path / "logs" / "a.log").read_text()
        assert "averaging round of epoch 0 failed (ConnectionError: injected" in failed and "trying again" in failed

        swarm.start_stage_peer("d", stage_args("avg", 2, "--stage", "0", target=8) + fast)
        swarm.wait_until_stages("avg", 2, peers=["d"])
        joined = _statuses(swarm, ["a", "b", "d"])
        assert joined["d"].epoch == epoch
        # every round hands both peers the same averaged bits, and the joiner a bitwise copy
        assert joined["d"].parameters_digest == joined["a"].parameters_digest == joined["b"].parameters_digest
        assert f"downloaded the stage's state at epoch {epoch}" in (tmp_path / "logs" / "d.log").read_text()
        swarm.stop()  # SIGTERM: each peer saves its stage
    saved = {
        name.rsplit("-", 1)[1].split(".")[0]: tensors for name, tensors in saved_stages(tmp_path / "saved").items()
    }
    a, b, d = (saved[swarm_ids[n][-8:]] for n in ("a", "b", "d"))
    assert a.keys() == b.keys() == d.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(d[name], a[name]), name


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_training_goes_on_when_a_stage_peer_is_killed_or_frozen(sig, tmp_path):
    """Stage 1 has two peers; after 3 steps, the first stage-1 peer the trainer calls is SIGKILLed (the call fails:
    banned, retried on the other) or SIGSTOPped (the call times out: retried on the other) just before the call
    leaves. No micro-batch fails, every step has all its losses, the survivor steps on its own once the other's
    progress record expires, and the loss keeps falling."""
    from corolla.net.faults import Call, FaultPlan, FaultyTransport

    model = str(zoo_checkpoint("llama"))
    fast = ["--matchmaking-time-s", "1", "--averaging-timeout-s", "4"]
    # started cold, as in every CI run before warm spawn: once (1 of 7 runs, warm) the survivor hung for 104 s in an
    # averaging round with the frozen peer (hivemind's step waits for a running all-reduce without a timeout), a real
    # bug not fixed yet; whether warm starts make it likelier is not known
    with LocalSwarm(model=model, log_dir=tmp_path / "logs", warm_spawn=False) as swarm:
        for name, stage in [("a", 0), ("b", 1), ("c", 1)]:
            swarm.start_stage_peer(name, [*stage_args("faults", 2, "--stage", str(stage), target=8), *fast])
        swarm.wait_until_stages("faults", 2, peers=["a", "b", "c"])

        victim: dict = {}
        stage1 = {swarm.peer_ids[n]: n for n in ("b", "c")}

        def on_step(report) -> None:
            if report.step == 2:
                victim["armed"] = True

        def rule(call: Call) -> None:
            # whichever peer the wiring picks next gets the signal, so the call is sure to meet the dead peer (a
            # victim chosen from earlier steps may never be called again: CI saw the wiring send all later work
            # to the other peer)
            if victim.get("armed") and "name" not in victim and call.peer_id in stage1:
                victim["name"] = stage1[call.peer_id]
                victim["pid"] = swarm.processes[victim["name"]].pid
                swarm.kill(victim["name"], sig)

        # averaging rounds keep a peer's compute thread busy: up to 4 s here, but a round whose groupmate froze can
        # hold the survivor for matchmaking plus all-reduce (~8 s; CI saw both peers time out at step 3): the calls
        # then time out at both, and the trainer waits for the survivor's ban to end instead of failing them
        config = trainer_config(
            model, swarm, "faults", 2, steps=14, samples_per_step=8, forward_timeout_s=6, backward_timeout_s=8
        )
        trainer = Trainer(config, on_step=on_step, wrap_transport=lambda t: FaultyTransport(t, FaultPlan(rule)))
        reports = trainer.train()
        assert "name" in victim, "the trainer called no stage-1 peer after step 2"
        log = tmp_path / "logs" / f"{'c' if victim['name'] == 'b' else 'b'}.log"
        wait_for(lambda: "1 peer(s) averaged" in log.read_text(), timeout_s=30, what="the survivor to step alone")
        victim["shm"] = sorted(Path("/dev/shm").glob(f"torch_{victim['pid']}_*"))
    assert [r.failed_microbatches for r in reports] == [0] * config.steps
    assert all(r.samples == 8 for r in reports)
    # what the victim's shared tensors left in /dev/shm (a SIGKILLed process never unlinks them) is gone with the swarm
    assert not any(path.exists() for path in victim["shm"]), victim["shm"]
    assert sum(r.retried_calls for r in reports[3:]) >= 1, "the call to the dead peer was not retried"
    first, last = [r.loss for r in reports[:3]], [r.loss for r in reports[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.3


def test_an_emptied_stage_is_refilled_from_a_backup_and_training_resumes(tmp_path):
    """Stage 1's only peer b trains 4 epochs and is SIGKILLed. The peers of stage 0 (a, and m: movable, but only to
    refill an empty stage, its gain threshold out of reach) each keep a copy of stage 1's state. m's first
    rebalancing check that sees stage 1 empty moves it there (the checks come every 0.5-1.5 periods: within two
    periods of b's record expiring); it restores the newest copy, bitwise b's parameters at its last epoch, and
    the trainer's next steps all finish through it."""
    from corolla.local_swarm import wait_for

    model = str(zoo_checkpoint("llama"))
    fast = ["--matchmaking-time-s", "1", "--averaging-timeout-s", "4", "--backup-period-s", "1"]
    mover = ["--rebalance", "on", "--rebalance-period-s", "2", "--rebalance-min-gain", "100"]
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for name, stage, extra in [("a", 0, []), ("b", 1, []), ("m", 0, mover)]:
            swarm.start_stage_peer(name, [*stage_args("refill", 2, "--stage", str(stage), target=8), *fast, *extra])
        swarm.wait_until_stages("refill", 2, peers=["a", "b", "m"])
        assert swarm.stage_peers("refill", 2)["m"] == (0, "ONLINE")
        config = trainer_config(model, swarm, "refill", 2, steps=4, samples_per_step=8, max_retries=60)
        assert sum(r.failed_microbatches for r in Trainer(config).train()) == 0
        before = _statuses(swarm, ["b"])["b"]
        assert before.epoch == 4

        def copies_are_current() -> bool:
            records = swarm.stage_records("refill", 2)
            return all(records[n].backup_of == 1 and records[n].backup_epoch == before.epoch for n in ("a", "m"))

        wait_for(copies_are_current, timeout_s=30, what="a and m to copy stage 1's last state")
        swarm.kill("b")
        wait_for(lambda: swarm.stage_peers("refill", 2).get("m") == (1, "ONLINE"), timeout_s=60, what="m to refill")
        after = _statuses(swarm, ["m"])["m"]
        assert (after.stage, after.epoch, after.parameters_digest) == (1, before.epoch, before.parameters_digest)
        reports = Trainer(config).train()
        assert [r.failed_microbatches for r in reports] == [0] * config.steps
        # m steps on (at once, or once b's progress record expires: until then it waits for b to average with)
        wait_for(lambda: _statuses(swarm, ["m"])["m"].epoch > before.epoch, timeout_s=30, what="m to step")
    log = (tmp_path / "logs" / "m.log").read_text()
    checks = [x for x in log.splitlines() if "Rebalancing check: stage(s) 1 have no peer" in x or "Moving from" in x]
    assert len(checks) == 2 and "Moving from stage 0 to stage 1" in checks[1], checks
    assert f"No other peer serves stage 1: restored its state at epoch {before.epoch} from" in log


def test_training_on_the_markov_source_reaches_its_floor(tmp_path):
    """A pipelined trainer (micro-batches in flight across steps) through 2 stage peers brings the next-token loss
    of a random Markov chain within 0.1 nat of the chain's entropy rate, the lowest loss any model can reach."""
    from corolla.training.config import DataConfig
    from corolla.training.data import MarkovSource

    model = str(zoo_checkpoint("llama"))
    floor = MarkovSource(vocab_size=16, seed=0).entropy_rate()
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for stage in range(2):
            swarm.start_stage_peer(
                f"s{stage}", stage_args("markov", 2, "--stage", str(stage), "--lr", "3e-3", target=16)
            )
        swarm.wait_until_stages("markov", 2, peers=["s0", "s1"])
        data = DataConfig(micro_batch_size=8, seq_len=32, markov_vocab_size=16, markov_seed=0)
        config = trainer_config(model, swarm, "markov", 2, data=data, steps=320, samples_per_step=16, max_in_flight=4)
        reports = Trainer(config).train()
    assert sum(r.failed_microbatches for r in reports) == 0
    final = sum(r.loss for r in reports[-20:]) / 20
    assert reports[0].loss > floor + 3
    assert final < floor + 0.1, f"loss {final:.3f} vs floor {floor:.3f}"


def test_two_trainers_share_the_swarm_and_each_micro_batch_is_accumulated_once(tmp_path):
    """Two trainers (different data) push micro-batches through the same stage peers at the same time: both finish,
    and every stage accumulated exactly the samples both sent (its epochs x target + what it holds)."""
    import threading

    from corolla.training.config import DataConfig

    model = str(zoo_checkpoint("llama"))
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for stage in range(2):
            swarm.start_stage_peer(f"s{stage}", stage_args("shared", 2, "--stage", str(stage), target=8))
        swarm.wait_until_stages("shared", 2, peers=["s0", "s1"])
        results = {}

        def train(seed: int) -> None:
            data = DataConfig(micro_batch_size=2, seq_len=16, data_seed=seed)
            config = trainer_config(model, swarm, "shared", 2, data=data, steps=5, samples_per_step=8, seed=seed)
            results[seed] = Trainer(config).train()

        threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        statuses = _statuses(swarm, ["s0", "s1"])
    sent = sum(r.samples for reports in results.values() for r in reports)
    assert set(results) == {1, 2} and sent == 2 * 5 * 8
    assert all(r.failed_microbatches == 0 for reports in results.values() for r in reports)
    for status in statuses.values():
        assert status.epoch * 8 + status.samples_accumulated == sent
