"""Next-token choice per sequence: greedy (temperature 0) batched, else temperature, top-k, top-p
and a per-request `torch.Generator`, so a seeded request draws the same numbers in any batch (its
tokens are the same wherever its logits are; see docs/ARCHITECTURE.md on batch invariance).

Every value validation accepts is numerically safe: a temperature below `GREEDY_BELOW` samples
greedily (dividing logits by 1e-40 overflows to inf, and softmax of inf is NaN), and sampling
shifts logits by their maximum before dividing, so no finite temperature overflows. A row that
still cannot be sampled (NaN logits, say) fails alone: `sample` returns a `SampleError` for it
and every other row gets its token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gateway.errors import InvalidRequest

GREEDY_BELOW = 1e-5  # temperatures in (0, GREEDY_BELOW) mean greedy: softmax at 1e-5 is one-hot already
SEED_LIMIT = 2**64  # seeds are uint64 in the API
MAX_LOGPROBS = 5  # as OpenAI's completions API


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: the server's default, clamped to what fits in the context
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eod: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self, vocab_size: int, max_tokens_limit: int, max_stop_token_ids: int) -> None:
        """Raise `InvalidRequest` naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > max_tokens_limit:
            raise InvalidRequest("max_tokens", f"{self.max_tokens} exceeds the limit {max_tokens_limit}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (0 <= self.seed < SEED_LIMIT):
            raise InvalidRequest("seed", f"must be in [0, 2^64), got {self.seed!r}")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequest(
                "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if len(self.stop_token_ids) > max_stop_token_ids:
            raise InvalidRequest(
                "stop_token_ids", f"at most {max_stop_token_ids} ids, got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequest("stop_token_ids", f"id {t} is outside the vocabulary [0, {vocab_size})")

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        if self.seed is None:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**32, ()).item()))
        # torch's CPU generator (mt19937) keeps only a seed's low 32 bits; fold the high half in, so
        # seeds that differ above bit 31 differ here too (seeds below 2^32 are used as they are).
        return torch.Generator().manual_seed((self.seed ^ (self.seed >> 32)) & 0xFFFFFFFF)


class SampleError(RuntimeError):
    """One row could not be sampled; its request fails alone."""


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | SampleError]:
    """logits `[B, V]` -> one token id per row, or a `SampleError` for a row that failed.

    The greedy argmax runs where the logits are (on a GPU only the B ids come back); rows that
    sample come to the host, since each request's generator is a CPU one."""
    out: list[int | SampleError] = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    host = logits[rows].float().cpu() if rows else None  # the rows that sample, on the host
    for j, i in enumerate(rows):
        try:
            out[i] = _sample_row(host[j], params[i], generators[i])
        except (RuntimeError, ValueError) as e:
            out[i] = SampleError(f"sampling failed: {e}")
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    # Shift by the max first: every value is <= 0, so dividing by any temperature >= GREEDY_BELOW
    # gives no +inf, and the max stays 0 (softmax has at least one finite entry).
    logits = (logits - logits.max()) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    if not bool(torch.isfinite(probs).all()):
        raise SampleError("logits are not finite")
    return int(torch.multinomial(probs, 1, generator=gen).item())
