"""Tokens -> streamed text (``corolla.api.text_stream``): stop sequences across tokens, held-back prefixes,
characters split across tokens."""

from __future__ import annotations

from corolla.api.text_stream import TextAssembler

PIECES = ["Hel", "lo", " wor", "ld", ".", " Bye", "!"]


def decode(tokens):
    return "".join(PIECES[t] for t in tokens)


def stream(assembler, tokens):
    return [assembler.add(t) for t in tokens]


def test_without_stops_text_is_sent_as_it_comes():
    text = TextAssembler(decode)
    assert stream(text, range(7)) == PIECES
    assert text.finish() == "" and not text.stopped


def test_a_stop_sequence_split_over_tokens_is_never_sent():
    text = TextAssembler(decode, stop=["world"])
    pieces = stream(text, range(4))
    assert "".join(pieces) == "Hello " and text.stopped
    assert pieces[2] == "" or "w" not in pieces[2]  # " wor" could begin "world": held back
    assert text.add(4) == "" and text.finish() == ""


def test_a_held_back_prefix_is_released_when_it_turns_out_not_to_stop():
    text = TextAssembler(decode, stop=["lol"])
    assert text.add(0) == "He"  # "l" may begin "lol"
    assert text.add(1) == "l"  # "Hello": "lo" may begin it
    assert text.add(2) == "lo wor"
    assert text.finish() == ""


def test_the_earliest_of_several_stops_wins():
    text = TextAssembler(decode, stop=["!", "."])
    assert "".join(stream(text, range(7))) == "Hello world"
    assert text.text == "Hello world"


def test_a_character_split_across_tokens_waits_for_its_bytes():
    data = [b"caf", b"\xc3", b"\xa9!"]

    def utf8(tokens):
        return b"".join(data[t] for t in tokens).decode("utf-8", errors="replace")

    text = TextAssembler(utf8)
    assert stream(text, range(3)) == ["caf", "", "\u00e9!"]
