"""Chat messages to a prompt: the Yuan 2.0 chat template, or the checkpoint's own.

The default is FastChat's `yuan2` conversation template (`fastchat/conversation.py`, reproduced in the
official Yuan 2.0 repository's `docs/Yuan2_fastchat.md`, which names its source as the
`chat_template` of IEITYuan/Yuan2-2B-Janus-hf's `tokenizer_config.json`; gathered in
`../shared/NOTES-yuan-chat.md`): the system message, if any, then "\\n"; then every other message in
order, each followed by `<n>`; the last `<n>` removed and `<sep>` appended. The model answers after
`<sep>` and ends its answer with `<eod>`. One deliberate difference: FastChat removes the last `<n>`
with `str.rstrip("<n>")`, which also strips any trailing "<", "n" and ">" of the last message ("Yuan"
would lose its "n"); this removes exactly one `<n>`.

A checkpoint whose `tokenizer_config.json` has a `chat_template` is rendered with it instead, in
Jinja's immutable sandbox, as Hugging Face's `apply_chat_template` does (`messages`,
`add_generation_prompt=True`, and the tokenizer's special tokens as variables).
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
YUAN2_SOURCE = "FastChat yuan2 (fastchat/conversation.py; Yuan 2.0 docs/Yuan2_fastchat.md)"


def message_text(message: dict, index: int) -> tuple[str, str]:
    """(role, text) of one OpenAI-style message; `content` may be a string or a list of text parts."""
    if not isinstance(message, dict):
        raise InvalidRequest("messages", f"[{index}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise InvalidRequest("messages", f"[{index}].role must be one of {list(ROLES)}, got {role!r}")
    if isinstance(content, list):
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise InvalidRequest("messages", f"[{index}].content parts must be text parts")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequest("messages", f"[{index}].content must be a string")
    return role, content


def render_yuan2(messages: list[dict]) -> str:
    """The prompt FastChat's yuan2 template gives (with exactly one trailing `<n>` removed)."""
    pairs = [message_text(m, i) for i, m in enumerate(messages)]
    if not pairs:
        raise InvalidRequest("messages", "must not be empty")
    if any(role == "system" for role, _ in pairs[1:]):
        raise InvalidRequest("messages", "a system message may only come first")
    text = ""
    if pairs[0][0] == "system":
        text, pairs = (pairs[0][1] + "\n" if pairs[0][1] else ""), pairs[1:]
    for _, content in pairs:
        if content:
            text += content + "<n>"
    if text.endswith("<n>"):
        text = text[: -len("<n>")]
    return text + "<sep>"


class ChatTemplate:
    """Renders messages to prompt text: the checkpoint's Jinja template if it has one, else Yuan 2's."""

    def __init__(self, jinja_source: str | None = None, variables: dict | None = None) -> None:
        self.source = "checkpoint chat_template" if jinja_source else YUAN2_SOURCE
        self._template = None
        if jinja_source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(jinja_source)
        self.variables = variables or {}

    def render(self, messages: list[dict]) -> str:
        if not isinstance(messages, list):
            raise InvalidRequest("messages", "must be a list of messages")
        if self._template is None:
            return render_yuan2(messages)
        checked = [dict(zip(("role", "content"), message_text(m, i))) for i, m in enumerate(messages)]
        if not checked:
            raise InvalidRequest("messages", "must not be empty")
        try:
            return self._template.render(messages=checked, add_generation_prompt=True, **self.variables)
        except Exception as e:  # a template that fails on this input is the request's problem to hear
            raise InvalidRequest("messages", f"the checkpoint's chat template failed: {e}") from e


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The checkpoint's `chat_template` (tokenizer_config.json) if it has one, else Yuan 2's."""
    path = Path(model_dir) / "tokenizer_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        if isinstance(config.get("chat_template"), str):
            tokens = {
                k: v if isinstance(v, str) else (v or {}).get("content", "")
                for k, v in config.items()
                if k.endswith("_token")
            }
            return ChatTemplate(config["chat_template"], tokens)
    return ChatTemplate()
