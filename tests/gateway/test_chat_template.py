"""The Yuan 2.0 chat template against the official one, with the real tokenizer."""

from __future__ import annotations

import json

import pytest

from gateway.chat import ChatTemplate, load_chat_template, render_yuan2
from gateway.errors import InvalidRequest
from gateway.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are Yuan."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
# Written by hand from FastChat's yuan2 template (fastchat/conversation.py, SeparatorStyle.YUAN2;
# the official repository's docs/Yuan2_fastchat.md): system + sep2 "\n", each message + "<n>", the
# last "<n>" removed, sep "<sep>" appended.
EXPECTED_TEXT = "You are Yuan.\nHi<n>Hello!<n>What is 2+2?<sep>"
# That text through the real Yuan tokenizer, piece by piece (the model's own vocabulary):
EXPECTED_IDS = [
    887, 526, 29871, 83590, 29889,  # ▁You ▁are ▁ Yuan .
    13,  # <0x0A>: the newline after the system message (sep2)
    18567, 29966, 29876, 29958,  # Hi < n >
    10994, 29991, 29966, 29876, 29958,  # Hello ! < n >
    5618, 338, 29871, 29906, 29974, 29906, 29973,  # What ▁is ▁ 2 + 2 ?
    77187,  # <sep>: the model answers after it
]  # fmt: skip


def test_system_and_two_turns_render_to_the_official_ids(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir, None)
    assert render_yuan2(CONVERSATION) == EXPECTED_TEXT
    assert tokenizer.encode(render_yuan2(CONVERSATION)) == EXPECTED_IDS


def test_exactly_one_trailing_n_is_removed_not_letters():
    """FastChat's rstrip("<n>") would turn "Yuan" into "Yua"; exactly one "<n>" goes."""
    assert render_yuan2([{"role": "user", "content": "Call me Yuan"}]) == "Call me Yuan<sep>"
    assert render_yuan2([{"role": "user", "content": [{"type": "text", "text": "a"}]}]) == "a<sep>"


@pytest.mark.parametrize("messages, says", [
    ([], "must not be empty"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system"),
    ("not a list", "list"),
])  # fmt: skip
def test_bad_messages_name_the_field(messages, says):
    with pytest.raises(InvalidRequest) as err:
        ChatTemplate().render(messages)
    assert err.value.field == "messages" and says in err.value.message


def test_a_checkpoint_chat_template_is_used_in_a_sandbox(tmp_path):
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<eod>"})
    )
    chat = load_chat_template(tmp_path)
    assert chat.render(CONVERSATION[1:3]) == "[user]Hi[assistant]Hello!<eod>"
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": evil}))
    with pytest.raises(InvalidRequest, match="chat template failed"):
        load_chat_template(tmp_path).render(CONVERSATION[1:2])
    assert load_chat_template(tmp_path / "none").source.startswith("FastChat yuan2")
