"""Streamed text: the deltas, joined, are exactly the decoded text; stop strings never leak."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from worker.model.detokenizer import TextStream, Vocabulary

TOKENIZER = Path(__file__).parents[2] / "data" / "phi3v-reference" / "model" / "tokenizer.json"


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary(Tokenizer.from_file(str(TOKENIZER)))


def stream_all(vocab: Vocabulary, ids: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    stream = TextStream(vocab, stop)
    deltas = [stream.push(token_id) for token_id in ids]
    deltas.append(stream.finish())
    return [d for d in deltas if d]


def _vocab_for_strategies() -> Vocabulary:
    return Vocabulary(Tokenizer.from_file(str(TOKENIZER)))


_V = _vocab_for_strategies()
# Ids that stress the decoder: byte-fallback ids (valid and broken UTF-8), special ids,
# the bare "▁" piece, and ordinary words.
_TRICKY = sorted(_V.byte_ids)[:256] + sorted(_V.special_ids) + [29871, 29874, 2, 0]
token_ids = st.lists(
    st.one_of(st.sampled_from(_TRICKY), st.integers(3, 31999)), min_size=0, max_size=60
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(token_ids)
def test_joined_deltas_equal_the_full_decode(ids: list[int]) -> None:
    assert "".join(stream_all(_V, ids)) == _V.decode(ids)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(token_ids, st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4))
def test_text_ends_before_the_first_stop_string(ids: list[int], stop: list[str]) -> None:
    full = _V.decode(ids)
    cuts = [full.find(s) for s in stop if full.find(s) >= 0]
    expected = full[: min(cuts)] if cuts else full
    assert "".join(stream_all(_V, ids, tuple(stop))) == expected


def test_multibyte_characters_arrive_whole(vocab: Vocabulary) -> None:
    ids = vocab.tokenizer.encode("prix 10 € 😀 fin", add_special_tokens=False).ids
    deltas = stream_all(vocab, ids)
    assert "".join(deltas) == "prix 10 € 😀 fin"
    assert all("\ufffd" not in d for d in deltas)
    assert any("😀" in d for d in deltas)


def test_a_stop_string_split_over_tokens_is_never_shown(vocab: Vocabulary) -> None:
    ids = vocab.tokenizer.encode("one two THE END three", add_special_tokens=False).ids
    stream = TextStream(vocab, ["THE END"])
    shown = ""
    for token_id in ids:
        shown += stream.push(token_id)
        assert "THE" not in shown
    shown += stream.finish()
    assert shown == "one two "
    assert stream.stop_string == "THE END"


def test_special_ids_give_no_text(vocab: Vocabulary) -> None:
    assert stream_all(vocab, [32007, 32000, 1]) == []
