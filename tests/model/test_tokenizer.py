"""The real Yuan tokenizer (loaded as the official scripts do) and the demo byte tokenizer."""

from __future__ import annotations

import json

import pytest

from gateway.tokenizer import ByteTokenizer, YuanTokenizer
from model.config import preset


@pytest.fixture(scope="module")
def yuan(tokenizer_dir):
    return YuanTokenizer(tokenizer_dir / "tokenizer.model")


def test_matches_the_official_hf_loading(yuan, tokenizer_dir):
    check = json.loads((tokenizer_dir / "tokenizer_check.json").read_text())
    for sample in check["llama_tokenizer"]:
        assert yuan.encode(sample["text"]) == sample["ids"], sample["text"]
    for token, tid in check["llama_tokenizer_ids"].items():
        assert yuan.encode(token) == [tid], token
    assert yuan.vocab_size == check["llama_tokenizer_len_after_add_tokens"]
    assert yuan.eod_id == 77185


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you today?",
        "你好，世界！今天天气怎么样？",
        "line one\nline two\n\nthree",
        "mixed 中文 and English\n换行",
    ],
)
def test_round_trips_text(yuan, text):
    ids = yuan.encode(text)
    assert yuan.decode(ids) == text
    if "\n" in text:
        assert 13 in ids, "a newline is the byte piece <0x0A> (id 13)"


def test_special_tokens_are_single_ids_and_skippable(yuan):
    ids = yuan.encode("question<sep>answer<eod>")
    assert 77187 in ids and ids[-1] == 77185
    assert yuan.decode(ids, skip_special=True) == "questionanswer"


def test_byte_tokenizer_round_trips_and_knows_eod():
    tok = ByteTokenizer(preset("tiny"))
    text = "héllo\n世界<eod>"
    ids = tok.encode(text)
    assert ids[-1] == preset("tiny").eod_token_id and max(ids[:-1]) < 256
    assert tok.decode(ids) == text
