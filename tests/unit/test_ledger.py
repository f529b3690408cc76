"""A stage peer accumulates each micro-batch at most once per averaging round (training/ledger.py)."""

from __future__ import annotations

import pytest

from corolla.training.ledger import DuplicateMicrobatch, MicrobatchLedger


def test_a_retried_or_duplicated_backward_is_refused_once_accumulated():
    ledger = MicrobatchLedger()
    ledger.begin("t1:7")
    with pytest.raises(DuplicateMicrobatch, match="t1:7"):
        ledger.begin("t1:7")  # the same call arriving twice while it runs
    ledger.commit("t1:7", samples=4)
    with pytest.raises(DuplicateMicrobatch):
        ledger.begin("t1:7")  # a late retry
    assert ledger.samples == 4 and ledger.accumulated == {"t1:7"}


def test_a_failed_computation_frees_its_id_for_the_retry():
    ledger = MicrobatchLedger()
    ledger.begin("m")
    ledger.abort("m")
    ledger.begin("m")
    ledger.commit("m", 2)
    assert ledger.samples == 2


def test_a_new_round_admits_ids_again_but_not_while_calls_run():
    ledger = MicrobatchLedger()
    ledger.begin("a")
    ledger.commit("a", 1)
    ledger.begin("b")
    with pytest.raises(RuntimeError, match="still running"):
        ledger.new_round()
    ledger.commit("b", 1)
    ledger.new_round()
    assert (ledger.round, ledger.samples, ledger.accumulated) == (1, 0, frozenset())
    ledger.begin("a")
    with pytest.raises(ValueError):
        ledger.begin("")
