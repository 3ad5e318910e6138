"""Incremental detokenization (UTF-8 safe) and stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from streaming_llm.engines.demo_model import build_tokenizer
from streaming_llm.engines.detokenize import REPLACEMENT, IncrementalDecoder, StopMatcher


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _stream(tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def test_multibyte_characters_are_never_split(byte_tokenizer) -> None:
    text = "日本語 🎉 ok"
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # characters really do span several tokens
    pieces = _stream(byte_tokenizer, ids)
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)
    shown = [p for p in pieces if p]
    assert shown[:3] == ["日", "本", "語"]
    # The emoji's four byte tokens give nothing until the last one.
    emoji_ids = byte_tokenizer("🎉", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(byte_tokenizer)
    assert [decoder.push(i) for i in emoji_ids] == ["", "", "", "🎉"]


def test_random_ids_concatenate_to_the_full_decode(byte_tokenizer) -> None:
    rng = random.Random(7)
    for _ in range(50):
        ids = [rng.randrange(len(byte_tokenizer)) for _ in range(rng.randrange(1, 40))]
        pieces = _stream(byte_tokenizer, ids)
        assert "".join(pieces) == byte_tokenizer.decode(ids, skip_special_tokens=True)
        # Only the final flush may end in a replacement character (bytes that never completed).
        assert all(not p.endswith(REPLACEMENT) for p in pieces[:-1])


def test_leading_space_of_sentencepiece_style_tokens_is_kept() -> None:
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = [1, 2, 3, 2]
    assert tokenizer.decode([2]) == "world"  # decoded alone, the space is dropped ...
    pieces = _stream(tokenizer, ids)
    assert pieces[:4] == ["Hello", " world", "!", " world"]  # ... in a stream it is not
    assert "".join(pieces) == tokenizer.decode(ids)


def test_special_tokens_are_skipped(byte_tokenizer) -> None:
    ids = byte_tokenizer("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert "".join(_stream(byte_tokenizer, ids)) == "hi"


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = [matcher.push(p) for p in pieces]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out, matcher.stopped


def test_stop_string_split_across_pieces() -> None:
    out, stopped = _feed(["</answer>"], ["The end", "</an", "swer> and more"])
    assert stopped
    assert out == ["The end", "", ""]


def test_text_that_only_looks_like_a_stop_start_is_released() -> None:
    out, stopped = _feed(["STOP"], ["a S", "T", "x", "y"])
    assert not stopped
    assert out == ["a ", "", "STx", "y", ""]
    out, stopped = _feed(["STOP"], ["ends with ST"])
    assert (out, stopped) == (["ends with ", "ST"], False)


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = _feed(["world", "lo w"], ["hello world"])
    assert stopped
    assert "".join(out) == "hel"


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher(None)
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""
