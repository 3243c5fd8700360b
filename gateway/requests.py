"""One generation request, front-end neutral: the checks every front end shares (gRPC and the
OpenAI-compatible HTTP API call the same `make_params`), and the request's stream of text deltas
(`deltas`), so both fronts stop at the same strings and say the same thing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.engine import EngineLimits
from gateway.sampling import SamplingParams
from gateway.service import Gateway, TokenEvent
from gateway.text import TextStream
from gateway.tokenizer import Tokenizer


class RequestFailed(RuntimeError):
    """An accepted request failed inside the engine (INTERNAL / HTTP 500); the others go on."""


def make_params(
    limits: EngineLimits,
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] = (),
    stop_token_ids: list[int] = (),
    ignore_eod: bool = False,
    logprobs: int | None = None,
) -> SamplingParams:
    """Sampling params from a request's fields, with the stop strings checked (the one thing the
    engine does not see); the engine checks the rest, request id and stop ids included
    (`Engine.validate`). Raises `InvalidRequest`."""
    limits.check_stop_strings(list(stop))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eod=ignore_eod,
        logprobs=logprobs,
    )


@dataclass
class Delta:
    """What one step added to a request: a token (None on a final message without one), the text it
    decided, and on the last delta why it finished."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "length" | "stop" | "eod" | "cancelled"
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    fault: bool = False
    first: TokenEvent | None = None  # on the last delta: the first and last events (for timings)
    last: TokenEvent | None = None


async def deltas(
    gateway: Gateway,
    tokenizer: Tokenizer,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    stop: list[str],
) -> AsyncIterator[Delta]:
    """Submit the request and yield its deltas; raises `InvalidRequest`/`QueueFull` before the first,
    `RequestFailed` if the engine fails it. Closing early cancels the request and frees its cache."""
    text = TextStream(tokenizer, stop)
    first = last = None
    stream = gateway.stream(request_id, prompt, params)
    try:
        async for event in stream:
            if event.error:
                raise RequestFailed(event.error)
            first, last = first or event, event
            token = event.token_id if event.token_id >= 0 else None
            piece = text.push(token) if token is not None else ""
            reason = "stop" if text.stopped else event.finish_reason
            if reason is not None and not text.stopped:
                piece += text.flush()
            yield Delta(
                event.index,
                token,
                piece,
                reason,
                event.logprob,
                event.top_logprobs,
                event.fault,
                first if reason else None,
                last if reason else None,
            )
            if reason is not None:
                return
    finally:
        await stream.aclose()  # cancels the request in the engine if it is still running
