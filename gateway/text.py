"""Incremental detokenization with stop strings, for streaming text deltas.

Each new token re-decodes the generated ids (cheap at these lengths) and emits the text added
since the last delta. Text that could still be the start of a stop string, or that ends in an
unfinished multi-byte character, is held back until it is decided, so a client never sees a stop
string or a replacement character that a later token would have completed.
"""

from __future__ import annotations

from gateway.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly decided text. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.stopped = True
                text = text[:at]
                break
        end = len(text) if self.stopped else self._safe_end(text)
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """The held-back text, once generation has ended without a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special=True)
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stop:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
        return end
