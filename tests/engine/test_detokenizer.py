"""Incremental detokenization never splits a UTF-8 character and adds up to the full text."""

from __future__ import annotations

import pytest

from sglbatch.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop_string


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.mark.parametrize("text", [
    " héllo wörld", " 😀🎉 emoji run", " 世界你好，数学很有趣", " mixed: naïve café 😀 and 世界!"])
def test_token_by_token_deltas_are_valid_and_complete(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > 3
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Say:"),
                                   skip_special_tokens=True)
    deltas = [detok.append([t]) for t in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
    # Byte-level BPE splits these characters across tokens, so some steps must hold back.
    if any(ord(c) > 0xFFFF for c in text):
        assert "" in deltas


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hi") + [tokenizer.eos_token_id]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert skip.append(ids) + skip.flush() == "Hi"
    assert keep.append(ids) + keep.flush() == "Hi" + tokenizer.hf.eos_token


def test_find_stop_string_searches_only_new_text():
    assert find_stop_string("abc STOP def", ["STOP"], new_chars=8) == (4, "STOP")
    # The stop string ended before the new characters: already checked in an earlier step.
    assert find_stop_string("abc STOP def", ["STOP"], new_chars=2) is None
    # Spanning old and new text counts; the earliest of several wins.
    assert find_stop_string("xxSTxOP", ["ST", "OP"], new_chars=1) == (5, "OP")
    assert find_stop_string("a\n\nb", ["\n\n", "b"], new_chars=3) == (1, "\n\n")
